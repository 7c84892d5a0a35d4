"""Held-out evaluation: the language-model loss over fixed held-out windows, and its perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from megaspec.train.data import EvalWindows, SyntheticData, micro_batches


def lm_loss(output: Any) -> Tensor:
    """The next-token loss alone: auxiliary (MoE balancing) losses are part of training, not of evaluation."""
    aux = getattr(output, "aux_loss", None)
    return output.loss if aux is None else output.loss - aux


def perplexity(loss: float) -> float:
    """exp(loss), the perplexity of a mean next-token cross-entropy in nats."""
    return math.exp(loss) if loss < 700 else math.inf


@torch.no_grad()
def held_out_loss(model: nn.Module, data: EvalWindows | SyntheticData, num_batches: int, global_batch_size: int,
                  micro_batch_size: int, rank: int, world_size: int, device: torch.device,
                  autocast_dtype: torch.dtype | None = None,
                  reduce: Callable[[Tensor], Tensor] = lambda t: t) -> float:
    """Mean loss over `num_batches` held-out batches, dropout off; every process evaluates its slice."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros(()), 0
    try:
        for index in range(num_batches):
            for tokens in micro_batches(data, index, global_batch_size, micro_batch_size, rank, world_size):
                tokens = tokens.to(device)  # [micro, s]
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    total += lm_loss(model(input_ids=tokens, labels=tokens)).float().cpu()
                count += 1
    finally:
        model.train(was_training)
    # Every micro-batch holds as many tokens as every other: the mean of means is the token mean.
    return float(reduce(total / max(count, 1)))
