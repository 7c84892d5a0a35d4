"""BERT (HF `BertModel` with its pooler, `BertForMaskedLM`) <-> specs/bert.yaml.

One HF config serves both classes, so there are two families: the HF class picks
one (from_hf), and the spec's pooler or masked-LM head picks one (to_hf).
"""

from __future__ import annotations

from typing import Any

import torch

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
    unsupported,
)


class Bert(Family):
    """BERT's encoder with the pooler (HF `BertModel`): post-LN layers, learned positions and token types."""

    name = "bert"
    model_types = ("bert",)
    hf_class = "BertModel"
    requires = ("bert_model", "pooler")
    prefix = ""  # where the encoder's tensors live in the HF class

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        unsupported(
            "BERT",
            is_decoder=(c.is_decoder, False),
            add_cross_attention=(c.add_cross_attention, False),
            position_embedding_type=(getattr(c, "position_embedding_type", "absolute"), "absolute"),
        )
        act = activation(c.hidden_act, "BERT")
        spec = shipped_spec("bert")
        node_at(spec, "token_type_embedding")["params"]["num_token_types"] = c.type_vocab_size
        node_at(spec, "encoder.layers.mlp")["submodules"]["activation"] = act
        config = {
            "num_layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "ffn_hidden_size": c.intermediate_size,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings,
            "layernorm_epsilon": c.layer_norm_eps,
            "add_bias_linear": True,
            "hidden_dropout": c.hidden_dropout_prob,
            "attention_dropout": c.attention_probs_dropout_prob,
            "init_method_std": c.initializer_range,
        }
        return spec, config

    def hf_config(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        # HF's type_vocab_size is the token-type embedding's param in the spec.
        node = spec.get("submodules", {}).get("token_type_embedding") or {}
        num_token_types = node.get("params", {}).get("num_token_types", 2) if isinstance(node, dict) else 2
        return transformers.BertConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.ffn_size,
            hidden_act=hf_activation(spec_activation(spec, "encoder.layers.mlp.activation")),
            hidden_dropout_prob=cfg.hidden_dropout,
            attention_probs_dropout_prob=cfg.attention_dropout,
            max_position_embeddings=cfg.max_position_embeddings,
            type_vocab_size=num_token_types,
            initializer_range=cfg.init_method_std,
            layer_norm_eps=cfg.layernorm_epsilon,
            tie_word_embeddings=cfg.share_embeddings_and_output_weights,
        )

    def hf_state(self, hf_model: Any) -> dict[str, torch.Tensor]:
        check_class(hf_model, "BERT", "BertModel", "BertForMaskedLM")
        return dict(hf_model.state_dict())

    def rules(self, configs: Configs) -> list[Rule]:
        return encoder_rules(configs[""], self.prefix) + [
            rule("pooler.dense.weight", "pooler.dense.weight"),
            rule("pooler.dense.bias", "pooler.dense.bias"),
        ]


class BertForMaskedLM(Bert):
    """BERT with the masked-LM head instead of the pooler (HF `BertForMaskedLM`), tied or not."""

    name = "bert_mlm"
    hf_class = "BertForMaskedLM"
    requires = ("bert_model", "bert_lm_head")
    prefix = "bert."

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        spec, config = super().spec_and_config(c)
        del spec["submodules"]["pooler"]
        spec["submodules"]["lm_head"] = "bert_lm_head"  # its empty activation slot follows the config
        config["activation"] = activation(c.hidden_act, "BERT")
        config["share_embeddings_and_output_weights"] = c.tie_word_embeddings
        return spec, config

    def rules(self, configs: Configs) -> list[Rule]:
        head, ours = "cls.predictions.", "lm_head."
        rules = encoder_rules(configs[""], self.prefix)
        for p in ("weight", "bias"):
            rules += [
                rule(f"{head}transform.dense.{p}", f"{ours}dense.{p}"),
                rule(f"{head}transform.LayerNorm.{p}", f"{ours}layernorm.{p}"),
            ]
        if configs[""].share_embeddings_and_output_weights:
            # Tied: decoder.weight is the word embedding and decoder.bias is `bias`, both dropped as aliases.
            rules.append(rule(f"{head}bias", f"{ours}output_layer.bias"))
        else:
            # Untied, HF keeps `bias` apart from decoder.bias and adds only the latter: that one is placed.
            rules += [
                rule(f"{head}decoder.weight", f"{ours}output_layer.weight"),
                rule((f"{head}bias", f"{head}decoder.bias"), f"{ours}output_layer.bias",
                     lambda _unused, used: (used,), lambda bias: (bias, bias)),
            ]
        return rules


def encoder_rules(cfg: TransformerConfig, prefix: str) -> list[Rule]:
    """Embeddings and encoder layers (`{prefix}embeddings`, `{prefix}encoder.layer.{i}`) <-> bert_model's."""
    heads = cfg.num_attention_heads

    def to_ours(q: Any, k: Any, v: Any) -> tuple[Any]:
        return (fuse_qkv(q, k, v, heads),)

    def to_hf(w: Any) -> tuple[Any, ...]:
        return split_qkv(w, heads, heads)

    emb, h, o = f"{prefix}embeddings.", f"{prefix}encoder.layer.{{i}}.", "encoder.layers.{i}."
    attn = f"{h}attention.self."
    rules = [
        rule(f"{emb}word_embeddings.weight", "embedding.weight"),
        rule(f"{emb}position_embeddings.weight", "position_embedding.weight"),
        rule(f"{emb}token_type_embeddings.weight", "token_type_embedding.weight"),
    ]
    for p in ("weight", "bias"):
        rules += [
            rule(f"{emb}LayerNorm.{p}", f"embedding_layernorm.{p}"),
            rule((f"{attn}query.{p}", f"{attn}key.{p}", f"{attn}value.{p}"),
                 f"{o}self_attention.linear_qkv.{p}", to_ours, to_hf),
            rule(f"{h}attention.output.dense.{p}", f"{o}self_attention.linear_proj.{p}"),
            rule(f"{h}attention.output.LayerNorm.{p}", f"{o}post_self_attn_layernorm.{p}"),
            rule(f"{h}intermediate.dense.{p}", f"{o}mlp.linear_fc1.{p}"),
            rule(f"{h}output.dense.{p}", f"{o}mlp.linear_fc2.{p}"),
            rule(f"{h}output.LayerNorm.{p}", f"{o}post_mlp_layernorm.{p}"),
        ]
    return rules
