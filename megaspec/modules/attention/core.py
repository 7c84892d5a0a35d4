"""Core attention: softmax(q k^T / sqrt(d)) v, given already projected heads.

Both implementations share one interface:
`forward(query [b, nh, sq, d], key [b, ng, sk, d], value [b, ng, sk, d],
attention_mask, is_causal) -> [b, nh, sq, d]`, where `attention_mask` is a
boolean mask broadcastable to [b, nh, sq, sk] (True = attend), a float mask of
the query's dtype added to the scores (a position bias with -inf or a large
negative value where masked, as T5's), or None; `is_causal` asks for causality
on top of any mask; and query head i reads key/value head i // (nh / ng) (GQA
groups are contiguous).
`softmax_scale` (a param) replaces 1/sqrt(d): T5 uses 1.0, having folded the
scale into its initialisation.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.registry import register


def combined_mask(attention_mask: Tensor | None, is_causal: bool, window: tuple[int, int] | None,
                  sq: int, sk: int, device: torch.device) -> tuple[Tensor | None, bool]:
    """(mask, is_causal) for the kernel: causality and a sliding window folded into `attention_mask`.

    Only with no mask, no window and as many queries as keys does causality stay a flag
    (the kernels' fast path, top-left aligned). Otherwise it is part of the mask, aligned
    bottom-right: the queries are the last `sq` of the `sk` positions, so a causal
    attention stays causal whatever mask or bias it is given.
    """
    if sq == 1:
        is_causal = False  # the one query is the last position: causality hides nothing (decode steps)
    if window is None and (not is_causal or (attention_mask is None and sq == sk)):
        return attention_mask, is_causal
    q = torch.arange(sk - sq, sk, device=device)[:, None]  # [sq, 1]: absolute query positions
    k = torch.arange(sk, device=device)[None, :]  # [1, sk]
    band = torch.ones(sq, sk, dtype=torch.bool, device=device)  # [sq, sk], True = attend
    if window is not None:
        left, right = window
        if left >= 0:
            band = band & (k >= q - left)
        if right >= 0:
            band = band & (k <= q + right)
    if is_causal:
        band = band & (k <= q)
    if attention_mask is None:
        return band, False
    if attention_mask.dtype == torch.bool:
        return attention_mask & band, False
    return attention_mask.masked_fill(~band, float("-inf")), False  # additive: -inf outside the band


@register("core_attention", "sdpa")
class SDPAttention(nn.Module):
    """PyTorch's fused scaled_dot_product_attention (flash / memory-efficient kernels)."""

    def __init__(self, config: TransformerConfig, *, softmax_scale: float | None = None) -> None:
        super().__init__()
        self.dropout = config.attention_dropout
        self.softmax_scale = softmax_scale  # None: sdpa's own 1/sqrt(d)
        self.window_size = config.window_size
        # Decided once: sdpa then reads the shared K/V heads in place rather than
        # materialising nh / ng copies of them.
        self.enable_gqa = config.query_groups != config.num_attention_heads

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        attention_mask, is_causal = combined_mask(
            attention_mask, is_causal, self.window_size, query.size(-2), key.size(-2), query.device)
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=self.enable_gqa,
        )  # [b, nh, sq, d]


@register("core_attention", "eager")
class EagerAttention(nn.Module):
    """The reference: explicit scores and an fp32 softmax. Slow; for checking and debugging."""

    def __init__(self, config: TransformerConfig, *, softmax_scale: float | None = None) -> None:
        super().__init__()
        self.dropout = nn.Dropout(config.attention_dropout)
        self.heads_per_group = config.num_attention_heads // config.query_groups
        self.softmax_scale = softmax_scale
        self.window_size = config.window_size

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        attention_mask, is_causal = combined_mask(
            attention_mask, is_causal, self.window_size, query.size(-2), key.size(-2), query.device)
        if self.heads_per_group > 1:
            key = key.repeat_interleave(self.heads_per_group, dim=1)  # [b, nh, sk, d]
            value = value.repeat_interleave(self.heads_per_group, dim=1)
        scale = query.size(-1) ** -0.5 if self.softmax_scale is None else self.softmax_scale
        scores = query @ key.transpose(-2, -1) * scale  # [b, nh, sq, sk]
        if is_causal:
            # Top-left aligned, as sdpa's is_causal: query i sees keys 0..i.
            sq, sk = scores.shape[-2:]
            causal = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        elif attention_mask is not None:  # additive: a position bias, masked entries very negative
            scores = scores + attention_mask
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        return self.dropout(probs) @ value  # [b, nh, sq, d]
