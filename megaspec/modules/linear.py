"""The dense projection every other module is built from."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.modules.utils import init_normal_, params_dtype
from megaspec.registry import register


@register("linear", "linear")
class Linear(nn.Module):
    """y = x W^T + b, with Megatron's init (scaled when it writes into the residual stream)."""

    def __init__(
        self,
        config: TransformerConfig,
        *,
        in_features: int,
        out_features: int,
        bias: bool = True,
        output_proj: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.init_std = config.init_method_std
        if output_proj and config.scaled_output_init:
            # Each layer adds two such outputs to the residual; scaling keeps the
            # residual's variance from growing with depth (GPT-2, Megatron).
            self.init_std /= math.sqrt(2.0 * config.num_layers)
        dtype = params_dtype(config)
        # torch.empty, not nn.Linear: initialising here and again in init_weights would double build time.
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def init_weights(self) -> None:
        """Weight ~ N(0, std), bias zeros."""
        init_normal_(self.weight, self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
