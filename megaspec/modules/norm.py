"""Normalisation layers: LayerNorm, RMSNorm, and `norm`, which picks one from the config."""

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
        dtype = params_dtype(config)
        self.weight = nn.Parameter(torch.empty(self.hidden_size, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.hidden_size, dtype=dtype))

    def init_weights(self) -> None:
        """Scale ones, bias zeros: the identity affine map."""
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:  # [..., h] -> [..., h]
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


@register("norm", "rms_norm")
class RMSNorm(nn.Module):
    """RMSNorm: scale by the root mean square, no centring and no bias (Llama, T5)."""

    def __init__(self, config: TransformerConfig, *, hidden_size: int | None = None, eps: float | None = None) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size if hidden_size is None else hidden_size
        self.eps = config.layernorm_epsilon if eps is None else eps
        self.weight = nn.Parameter(torch.empty(self.hidden_size, dtype=params_dtype(config)))

    def init_weights(self) -> None:
        """Scale ones."""
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:  # [..., h] -> [..., h]
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


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
