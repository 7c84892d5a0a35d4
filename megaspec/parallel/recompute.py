"""Activation checkpointing per layer: recompute a layer's (or its core attention's) activations in backward."""

from __future__ import annotations

import re

from torch import nn
from torch.utils.checkpoint import checkpoint

from megaspec.parallel.config import ParallelConfig


def _checkpointed(module: nn.Module) -> None:
    """Make the module's forward save only its inputs; names and parameters are unchanged."""
    forward = module.forward

    def recomputed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = recomputed  # type: ignore[method-assign]


def apply_recompute(model: nn.Module, layers: list[nn.Module], cfg: ParallelConfig) -> int:
    """Checkpoint the configured layers (all when recompute_layers is None); returns how many modules."""
    if cfg.recompute_granularity is None:
        return 0
    index = {id(m): int(re.findall(r"(\d+)$", name)[-1]) if re.search(r"\d+$", name) else 0
             for name, m in model.named_modules()}
    chosen = None if cfg.recompute_layers is None else set(cfg.recompute_layers)
    count = 0
    for layer in layers:
        if chosen is not None and index.get(id(layer)) not in chosen:
            continue
        if cfg.recompute_granularity == "full":
            _checkpointed(layer)
            count += 1
            continue
        # Selective: only the attention kernels, whose activations (scores) grow with s^2.
        for attention in (getattr(layer, "self_attention", None), getattr(layer, "cross_attention", None)):
            core = getattr(attention, "core_attention", None)
            if core is not None:
                _checkpointed(core)
                count += 1
    return count
