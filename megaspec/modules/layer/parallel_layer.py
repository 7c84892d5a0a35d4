"""A transformer layer whose attention and MLP read the same input and add to the residual together."""

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.cache import Cache, child_cache
from megaspec.config import TransformerConfig
from megaspec.kinds import Rotary
from megaspec.registry import Slot, register


@register("layer", "parallel_transformer_layer")
class ParallelTransformerLayer(nn.Module):
    """x + drop(attn(ln1(x))) + drop(mlp(ln2(x))): attention and MLP side by side (GPT-J, GPT-NeoX, Falcon, PaLM).

    With `pre_mlp_layernorm` filled each branch has its own norm (GPT-NeoX, Falcon's
    new decoder architecture); left empty, the MLP reads the attention's normalised
    input, so one norm serves both (Falcon-7B).
    """

    # Sequence parallelism (megaspec.parallel.plans): norms run on this rank's slice of the sequence.
    tp_plan: ClassVar[dict[str, str]] = {"input_layernorm": "sequence_parallel",
                                         "pre_mlp_layernorm": "sequence_parallel"}

    slots: ClassVar[dict[str, Slot]] = {
        "input_layernorm": Slot("norm", required=False),
        "self_attention": Slot("self_attention"),
        "pre_mlp_layernorm": Slot("norm", required=False),
        "mlp": Slot(("mlp", "moe")),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        input_layernorm: nn.Module | None = None,
        self_attention: nn.Module,
        pre_mlp_layernorm: nn.Module | None = None,
        mlp: nn.Module,
    ) -> None:
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = nn.Identity() if input_layernorm is None else input_layernorm
        self.self_attention = self_attention
        self.pre_mlp_layernorm = pre_mlp_layernorm  # None: the MLP shares the attention's input
        self.mlp = mlp

    def init_cache(self, cache: Cache) -> Any:
        """The self-attention's cache."""
        return child_cache(self.self_attention, cache)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        rotary: Rotary | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: Any = None,
    ) -> Tensor:  # [b, s, h] -> [b, s, h]; a decoder-only layer: no context
        normed = self.input_layernorm(hidden_states)
        cached = {} if cache is None else {"cache": cache}  # passed only while generating
        attn = self.self_attention(normed, attention_mask=attention_mask, rotary=rotary, **cached)
        mlp_input = normed if self.pre_mlp_layernorm is None else self.pre_mlp_layernorm(hidden_states)
        mlp = self.mlp(mlp_input)
        p = self.hidden_dropout
        return hidden_states + F.dropout(attn, p, self.training) + F.dropout(mlp, p, self.training)
