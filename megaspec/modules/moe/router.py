"""The top-k router: which experts each token goes to, with what weight, and the balancing losses."""

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.modules.moe.routing import (
    aux_loss_scores,
    drop_over_capacity,
    load_balancing_loss,
    select_topk,
    z_loss,
)
from megaspec.modules.utils import init_normal_, params_dtype
from megaspec.registry import register


def require_experts(config: TransformerConfig, what: str) -> int:
    """config.num_moe_experts, or a clear error naming the module that needs it."""
    if config.num_moe_experts is None:
        raise ValueError(f"{what} needs config.num_moe_experts (the number of routed experts)")
    return config.num_moe_experts


@register("router", "topk_router")
class TopKRouter(nn.Module):
    """logits = x W^T; pick k experts per token by softmax or sigmoid scores (Megatron-Core's TopKRouter).

    Returns probs [t, k], expert indices [t, k] and the coefficient-weighted
    load-balancing plus z-loss. With a capacity factor, an assignment over capacity
    is dropped: probability 0 and index E (no expert).
    """

    # Group-limited routing: a group scores the sum of its best N experts (None: k / group_topk,
    # Megatron-Core's rule; DeepSeek-V3 uses 2, DeepSeek-V2's group_limited_greedy 1).
    config_fields: ClassVar[dict] = {"moe_router_group_score_topk": (PositiveInt | None, None)}

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_experts = require_experts(config, "topk_router")
        self.topk = config.moe_router_topk
        self.score_function = config.moe_router_score_function
        self.pre_softmax = config.moe_router_pre_softmax
        self.num_groups = config.moe_router_num_groups
        self.group_topk = config.moe_router_group_topk
        self.group_score_topk = config.moe_router_group_score_topk
        if self.group_score_topk is not None:
            if self.num_groups is None:
                raise ValueError("config.moe_router_group_score_topk needs group-limited routing "
                                 "(moe_router_num_groups and moe_router_group_topk)")
            if self.group_score_topk > self.num_experts // self.num_groups:
                raise ValueError(f"config.moe_router_group_score_topk ({self.group_score_topk}) must be <= the "
                                 f"experts per group ({self.num_experts // self.num_groups})")
        self.scaling_factor = config.moe_router_topk_scaling_factor
        self.capacity_factor = config.moe_expert_capacity_factor
        self.drop_policy = config.moe_token_drop_policy
        self.aux_loss_coeff = config.moe_aux_loss_coeff
        self.z_loss_coeff = config.moe_z_loss_coeff or 0.0
        self.bias_update_rate = config.moe_router_bias_update_rate
        self.init_std = config.init_method_std
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=params_dtype(config)))
        # Updated outside autograd (update_expert_bias), and saved with the model: a buffer.
        enabled = config.moe_router_enable_expert_bias
        self.register_buffer("expert_bias", torch.empty(self.num_experts) if enabled else None)

    def init_weights(self) -> None:
        """Weight ~ N(0, std); expert bias zeros."""
        init_normal_(self.weight, self.init_std)
        if self.expert_bias is not None:
            nn.init.zeros_(self.expert_bias)

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """fp32 logits [t, E] -> probs [t, k], indices [t, k] (before capacity dropping)."""
        if self.score_function == "softmax":
            if self.pre_softmax:  # probabilities over all experts, kept as they are
                scores = F.softmax(logits, dim=-1)
                indices = select_topk(scores, self.topk, self.num_groups, self.group_topk, self.group_score_topk)
                probs = scores.gather(1, indices)
            else:  # softmax over the chosen k only: weights sum to 1 (Mixtral)
                indices = select_topk(logits, self.topk, self.num_groups, self.group_topk, self.group_score_topk)
                probs = F.softmax(logits.gather(1, indices), dim=-1)
        else:
            scores = torch.sigmoid(logits)
            # The bias only steers which experts are chosen, never their weights (DeepSeek-V3).
            chosen_by = scores if self.expert_bias is None else scores + self.expert_bias
            indices = select_topk(chosen_by, self.topk, self.num_groups, self.group_topk,
                                  self.group_score_topk)
            probs = scores.gather(1, indices)
            if self.topk > 1:
                probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        if self.scaling_factor is not None:
            probs = probs * self.scaling_factor
        return probs, indices

    def balancing_loss(self, logits: Tensor, indices: Tensor) -> Tensor:
        """The coefficient-weighted load-balancing loss plus z-loss, for this forward's tokens."""
        loss = logits.new_zeros(())
        if self.aux_loss_coeff > 0:
            scores = aux_loss_scores(logits, self.score_function)
            loss = loss + self.aux_loss_coeff * load_balancing_loss(scores, indices, self.num_experts)
        if self.z_loss_coeff > 0:
            loss = loss + self.z_loss_coeff * z_loss(logits)
        return loss

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """hidden_states [t, h] -> probs [t, k] (fp32), indices [t, k], aux_loss (scalar, fp32)."""
        logits = F.linear(hidden_states, self.weight).float()  # [t, E]; routing in fp32, as Megatron and HF do
        probs, indices = self.route(logits)
        aux_loss = self.balancing_loss(logits, indices)  # on the routing as chosen, before capacity dropping
        if self.capacity_factor is not None:
            probs, indices = drop_over_capacity(
                probs, indices, self.num_experts, self.capacity_factor, self.drop_policy
            )
        return probs, indices, aux_loss

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: Tensor) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower it for over-loaded ones.

        Call after an optimizer step with the assignments per expert [E] summed since the last call.
        """
        if self.expert_bias is None:
            raise RuntimeError("update_expert_bias needs config.moe_router_enable_expert_bias")
        load = tokens_per_expert.float()
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
