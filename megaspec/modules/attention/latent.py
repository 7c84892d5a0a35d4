"""Multi-head Latent Attention (DeepSeek-V2/V3): keys and values from a low-rank latent, RoPE on a decoupled part.

Each token's keys and values are compressed into one latent of kv_lora_rank channels
plus one rotary key of rotary_dim channels shared by all heads; per-head keys and
values are expanded from the latent. The latent and the rotated key are all a cache
needs to hold (`compress_kv` makes them, `expand_kv` turns them into heads), as in
DeepSeek's own inference. Slot names are Megatron-Core's MLASelfAttention's.
"""

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import PositiveInt
from torch import Tensor, nn

from megaspec.cache import Cache, CacheUnsupported, KVCache, window_positions
from megaspec.config import TransformerConfig
from megaspec.kinds import Rotary
from megaspec.modules.position.rope_scaling import yarn_softmax_scale
from megaspec.modules.position.rotary import apply_rotary
from megaspec.registry import Slot, register

_LINEAR = ("in_features", "out_features", "bias")


@register("self_attention", "multi_latent_attention")
class MultiLatentAttention(nn.Module):
    """Self-attention whose keys and values come from a compressed latent (MLA).

    Per head, queries and keys are [nope (qk_head_dim) | rope (rotary_dim)] and values
    v_head_dim wide. The query is one projection (`linear_q_proj`) when q_lora_rank is
    null, else down-projected, normalised and up-projected (`linear_q_down_proj`,
    `q_layernorm`, `linear_q_up_proj`); a spec may fill both, so one spec serves models
    of either kind, and the config picks. Keys and values: `linear_kv_down_proj` makes
    [latent (kv_lora_rank) | rotary key], `kv_layernorm` normalises the latent and
    `linear_kv_up_proj` expands it to [k_nope | v] per head. The softmax scale is
    1/sqrt(qk_head_dim + rotary_dim), times YaRN's mscale(factor, mscale_all_dim)^2 as DeepSeek's.
    """

    # Megatron-Core's MLATransformerConfig names. The rotary part of each query/key head is
    # config.rotary_dim (kv_channels x rotary_percent), which the rotary embedding reads too.
    config_fields: ClassVar[dict] = {
        "q_lora_rank": (PositiveInt | None, None),  # None: a full-rank query projection
        "kv_lora_rank": (PositiveInt, 512),
        "qk_head_dim": (PositiveInt, 128),  # the part of each query/key head without position
        "v_head_dim": (PositiveInt, 128),
    }

    slots: ClassVar[dict[str, Slot]] = {
        "linear_q_proj": Slot("linear", required=False, provides=_LINEAR),
        "linear_q_down_proj": Slot("linear", required=False, provides=_LINEAR),
        "q_layernorm": Slot("norm", required=False, provides=("hidden_size",)),
        "linear_q_up_proj": Slot("linear", required=False, provides=_LINEAR),
        "linear_kv_down_proj": Slot("linear", provides=_LINEAR, default="linear"),
        "kv_layernorm": Slot("norm", provides=("hidden_size",)),
        "linear_kv_up_proj": Slot("linear", provides=_LINEAR, default="linear"),
        "core_attention": Slot("core_attention", provides=("softmax_scale",), default="sdpa"),
        "linear_proj": Slot("linear", provides=(*_LINEAR, "output_proj"), default="linear"),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        attn_mask_type: Literal["causal", "padding", "no_mask"] = "causal",
        linear_q_proj: Callable[..., nn.Module] | None = None,
        linear_q_down_proj: Callable[..., nn.Module] | None = None,
        q_layernorm: Callable[..., nn.Module] | None = None,
        linear_q_up_proj: Callable[..., nn.Module] | None = None,
        linear_kv_down_proj: Callable[..., nn.Module],
        kv_layernorm: Callable[..., nn.Module],
        linear_kv_up_proj: Callable[..., nn.Module],
        core_attention: Callable[..., nn.Module],
        linear_proj: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        if config.query_groups != self.num_heads:
            raise ValueError(f"multi_latent_attention expands keys and values for every head: num_query_groups "
                             f"({config.query_groups}) must be unset or equal num_attention_heads ({self.num_heads})")
        self.nope_dim = config.qk_head_dim
        self.rope_dim = config.rotary_dim
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.attn_mask_type = attn_mask_type
        self.causal = attn_mask_type == "causal"
        self.ignore_mask = attn_mask_type == "no_mask"
        self.cache_window = window_positions(config.window_size)  # what a generation cache must keep
        h, qk_dim = config.hidden_size, self.nope_dim + self.rope_dim
        # HF's attention_bias: the down projections and the output projection; the up projections have none.
        bias = config.add_bias_linear

        self.linear_q_proj = self.linear_q_down_proj = self.linear_q_up_proj = None
        self.q_layernorm = None
        if self.q_lora_rank is None:
            _require(linear_q_proj=linear_q_proj, why="config.q_lora_rank is null (a full-rank query)")
            self.linear_q_proj = linear_q_proj(in_features=h, out_features=self.num_heads * qk_dim, bias=False)
        else:
            why = f"config.q_lora_rank is {self.q_lora_rank} (a low-rank query)"
            _require(linear_q_down_proj=linear_q_down_proj, q_layernorm=q_layernorm,
                     linear_q_up_proj=linear_q_up_proj, why=why)
            self.linear_q_down_proj = linear_q_down_proj(in_features=h, out_features=self.q_lora_rank, bias=bias)
            self.q_layernorm = q_layernorm(hidden_size=self.q_lora_rank)
            self.linear_q_up_proj = linear_q_up_proj(
                in_features=self.q_lora_rank, out_features=self.num_heads * qk_dim, bias=False)
        self.linear_kv_down_proj = linear_kv_down_proj(
            in_features=h, out_features=self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_layernorm = kv_layernorm(hidden_size=self.kv_lora_rank)
        self.linear_kv_up_proj = linear_kv_up_proj(
            in_features=self.kv_lora_rank, out_features=self.num_heads * (self.nope_dim + self.v_head_dim), bias=False)
        self.softmax_scale = qk_dim**-0.5 * yarn_softmax_scale(config.rope_scaling)
        self.core_attention = core_attention(softmax_scale=self.softmax_scale)
        self.linear_proj = linear_proj(
            in_features=self.num_heads * self.v_head_dim, out_features=h, bias=bias, output_proj=True)

    def project_query(self, hidden_states: Tensor) -> Tensor:
        """hidden [b, s, h] -> queries [b, s, nh, qk_head_dim + rotary_dim], not yet rotated."""
        if self.linear_q_proj is not None:
            query = self.linear_q_proj(hidden_states)
        else:
            query = self.linear_q_up_proj(self.q_layernorm(self.linear_q_down_proj(hidden_states)))
        return query.unflatten(-1, (self.num_heads, -1))

    def compress_kv(self, hidden_states: Tensor, rotary: Rotary | None) -> tuple[Tensor, Tensor]:
        """hidden [b, s, h] -> (normalised latent [b, s, kv_lora_rank], rotated key [b, s, 1, rotary_dim]):
        what a cache holds per token."""
        latent, key_rope = self.linear_kv_down_proj(hidden_states).split([self.kv_lora_rank, self.rope_dim], -1)
        key_rope = key_rope.unsqueeze(2)  # one rotary key shared by every head
        if rotary is not None:
            key_rope = apply_rotary(key_rope, rotary)
        return self.kv_layernorm(latent), key_rope

    def expand_kv(self, latent: Tensor, key_rope: Tensor) -> tuple[Tensor, Tensor]:
        """(latent [b, sk, r], rotated key [b, sk, 1, rot]) -> keys [b, sk, nh, nope + rot], values [b, sk, nh, dv]."""
        kv = self.linear_kv_up_proj(latent).unflatten(-1, (self.num_heads, -1))  # [b, sk, nh, nope + dv]
        key_nope, value = kv.split([self.nope_dim, self.v_head_dim], dim=-1)
        key = torch.cat((key_nope, key_rope.expand(-1, -1, self.num_heads, -1)), dim=-1)
        return key, value

    def init_cache(self, cache: Cache) -> KVCache:
        """The latent and the rotated key of every position: all MLA needs to keep (one "group" of each)."""
        if not self.causal:
            raise CacheUnsupported(self, f"its attn_mask_type is '{self.attn_mask_type}': it attends to later "
                                         "tokens, so a decoder that generates needs attn_mask_type 'causal'")
        return KVCache(cache, window=self.cache_window)

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, rotary: Rotary | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        b, s, _ = hidden_states.shape
        query_nope, query_rope = self.project_query(hidden_states).split([self.nope_dim, self.rope_dim], dim=-1)
        if rotary is not None:
            query_rope = apply_rotary(query_rope, rotary)
        query = torch.cat((query_nope, query_rope), dim=-1)  # [b, s, nh, nope + rot]
        mask = None if self.ignore_mask else attention_mask
        latent, key_rope = self.compress_kv(hidden_states, rotary)  # [b, s, r], [b, s, 1, rot]
        if cache is not None:  # generating: store this step's latents, expand every cached one
            latent, key_rope, mask = cache.update(latent.unsqueeze(1), key_rope.transpose(1, 2), mask)
            latent, key_rope = latent.squeeze(1), key_rope.transpose(1, 2)  # [b, sk, r], [b, sk, 1, rot]
        key, value = self.expand_kv(latent, key_rope)
        out = self.core_attention(
            query.transpose(1, 2),  # [b, nh, s, nope + rot]
            key.transpose(1, 2),  # [b, nh, sk, nope + rot]
            value.transpose(1, 2),  # [b, nh, sk, dv]
            mask,
            self.causal,
        )  # [b, nh, s, dv]
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.v_head_dim))  # [b, s, h]

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, q_lora_rank={self.q_lora_rank}, kv_lora_rank={self.kv_lora_rank}, "
                f"qk_head_dim={self.nope_dim}, rotary_dim={self.rope_dim}, v_head_dim={self.v_head_dim}")


def _require(why: str, **slots: object) -> None:
    """Raise naming the slots the config needs that the spec leaves empty."""
    empty = [name for name, factory in slots.items() if factory is None]
    if empty:
        raise ValueError(f"{why}, but the spec leaves {', '.join(empty)} empty")
