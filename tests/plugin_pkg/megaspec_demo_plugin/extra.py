"""A callable entry point: megaspec calls register_all() when it loads plug-ins."""

import torch
from torch import nn

import megaspec


def register_all() -> None:
    """Register `demo_norm`."""

    @megaspec.register("norm", "demo_norm")
    class DemoNorm(nn.Module):
        """Identity norm: [b, s, h] -> [b, s, h]."""

        def __init__(self, config: megaspec.TransformerConfig, hidden_size: int | None = None) -> None:
            super().__init__()

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return hidden_states
