"""The mixture-of-experts layer: router -> routed experts (+ shared experts), a drop-in for the MLP."""

from typing import ClassVar

from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.modules.moe.router import require_experts
from megaspec.modules.moe.routing import count_tokens
from megaspec.registry import Slot, register


@register("moe", "moe")
class MoELayer(nn.Module):
    """y = sum_k p_k * expert_k(x) (+ shared_experts(x)), [b, s, h] -> [b, s, h] (Megatron-Core's MoELayer).

    After each forward, for logging and balancing: `aux_loss` (the router's weighted
    load-balancing and z-losses; models add it to their loss), `tokens_per_expert` [E]
    (assignments each expert computed) and `num_dropped_tokens` (assignments over capacity).
    """

    slots: ClassVar[dict[str, Slot]] = {
        "router": Slot("router", default="topk_router"),
        "experts": Slot("experts", default="grouped_experts"),
        "shared_experts": Slot("mlp", required=False),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        router: nn.Module,
        experts: nn.Module,
        shared_experts: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = require_experts(config, "moe")
        self.router = router
        self.experts = experts
        self.shared_experts = shared_experts
        # Written by forward; read by the model (aux_loss) and by training loops.
        self.aux_loss: Tensor | None = None
        self.tokens_per_expert: Tensor | None = None
        self.num_dropped_tokens: Tensor | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:  # [b, s, h] -> [b, s, h]
        x = hidden_states.reshape(-1, hidden_states.size(-1))  # [t, h]
        probs, indices, aux_loss = self.router(x)  # [t, k] each; a dropped assignment has index E
        counts = count_tokens(indices, self.num_experts)  # [E + 1]: per expert, then dropped
        out = self.experts(x, probs, indices, counts[: self.num_experts])  # [t, h]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        self.aux_loss = aux_loss
        self.tokens_per_expert = counts[: self.num_experts].detach()
        self.num_dropped_tokens = counts[self.num_experts].detach()
        return out.view_as(hidden_states)
