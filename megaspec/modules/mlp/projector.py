"""Projectors between two models' hidden sizes (vision features -> language embeddings).

A projector is built by its parent with `in_features` and `out_features`, the
sizes only the parent knows. The affine projector of LLaVA-1.0 needs no class
of its own: the built-in `linear` takes exactly those arguments.
"""

from collections.abc import Callable
from typing import ClassVar

from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.registry import Slot, register


@register("mlp", "mlp2x_gelu")
class MLP2xGELU(nn.Module):
    """linear_fc2(gelu(linear_fc1(x))): LLaVA-1.5's two-layer projector, in -> out -> out."""

    slots: ClassVar[dict[str, Slot]] = {
        "linear_fc1": Slot("linear", provides=("in_features", "out_features", "bias"), default="linear"),
        "activation": Slot("activation", default="gelu"),
        "linear_fc2": Slot("linear", provides=("in_features", "out_features", "bias"), default="linear"),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        in_features: int,
        out_features: int,
        bias: bool = True,
        linear_fc1: Callable[..., nn.Module],
        activation: nn.Module,
        linear_fc2: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        self.linear_fc1 = linear_fc1(in_features=in_features, out_features=out_features, bias=bias)
        self.activation = activation
        self.linear_fc2 = linear_fc2(in_features=out_features, out_features=out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        return self.linear_fc2(self.activation(self.linear_fc1(x)))
