"""Normalisation layers: LayerNorm, RMSNorm, and `norm`, which picks one from the config.

With `config.layernorm_zero_centered_gamma` (Gemma) a norm stores its scale as
gamma - 1: it multiplies by (1 + weight), and its weight starts at zero.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.modules.utils import params_dtype
from megaspec.registry import register


@register("norm", "layer_norm")
class LayerNorm(nn.Module):
    """LayerNorm with a learned scale and bias (GPT-2, BERT)."""

    def __init__(self, config: TransformerConfig, *, hidden_size: int | None = None, eps: float | None = None) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size if hidden_size is None else hidden_size
        self.eps = config.layernorm_epsilon if eps is None else eps
        self.zero_centered = config.layernorm_zero_centered_gamma
        dtype = params_dtype(config)
        self.weight = nn.Parameter(torch.empty(self.hidden_size, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.hidden_size, dtype=dtype))

    def init_weights(self) -> None:
        """Scale ones (weight zeros when zero-centred), bias zeros: the identity affine map."""
        (nn.init.zeros_ if self.zero_centered else nn.init.ones_)(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:  # [..., h] -> [..., h]
        weight = self.weight + 1 if self.zero_centered else self.weight
        return F.layer_norm(x, (self.hidden_size,), weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}" + (", zero_centered_gamma" if self.zero_centered else "")


@register("norm", "rms_norm")
class RMSNorm(nn.Module):
    """RMSNorm: scale by the root mean square, no centring and no bias (Llama, T5)."""

    def __init__(self, config: TransformerConfig, *, hidden_size: int | None = None, eps: float | None = None) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size if hidden_size is None else hidden_size
        self.eps = config.layernorm_epsilon if eps is None else eps
        self.zero_centered = config.layernorm_zero_centered_gamma
        self.weight = nn.Parameter(torch.empty(self.hidden_size, dtype=params_dtype(config)))

    def init_weights(self) -> None:
        """Scale ones (weight zeros when zero-centred)."""
        (nn.init.zeros_ if self.zero_centered else nn.init.ones_)(self.weight)

    def forward(self, x: Tensor) -> Tensor:  # [..., h] -> [..., h]
        if self.zero_centered:
            # As Gemma: normalise and scale in fp32, then round once to x's dtype.
            scale = 1.0 + self.weight.float()
            return (F.rms_norm(x.float(), (self.hidden_size,), None, self.eps) * scale).type_as(x)
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}" + (", zero_centered_gamma" if self.zero_centered else "")


@register("norm", "norm")
class Norm(nn.Module):
    """LayerNorm or RMSNorm, whichever `config.normalization` names."""

    # A factory in class form (as Megatron's WrappedTorchNorm): the registry maps
    # names to classes, and the built module is then a plain LayerNorm/RMSNorm.
    def __new__(
        cls, config: TransformerConfig, *, hidden_size: int | None = None, eps: float | None = None
    ) -> nn.Module:
        impl = RMSNorm if config.normalization == "RMSNorm" else LayerNorm
        return impl(config, hidden_size=hidden_size, eps=eps)

    def __init__(self, config: TransformerConfig, *, hidden_size: int | None = None, eps: float | None = None) -> None:
        # Never runs (__new__ returns another class); it declares the params schema.
        super().__init__()
