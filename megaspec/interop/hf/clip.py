"""CLIP's image tower (HF `CLIPVisionModel`) <-> the `vision_model` node of specs/llava.yaml.

The tower's config, spec and tensor rules are also LLaVA's vision half
(megaspec.interop.hf.llava), so they take name prefixes and a config name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from megaspec.config import TransformerConfig
from megaspec.configs import Configs
from megaspec.interop.hf.core import (
    Family,
    Rule,
    activation,
    check_class,
    fuse_qkv,
    hf_activation,
    node_at,
    rule,
    shipped_spec,
    spec_activation,
    split_qkv,
)

# The tower reads neither a vocabulary, a position limit (its positions are one per patch) nor a tie:
# a config for it cannot set them, and HF's values for them are not compared.
VISION_UNREAD = frozenset({"vocab_size", "max_position_embeddings", "share_embeddings_and_output_weights"})


def vision_spec(c: Any, architecture: str) -> dict[str, Any]:
    """The tower's spec node (no `config:` selection) for an HF CLIPVisionConfig."""
    node = shipped_spec("llava")["submodules"]["vision_model"]
    node.pop("config", None)
    node_at(node, "encoder.layers.mlp")["submodules"]["activation"] = activation(c.hidden_act, architecture)
    return node


def vision_config(c: Any, architecture: str) -> dict[str, Any]:
    """TransformerConfig fields for an HF CLIPVisionConfig."""
    return {
        "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "ffn_hidden_size": c.intermediate_size,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "num_channels": c.num_channels,
        "layernorm_epsilon": c.layer_norm_eps,
        "add_bias_linear": True,
        "hidden_dropout": 0.0,
        "attention_dropout": c.attention_dropout,
        "init_method_std": c.initializer_range,
    }


def hf_vision_config(spec: dict[str, Any], cfg: TransformerConfig) -> Any:
    """The tower's spec node and TransformerConfig -> HF CLIPVisionConfig."""
    import transformers

    return transformers.CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_channels=cfg.num_channels,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act=hf_activation(spec_activation(spec, "encoder.layers.mlp.activation")),
        layer_norm_eps=cfg.layernorm_epsilon,
        attention_dropout=cfg.attention_dropout,
        initializer_range=cfg.init_method_std,
    )


def vision_rules(cfg: TransformerConfig, hf_prefix: str = "", ours_prefix: str = "") -> list[Rule]:
    """CLIP tower tensors (`{hf_prefix}embeddings...`) <-> vision_transformer ones (`{ours_prefix}embedding...`)."""
    heads = cfg.num_attention_heads

    def to_ours(q: Any, k: Any, v: Any) -> tuple[Any]:
        return (fuse_qkv(q, k, v, heads),)

    def to_hf(w: Any) -> tuple[Any, ...]:
        return split_qkv(w, heads, heads)

    h, o = f"{hf_prefix}encoder.layers.{{i}}.", f"{ours_prefix}encoder.layers.{{i}}."
    attn = f"{h}self_attn."
    rules = [
        rule(f"{hf_prefix}embeddings.class_embedding", f"{ours_prefix}embedding.class_embedding"),
        rule(f"{hf_prefix}embeddings.patch_embedding.weight", f"{ours_prefix}embedding.weight"),
        rule(f"{hf_prefix}embeddings.position_embedding.weight", f"{ours_prefix}embedding.position_embedding"),
    ]
    for p in ("weight", "bias"):
        rules += [
            rule(f"{hf_prefix}pre_layrnorm.{p}", f"{ours_prefix}pre_layernorm.{p}"),  # sic: HF's spelling
            rule(f"{hf_prefix}post_layernorm.{p}", f"{ours_prefix}post_layernorm.{p}"),
            rule(f"{h}layer_norm1.{p}", f"{o}input_layernorm.{p}"),
            rule(f"{h}layer_norm2.{p}", f"{o}pre_mlp_layernorm.{p}"),
            rule((f"{attn}q_proj.{p}", f"{attn}k_proj.{p}", f"{attn}v_proj.{p}"),
                 f"{o}self_attention.linear_qkv.{p}", to_ours, to_hf),
            rule(f"{attn}out_proj.{p}", f"{o}self_attention.linear_proj.{p}"),
            rule(f"{h}mlp.fc1.{p}", f"{o}mlp.linear_fc1.{p}"),
            rule(f"{h}mlp.fc2.{p}", f"{o}mlp.linear_fc2.{p}"),
        ]
    return rules


class CLIPVision(Family):
    """CLIP's ViT image tower: patch conv, class token, pre-LN layers, LayerNorm on the pooled class token."""

    name = "clip_vision"
    model_types = ("clip_vision_model",)
    hf_class = "CLIPVisionModel"
    requires = ("vision_transformer", "patch_embedding")
    unread_fields: Mapping[str, frozenset[str]] = {"": VISION_UNREAD}

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return vision_spec(c, "CLIP vision"), vision_config(c, "CLIP vision")

    def hf_config(self, spec: dict[str, Any], configs: Configs) -> Any:
        return hf_vision_config(spec, configs[""])

    def hf_state(self, hf_model: Any) -> dict[str, Tensor]:
        check_class(hf_model, "CLIP's vision tower", self.hf_class)  # not ...WithProjection: no projection slot
        return dict(hf_model.state_dict())

    def rules(self, configs: Configs) -> list[Rule]:
        return vision_rules(configs[""])
