"""A decoder-only language model (GPT-2, Llama, ...), assembled entirely from slots."""

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.cache import Cache, child_cache
from megaspec.config import TransformerConfig
from megaspec.errors import SpecError
from megaspec.models.losses import causal_lm_loss
from megaspec.models.masks import causal_padding_mask, decode_mask
from megaspec.models.output import ModelOutput
from megaspec.registry import Slot, register


@register("model", "gpt_model")
class GPTModel(nn.Module):
    """embedding -> position_embedding -> embedding_layernorm -> decoder -> output_layer, with a causal LM loss.

    `embedding_layernorm` (BLOOM's `word_embeddings_layernorm`) normalises the embeddings,
    `inputs_embeds` included, before the first layer.
    """

    # logits [b, s, vocab], labels [b, s] -> loss; also what a pipeline's last stage computes.
    loss_function = staticmethod(causal_lm_loss)

    slots: ClassVar[dict[str, Slot]] = {
        "embedding": Slot("embedding"),
        "position_embedding": Slot("position_embedding", required=False),
        "embedding_layernorm": Slot("norm", required=False),
        "decoder": Slot("block"),
        "output_layer": Slot("head"),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        embedding: nn.Module,
        position_embedding: nn.Module | None = None,
        embedding_layernorm: nn.Module | None = None,
        decoder: nn.Module,
        output_layer: nn.Module,
    ) -> None:
        super().__init__()
        self.share_embeddings_and_output_weights = config.share_embeddings_and_output_weights
        self.embedding_dropout = config.hidden_dropout
        # The context the model is meant for: `megaspec train` and `megaspec.generate` keep
        # sequences within it (a learned position table also has this many rows).
        self.max_position_embeddings = config.max_position_embeddings
        self.embedding = embedding
        self.position_embedding = position_embedding
        self.embedding_layernorm = nn.Identity() if embedding_layernorm is None else embedding_layernorm
        self.decoder = decoder
        self.output_layer = output_layer
        # Modules that leave an `aux_loss` tensor after each forward (MoE layers), found once
        # here so that forward sums a fixed list: no module walk per step, compile-friendly.
        self.aux_loss_modules = [m for m in self.modules() if hasattr(m, "aux_loss")]

    def init_cache(self, cache: Cache) -> Any:
        """The decoder's cache, within the positions a learned position table holds."""
        limit = getattr(self.position_embedding, "position_limit", None)
        if limit is not None and cache.max_length is not None and cache.max_length > limit:
            raise SpecError(f"generation would reach position {cache.max_length - 1}, but the position embedding "
                            f"holds {limit} positions (max_position_embeddings); shorten the prompt or "
                            "generate fewer tokens")
        return child_cache(self.decoder, cache)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """input_ids [b, s] (or inputs_embeds [b, s, h], e.g. with image features spliced in);
        attention_mask [b, s] (1 = token, 0 = pad; in a decode step it covers every position so far);
        labels [b, s], shifted here; cache: a generation's (megaspec.cache); logits_to_keep: the last n only."""
        # [b, s, h]
        hidden_states = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:  # the positions this forward fills: from 0, or after the cached ones
            s = hidden_states.size(1)
            position_ids = (torch.arange(s, device=hidden_states.device) if cache is None else cache.positions)[None]
        rotary = None
        if self.position_embedding is not None:
            hidden_states, rotary = self.position_embedding(hidden_states, position_ids)
        hidden_states = self.embedding_layernorm(hidden_states)
        # After the position embedding, as in GPT-2 and Megatron: drop(token + position).
        hidden_states = F.dropout(hidden_states, self.embedding_dropout, self.training)

        # Built once for all layers. Without padding there is no mask at all, so
        # attention takes its is_causal fast path.
        if attention_mask is None:
            mask = None
        elif cache is not None and cache.filled:  # a decode step: over every key position
            mask = decode_mask(attention_mask, cache.positions, cache.key_length)  # [b, 1, s, K]
        else:
            mask = causal_padding_mask(attention_mask)  # [b, 1, s, s]
        if cache is None:
            hidden_states = self.decoder(hidden_states, attention_mask=mask, rotary=rotary)  # [b, s, h]
        else:
            hidden_states = self.decoder(hidden_states, attention_mask=mask, rotary=rotary, cache=cache.state)

        weight = self.embedding.weight if self.share_embeddings_and_output_weights else None
        if logits_to_keep and labels is not None:
            raise SpecError("logits_to_keep leaves out logits the loss needs; pass labels or logits_to_keep, not both")
        kept = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        logits = self.output_layer(kept, weight)  # [b, s or logits_to_keep, vocab]
        loss = None if labels is None else self.loss_function(logits, labels)
        aux_loss = sum(m.aux_loss for m in self.aux_loss_modules) if self.aux_loss_modules else None
        if loss is not None and aux_loss is not None:
            loss = loss + aux_loss
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=hidden_states, aux_loss=aux_loss)

    def extra_repr(self) -> str:
        return f"max_position_embeddings={self.max_position_embeddings}"

    def example_inputs(self, batch: int = 1, seq: int = 8, device: torch.device | str | None = None) -> dict:
        """Keyword arguments for a forward pass of the given size (shape checks, tracing)."""
        if device is None:
            device = next(self.parameters()).device
        return {"input_ids": torch.zeros(batch, seq, dtype=torch.long, device=device)}
