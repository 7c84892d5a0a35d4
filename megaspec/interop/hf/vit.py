"""ViT (HF `ViTModel`, with its pooler) <-> specs/vit.yaml.

HF keeps the class token as [1, 1, h] and the positions as [1, 1 + patches, h];
megaspec's patch embedding keeps them as [h] and [1 + patches, h].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from megaspec.configs import Configs
from megaspec.interop.hf.clip import VISION_UNREAD
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
    split_qkv,
    unsupported,
)


class ViT(Family):
    """ViT: conv patches with a class token and learned positions, pre-LN layers, final LayerNorm, tanh pooler."""

    name = "vit"
    model_types = ("vit",)
    hf_class = "ViTModel"
    requires = ("vision_transformer", "patch_embedding", "pooler")
    unread_fields: Mapping[str, frozenset[str]] = {"": VISION_UNREAD}
    architecture = "ViT"

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        unsupported(self.architecture, qkv_bias=(c.qkv_bias, True), pooler_act=(c.pooler_act, "tanh"),
                    pooler_output_size=(c.pooler_output_size, c.hidden_size))
        act = activation(c.hidden_act, self.architecture)
        spec = shipped_spec("vit")
        node_at(spec, "encoder.layers.mlp")["submodules"]["activation"] = act
        config = {
            "num_layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "ffn_hidden_size": c.intermediate_size,
            "image_size": c.image_size,
            "patch_size": c.patch_size,
            "num_channels": c.num_channels,
            "max_position_embeddings": (c.image_size // c.patch_size) ** 2 + 1,  # patches + the class token
            "normalization": "LayerNorm",
            "layernorm_epsilon": c.layer_norm_eps,
            "activation": act,
            "add_bias_linear": True,
            "position_embedding_type": "learned_absolute",
            "hidden_dropout": c.hidden_dropout_prob,
            "attention_dropout": c.attention_probs_dropout_prob,
            "init_method_std": c.initializer_range,
        }
        return spec, config

    def hf_config(self, configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        unsupported(self.architecture, add_bias_linear=(cfg.add_bias_linear, True))
        return transformers.ViTConfig(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.ffn_size,
            hidden_act=hf_activation(cfg.activation),
            hidden_dropout_prob=cfg.hidden_dropout,
            attention_probs_dropout_prob=cfg.attention_dropout,
            initializer_range=cfg.init_method_std,
            layer_norm_eps=cfg.layernorm_epsilon,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            num_channels=cfg.num_channels,
            qkv_bias=True,
        )

    def hf_state(self, hf_model: Any) -> dict[str, Tensor]:
        check_class(hf_model, self.architecture, self.hf_class)  # its pooler; heads on top have no slot here
        return dict(hf_model.state_dict())

    def rules(self, configs: Configs) -> list[Rule]:
        heads = configs[""].num_attention_heads

        def qkv_to_ours(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor]:
            return (fuse_qkv(q, k, v, heads),)

        def qkv_to_hf(w: Tensor) -> tuple[Tensor, ...]:
            return split_qkv(w, heads, heads)

        def batched(t: Tensor) -> tuple[Tensor]:  # [h] or [n, h] -> HF's [1, 1, h] or [1, n, h]
            return (t.reshape(1, 1, -1) if t.dim() == 1 else t.unsqueeze(0),)

        def unbatched(t: Tensor) -> tuple[Tensor]:
            return (t.reshape(-1) if t.size(1) == 1 else t.squeeze(0),)

        h, o = "layers.{i}.", "encoder.layers.{i}."
        attn = f"{h}attention."
        rules = [
            rule("embeddings.cls_token", "embedding.class_embedding", unbatched, batched),
            rule("embeddings.position_embeddings", "embedding.position_embedding", unbatched, batched),
            rule("embeddings.patch_embeddings.projection.weight", "embedding.weight"),
            rule("embeddings.patch_embeddings.projection.bias", "embedding.bias"),
        ]
        for p in ("weight", "bias"):
            rules += [
                rule((f"{attn}q_proj.{p}", f"{attn}k_proj.{p}", f"{attn}v_proj.{p}"),
                     f"{o}self_attention.linear_qkv.{p}", qkv_to_ours, qkv_to_hf),
                rule(f"{attn}o_proj.{p}", f"{o}self_attention.linear_proj.{p}"),
                rule(f"{h}layernorm_before.{p}", f"{o}input_layernorm.{p}"),
                rule(f"{h}layernorm_after.{p}", f"{o}pre_mlp_layernorm.{p}"),
                rule(f"{h}mlp.fc1.{p}", f"{o}mlp.linear_fc1.{p}"),
                rule(f"{h}mlp.fc2.{p}", f"{o}mlp.linear_fc2.{p}"),
                rule(f"layernorm.{p}", f"encoder.final_layernorm.{p}"),
                rule(f"pooler.dense.{p}", f"pooler.dense.{p}"),
            ]
        return rules
