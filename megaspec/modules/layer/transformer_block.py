"""A stack of transformer layers, optionally followed by a final norm."""

from typing import ClassVar

import torch
from torch import Tensor, nn

from megaspec.cache import Cache, StackCache, child_cache
from megaspec.config import TransformerConfig
from megaspec.kinds import Rotary
from megaspec.registry import Slot, register


def add_attention_bias(bias: Tensor, attention_mask: Tensor | None) -> Tensor:
    """A bias [1, nh, sq, sk] with a mask folded in, as one additive float mask [b, nh, sq, sk].

    A boolean mask's False entries become the dtype's most negative value rather
    than -inf, so a query that may attend nowhere gets a uniform softmax, not NaN.
    """
    if attention_mask is None:
        return bias
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, bias, torch.finfo(bias.dtype).min)
    return bias + attention_mask


@register("block", "transformer_block")
class TransformerBlock(nn.Module):
    """layers[0] .. layers[n-1], then final_layernorm (Megatron keeps the final norm here).

    An optional `attention_bias` (T5's relative position bias) is computed once
    per forward and added to every layer's self-attention scores: the whole stack
    shares one table, as in T5, where only layer 0 owns it. Its module is called
    as `attention_bias(query_length, key_length) -> [1, nh, sq, sk]`. When generating,
    each layer gets its own cache, and a decode step's bias covers every key position.
    """

    # Sequence parallelism (megaspec.parallel.plans): the residual stream is split over the
    # sequence from the first layer to the final norm.
    tp_plan: ClassVar[dict[str, str]] = {"": "scatter_sequence", "final_layernorm": "sequence_parallel"}

    slots: ClassVar[dict[str, Slot]] = {
        "attention_bias": Slot("attention_bias", required=False),
        "layers": Slot("layer", many=True, count="num_layers"),
        "final_layernorm": Slot("norm", required=False),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        attention_bias: nn.Module | None = None,
        layers: list[nn.Module],
        final_layernorm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.attention_bias = attention_bias
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = nn.Identity() if final_layernorm is None else final_layernorm

    def init_cache(self, cache: Cache) -> StackCache:
        """One cache per layer."""
        return StackCache(cache, [child_cache(layer, cache) for layer in self.layers])

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        rotary: Rotary | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: StackCache | None = None,
    ) -> Tensor:  # [b, s, h] -> [b, s, h]
        if self.attention_bias is not None:
            attention_mask = add_attention_bias(self._bias(hidden_states, cache), attention_mask)
        for i, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, attention_mask=attention_mask, rotary=rotary, context=context,
                                  context_mask=context_mask, **({} if cache is None else {"cache": cache.layers[i]}))
        return self.final_layernorm(hidden_states)

    def _bias(self, hidden_states: Tensor, cache: StackCache | None) -> Tensor:
        """The bias [1, nh, s, sk] over this forward's tokens, or a decode step's rows over every key position."""
        assert self.attention_bias is not None
        if cache is None or not cache.cache.filled:
            s = hidden_states.size(1)
            return self.attention_bias(s, s).to(hidden_states.dtype)  # [1, nh, s, s]
        k = cache.cache.key_length
        return self.attention_bias(k, k)[:, :, cache.cache.positions].to(hidden_states.dtype)  # [1, nh, s, k]
