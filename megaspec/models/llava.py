"""LLaVA (Liu et al., 2023): a vision tower's patch features, projected into a language model's prompt."""

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from megaspec.cache import Cache, child_cache
from megaspec.config import TransformerConfig
from megaspec.errors import SpecError
from megaspec.models.output import ModelOutput
from megaspec.registry import Slot, register


@register("model", "llava_model")
class LLaVAModel(nn.Module):
    """vision_model -> vision_projection -> features written over the image tokens -> language_model.

    Slot names are Megatron-Core's LLaVAModel's. Built with the language config (the
    root selects it); the vision tower selects its own (`config: vision`). A prompt
    holds one `image_token_index` per image feature, in image order, as HF's
    processor expands `<image>`; each image gives `num_image_tokens` features.
    """

    slots: ClassVar[dict[str, Slot]] = {
        "vision_model": Slot("model"),
        # The built-in `linear` is the affine projector; `mlp2x_gelu` is LLaVA-1.5's.
        "vision_projection": Slot(("mlp", "linear"), provides=("in_features", "out_features"), default="mlp2x_gelu"),
        "language_model": Slot("model"),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        image_token_index: int = 32000,
        vision_feature_layer: int = -2,
        vision_feature_select_strategy: Literal["default", "full"] = "default",
        vision_model: nn.Module,
        vision_projection: Callable[..., nn.Module],
        language_model: nn.Module,
    ) -> None:
        super().__init__()
        layers = vision_model.num_layers
        if not -layers - 1 <= vision_feature_layer <= layers:
            raise ValueError(
                f"vision_feature_layer {vision_feature_layer} is out of range: the vision tower has {layers} "
                f"layers, so it must be in [{-layers - 1}, {layers}] (0: embeddings, -1: last layer)"
            )
        self.image_token_index = image_token_index
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        # "default" drops the class token(s), as LLaVA-1.5; "full" keeps them.
        self.feature_start = vision_model.num_class_tokens if vision_feature_select_strategy == "default" else 0
        self.num_image_tokens = vision_model.num_class_tokens + vision_model.num_patches - self.feature_start
        self.vision_model = vision_model
        self.vision_projection = vision_projection(
            in_features=vision_model.hidden_size, out_features=config.hidden_size
        )
        self.language_model = language_model

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [n, c, H, W] -> [n, num_image_tokens, h]: the chosen layer's tokens, projected."""
        hidden = self.vision_model.hidden_states(pixel_values, self.vision_feature_layer)  # [n, cls + p, hv]
        # The tower may hold another params_dtype than the projector (its own named config).
        dtype = next(self.vision_projection.parameters()).dtype
        return self.vision_projection(hidden[:, self.feature_start :].to(dtype))  # [n, t, h]

    def init_cache(self, cache: Cache) -> Any:
        """The language model's cache: images are read once, with the prompt."""
        return child_cache(self.language_model, cache)

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """input_ids [b, s] with image tokens; pixel_values [n, c, H, W]; attention_mask, labels [b, s].

        position_ids, cache and logits_to_keep go to the language model (see GPTModel.forward).
        """
        lm_inputs = {"attention_mask": attention_mask, "labels": labels, "position_ids": position_ids,
                     "logits_to_keep": logits_to_keep, **({} if cache is None else {"cache": cache})}
        if cache is not None and cache.filled:  # a decode step: generated tokens, never image placeholders
            return self.language_model(input_ids=input_ids, **lm_inputs)
        image_mask = input_ids == self.image_token_index  # [b, s]
        n_images = 0 if pixel_values is None else pixel_values.size(0)
        if not (input_ids.is_meta or torch.compiler.is_compiling()):
            self._check_image_tokens(image_mask, n_images)
        lm = self.language_model
        # Image tokens may lie outside the vocabulary (Megatron uses -200): look up id 0 there instead.
        embeds = lm.embedding(input_ids.masked_fill(image_mask, 0))  # [b, s, h]
        if pixel_values is not None:
            features = self.image_features(pixel_values).to(embeds.dtype)  # [n, t, h]
            # Row-major over [b, s]: the k-th image token of the batch takes the k-th feature.
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features)
        return self.language_model(inputs_embeds=embeds, **lm_inputs)

    def _check_image_tokens(self, image_mask: Tensor, n_images: int) -> None:
        """Every image feature needs exactly one image token in the prompt, and vice versa."""
        n_tokens = int(image_mask.sum())
        n_features = n_images * self.num_image_tokens
        if n_tokens != n_features:
            raise SpecError(
                f"the prompt holds {n_tokens} image tokens (id {self.image_token_index}) but {n_images} "
                f"image(s) give {n_features} features ({self.num_image_tokens} per image); put exactly "
                f"{self.num_image_tokens} image tokens in the prompt for each image"
            )

    def example_inputs(self, batch: int = 1, seq: int = 8, device: torch.device | str | None = None) -> dict:
        """One image per sequence: a first token, the image's tokens, then seq - 1 more text tokens."""
        if device is None:
            device = next(self.parameters()).device
        t = self.num_image_tokens
        input_ids = torch.zeros(batch, seq + t, dtype=torch.long, device=device)
        input_ids[:, 1 : 1 + t] = self.image_token_index
        vision = self.vision_model
        pixel_values = torch.zeros(batch, vision.num_channels, vision.image_size, vision.image_size, device=device)
        return {"input_ids": input_ids, "pixel_values": pixel_values}
