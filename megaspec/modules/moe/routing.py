"""Routing math as plain functions: top-k selection, capacity dropping, auxiliary losses.

Shapes: t tokens, E experts, k experts per token. Every function keeps static
shapes (no boolean indexing), so a router built from them traces under torch.compile.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def group_limited_topk(scores: Tensor, k: int, num_groups: int, group_topk: int,
                       group_score_topk: int | None = None) -> Tensor:
    """Indices [t, k] of the top-k scores among the best `group_topk` of `num_groups` expert groups.

    A group's score is the sum of its best `group_score_topk` experts: by default k / group_topk
    (Megatron-Core); DeepSeek-V3 sums its best 2, DeepSeek-V2 takes its best 1.
    """
    t, num_experts = scores.shape
    grouped = scores.view(t, num_groups, num_experts // num_groups)  # [t, g, E/g]
    per_group = group_score_topk or k // group_topk
    group_scores = grouped.topk(per_group, dim=-1).values.sum(dim=-1)  # [t, g]
    best = group_scores.topk(group_topk, dim=-1).indices  # [t, group_topk]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, best, True)  # [t, g]
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(t, num_experts)  # [t, E]
    return scores.masked_fill(~expert_mask, float("-inf")).topk(k, dim=-1).indices


def select_topk(scores: Tensor, k: int, num_groups: int | None, group_topk: int | None,
                group_score_topk: int | None = None) -> Tensor:
    """Indices [t, k] of the experts chosen from `scores` [t, E], group-limited when configured."""
    if num_groups is None or group_topk is None:
        return scores.topk(k, dim=-1).indices
    return group_limited_topk(scores, k, num_groups, group_topk, group_score_topk)


def drop_over_capacity(
    probs: Tensor, indices: Tensor, num_experts: int, capacity_factor: float, policy: str = "probs"
) -> tuple[Tensor, Tensor]:
    """Keep at most ceil(t * k / E * capacity_factor) tokens per expert; dropped ones get probability 0
    and expert index E (one past the last expert), so they reach no expert."""
    t, k = indices.shape
    capacity = min(t, math.ceil(t * k / num_experts * capacity_factor))
    assigned = torch.zeros(t, num_experts, dtype=torch.bool, device=indices.device).scatter(1, indices, True)
    if policy == "probs":  # an expert keeps the tokens that want it most
        priority = torch.zeros(t, num_experts, dtype=probs.dtype, device=probs.device).scatter(1, indices, probs)
    else:  # "position": an expert keeps the earliest tokens
        priority = -torch.arange(t, dtype=probs.dtype, device=probs.device).unsqueeze(1).expand(t, num_experts)
    priority = priority.masked_fill(~assigned, float("-inf"))
    winners = priority.topk(capacity, dim=0).indices  # [capacity, E]: token ids each expert keeps
    kept = torch.zeros_like(assigned).scatter(0, winners, True) & assigned  # [t, E]
    keep = kept.gather(1, indices)  # [t, k]
    return probs.masked_fill(~keep, 0.0), indices.masked_fill(~keep, num_experts)


def count_tokens(indices: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert [E + 1]; the last entry counts the dropped ones (index E)."""
    flat = indices.flatten()
    return torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


def load_balancing_loss(scores: Tensor, indices: Tensor, num_experts: int) -> Tensor:
    """Switch-Transformer loss E * sum_i f_i * P_i, as Megatron-Core computes it (without the coefficient).

    f_i: share of the t * k assignments that went to expert i (before any dropping);
    P_i: mean routing score of expert i over tokens, scores [t, E] summing to 1 per token.
    Equals 1 when routing is perfectly uniform.
    """
    t, k = indices.shape
    counts = count_tokens(indices, num_experts)[:num_experts].to(scores.dtype)  # [E]
    return num_experts * (counts * scores.sum(dim=0)).sum() / (t * t * k)


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, keeps logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def aux_loss_scores(logits: Tensor, score_function: str) -> Tensor:
    """Per-token expert scores [t, E] summing to 1, which the load-balancing loss averages."""
    if score_function == "softmax":
        return F.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits)
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
