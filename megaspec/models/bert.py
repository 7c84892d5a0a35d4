"""A bidirectional encoder (BERT), assembled entirely from slots."""

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.models.losses import token_cross_entropy
from megaspec.models.masks import padding_mask
from megaspec.models.output import ModelOutput
from megaspec.registry import Slot, register


@register("model", "bert_model")
class BertModel(nn.Module):
    """norm(tokens + token types + positions) -> encoder -> optional pooler and masked-LM head.

    Which parts exist is the spec's choice: leave `pooler` or `lm_head` out and
    the output has no `pooler_output` or `logits`. Post-LN versus pre-LN is
    decided in the encoder's layers, not here.
    """

    slots: ClassVar[dict[str, Slot]] = {
        "embedding": Slot("embedding"),
        "token_type_embedding": Slot("embedding", required=False),
        "position_embedding": Slot("position_embedding", required=False),
        "embedding_layernorm": Slot("norm", required=False),
        "encoder": Slot("block"),
        "pooler": Slot("pooler", required=False),
        "lm_head": Slot("head", required=False),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        embedding: nn.Module,
        token_type_embedding: nn.Module | None = None,
        position_embedding: nn.Module | None = None,
        embedding_layernorm: nn.Module | None = None,
        encoder: nn.Module,
        pooler: nn.Module | None = None,
        lm_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # Only a masked-LM head can share the word embedding's weight.
        self.share_embeddings_and_output_weights = lm_head is not None and config.share_embeddings_and_output_weights
        self.embedding_dropout = config.hidden_dropout
        self.embedding = embedding
        self.token_type_embedding = token_type_embedding
        self.position_embedding = position_embedding
        self.embedding_layernorm = nn.Identity() if embedding_layernorm is None else embedding_layernorm
        self.encoder = encoder
        self.pooler = pooler
        self.lm_head = lm_head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> ModelOutput:
        """input_ids, token_type_ids, labels [b, s] (label -100: unscored); attention_mask [b, s] (1: token, 0: pad)."""
        hidden_states = self.embedding(input_ids)  # [b, s, h]
        if self.token_type_embedding is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)  # every token in segment A
            hidden_states = hidden_states + self.token_type_embedding(token_type_ids)
        rotary = None
        if self.position_embedding is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)  # [1, s]
            hidden_states, rotary = self.position_embedding(hidden_states, position_ids)
        hidden_states = self.embedding_layernorm(hidden_states)
        hidden_states = F.dropout(hidden_states, self.embedding_dropout, self.training)

        # Bidirectional: only padding is masked, and without padding there is no mask.
        mask = None if attention_mask is None else padding_mask(attention_mask)  # [b, 1, 1, s]
        hidden_states = self.encoder(hidden_states, attention_mask=mask, rotary=rotary)  # [b, s, h]

        pooled = None if self.pooler is None else self.pooler(hidden_states)  # [b, h]
        logits = loss = None
        if self.lm_head is not None:
            weight = self.embedding.weight if self.share_embeddings_and_output_weights else None
            logits = self.lm_head(hidden_states, weight)  # [b, s, vocab]
            if labels is not None:
                loss = token_cross_entropy(logits, labels)
        elif labels is not None:
            raise ValueError("labels were given but this model has no lm_head to score them")
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=hidden_states, pooler_output=pooled)

    def example_inputs(self, batch: int = 1, seq: int = 8, device: torch.device | str | None = None) -> dict:
        """Keyword arguments for a forward pass of the given size (shape checks, tracing)."""
        if device is None:
            device = next(self.parameters()).device
        input_ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
        return {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids)}
