"""T5's relative position bias: a learned scalar per head and distance bucket, added to attention scores.

Distances are bucketed (Raffel et al., 2020, after Mesh TensorFlow): the first
half of the buckets hold exact distances 0, 1, 2, ..., the second half cover
distances up to `relative_attention_max_distance` on a log scale, and the last
bucket holds everything further. A bidirectional bias (an encoder) spends half
of its buckets on keys after the query; a causal one (a decoder) only sees keys
at or before the query, and masks the rest.
"""

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.modules.utils import init_normal_, params_dtype
from megaspec.registry import register


def relative_position_buckets(
    relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """Map key - query distances (any int shape) to bucket ids in [0, num_buckets)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        # Keys after the query use the upper half of the buckets.
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # keys after the query share bucket 0 (masked anyway)
    max_exact = num_buckets // 2
    # Log-spaced buckets from max_exact up to max_distance; clamp(min=1) only keeps log
    # finite for the small distances, which take the exact branch below.
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    far = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    far = far.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, far)


@register("attention_bias", "relative_position_bias")
class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias: `forward(sq, sk) -> [1, nh, sq, sk]`, shared by a whole stack.

    It goes in a block's `attention_bias` slot, which computes it once and adds it
    to every layer's attention scores (T5 keeps the table in layer 0 and passes
    its output on). With `bidirectional: false` keys after the query get the most
    negative value, so the bias alone keeps a stack causal.
    """

    # Tensor parallelism (megaspec.parallel.plans): the table is tiny, so every rank computes
    # the whole bias and keeps the heads its attention holds.
    tp_plan: ClassVar[dict[str, str]] = {"": "split_heads_output"}

    def __init__(self, config: TransformerConfig, *, bidirectional: bool = True) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.num_heads = config.num_attention_heads
        self.init_std = config.init_method_std
        exact = (self.num_buckets // 2 if bidirectional else self.num_buckets) // 2  # exact-distance buckets
        if exact < 1:
            raise ValueError(
                f"relative_attention_num_buckets must be at least {4 if bidirectional else 2} for a "
                f"{'bidirectional' if bidirectional else 'causal'} bias, got {self.num_buckets}; T5 uses 32"
            )
        if self.max_distance <= exact:
            raise ValueError(
                f"relative_attention_max_distance ({self.max_distance}) must exceed the {exact} "
                f"exact-distance buckets; T5 uses 128"
            )
        self.weight = nn.Parameter(torch.empty(self.num_buckets, self.num_heads, dtype=params_dtype(config)))

    def init_weights(self) -> None:
        """Weight ~ N(0, init_method_std)."""
        init_normal_(self.weight, self.init_std)

    def forward(self, query_length: int, key_length: int) -> Tensor:
        device = self.weight.device
        query_position = torch.arange(query_length, device=device)[:, None]  # [sq, 1]
        key_position = torch.arange(key_length, device=device)[None, :]  # [1, sk]
        relative = key_position - query_position  # [sq, sk]: > 0 for keys after the query
        buckets = relative_position_buckets(relative, self.bidirectional, self.num_buckets, self.max_distance)
        bias = F.embedding(buckets, self.weight).permute(2, 0, 1).unsqueeze(0)  # [1, nh, sq, sk]
        if not self.bidirectional:
            bias = bias.masked_fill(relative > 0, torch.finfo(bias.dtype).min)
        return bias

    def extra_repr(self) -> str:
        return (
            f"buckets={self.num_buckets}, max_distance={self.max_distance}, heads={self.num_heads}, "
            f"bidirectional={self.bidirectional}"
        )
