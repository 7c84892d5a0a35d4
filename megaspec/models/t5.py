"""An encoder-decoder (T5), assembled entirely from slots."""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import NonNegativeInt
from torch import Tensor, nn

from megaspec.cache import Cache, child_cache
from megaspec.config import TransformerConfig
from megaspec.models.losses import token_cross_entropy
from megaspec.models.masks import causal_padding_mask, decode_mask, padding_mask
from megaspec.models.output import ModelOutput
from megaspec.registry import Slot, register


@dataclass
class EncoderDecoderCache:
    """A generation's state: the decoder's cache and the encoder output, computed at the first step."""

    decoder: Any
    encoder_output: Tensor | None = None


@register("model", "t5_model")
class T5Model(nn.Module):
    """embedding -> encoder; embedding -> decoder (cross-attending to the encoder) -> output_layer.

    One token embedding serves the encoder, the decoder and, when the config ties
    them, the output layer. Position information (T5's relative bias) lives in the
    blocks' `attention_bias` slots; cross-attention lives in the decoder layers'
    `cross_attention` slot, which receives the encoder output and its padding mask.
    Generation starts each decoder sequence with `decoder_start_token_id` (T5: the pad id, 0).
    """

    is_encoder_decoder: ClassVar[bool] = True

    slots: ClassVar[dict[str, Slot]] = {
        "embedding": Slot("embedding"),
        "encoder": Slot("block"),
        "decoder": Slot("block"),
        "output_layer": Slot("head"),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        embedding: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        output_layer: nn.Module,
        decoder_start_token_id: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        self.decoder_start_token_id = decoder_start_token_id
        self.share_embeddings_and_output_weights = config.share_embeddings_and_output_weights
        # A tied head reads the embedding table, whose scale suits inputs, not logits:
        # T5 scales the decoder output by d_model^-0.5 first. Untied (T5 v1.1) it does not.
        self.output_scale = config.hidden_size**-0.5 if config.share_embeddings_and_output_weights else 1.0
        self.dropout = config.hidden_dropout
        self.embedding = embedding
        self.encoder = encoder
        self.decoder = decoder
        self.output_layer = output_layer

    def init_cache(self, cache: Cache) -> EncoderDecoderCache:
        """The decoder's cache; the encoder runs once, at the first step."""
        return EncoderDecoderCache(child_cache(self.decoder, cache))

    def forward(
        self,
        input_ids: Tensor,
        decoder_input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        cache: Cache | None = None,
    ) -> ModelOutput:
        """input_ids [b, s], decoder_input_ids [b, t]; masks 1 = token, 0 = pad; labels [b, t], -100 = unscored.

        With a cache (generating), decoder_input_ids are the step's new tokens and the encoder runs once.
        """
        # Encoder: bidirectional, padding masked; also the cross-attention mask.
        encoder_mask = None if attention_mask is None else padding_mask(attention_mask)  # [b, 1, 1, s]
        state = None if cache is None else cache.state
        if state is not None and state.encoder_output is not None:
            encoder_output = state.encoder_output
        else:
            hidden_states = F.dropout(self.embedding(input_ids), self.dropout, self.training)  # [b, s, h]
            encoder_output = self.encoder(hidden_states, attention_mask=encoder_mask)  # [b, s, h]
            encoder_output = F.dropout(encoder_output, self.dropout, self.training)
            if state is not None:
                state.encoder_output = encoder_output

        # Decoder: an explicit causal mask, since a position bias is added to it and the
        # attention's own causal fast path only applies without a mask.
        if cache is not None and cache.filled:  # a decode step: over every key position (the cache keeps it causal)
            decoder_mask = None if decoder_attention_mask is None else decode_mask(
                decoder_attention_mask, cache.positions, cache.key_length)  # [b, 1, t, K]
        else:
            if decoder_attention_mask is None:
                decoder_attention_mask = torch.ones_like(decoder_input_ids)
            decoder_mask = causal_padding_mask(decoder_attention_mask)  # [b, 1, t, t]
        hidden_states = F.dropout(self.embedding(decoder_input_ids), self.dropout, self.training)  # [b, t, h]
        cached = {} if state is None else {"cache": state.decoder}
        hidden_states = self.decoder(hidden_states, attention_mask=decoder_mask, context=encoder_output,
                                     context_mask=encoder_mask, **cached)  # [b, t, h]
        hidden_states = F.dropout(hidden_states, self.dropout, self.training)

        weight = self.embedding.weight if self.share_embeddings_and_output_weights else None
        logits = self.output_layer(hidden_states * self.output_scale, weight)  # [b, t, vocab]
        loss = None if labels is None else token_cross_entropy(logits, labels)
        return ModelOutput(
            logits=logits, loss=loss, last_hidden_state=hidden_states, encoder_last_hidden_state=encoder_output
        )

    def example_inputs(self, batch: int = 1, seq: int = 8, device: torch.device | str | None = None) -> dict:
        """Keyword arguments for a forward pass of the given size (`seq` tokens in and out)."""
        if device is None:
            device = next(self.parameters()).device
        input_ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
        return {"input_ids": input_ids, "decoder_input_ids": torch.zeros_like(input_ids)}
