"""A vision transformer encoder (ViT, CLIP's image tower), assembled from slots."""

from typing import ClassVar

import torch
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.models.masks import padding_mask
from megaspec.models.output import ModelOutput
from megaspec.registry import Slot, register


@register("model", "vision_transformer")
class VisionTransformer(nn.Module):
    """embedding (patches) -> pre_layernorm -> encoder -> tokens; pooled by `pooler`, or class token + post_layernorm.

    The names follow HF's CLIPVisionModel: CLIP normalises the embeddings once
    before the first layer (`pre_layernorm`, HF's `pre_layrnorm`) and only the
    pooled class token after the last (`post_layernorm`). The original ViT instead
    ends its encoder with a norm and pools with a `pooler` (tanh(dense(class token))).
    The encoder is a block whose `layers` can also be run partially, for features
    from an inner layer.
    """

    slots: ClassVar[dict[str, Slot]] = {
        "embedding": Slot("embedding"),
        "pre_layernorm": Slot("norm", required=False),
        "encoder": Slot("block"),
        "post_layernorm": Slot("norm", required=False),
        "pooler": Slot("pooler", required=False),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        embedding: nn.Module,
        pre_layernorm: nn.Module | None = None,
        encoder: nn.Module,
        post_layernorm: nn.Module | None = None,
        pooler: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if pooler is not None and post_layernorm is not None:
            raise ValueError("fill one of pooler (which pools itself) and post_layernorm (which normalises the "
                             "pooled class token), not both")
        self.hidden_size = config.hidden_size
        self.image_size = config.image_size
        self.num_channels = config.num_channels
        # Token counts per image, which a multimodal model needs before running the tower.
        self.num_patches: int = embedding.num_patches
        self.num_class_tokens: int = embedding.num_class_tokens
        self.num_layers = len(encoder.layers)
        self.embedding = embedding
        self.pre_layernorm = nn.Identity() if pre_layernorm is None else pre_layernorm
        self.encoder = encoder
        self.post_layernorm = nn.Identity() if post_layernorm is None else post_layernorm
        self.pooler = pooler

    def hidden_states(self, pixel_values: Tensor, layer: int = -1, attention_mask: Tensor | None = None) -> Tensor:
        """Token states after `layer` encoder layers: 0 is the (normalised) embeddings, -1 the encoder output.

        Indexed as HF's `hidden_states` tuple, so LLaVA's `vision_feature_layer: -2` is
        the input of the last layer; layers after `layer` are not run. `attention_mask`
        [b, tokens] (1 = attend, 0 = masked key) reaches layers whose attention reads masks.
        """
        if not -self.num_layers - 1 <= layer <= self.num_layers:
            raise IndexError(f"layer {layer} is out of range for an encoder of {self.num_layers} layers")
        hidden = self.pre_layernorm(self.embedding(pixel_values))  # [b, cls + patches, h]
        mask = None if attention_mask is None else padding_mask(attention_mask)  # [b, 1, 1, tokens]
        stop = layer % (self.num_layers + 1)
        if stop == self.num_layers:
            return self.encoder(hidden, attention_mask=mask)  # the whole block, its own final norm included
        for encoder_layer in self.encoder.layers[:stop]:
            hidden = encoder_layer(hidden, attention_mask=mask)  # bidirectional, no rotary
        return hidden

    def forward(self, pixel_values: Tensor, attention_mask: Tensor | None = None) -> ModelOutput:
        """pixel_values [b, c, H, W] -> last_hidden_state [b, cls + patches, h], pooler_output [b, h]."""
        hidden = self.hidden_states(pixel_values, attention_mask=attention_mask)
        if self.pooler is not None:
            return ModelOutput(last_hidden_state=hidden, pooler_output=self.pooler(hidden))
        # CLIP pools the class token; a tower without one pools the mean of its patches.
        pooled = hidden[:, 0] if self.num_class_tokens else hidden.mean(dim=1)
        return ModelOutput(last_hidden_state=hidden, pooler_output=self.post_layernorm(pooled))

    def example_inputs(self, batch: int = 1, seq: int = 8, device: torch.device | str | None = None) -> dict:
        """A batch of blank images of the configured size (`seq` is ignored: images fix the length)."""
        if device is None:
            device = next(self.parameters()).device
        shape = (batch, self.num_channels, self.image_size, self.image_size)
        return {"pixel_values": torch.zeros(shape, device=device)}
