"""ALiBi (Press et al., 2022): no position embedding, a linear distance penalty on attention scores per head."""

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.registry import register


def alibi_slopes(num_heads: int, device: torch.device | None = None) -> Tensor:
    """One slope per head [nh]: 2^(-8/n), 2^(-16/n), ... for n the largest power of two <= nh.

    Heads beyond that power of two take every other slope of the next power (the
    paper's recipe for other head counts, as BLOOM's 112 heads use).
    """
    n = 2 ** math.floor(math.log2(num_heads))
    base = torch.full((), 2 ** (-(2 ** -(math.log2(n) - 3))), dtype=torch.float32, device=device)
    slopes = torch.pow(base, torch.arange(1, 1 + n, dtype=torch.int32, device=device))
    if n != num_heads:
        extra_base = torch.full((), 2 ** (-(2 ** -(math.log2(2 * n) - 3))), dtype=torch.float32, device=device)
        extra = torch.arange(1, 1 + 2 * min(n, num_heads - n), 2, dtype=torch.int32, device=device)
        slopes = torch.cat([slopes, torch.pow(extra_base, extra)])
    return slopes  # [nh]


@register("attention_bias", "alibi")
class ALiBi(nn.Module):
    """bias[h, q, k] = -slope_h * |q - k|, added to every layer's scores (BLOOM); `forward(sq, sk) -> [1, nh, sq, sk]`.

    It goes in a block's `attention_bias` slot. Queries are the last `sq` of the `sk`
    positions (as with a cache). A causal self-attention stays causal: the core folds
    causality into the bias. Within a causal row this equals BLOOM's slope * key
    position up to a constant, which softmax ignores.
    """

    # Tensor parallelism (megaspec.parallel.plans): every rank computes the whole bias and keeps its heads.
    tp_plan: ClassVar[dict[str, str]] = {"": "split_heads_output"}

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        # Not persistent: a pure function of the head count; init_weights recomputes it after a meta build.
        self.register_buffer("slopes", alibi_slopes(self.num_heads), persistent=False)

    def init_weights(self) -> None:
        """Recompute the slopes."""
        self.slopes.copy_(alibi_slopes(self.num_heads, self.slopes.device))

    def forward(self, query_length: int, key_length: int) -> Tensor:
        device = self.slopes.device
        query_position = torch.arange(key_length - query_length, key_length, device=device)[:, None]  # [sq, 1]
        key_position = torch.arange(key_length, device=device)[None, :]  # [1, sk]
        distance = (query_position - key_position).abs()  # [sq, sk]
        return -(self.slopes[:, None, None] * distance).unsqueeze(0)  # [1, nh, sq, sk]

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}"
