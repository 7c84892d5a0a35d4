"""One pre-norm transformer layer: attention and MLP, each inside a residual branch."""

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.cache import Cache, child_cache
from megaspec.config import TransformerConfig
from megaspec.kinds import Rotary
from megaspec.registry import Slot, register


def _or_identity(module: nn.Module | None) -> nn.Module:
    """An empty norm slot is the identity (so forward needs no branch)."""
    return nn.Identity() if module is None else module


def _cached(cache: dict[str, Any] | None, slot: str) -> dict[str, Any]:
    """The `cache=` keyword for a child while generating; nothing otherwise (the child may not take one)."""
    return {} if cache is None else {"cache": cache[slot]}


@register("layer", "transformer_layer")
class TransformerLayer(nn.Module):
    """x = post(x + drop(out(branch(pre(x))))) for each branch: self-attention, cross-attention, MLP.

    Slot names are Megatron-Core's. An empty attention, cross-attention or MLP slot
    skips that residual branch; an empty norm slot is the identity. Where the norm
    sits is the spec's choice, not a code path: pre-LN (GPT, Llama, T5) fills the
    `input_layernorm`/`pre_*` slots, post-LN (BERT) the `post_*` ones, and "sandwich"
    norms (Gemma-2/3; OLMo-2 without the pre-norms) the `*_output_layernorm` ones,
    which normalise a branch's output before it is added to the residual.
    """

    # Sequence parallelism (megaspec.parallel.plans): norms run on this rank's slice of the sequence.
    tp_plan: ClassVar[dict[str, str]] = {
        name: "sequence_parallel"
        for name in ("input_layernorm", "self_attn_output_layernorm", "post_self_attn_layernorm",
                     "pre_cross_attn_layernorm", "cross_attn_output_layernorm", "post_cross_attn_layernorm",
                     "pre_mlp_layernorm", "mlp_output_layernorm", "post_mlp_layernorm")
    }

    slots: ClassVar[dict[str, Slot]] = {
        "input_layernorm": Slot("norm", required=False),
        "self_attention": Slot("self_attention", required=False),
        "self_attn_output_layernorm": Slot("norm", required=False),
        "post_self_attn_layernorm": Slot("norm", required=False),
        "pre_cross_attn_layernorm": Slot("norm", required=False),
        "cross_attention": Slot("cross_attention", required=False),
        "cross_attn_output_layernorm": Slot("norm", required=False),
        "post_cross_attn_layernorm": Slot("norm", required=False),
        "pre_mlp_layernorm": Slot("norm", required=False),
        "mlp": Slot(("mlp", "moe"), required=False),
        "mlp_output_layernorm": Slot("norm", required=False),
        "post_mlp_layernorm": Slot("norm", required=False),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        input_layernorm: nn.Module | None = None,
        self_attention: nn.Module | None = None,
        self_attn_output_layernorm: nn.Module | None = None,
        post_self_attn_layernorm: nn.Module | None = None,
        pre_cross_attn_layernorm: nn.Module | None = None,
        cross_attention: nn.Module | None = None,
        cross_attn_output_layernorm: nn.Module | None = None,
        post_cross_attn_layernorm: nn.Module | None = None,
        pre_mlp_layernorm: nn.Module | None = None,
        mlp: nn.Module | None = None,
        mlp_output_layernorm: nn.Module | None = None,
        post_mlp_layernorm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = _or_identity(input_layernorm)
        self.self_attention = self_attention
        self.self_attn_output_layernorm = _or_identity(self_attn_output_layernorm)
        self.post_self_attn_layernorm = _or_identity(post_self_attn_layernorm)
        self.pre_cross_attn_layernorm = _or_identity(pre_cross_attn_layernorm)
        self.cross_attention = cross_attention
        self.cross_attn_output_layernorm = _or_identity(cross_attn_output_layernorm)
        self.post_cross_attn_layernorm = _or_identity(post_cross_attn_layernorm)
        self.pre_mlp_layernorm = _or_identity(pre_mlp_layernorm)
        self.mlp = mlp
        self.mlp_output_layernorm = _or_identity(mlp_output_layernorm)
        self.post_mlp_layernorm = _or_identity(post_mlp_layernorm)

    def init_cache(self, cache: Cache) -> dict[str, Any]:
        """One cache per attention branch, by slot name."""
        return {slot: child_cache(module, cache) for slot in ("self_attention", "cross_attention")
                if (module := getattr(self, slot)) is not None}

    def _residual(self, hidden_states: Tensor, branch: Tensor) -> Tensor:
        return hidden_states + F.dropout(branch, self.hidden_dropout, self.training)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        rotary: Rotary | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: dict[str, Any] | None = None,
    ) -> Tensor:  # [b, s, h] -> [b, s, h]
        if self.self_attention is not None:
            x = self.self_attention(self.input_layernorm(hidden_states), attention_mask=attention_mask, rotary=rotary,
                                    **_cached(cache, "self_attention"))
            x = self.self_attn_output_layernorm(x)
            hidden_states = self.post_self_attn_layernorm(self._residual(hidden_states, x))
        if self.cross_attention is not None:
            # Queries from the layer, keys and values from `context` [b, sk, h] (an encoder's output).
            x = self.cross_attention(
                self.pre_cross_attn_layernorm(hidden_states), context=context, attention_mask=context_mask,
                **_cached(cache, "cross_attention"),
            )
            x = self.cross_attn_output_layernorm(x)
            hidden_states = self.post_cross_attn_layernorm(self._residual(hidden_states, x))
        if self.mlp is not None:
            x = self.mlp_output_layernorm(self.mlp(self.pre_mlp_layernorm(hidden_states)))
            hidden_states = self.post_mlp_layernorm(self._residual(hidden_states, x))
        return hidden_states
