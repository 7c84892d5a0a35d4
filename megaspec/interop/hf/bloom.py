"""BLOOM (HF `BloomForCausalLM`) <-> specs/bloom.yaml.

HF adds slope * key position to the scores; megaspec's `alibi` adds -slope * |q - k|.
In a causal row the two differ by a constant, which softmax ignores. HF's fused
query_key_value is per head [q_h, k_h, v_h], megaspec's layout with one group per head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megaspec.configs import Configs
from megaspec.errors import SpecError
from megaspec.interop.hf.core import Family, Rule, megatron_layer_rules, rule, shipped_spec, token_ids, unsupported

# ALiBi has no position table: a length limit is never read.
BLOOM_UNREAD = frozenset({"max_position_embeddings"})


class Bloom(Family):
    """BLOOM: ALiBi, an embedding LayerNorm, pre-LN layers with biases, a tanh-GELU MLP of 4 x hidden."""

    name = "bloom"
    model_types = ("bloom",)
    hf_class = "BloomForCausalLM"
    requires = ("gpt_model", "alibi")
    unread_fields: Mapping[str, frozenset[str]] = {"": BLOOM_UNREAD}
    architecture = "BLOOM"

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        # pretraining_tp with slow_but_exact only splits HF's matmuls into slices: the same sums.
        unsupported(self.architecture, apply_residual_connection_post_layernorm=(
            c.apply_residual_connection_post_layernorm, False))
        config = {
            "num_layers": c.n_layer,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.n_head,
            "ffn_hidden_size": 4 * c.hidden_size,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": 2048,
            "normalization": "LayerNorm",
            "layernorm_epsilon": c.layer_norm_epsilon,
            "activation": "gelu_tanh",
            "add_bias_linear": True,
            "position_embedding_type": "none",
            "share_embeddings_and_output_weights": c.tie_word_embeddings,
            "hidden_dropout": c.hidden_dropout,
            "attention_dropout": c.attention_dropout,
            "init_method_std": c.initializer_range,
        }
        return shipped_spec("bloom"), config

    def hf_config(self, configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        unsupported(self.architecture, add_bias_linear=(cfg.add_bias_linear, True), activation=(
            cfg.activation, "gelu_tanh"))
        if cfg.ffn_size != 4 * cfg.hidden_size:
            raise SpecError(f"HF BLOOM's MLP is 4 x hidden_size ({4 * cfg.hidden_size}), got {cfg.ffn_size}")
        return transformers.BloomConfig(
            n_layer=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            n_head=cfg.num_attention_heads,
            vocab_size=cfg.vocab_size,
            layer_norm_epsilon=cfg.layernorm_epsilon,
            tie_word_embeddings=cfg.share_embeddings_and_output_weights,
            hidden_dropout=cfg.hidden_dropout,
            attention_dropout=cfg.attention_dropout,
            initializer_range=cfg.init_method_std,
            **token_ids(cfg.vocab_size, bos_token_id=1, eos_token_id=2),
        )

    def rules(self, configs: Configs) -> list[Rule]:
        h, o = "transformer.h.{i}.", "decoder.layers.{i}."
        rules = [rule("transformer.word_embeddings.weight", "embedding.weight")]
        for p in ("weight", "bias"):
            rules += [
                rule(f"transformer.word_embeddings_layernorm.{p}", f"embedding_layernorm.{p}"),
                rule(f"transformer.ln_f.{p}", f"decoder.final_layernorm.{p}"),
                rule(f"{h}input_layernorm.{p}", f"{o}input_layernorm.{p}"),
                rule(f"{h}post_attention_layernorm.{p}", f"{o}pre_mlp_layernorm.{p}"),
            ]
        rules += megatron_layer_rules(h, "self_attention", ("weight", "bias"))
        if not configs[""].share_embeddings_and_output_weights:
            rules.append(rule("lm_head.weight", "output_layer.weight"))
        return rules
