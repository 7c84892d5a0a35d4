"""Learned absolute positions (GPT-2, BERT).

Position embeddings share one call, `forward(hidden_states, position_ids) ->
(hidden_states, rotary)`: additive kinds return new hidden states and no rotary.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.modules.utils import init_normal_, params_dtype
from megaspec.registry import register


@register("position_embedding", "learned_position_embedding")
class LearnedPositionEmbedding(nn.Module):
    """A learned table of absolute positions, added to the hidden states (GPT-2, BERT)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.init_std = config.init_method_std
        self.position_limit = config.max_position_embeddings  # the table ends there: position ids stay below
        self.weight = nn.Parameter(
            torch.empty(config.max_position_embeddings, config.hidden_size, dtype=params_dtype(config))
        )

    def init_weights(self) -> None:
        """Weight ~ N(0, init_method_std)."""
        init_normal_(self.weight, self.init_std)

    def forward(self, hidden_states: Tensor, position_ids: Tensor) -> tuple[Tensor, None]:
        # [b, s, h] + [b or 1, s, h]
        return hidden_states + F.embedding(position_ids, self.weight), None
