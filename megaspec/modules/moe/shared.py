"""Shared experts: a dense MLP every token passes through beside the routed experts (DeepSeek, Qwen-MoE)."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.modules.mlp.mlp import MLP
from megaspec.modules.utils import init_normal_, params_dtype
from megaspec.registry import register


@register("mlp", "shared_expert_mlp")
class SharedExpertMLP(MLP):
    """The MLP at width moe_shared_expert_intermediate_size, scaled by sigmoid(x . w) if moe_shared_expert_gate.

    Its slots are MLP's (inherited), defaults included.
    """

    def __init__(
        self,
        config: TransformerConfig,
        *,
        linear_fc1: Callable[..., nn.Module],
        linear_fc2: Callable[..., nn.Module],
        activation: nn.Module | None = None,
    ) -> None:
        size = config.moe_shared_expert_intermediate_size
        if size is None:
            raise ValueError("shared_expert_mlp needs config.moe_shared_expert_intermediate_size")
        # All shared experts fused into one MLP of their total width (Megatron-Core's layout).
        super().__init__(
            config.updated(ffn_hidden_size=size), linear_fc1=linear_fc1, linear_fc2=linear_fc2, activation=activation
        )
        self.init_std = config.init_method_std
        self.gate_weight = None
        if config.moe_shared_expert_gate:
            self.gate_weight = nn.Parameter(torch.empty(1, config.hidden_size, dtype=params_dtype(config)))

    def init_weights(self) -> None:
        """Gate weight ~ N(0, std) (the projections initialise themselves)."""
        if self.gate_weight is not None:
            init_normal_(self.gate_weight, self.init_std)

    def forward(self, hidden_states: Tensor) -> Tensor:  # [..., h] -> [..., h]
        out = super().forward(hidden_states)
        if self.gate_weight is not None:
            out = out * torch.sigmoid(F.linear(hidden_states, self.gate_weight))  # [..., 1] gate per token
        return out
