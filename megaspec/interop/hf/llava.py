"""LLaVA (HF `LlavaForConditionalGeneration`, CLIP tower + Llama) <-> specs/llava.yaml.

Two named configs, as conf/model/llava.yaml: `language` (the Llama family's
translation of `text_config`) and `vision` (CLIP's of `vision_config`). HF's
LLaVA options that steer the forward (image token, feature layer and selection)
are params of the spec's root node; the projector's activation and bias are its node's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from megaspec.configs import Configs
from megaspec.errors import SpecError
from megaspec.interop.hf.clip import VISION_UNREAD, hf_vision_config, vision_config, vision_rules, vision_spec
from megaspec.interop.hf.core import (
    Family,
    Rule,
    activation,
    check_class,
    hf_activation,
    rule,
    shipped_spec,
    spec_activation,
    unsupported,
)
from megaspec.interop.hf.llama import Llama, decoder_rules

# LLaVAModel's params as HF's LlavaConfig defaults them.
DEFAULT_PARAMS = {"image_token_index": 32000, "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}


def _rebased(rules: list[Rule], hf_from: str, hf_to: str, ours_prefix: str) -> list[Rule]:
    """Rules with HF names under `hf_from` moved under `hf_to`, and megaspec names under `ours_prefix`."""
    def move(name: str) -> str:
        return hf_to + name.removeprefix(hf_from) if name.startswith(hf_from) else name

    return [Rule(tuple(move(n) for n in r.hf), tuple(ours_prefix + n for n in r.ours), r.to_ours, r.to_hf)
            for r in rules]


class Llava(Family):
    """LLaVA-1.5: CLIP ViT features from one layer, a two-layer GELU projector, a Llama decoder."""

    name = "llava"
    model_types = ("llava",)
    hf_class = "LlavaForConditionalGeneration"
    requires = ("llava_model", "vision_transformer", "patch_embedding", "mlp2x_gelu", "gpt_model")
    unread_fields: Mapping[str, frozenset[str]] = {"vision": VISION_UNREAD}

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        vision, text = c.vision_config, c.text_config
        unsupported("LLaVA", vision_config_model_type=(vision.model_type, "clip_vision_model"),
                    text_config_model_type=(text.model_type, "llama"))
        if not isinstance(c.vision_feature_layer, int):
            raise SpecError(f"unsupported LLaVA configuration: vision_feature_layer={c.vision_feature_layer!r} "
                            "(megaspec reads features from one layer, an int)")
        language_spec, language = Llama().spec_and_config(text)
        language["share_embeddings_and_output_weights"] = c.tie_word_embeddings  # LLaVA's own flag decides
        spec = shipped_spec("llava")
        spec["params"] = {
            "image_token_index": c.image_token_index,
            "vision_feature_layer": c.vision_feature_layer,
            "vision_feature_select_strategy": c.vision_feature_select_strategy,
        }
        subs = spec["submodules"]
        subs["vision_model"] = {**vision_spec(vision, "LLaVA vision"), "config": "vision"}
        subs["language_model"] = language_spec
        projector = subs["vision_projection"]
        projector["submodules"]["activation"] = activation(c.projector_hidden_act, "LLaVA projector")
        if not c.multimodal_projector_bias:
            projector["params"] = {"bias": False}
        return spec, {"language": language, "vision": vision_config(vision, "LLaVA vision")}

    def hf_config(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        params = {**DEFAULT_PARAMS, **spec.get("params", {})}
        projector = spec.get("submodules", {}).get("vision_projection", {})
        act = spec_activation(spec, "vision_projection.activation")
        subs = spec.get("submodules", {})
        language, vision = configs["language"], configs["vision"]
        strategy = params["vision_feature_select_strategy"]
        return transformers.LlavaConfig(
            vision_config=hf_vision_config(subs.get("vision_model", {}), vision),
            text_config=Llama().hf_config(subs.get("language_model", {}), {"": language}),
            image_token_index=params["image_token_index"],
            vision_feature_layer=params["vision_feature_layer"],
            vision_feature_select_strategy=strategy,
            projector_hidden_act=hf_activation(act),
            multimodal_projector_bias=projector.get("params", {}).get("bias", True),
            image_seq_length=vision.num_patches + (strategy == "full"),
            tie_word_embeddings=language.share_embeddings_and_output_weights,
        )

    def hf_state(self, hf_model: Any) -> dict[str, Tensor]:
        check_class(hf_model, "LLaVA", self.hf_class)  # a bare LlavaModel has no lm_head
        return dict(hf_model.state_dict())

    def rules(self, configs: Configs) -> list[Rule]:
        language = _rebased(decoder_rules(configs["language"]), "model.", "model.language_model.", "language_model.")
        projector = [rule(f"model.multi_modal_projector.linear_{n}.{p}", f"vision_projection.linear_fc{n}.{p}")
                     for n in (1, 2) for p in ("weight", "bias")]
        return vision_rules(configs["vision"], "model.vision_tower.", "vision_model.") + projector + language
