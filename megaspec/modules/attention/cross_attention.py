"""Cross-attention: queries from the layer, keys and values from a context (an encoder's output)."""

from collections.abc import Callable
from typing import ClassVar

from torch import Tensor, nn

from megaspec.cache import Cache, ContextCache
from megaspec.config import TransformerConfig
from megaspec.registry import Slot, register


@register("cross_attention", "cross_attention")
class CrossAttention(nn.Module):
    """Multi-head (or grouped-query) attention of hidden states [b, sq, h] over a context [b, sk, h].

    Megatron-Core's layout: `linear_q` projects the queries, `linear_kv` the keys and
    values together, its rows ordered group by group as [k_0, v_0 | k_1, v_1 | ...],
    so a run of groups is a self-contained tensor-parallel shard. It fills a
    TransformerLayer's `cross_attention` slot, which passes the encoder output as
    `context` and the encoder's padding mask as `attention_mask`. When generating, the
    context's keys and values are computed at the first step and reused by the others.
    """

    # Tensor parallelism (megaspec.parallel.plans): whole heads and query groups per rank.
    tp_plan: ClassVar[dict[str, str]] = {
        "linear_q": "colwise",
        "linear_kv": "colwise",
        "linear_proj": "rowwise",
        "num_heads": "per_rank",
        "num_query_groups": "per_rank",
    }

    slots: ClassVar[dict[str, Slot]] = {
        "linear_q": Slot("linear", provides=("in_features", "out_features", "bias")),
        "linear_kv": Slot("linear", provides=("in_features", "out_features", "bias")),
        "core_attention": Slot("core_attention"),
        "linear_proj": Slot("linear", provides=("in_features", "out_features", "bias", "output_proj")),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        linear_q: Callable[..., nn.Module],
        linear_kv: Callable[..., nn.Module],
        core_attention: nn.Module,
        linear_proj: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_query_groups = config.query_groups
        self.head_dim = config.head_dim
        bias = config.add_bias_linear or config.add_qkv_bias
        self.linear_q = linear_q(
            in_features=config.hidden_size, out_features=self.num_heads * self.head_dim, bias=bias
        )
        self.linear_kv = linear_kv(
            in_features=config.hidden_size, out_features=2 * self.num_query_groups * self.head_dim, bias=bias
        )
        self.core_attention = core_attention
        self.linear_proj = linear_proj(
            in_features=self.num_heads * self.head_dim,
            out_features=config.hidden_size,
            bias=config.add_bias_linear,
            output_proj=True,
        )

    def init_cache(self, cache: Cache) -> ContextCache:
        """The context's keys and values, kept from the first step of a generation."""
        return ContextCache()

    def forward(self, hidden_states: Tensor, context: Tensor, attention_mask: Tensor | None = None,
                cache: ContextCache | None = None) -> Tensor:
        b, sq, _ = hidden_states.shape
        query = self.linear_q(hidden_states).view(b, sq, self.num_heads, self.head_dim)  # [b, sq, nh, d]
        if cache is not None and cache.key is not None and cache.value is not None:
            key, value = cache.key, cache.value  # [b, ng, sk, d] each, from the first step
        else:
            sk = context.size(1)
            kv = self.linear_kv(context).view(b, sk, self.num_query_groups, 2, self.head_dim)
            key, value = (t.transpose(1, 2) for t in kv.unbind(dim=3))  # [b, ng, sk, d] each
            if cache is not None:
                cache.key, cache.value = key, value
        out = self.core_attention(
            query.transpose(1, 2),  # [b, nh, sq, d]
            key,
            value,
            attention_mask,  # [b, 1, 1, sk]: which context tokens exist
            False,  # every query may read the whole context
        )  # [b, nh, sq, d]
        out = out.transpose(1, 2).reshape(b, sq, self.num_heads * self.head_dim)  # [b, sq, nh * d]
        return self.linear_proj(out)  # [b, sq, h]

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, query_groups={self.num_query_groups}, head_dim={self.head_dim}"
