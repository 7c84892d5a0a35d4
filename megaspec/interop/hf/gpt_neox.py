"""GPT-NeoX and Pythia (HF `GPTNeoXForCausalLM`) <-> specs/gpt_neox.yaml.

HF's fused query_key_value is laid out per head as [q_h, k_h, v_h], which is
megaspec's per-group layout with one group per head, so it moves unchanged.
`use_parallel_residual: false` keeps the same slots in a sequential transformer_layer.
"""

from __future__ import annotations

from typing import Any

from megaspec.configs import Configs
from megaspec.interop.hf.core import (
    Family,
    Rule,
    activation,
    hf_activation,
    layer_nodes,
    megatron_layer_rules,
    node_at,
    rule,
    shipped_spec,
    token_ids,
    unsupported,
)
from megaspec.interop.hf.llama import hf_rope, partial_rope_fields

PARALLEL, SEQUENTIAL = "parallel_transformer_layer", "transformer_layer"


class GPTNeoX(Family):
    """GPT-NeoX / Pythia: parallel attention and MLP with a LayerNorm each, partial RoPE, biases everywhere."""

    name = "gpt_neox"
    model_types = ("gpt_neox",)
    hf_class = "GPTNeoXForCausalLM"
    requires = ("gpt_model", PARALLEL)
    architecture = "GPT-NeoX"

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        unsupported(self.architecture, attention_bias=(c.attention_bias, True))  # the MLP always has biases
        act = activation(c.hidden_act, self.architecture)
        spec = shipped_spec("gpt_neox")
        layer = layer_nodes(spec)[0]
        layer["module"] = PARALLEL if c.use_parallel_residual else SEQUENTIAL
        node_at(layer, "mlp")["submodules"]["activation"] = act
        config = {
            "num_layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "ffn_hidden_size": c.intermediate_size,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings,
            "normalization": "LayerNorm",
            "layernorm_epsilon": c.layer_norm_eps,
            "activation": act,
            "add_bias_linear": True,
            "position_embedding_type": "rope",
            **partial_rope_fields(c, self.architecture),
            "share_embeddings_and_output_weights": c.tie_word_embeddings,
            "hidden_dropout": c.hidden_dropout,
            "attention_dropout": c.attention_dropout,
            "init_method_std": c.initializer_range,
        }
        return spec, config

    def hf_config_from(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        unsupported(self.architecture, add_bias_linear=(cfg.add_bias_linear, True))
        return transformers.GPTNeoXConfig(
            num_hidden_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.ffn_size,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_position_embeddings,
            layer_norm_eps=cfg.layernorm_epsilon,
            hidden_act=hf_activation(cfg.activation),
            rope_parameters={**hf_rope(cfg), "partial_rotary_factor": cfg.rotary_percent},
            use_parallel_residual=layer_nodes(spec)[0]["module"] == PARALLEL,
            tie_word_embeddings=cfg.share_embeddings_and_output_weights,
            hidden_dropout=cfg.hidden_dropout,
            attention_dropout=cfg.attention_dropout,
            initializer_range=cfg.init_method_std,
            attention_bias=True,
            **token_ids(cfg.vocab_size, bos_token_id=0, eos_token_id=2),
        )

    def hf_config(self, configs: Configs) -> Any:
        return self.hf_config_from(shipped_spec("gpt_neox"), configs)

    def rules(self, configs: Configs) -> list[Rule]:
        h, o = "gpt_neox.layers.{i}.", "decoder.layers.{i}."
        rules = [rule("gpt_neox.embed_in.weight", "embedding.weight")]
        for p in ("weight", "bias"):
            rules += [
                rule(f"gpt_neox.final_layer_norm.{p}", f"decoder.final_layernorm.{p}"),
                rule(f"{h}input_layernorm.{p}", f"{o}input_layernorm.{p}"),
                rule(f"{h}post_attention_layernorm.{p}", f"{o}pre_mlp_layernorm.{p}"),
            ]
        rules += megatron_layer_rules(h, "attention", ("weight", "bias"))
        if not configs[""].share_embeddings_and_output_weights:
            rules.append(rule("lm_head.weight", "output_layer.weight"))
        return rules
