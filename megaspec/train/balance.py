"""Aux-loss-free expert balancing (DeepSeek-V3): nudge each router's expert bias after a step.

A router with `moe_router_enable_expert_bias` selects experts with a bias that is not
learned by gradients: after each optimizer step, under-loaded experts' biases rise and
over-loaded ones fall (`TopKRouter.update_expert_bias`). This counts the assignments of
every micro-batch since the last step and makes that call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


class ExpertBiasUpdater:
    """Counts tokens per expert over a step's micro-batches, then updates the router biases."""

    def __init__(self, model: nn.Module, group: Any = None) -> None:
        self.group = group
        # MoE layers expose tokens_per_expert after each forward; their router holds the bias.
        self.layers = [m for m in model.modules()
                       if hasattr(m, "tokens_per_expert") and getattr(getattr(m, "router", None), "expert_bias", None)
                       is not None]
        self.counts: dict[int, Tensor] = {}
        for layer in self.layers:
            layer.register_forward_hook(self._count)

    def _count(self, layer: nn.Module, args: Any, output: Any) -> None:
        counts = layer.tokens_per_expert  # [E], this forward's assignments per expert
        key = id(layer)
        self.counts[key] = counts if key not in self.counts else self.counts[key] + counts

    def step(self) -> None:
        """Apply one balancing update from the counts since the last call, then reset them."""
        for layer in self.layers:
            counts = self.counts.pop(id(layer), None)
            if counts is None:  # this process ran no forward through it (another pipeline stage)
                continue
            counts = counts.to(torch.float32)
            if dist.is_initialized():
                # Every data-parallel rank saw other tokens: balance on the global load, so the
                # biases stay identical on all ranks. Uniform over-counting (TP) changes no sign.
                dist.all_reduce(counts, group=self.group)
            layer.router.update_expert_bias(counts)
