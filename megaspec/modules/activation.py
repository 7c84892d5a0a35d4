"""Pointwise activations, one registered module each, so a spec can name them."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.registry import register


@register("activation", "gelu")
class GELU(nn.Module):
    """GELU, exact (erf) form (BERT, Megatron's default)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x)


@register("activation", "gelu_tanh")
class GELUTanh(nn.Module):
    """GELU, tanh approximation (GPT-2's `gelu_new`)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")


@register("activation", "relu")
class ReLU(nn.Module):
    """ReLU (the original Transformer, T5)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


@register("activation", "squared_relu")
class SquaredReLU(nn.Module):
    """relu(x)^2 (Primer, Nemotron)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


@register("activation", "silu")
class SiLU(nn.Module):
    """SiLU / swish, x * sigmoid(x) (SwiGLU in Llama when gated)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x)


@register("activation", "quick_gelu")
class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the sigmoid approximation of GELU (CLIP)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


# Keys are the values TransformerConfig.activation accepts.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": GELU,
    "gelu_tanh": GELUTanh,
    "relu": ReLU,
    "squared_relu": SquaredReLU,
    "silu": SiLU,
    "quick_gelu": QuickGELU,
}


def activation_from_config(config: TransformerConfig) -> nn.Module:
    """The activation module `config.activation` names."""
    return ACTIVATIONS[config.activation](config)
