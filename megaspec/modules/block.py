"""A stack of transformer layers, optionally followed by a final norm."""

from typing import ClassVar

from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.modules.embedding import Rotary
from megaspec.registry import Slot, register


@register("block", "transformer_block")
class TransformerBlock(nn.Module):
    """layers[0] .. layers[n-1], then final_layernorm (Megatron keeps the final norm here)."""

    slots: ClassVar[dict[str, Slot]] = {
        "layers": Slot("layer", many=True, count="num_layers"),
        "final_layernorm": Slot("norm", required=False),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        layers: list[nn.Module],
        final_layernorm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = nn.Identity() if final_layernorm is None else final_layernorm

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        rotary: Rotary | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:  # [b, s, h] -> [b, s, h]
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, rotary, context, context_mask)
        return self.final_layernorm(hidden_states)
