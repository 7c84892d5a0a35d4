"""Tiny registered modules for testing the spec core without the real model zoo."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from megaspec import Slot, TransformerConfig, register
from megaspec.registry import unregister

TOY_NAMES = ("toy_norm", "toy_mlp", "toy_attn", "toy_layer", "toy_stack", "toy_linear")


def register_toys() -> None:
    """Register the toy modules (idempotent: the same classes re-register silently)."""

    @register("norm", "toy_norm", override=True)
    class ToyNorm(nn.Module):
        def __init__(self, config: TransformerConfig, eps: float = 1e-5, hidden_size: int | None = None) -> None:
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.empty(hidden_size or config.hidden_size))

        def init_weights(self) -> None:
            nn.init.ones_(self.weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    @register("linear", "toy_linear", override=True)
    class ToyLinear(nn.Module):
        def __init__(self, config: TransformerConfig, in_features: int, out_features: int, bias: bool = True) -> None:
            super().__init__()
            self.proj = nn.Linear(in_features, out_features, bias=bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    @register("mlp", "toy_mlp", override=True)
    class ToyMlp(nn.Module):
        slots: ClassVar[dict[str, Slot]] = {"fc": Slot("linear", provides=("in_features", "out_features"), default="toy_linear")}

        def __init__(self, config: TransformerConfig, ffn_hidden_size: int | None = None, fc=None) -> None:
            super().__init__()
            self.width = ffn_hidden_size or config.ffn_size
            self.fc = fc(in_features=config.hidden_size, out_features=config.hidden_size)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    @register("self_attention", "toy_attn", override=True)
    class ToyAttn(nn.Module):
        def __init__(self, config: TransformerConfig, mask: Literal["causal", "padding"] = "causal") -> None:
            super().__init__()
            self.mask = mask
            self.groups = config.query_groups

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, rotary=None) -> torch.Tensor:
            return x

    @register("layer", "toy_layer", override=True)
    class ToyLayer(nn.Module):
        slots: ClassVar[dict[str, Slot]] = {
            "norm": Slot("norm", required=False),
            "attn": Slot("self_attention"),
            "mlp": Slot(("mlp", "moe")),
        }

        def __init__(self, config: TransformerConfig, norm=None, attn=None, mlp=None) -> None:
            super().__init__()
            self.norm, self.attn, self.mlp = norm, attn, mlp

        def forward(self, x: torch.Tensor, **masks_and_context) -> torch.Tensor:
            return self.mlp(self.attn(x))

    @register("block", "toy_stack", override=True)
    class ToyStack(nn.Module):
        slots: ClassVar[dict[str, Slot]] = {"layers": Slot("layer", many=True, count="num_layers")}

        def __init__(self, config: TransformerConfig, layers=None) -> None:
            super().__init__()
            self.layers = nn.ModuleList(layers)

        def forward(self, x: torch.Tensor, **masks_and_context) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x


def unregister_toys() -> None:
    """Remove the toy modules."""
    for name in TOY_NAMES:
        unregister(name)


TOY_CONFIG = dict(num_layers=3, hidden_size=8, num_attention_heads=2)
