"""The position-wise feed-forward network, plain or gated (GLU)."""

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.modules.activation import activation_from_config
from megaspec.registry import Slot, register


@register("mlp", "mlp")
class MLP(nn.Module):
    """fc2(act(fc1(x))), or fc2(act(gate) * up) when `config.gated_linear_unit` (SwiGLU, GeGLU)."""

    slots: ClassVar[dict[str, Slot]] = {
        "linear_fc1": Slot("linear", provides=("in_features", "out_features", "bias"), default="linear"),
        "linear_fc2": Slot(
            "linear", provides=("in_features", "out_features", "bias", "output_proj"), default="linear"
        ),
        "activation": Slot("activation", required=False),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        linear_fc1: Callable[..., nn.Module],
        linear_fc2: Callable[..., nn.Module],
        activation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.gated = config.gated_linear_unit
        ffn = config.ffn_size
        # Gated: one fused projection whose output is [gate | up] (Megatron's layout).
        self.linear_fc1 = linear_fc1(
            in_features=config.hidden_size,
            out_features=2 * ffn if self.gated else ffn,
            bias=config.add_bias_linear,
        )
        self.activation = activation if activation is not None else activation_from_config(config)
        self.linear_fc2 = linear_fc2(
            in_features=ffn, out_features=config.hidden_size, bias=config.add_bias_linear, output_proj=True
        )

    @property
    def tp_plan(self) -> dict[str, str]:
        """Tensor parallelism (megaspec.parallel.plans): fc1 split by column, fc2 by row."""
        fc1 = "colwise_gated" if self.gated else "colwise"  # gated: each rank keeps gate_r and up_r
        return {"": "gather_sequence", "linear_fc1": fc1, "linear_fc2": "rowwise"}

    def forward(self, hidden_states: Tensor) -> Tensor:  # [b, s, h] -> [b, s, h]
        x = self.linear_fc1(hidden_states)  # [b, s, ffn] or [b, s, 2 * ffn]
        if self.gated:
            gate, up = torch.chunk(x, 2, dim=-1)  # [b, s, ffn] each
            x = self.activation(gate) * up
        else:
            x = self.activation(x)
        return self.linear_fc2(x)  # [b, s, h]
