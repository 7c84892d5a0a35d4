"""Core attention: softmax(q k^T / sqrt(d)) v, given already projected heads.

Both implementations share one interface:
`forward(query [b, nh, sq, d], key [b, ng, sk, d], value [b, ng, sk, d],
attention_mask, is_causal) -> [b, nh, sq, d]`, where `attention_mask` is a
boolean mask broadcastable to [b, nh, sq, sk] (True = attend) or None, and
query head i reads key/value head i // (nh / ng) (GQA groups are contiguous).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.registry import register


@register("core_attention", "sdpa")
class SDPAttention(nn.Module):
    """PyTorch's fused scaled_dot_product_attention (flash / memory-efficient kernels)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.dropout = config.attention_dropout
        # Decided once: sdpa then reads the shared K/V heads in place rather than
        # materialising nh / ng copies of them.
        self.enable_gqa = config.query_groups != config.num_attention_heads

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=self.enable_gqa,
        )  # [b, nh, sq, d]


@register("core_attention", "eager")
class EagerAttention(nn.Module):
    """The reference: explicit scores and an fp32 softmax. Slow; for checking and debugging."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(config.attention_dropout)
        self.heads_per_group = config.num_attention_heads // config.query_groups

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        if self.heads_per_group > 1:
            key = key.repeat_interleave(self.heads_per_group, dim=1)  # [b, nh, sk, d]
            value = value.repeat_interleave(self.heads_per_group, dim=1)
        scores = query @ key.transpose(-2, -1) * query.size(-1) ** -0.5  # [b, nh, sq, sk]
        if is_causal:
            # Top-left aligned, as sdpa's is_causal: query i sees keys 0..i.
            sq, sk = scores.shape[-2:]
            causal = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        return self.dropout(probs) @ value  # [b, nh, sq, d]
