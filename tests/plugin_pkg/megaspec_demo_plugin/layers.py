"""Importing this module registers `demo_mlp`."""

import torch
from torch import nn

import megaspec


@megaspec.register("mlp", "demo_mlp")
class DemoMlp(nn.Module):
    """An MLP that keeps only a learned scale: hidden [b, s, h] -> [b, s, h]."""

    def __init__(self, config: megaspec.TransformerConfig, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((config.hidden_size,), scale))

    def init_weights(self) -> None:
        nn.init.ones_(self.scale)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.scale
