"""AdamW with decoupled weight decay on matrices only, and a warm-up + cosine learning rate."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW; biases, norms and other 1-D parameters are not decayed (GPT-2 / Megatron practice)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine decay to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(max_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (the schedule is stateless: resume needs only the step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, pipeline_group: Any = None,
                   counted_elsewhere: tuple[torch.Tensor, ...] = ()) -> float:
    """Scale gradients so their global L2 norm is at most max_norm (0: no clipping); returns the norm before.

    Works for any layout: the norms of sharded (DTensor) gradients are reduced over
    their mesh, one group of parameters per mesh, and pipeline stages add theirs up.
    `counted_elsewhere`: copies of a parameter another stage also holds (a tied embedding).
    """
    grads = [p.grad for p in params if p.grad is not None]
    skip = {id(p) for p in counted_elsewhere}
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None and id(p) not in skip:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    squares = torch.zeros((), dtype=torch.float64)
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        squares += norm.double().cpu() ** 2
    if pipeline_group is not None:
        import torch.distributed as dist

        dist.all_reduce(squares, group=pipeline_group)
    total = float(squares.sqrt())
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(scale)
    return total
