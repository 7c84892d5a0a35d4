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
scale into its initialisation. Two config fields serve models whose scale and
scores are sizes (Gemma-2/3): `query_pre_attn_scalar` s makes the scale s^-0.5,
and `attn_logit_softcapping` c caps the scores at c * tanh(scores / c) before
masking. The fused kernels cannot cap scores, so `sdpa` computes capped
attention with explicit scores, as `eager` does.
"""

from collections.abc import Callable
from typing import ClassVar

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


def explicit_attention(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                       is_causal: bool, scale: float, softcap: float | None,
                       dropout: Callable[[Tensor], Tensor]) -> Tensor:
    """Attention with the scores written out and an fp32 softmax (the reference, and the soft-capped path).

    q [b, nh, sq, d], k and v [b, nh, sk, d] (groups already repeated); the mask as
    combined_mask leaves it, `is_causal` top-left aligned as sdpa's.
    """
    scores = query @ key.transpose(-2, -1) * scale  # [b, nh, sq, sk]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        sq, sk = scores.shape[-2:]
        causal = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    elif attention_mask is not None:  # additive: a position bias, masked entries very negative
        scores = scores + attention_mask
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return dropout(probs) @ value  # [b, nh, sq, d]


class _CoreAttention(nn.Module):
    """What both implementations read from the config: dropout, window, scale and score cap."""

    config_fields: ClassVar[dict] = {
        "query_pre_attn_scalar": (float | None, None),  # scale = query_pre_attn_scalar ** -0.5 (Gemma-2/3)
        "attn_logit_softcapping": (float | None, None),  # scores -> c * tanh(scores / c) (Gemma-2)
    }

    def __init__(self, config: TransformerConfig, *, softmax_scale: float | None = None) -> None:
        super().__init__()
        scalar = config.query_pre_attn_scalar
        if softmax_scale is not None and scalar is not None:
            raise ValueError(f"softmax_scale ({softmax_scale}) and config.query_pre_attn_scalar ({scalar}) both set "
                             "the attention scale; set one")
        if scalar is not None and scalar <= 0:
            raise ValueError(f"config.query_pre_attn_scalar must be positive, got {scalar}")
        if config.attn_logit_softcapping is not None and config.attn_logit_softcapping <= 0:
            raise ValueError(f"config.attn_logit_softcapping must be positive, got {config.attn_logit_softcapping}")
        self.softmax_scale = softmax_scale if scalar is None else scalar**-0.5  # None: 1/sqrt(d)
        self.softcap = config.attn_logit_softcapping
        self.window_size = config.window_size
        self.heads_per_group = config.num_attention_heads // config.query_groups

    def explicit(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 is_causal: bool, dropout: Callable[[Tensor], Tensor]) -> Tensor:
        """explicit_attention with this module's scale and cap, K/V heads repeated per group."""
        if self.heads_per_group > 1:
            key = key.repeat_interleave(self.heads_per_group, dim=1)  # [b, nh, sk, d]
            value = value.repeat_interleave(self.heads_per_group, dim=1)
        scale = query.size(-1) ** -0.5 if self.softmax_scale is None else self.softmax_scale
        return explicit_attention(query, key, value, attention_mask, is_causal, scale, self.softcap, dropout)

    def extra_repr(self) -> str:
        parts = [f"scale={self.softmax_scale}"] if self.softmax_scale is not None else []
        parts += [f"softcap={self.softcap}"] if self.softcap is not None else []
        parts += [f"window={self.window_size}"] if self.window_size is not None else []
        return ", ".join(parts)


@register("core_attention", "sdpa")
class SDPAttention(_CoreAttention):
    """PyTorch's fused scaled_dot_product_attention (flash / memory-efficient kernels)."""

    def __init__(self, config: TransformerConfig, *, softmax_scale: float | None = None) -> None:
        super().__init__(config, softmax_scale=softmax_scale)
        self.dropout = config.attention_dropout
        # Decided once: sdpa then reads the shared K/V heads in place rather than
        # materialising nh / ng copies of them.
        self.enable_gqa = self.heads_per_group > 1

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        attention_mask, is_causal = combined_mask(
            attention_mask, is_causal, self.window_size, query.size(-2), key.size(-2), query.device)
        if self.softcap is not None:  # no fused kernel caps scores
            return self.explicit(query, key, value, attention_mask, is_causal, self._dropout)
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

    def _dropout(self, probs: Tensor) -> Tensor:
        return F.dropout(probs, self.dropout, self.training)


@register("core_attention", "eager")
class EagerAttention(_CoreAttention):
    """The reference: explicit scores and an fp32 softmax. Slow; for checking and debugging."""

    def __init__(self, config: TransformerConfig, *, softmax_scale: float | None = None) -> None:
        super().__init__(config, softmax_scale=softmax_scale)
        self.dropout = nn.Dropout(config.attention_dropout)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        attention_mask, is_causal = combined_mask(
            attention_mask, is_causal, self.window_size, query.size(-2), key.size(-2), query.device)
        return self.explicit(query, key, value, attention_mask, is_causal, self.dropout)
