"""Falcon (HF `FalconForCausalLM`) <-> specs/falcon.yaml and specs/falcon_new_decoder.yaml.

FalconConfig describes three layouts: Falcon-7B's (multi-query attention in parallel
with the MLP, one LayerNorm), the "new decoder architecture" of Falcon-40B/180B
(grouped key/value heads, a LayerNorm per branch, or one with
`num_ln_in_parallel_attn: 1`), and a sequential one (`parallel_attn: false`). Each of
HF's fused query_key_value layouts is already megaspec's per-group layout, so every
tensor moves unchanged; only the norms' names follow the layout.
"""

from __future__ import annotations

from typing import Any

from megaspec.configs import Configs
from megaspec.errors import SpecError
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
from megaspec.interop.hf.llama import hf_rope, rope_fields

PARALLEL, SEQUENTIAL = "parallel_transformer_layer", "transformer_layer"


def _layout(spec: dict[str, Any]) -> tuple[bool, bool]:
    """(parallel, two norms) of the spec's layer node."""
    layer = layer_nodes(spec)[0]
    return layer["module"] == PARALLEL, bool(layer.get("submodules", {}).get("pre_mlp_layernorm"))


class Falcon(Family):
    """Falcon: rotary, LayerNorm, GELU MLP, multi-query or grouped attention, parallel or sequential layers."""

    name = "falcon"
    model_types = ("falcon",)
    hf_class = "FalconForCausalLM"
    requires = ("gpt_model", PARALLEL)
    architecture = "Falcon"

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        unsupported(self.architecture, alibi=(c.alibi, False))
        new = bool(c.new_decoder_architecture)
        norms = c.num_ln_in_parallel_attn or (2 if new else 1)
        if new and not c.parallel_attn:
            raise SpecError("unsupported Falcon configuration: new_decoder_architecture needs parallel_attn "
                            "(HF's Falcon runs no other combination)")
        if not new:
            unsupported(self.architecture, num_ln_in_parallel_attn=(norms, 1))
        spec = shipped_spec("falcon_new_decoder" if new and norms == 2 else "falcon")
        layer = layer_nodes(spec)[0]
        act = activation(c.activation, self.architecture)
        node_at(layer, "mlp")["submodules"]["activation"] = act
        if not c.parallel_attn:  # sequential: a second norm before the MLP, after the attention's residual add
            layer["module"] = SEQUENTIAL
            layer["submodules"]["pre_mlp_layernorm"] = "layer_norm"
        groups = c.num_kv_heads if new else (1 if c.multi_query else c.num_attention_heads)
        config = {
            "num_layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "num_query_groups": groups,
            "ffn_hidden_size": c.ffn_hidden_size,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings,
            "normalization": "LayerNorm",
            "layernorm_epsilon": c.layer_norm_epsilon,
            "activation": act,
            "add_bias_linear": bool(c.bias),
            "position_embedding_type": "rope",
            **rope_fields(c, self.architecture),
            "share_embeddings_and_output_weights": c.tie_word_embeddings,
            "hidden_dropout": c.hidden_dropout,
            "attention_dropout": c.attention_dropout,
            "init_method_std": c.initializer_range,
        }
        return spec, config

    def hf_config_from(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        parallel, two_norms = _layout(spec)
        heads, groups = cfg.num_attention_heads, cfg.query_groups
        # The new architecture for two norms or grouped heads; Falcon-7B's otherwise.
        new = parallel and (two_norms or groups not in (1, heads))
        if not new and groups not in (1, heads):
            raise SpecError(f"HF Falcon groups key/value heads ({groups} of {heads}) only in its new decoder "
                            "architecture, whose layers are parallel")
        return transformers.FalconConfig(
            num_hidden_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=heads,
            num_kv_heads=groups,
            new_decoder_architecture=new,
            multi_query=groups == 1,
            parallel_attn=parallel,
            num_ln_in_parallel_attn=(2 if two_norms else 1) if new else None,
            ffn_hidden_size=cfg.ffn_size,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_position_embeddings,
            layer_norm_epsilon=cfg.layernorm_epsilon,
            activation=hf_activation(cfg.activation),
            bias=cfg.add_bias_linear,
            alibi=False,
            rope_parameters=hf_rope(cfg),
            tie_word_embeddings=cfg.share_embeddings_and_output_weights,
            hidden_dropout=cfg.hidden_dropout,
            attention_dropout=cfg.attention_dropout,
            initializer_range=cfg.init_method_std,
            **token_ids(cfg.vocab_size, bos_token_id=11, eos_token_id=11),
        )

    def hf_config(self, configs: Configs) -> Any:
        return self.hf_config_from(shipped_spec("falcon"), configs)

    def rules(self, configs: Configs) -> list[Rule]:
        return self.rules_from(shipped_spec("falcon"), configs)

    def rules_from(self, spec: dict[str, Any], configs: Configs) -> list[Rule]:
        parallel, two_norms = _layout(spec)
        h, o = "transformer.h.{i}.", "decoder.layers.{i}."
        norms = {"input_layernorm": "input_layernorm"}
        if two_norms:
            norms = ({"ln_attn": "input_layernorm", "ln_mlp": "pre_mlp_layernorm"} if parallel else
                     {"input_layernorm": "input_layernorm", "post_attention_layernorm": "pre_mlp_layernorm"})
        rules = [rule("transformer.word_embeddings.weight", "embedding.weight")]
        for p in ("weight", "bias"):
            rules.append(rule(f"transformer.ln_f.{p}", f"decoder.final_layernorm.{p}"))
            rules += [rule(f"{h}{hf}.{p}", f"{o}{ours}.{p}") for hf, ours in norms.items()]
        rules += megatron_layer_rules(h, "self_attention",
                                      ("weight", "bias") if configs[""].add_bias_linear else ("weight",))
        if not configs[""].share_embeddings_and_output_weights:
            rules.append(rule("lm_head.weight", "output_layer.weight"))
        return rules
