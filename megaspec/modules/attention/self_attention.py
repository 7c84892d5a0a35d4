"""Self-attention with a fused QKV projection in Megatron-Core's per-query-group layout."""

from collections.abc import Callable
from typing import ClassVar, Literal

from torch import Tensor, nn

from megaspec.cache import Cache, CacheUnsupported, KVCache, window_positions
from megaspec.config import TransformerConfig
from megaspec.kinds import Rotary
from megaspec.modules.position.rotary import apply_rotary
from megaspec.modules.position.rotary_tables import select_rotary
from megaspec.registry import Slot, register


@register("self_attention", "self_attention")
class SelfAttention(nn.Module):
    """Multi-head, grouped-query or multi-query self-attention (from the head counts in the config).

    The rows of `linear_qkv`'s weight are ordered group by group; each group holds
    its nh/ng query heads, then its key head, then its value head:
    [q_0 .. q_{nh/ng-1}, k_0, v_0 | q_{nh/ng} .., k_1, v_1 | ...]. A contiguous run of
    groups is then a self-contained shard, so tensor parallelism can split by head.

    QK-norm (`q_layernorm`, `k_layernorm`) normalises each head (Qwen3, Gemma-3), or with
    `qk_layernorm_per_head: false` the whole query and key projections (OLMo-2). With
    `rotary_table` the layer reads one of several named RoPE tables (Gemma-3's local and
    global ones, from `local_global_rotary_embedding`).

    For generation it caches the keys and values of its query groups only (`KVCache`),
    and with a sliding window (config.window_size) only the positions the window sees.
    """

    # Tensor parallelism (megaspec.parallel.plans): whole query groups per rank, so each
    # rank attends with its own heads; the output projection sums the ranks' parts.
    tp_plan: ClassVar[dict[str, str]] = {
        "": "gather_sequence",
        "linear_qkv": "colwise",
        "linear_proj": "rowwise",
        "num_heads": "per_rank",
        "num_query_groups": "per_rank",
    }

    slots: ClassVar[dict[str, Slot]] = {
        "linear_qkv": Slot("linear", provides=("in_features", "out_features", "bias"), default="linear"),
        "core_attention": Slot("core_attention", default="sdpa"),
        "linear_proj": Slot(
            "linear", provides=("in_features", "out_features", "bias", "output_proj"), default="linear"
        ),
        "q_layernorm": Slot("norm", required=False, provides=("hidden_size",)),
        "k_layernorm": Slot("norm", required=False, provides=("hidden_size",)),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        attn_mask_type: Literal["causal", "padding", "no_mask"] = "causal",
        qk_layernorm_per_head: bool = True,
        rotary_table: str | None = None,
        linear_qkv: Callable[..., nn.Module],
        core_attention: nn.Module,
        linear_proj: Callable[..., nn.Module],
        q_layernorm: Callable[..., nn.Module] | None = None,
        k_layernorm: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_query_groups = config.query_groups
        self.heads_per_group = self.num_heads // self.num_query_groups
        self.head_dim = config.head_dim
        self.attn_mask_type = attn_mask_type
        # Causal attends causally with or without a mask: the core folds causality into any mask
        # it is given (padding, a position bias), and takes the kernel's fast path when there is none.
        self.causal = attn_mask_type == "causal"
        self.ignore_mask = attn_mask_type == "no_mask"
        self.rotary_table = rotary_table
        self.cache_window = window_positions(config.window_size)  # what a generation cache must keep

        qkv_size = (self.num_heads + 2 * self.num_query_groups) * self.head_dim
        self.linear_qkv = linear_qkv(
            in_features=config.hidden_size,
            out_features=qkv_size,
            bias=config.add_bias_linear or config.add_qkv_bias,
        )
        # QK-norm is the spec's choice: filled slots normalise the queries and keys, per head
        # (over d) or over the whole projection (over nh * d for queries, ng * d for keys).
        self.qk_layernorm_per_head = qk_layernorm_per_head
        q_size = self.head_dim if qk_layernorm_per_head else self.num_heads * self.head_dim
        k_size = self.head_dim if qk_layernorm_per_head else self.num_query_groups * self.head_dim
        self.q_layernorm = q_layernorm(hidden_size=q_size) if q_layernorm else nn.Identity()
        self.k_layernorm = k_layernorm(hidden_size=k_size) if k_layernorm else nn.Identity()
        self.core_attention = core_attention
        self.linear_proj = linear_proj(
            in_features=self.num_heads * self.head_dim,
            out_features=config.hidden_size,
            bias=config.add_bias_linear,
            output_proj=True,
        )

    def init_cache(self, cache: Cache) -> KVCache:
        """Keys and values for generation; only a causal attention can be cached (later tokens change nothing)."""
        if not self.causal:
            raise CacheUnsupported(self, f"its attn_mask_type is '{self.attn_mask_type}': it attends to later "
                                         "tokens, so its outputs change as tokens are generated; a decoder that "
                                         "generates needs attn_mask_type 'causal'")
        return KVCache(cache, window=self.cache_window)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        rotary: Rotary | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        b, s, _ = hidden_states.shape
        qkv = self.linear_qkv(hidden_states)  # [b, s, ng * (nh/ng + 2) * d]
        qkv = qkv.view(b, s, self.num_query_groups, self.heads_per_group + 2, self.head_dim)
        query, key, value = qkv.split([self.heads_per_group, 1, 1], dim=3)
        query = query.reshape(b, s, self.num_heads, self.head_dim)  # [b, s, nh, d]
        key = key.squeeze(3)  # [b, s, ng, d]
        value = value.squeeze(3)  # [b, s, ng, d]

        if self.qk_layernorm_per_head:
            query = self.q_layernorm(query)
            key = self.k_layernorm(key)
        else:  # heads side by side, in the order of the unfused projections
            query = self.q_layernorm(query.flatten(2)).view(b, s, self.num_heads, self.head_dim)
            key = self.k_layernorm(key.flatten(2)).view(b, s, self.num_query_groups, self.head_dim)
        if rotary is not None:
            rotary = select_rotary(rotary, self.rotary_table)
            query = apply_rotary(query, rotary)
            key = apply_rotary(key, rotary)

        if self.ignore_mask:
            attention_mask = None
        query = query.transpose(1, 2)  # [b, nh, s, d]
        key = key.transpose(1, 2)  # [b, ng, s, d]
        value = value.transpose(1, 2)  # [b, ng, s, d]
        if cache is not None:  # generating: store this step's keys, attend over every cached one
            key, value, attention_mask = cache.update(key, value, attention_mask)  # [b, ng, sk, d]
        out = self.core_attention(query, key, value, attention_mask, self.causal)  # [b, nh, s, d]
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)  # [b, s, nh * d]
        return self.linear_proj(out)  # [b, s, h]

    def extra_repr(self) -> str:
        table = f", rotary_table={self.rotary_table}" if self.rotary_table is not None else ""
        return (
            f"heads={self.num_heads}, query_groups={self.num_query_groups}, "
            f"head_dim={self.head_dim}, attn_mask_type={self.attn_mask_type}{table}"
        )
