"""Routed experts: E MLPs with stacked weights [E, ...], computed one expert at a time or all at once.

Both registered kinds hold the same parameters and give the same numbers; they
differ only in how the matmuls are issued. Stacking by expert keeps the layout
shardable by expert (expert parallelism slices dim 0).
"""

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.modules.activation import activation_from_config
from megaspec.modules.moe.grouped_gemm import grouped_linear, grouped_mm_supported
from megaspec.modules.moe.router import require_experts
from megaspec.modules.utils import init_normal_, params_dtype
from megaspec.registry import Slot, register


class Experts(nn.Module):
    """Weights and activation shared by the expert kinds: fc1 [E, ffn or 2 * ffn, h], fc2 [E, h, ffn]."""

    slots: ClassVar[dict[str, Slot]] = {"activation": Slot("activation", required=False)}

    def __init__(self, config: TransformerConfig, *, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.num_experts = require_experts(config, type(self).__name__)
        self.gated = config.gated_linear_unit
        # A capacity factor can drop assignments, which then sit past the last expert's rows.
        self.may_drop = config.moe_expert_capacity_factor is not None
        h, ffn, dtype = config.hidden_size, config.moe_ffn_size, params_dtype(config)
        # Per expert, nn.Linear's [out, in] layout; gated fc1 rows are [gate | up] as in the dense MLP.
        self.fc1_weight = nn.Parameter(torch.empty(self.num_experts, 2 * ffn if self.gated else ffn, h, dtype=dtype))
        self.fc2_weight = nn.Parameter(torch.empty(self.num_experts, h, ffn, dtype=dtype))
        bias = config.add_bias_linear
        self.fc1_bias = nn.Parameter(torch.empty(self.fc1_weight.shape[:2], dtype=dtype)) if bias else None
        self.fc2_bias = nn.Parameter(torch.empty(self.num_experts, h, dtype=dtype)) if bias else None
        self.activation = activation if activation is not None else activation_from_config(config)
        self.init_std = config.init_method_std
        # fc2 writes into the residual stream: scaled as the dense MLP's output projection.
        self.output_std = self.init_std / (math.sqrt(2.0 * config.num_layers) if config.scaled_output_init else 1.0)

    def init_weights(self) -> None:
        """Weights ~ N(0, std) (fc2 with the output scaling), biases zeros."""
        init_normal_(self.fc1_weight, self.init_std)
        init_normal_(self.fc2_weight, self.output_std)
        for bias in (self.fc1_bias, self.fc2_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def act(self, x: Tensor) -> Tensor:
        """The activation between the projections: act(gate) * up when gated."""
        if self.gated:
            gate, up = torch.chunk(x, 2, dim=-1)
            return self.activation(gate) * up
        return self.activation(x)

    def grouped_forward(
        self, hidden_states: Tensor, probs: Tensor, indices: Tensor, tokens_per_expert: Tensor
    ) -> Tensor:
        """All experts at once: rows sorted by expert, one grouped matmul per projection."""
        t, k = indices.shape
        flat = indices.flatten()  # [t * k]
        # Stable, so each expert sees its tokens in order; dropped assignments (index E) sort last.
        order = flat.argsort(stable=True)  # [n]: row r of the sorted batch is assignment order[r]
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)  # [E]
        x = hidden_states[order // k]  # [n, h]
        expert = flat[order]  # [n]
        if self.may_drop:
            kept = (expert < self.num_experts).unsqueeze(-1)  # [n, 1]
            # Rows past the last expert come back undefined, also as gradients: zero them both ways.
            x = torch.where(kept, x, 0.0)
        expert = expert.clamp(max=self.num_experts - 1)  # in range for the bias lookup
        y = grouped_linear(x, self.fc1_weight, offsets)  # [n, ffn] or [n, 2 * ffn]
        if self.fc1_bias is not None:
            y = y + self.fc1_bias[expert]
            if self.may_drop:  # else the undefined rows' gradient would reach the bias
                y = torch.where(kept, y, 0.0)
        y = grouped_linear(self.act(y), self.fc2_weight, offsets)  # [n, h]
        if self.fc2_bias is not None:
            y = y + self.fc2_bias[expert]
        y = y * probs.flatten()[order].unsqueeze(-1).to(y.dtype)
        if self.may_drop:
            y = torch.where(kept, y, 0.0)
        # Back to assignment order, then each token sums its k outputs (deterministic, unlike index_add).
        y = torch.empty_like(y).index_copy(0, order, y)  # [t * k, h]
        return y.view(t, k, -1).sum(dim=1)  # [t, h]

    def gathered_forward(self, hidden_states: Tensor, probs: Tensor, indices: Tensor) -> Tensor:
        """Each token through its own k experts' weights, gathered (gpt-fast's way): for a few tokens."""
        chosen = indices.clamp(max=self.num_experts - 1)  # [t, k]; a dropped assignment has probability 0
        y = (self.fc1_weight[chosen] @ hidden_states[:, None, :, None]).squeeze(-1)  # [t, k, ffn or 2 * ffn]
        if self.fc1_bias is not None:
            y = y + self.fc1_bias[chosen]
        y = (self.fc2_weight[chosen] @ self.act(y)[..., None]).squeeze(-1)  # [t, k, h]
        if self.fc2_bias is not None:
            y = y + self.fc2_bias[chosen]
        return (y * probs.unsqueeze(-1).to(y.dtype)).sum(dim=1)  # [t, h]

    def dense_forward(self, hidden_states: Tensor, probs: Tensor, indices: Tensor) -> Tensor:
        """Every expert on every token, weighted by its probability (zero where not chosen)."""
        t, e = hidden_states.size(0), self.num_experts
        weights = probs.new_zeros(t, e + 1).scatter_add(1, indices, probs)[:, :e]  # [t, E]; index E: dropped
        y = hidden_states.expand(e, -1, -1) @ self.fc1_weight.transpose(1, 2)  # [E, t, ffn or 2 * ffn]
        if self.fc1_bias is not None:
            y = y + self.fc1_bias[:, None]
        y = self.act(y) @ self.fc2_weight.transpose(1, 2)  # [E, t, h]
        if self.fc2_bias is not None:
            y = y + self.fc2_bias[:, None]
        return (y * weights.T.unsqueeze(-1).to(y.dtype)).sum(dim=0)  # [t, h]

    def extra_repr(self) -> str:
        e, h, ffn = self.fc2_weight.shape
        return f"num_experts={e}, hidden={h}, ffn={ffn}, gated={self.gated}"


@register("experts", "sequential_experts")
class SequentialExperts(Experts):
    """A loop over experts, each a plain MLP on its own tokens: the readable reference."""

    def forward(self, hidden_states: Tensor, probs: Tensor, indices: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """hidden_states [t, h], probs and indices [t, k] (index E: dropped) -> [t, h]."""
        if hidden_states.is_meta:  # meta tensors hold no routing to follow; shapes and FLOPs as grouped
            return self.grouped_forward(hidden_states, probs, indices, tokens_per_expert)
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token, slot = torch.where(indices == e)  # [n_e] each
            b1 = None if self.fc1_bias is None else self.fc1_bias[e]
            b2 = None if self.fc2_bias is None else self.fc2_bias[e]
            y = F.linear(self.act(F.linear(hidden_states[token], self.fc1_weight[e], b1)), self.fc2_weight[e], b2)
            out = out.index_add(0, token, y * probs[token, slot].unsqueeze(-1).to(y.dtype))
        return out


@register("experts", "grouped_experts")
class GroupedExperts(Experts):
    """Rows sorted by expert, one grouped matmul per projection (torch._grouped_mm where supported)."""

    def forward(self, hidden_states: Tensor, probs: Tensor, indices: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """hidden_states [t, h], probs and indices [t, k] (index E: dropped) -> [t, h]."""
        if torch.compiler.is_compiling() and not grouped_mm_supported(hidden_states):
            # No grouped matmul under compile (fp32 on CPUs): static shapes instead of per-expert
            # segments read on the host, so a decode step stays one graph.
            if indices.numel() <= self.num_experts:
                return self.gathered_forward(hidden_states, probs, indices)
            return self.dense_forward(hidden_states, probs, indices)
        return self.grouped_forward(hidden_states, probs, indices, tokens_per_expert)
