"""Llama and Mistral (HF `LlamaForCausalLM`, `MistralForCausalLM`) <-> specs/llama.yaml.

Mistral is Llama plus a sliding attention window (config.window_size); both
share the layout, the config fields and the tensor rules below.
"""

from __future__ import annotations

from typing import Any

from megaspec.config import TransformerConfig
from megaspec.configs import Configs
from megaspec.errors import SpecError
from megaspec.interop.hf.core import (
    Family,
    Rule,
    activation,
    concat,
    fuse_qkv,
    halves,
    hf_activation,
    layer_nodes,
    layers_module,
    node_at,
    rule,
    shipped_spec,
    spec_activation,
    split_qkv,
    token_ids,
    unsupported,
)
from megaspec.interop.hf.moe import aux_loss_coeff, hf_aux_loss
from megaspec.interop.hf.rope import hf_rope, partial_rope_fields, rope_fields, rope_parameters

__all__ = ["Llama", "Mistral", "Mixtral", "decoder_rules", "hf_rope", "llama_config_kwargs", "partial_rope_fields",
           "qk_norm", "rope_fields", "rope_parameters"]

# HF per-layer norm names -> transformer_layer slots, for Llama's pre-norm layout.
LLAMA_NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "pre_mlp_layernorm"}


def llama_config_kwargs(cfg: TransformerConfig, hidden_act: str) -> dict[str, Any]:
    """The HF config fields that Llama and the configs modelled on it (DeepSeek's) name alike."""
    return {
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.layernorm_epsilon,
        "hidden_act": hf_activation(hidden_act),
        "rope_parameters": hf_rope(cfg),
        "tie_word_embeddings": cfg.share_embeddings_and_output_weights,
        "attention_dropout": cfg.attention_dropout,
        "initializer_range": cfg.init_method_std,
    }


class Llama(Family):
    """Llama 1-3 (grouped-query attention, SwiGLU, RMSNorm, RoPE with optional Llama-3.1 scaling)."""

    name = "llama"
    model_types = ("llama",)
    hf_class = "LlamaForCausalLM"
    requires = ("gpt_model",)
    architecture = "Llama"
    spec_name = "llama"  # the shipped spec the translation starts from
    norms = LLAMA_NORMS  # HF's layer norms -> the spec's norm slots

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        attention_bias = getattr(c, "attention_bias", False)
        unsupported(self.architecture, mlp_bias=(getattr(c, "mlp_bias", False), attention_bias))
        act = activation(self.hf_act(c), self.architecture)
        spec = shipped_spec(self.spec_name)
        for layer in layer_nodes(spec):
            node_at(layer, "mlp")["submodules"]["activation"] = act
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        config = {
            "num_layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "num_query_groups": c.num_key_value_heads or c.num_attention_heads,
            "kv_channels": None if head_dim * c.num_attention_heads == c.hidden_size else head_dim,
            "ffn_hidden_size": c.intermediate_size,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings,
            "layernorm_epsilon": c.rms_norm_eps,
            "gated_linear_unit": True,
            "add_bias_linear": attention_bias,
            **self.rope(c),
            "share_embeddings_and_output_weights": c.tie_word_embeddings,
            "hidden_dropout": 0.0,
            "attention_dropout": c.attention_dropout,
            "init_method_std": c.initializer_range,
        }
        return spec, config

    def hf_act(self, c: Any) -> str:
        """The HF config's activation name (its field differs by family)."""
        return c.hidden_act

    def rope(self, c: Any) -> dict[str, Any]:
        """TransformerConfig RoPE fields for the HF config."""
        return rope_fields(c, self.architecture)

    # Where the spec names the MLP's activation (HF's hidden_act), below each layer node.
    activation_path = "decoder.layers.mlp.activation"

    def hidden_act(self, spec: dict[str, Any], cfg: TransformerConfig) -> str:
        """The MLPs' activation, megaspec's name (the same in every layer node, as HF has one)."""
        name = layers_module(spec, "mlp.activation")
        if name is None:
            raise SpecError(f"the spec has no module at '{self.activation_path}'")
        return name

    def hf_kwargs(self, spec: dict[str, Any], cfg: TransformerConfig) -> dict[str, Any]:
        """Keyword arguments of the HF config class."""
        return {
            "num_hidden_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.query_groups,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.ffn_size,
            **llama_config_kwargs(cfg, self.hidden_act(spec, cfg)),
            **token_ids(cfg.vocab_size, bos_token_id=1, eos_token_id=2),
        }

    def hf_config(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        bias = cfg.add_bias_linear
        return transformers.LlamaConfig(**self.hf_kwargs(spec, cfg), attention_bias=bias, mlp_bias=bias)

    def rules(self, configs: Configs) -> list[Rule]:
        return self.rules_from(shipped_spec(self.spec_name), configs)

    def rules_from(self, spec: dict[str, Any], configs: Configs) -> list[Rule]:
        return decoder_rules(configs[""], norms=self.norms, qk_norm=qk_norm(spec))


def qk_norm(spec: dict[str, Any]) -> bool:
    """Whether the spec's decoder layers normalise queries and keys (q_layernorm and k_layernorm filled)."""
    q, k = (layers_module(spec, f"self_attention.{slot}") for slot in ("q_layernorm", "k_layernorm"))
    if (q is None) != (k is None):
        raise SpecError("HF normalises queries and keys together: fill both q_layernorm and k_layernorm, or neither")
    return q is not None



def decoder_rules(cfg: TransformerConfig, mlp: bool = True, norms: dict[str, str] = LLAMA_NORMS,
                  qk_norm: bool = False) -> list[Rule]:
    """Tensor rules of the Llama layout (`model.layers.{i}` <-> `decoder.layers.{i}`), MLP optional.

    `norms` maps each HF layer norm to its slot (sandwich-norm families name theirs
    differently); `qk_norm` adds the QK-norm weights (`self_attn.q_norm`, `k_norm`, filled
    q_layernorm / k_layernorm slots in the spec), and q/k/v biases follow add_bias_linear
    or add_qkv_bias (Qwen2: q/k/v only).
    """
    heads, groups = cfg.num_attention_heads, cfg.query_groups

    def to_ours(q: Any, k: Any, v: Any) -> tuple[Any]:
        return (fuse_qkv(q, k, v, groups),)

    def to_hf(w: Any) -> tuple[Any, ...]:
        return split_qkv(w, heads, groups)

    h, o = "model.layers.{i}.", "decoder.layers.{i}."
    attn = f"{h}self_attn."
    params = ("weight", "bias") if cfg.add_bias_linear else ("weight",)
    qkv_params = ("weight", "bias") if cfg.add_bias_linear or cfg.add_qkv_bias else ("weight",)
    rules = [
        rule("model.embed_tokens.weight", "embedding.weight"),
        rule("model.norm.weight", "decoder.final_layernorm.weight"),
        *(rule(f"{h}{hf}.weight", f"{o}{ours}.weight") for hf, ours in norms.items()),
    ]
    for p in qkv_params:
        rules.append(rule((f"{attn}q_proj.{p}", f"{attn}k_proj.{p}", f"{attn}v_proj.{p}"),
                          f"{o}self_attention.linear_qkv.{p}", to_ours, to_hf))
    if qk_norm:
        rules += [rule(f"{attn}q_norm.weight", f"{o}self_attention.q_layernorm.weight"),
                  rule(f"{attn}k_norm.weight", f"{o}self_attention.k_layernorm.weight")]
    for p in params:
        rules.append(rule(f"{attn}o_proj.{p}", f"{o}self_attention.linear_proj.{p}"))
        if mlp:
            rules += [
                rule((f"{h}mlp.gate_proj.{p}", f"{h}mlp.up_proj.{p}"), f"{o}mlp.linear_fc1.{p}", concat, halves),
                rule(f"{h}mlp.down_proj.{p}", f"{o}mlp.linear_fc2.{p}"),
            ]
    if not cfg.share_embeddings_and_output_weights:
        rules.append(rule("lm_head.weight", "output_layer.weight"))
    return rules


class Mistral(Llama):
    """Mistral: Llama's layout with sliding-window attention (HF `sliding_window` W = window_size (W - 1, 0))."""

    name = "mistral"
    model_types = ("mistral",)
    hf_class = "MistralForCausalLM"
    architecture = "Mistral"

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        spec, config = super().spec_and_config(c)
        window = getattr(c, "sliding_window", None)
        config["window_size"] = None if window is None else (window - 1, 0)
        return spec, config

    def hf_config(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        window = cfg.window_size
        if window is not None and (window[1] != 0 or window[0] < 0):
            raise SpecError(f"HF Mistral's sliding window looks back only: window_size (W - 1, 0), got {window}")
        unsupported("Mistral", add_bias_linear=(cfg.add_bias_linear, False))
        return transformers.MistralConfig(**self.hf_kwargs(spec, cfg),
                                          sliding_window=None if window is None else window[0] + 1)


class Mixtral(Mistral):
    """Mixtral: Mistral with every MLP a sparse mixture of SwiGLU experts (specs/mixtral.yaml).

    HF stacks the experts as ours are stored: gate_up_proj [E, gate | up, h] is
    fc1_weight and down_proj [E, h, ffn] is fc2_weight, so they move unchanged.
    """

    name = "mixtral"
    model_types = ("mixtral",)
    hf_class = "MixtralForCausalLM"
    requires = ("gpt_model", "moe", "topk_router", "grouped_experts")
    architecture = "Mixtral"

    def hidden_act(self, spec: dict[str, Any], cfg: TransformerConfig) -> str:
        """The experts read their activation from the config (the dense MLPs' spec must match it)."""
        return cfg.activation

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        unsupported(self.architecture, router_jitter_noise=(c.router_jitter_noise, 0.0))
        llama_spec, config = super().spec_and_config(c)
        act = spec_activation(llama_spec, Llama.activation_path)
        spec = shipped_spec("mixtral")
        spec["submodules"]["decoder"]["submodules"]["layers"]["nodes"]["dense"]["submodules"]["mlp"][
            "submodules"]["activation"] = act
        config.update(  # ffn_hidden_size (HF's intermediate_size) is each expert's width
            activation=act,
            num_moe_experts=c.num_local_experts,
            moe_router_topk=c.num_experts_per_tok,
            moe_layer_freq=1,
            moe_aux_loss_coeff=aux_loss_coeff(c),
        )
        return spec, config

    def hf_config(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        if cfg.num_moe_experts is None:
            raise SpecError("Mixtral: the config has no num_moe_experts (not a mixture of experts)")
        unsupported("Mixtral", moe_layer_freq=(cfg.moe_layer_freq, 1),
                    moe_ffn_hidden_size=(cfg.moe_ffn_size, cfg.ffn_size))
        mistral = super().hf_config(spec, configs)
        window = getattr(mistral, "sliding_window", None)
        return transformers.MixtralConfig(
            **self.hf_kwargs(spec, cfg), sliding_window=window, num_local_experts=cfg.num_moe_experts,
            num_experts_per_tok=cfg.moe_router_topk, **hf_aux_loss(cfg),
        )

    def rules_from(self, spec: dict[str, Any], configs: Configs) -> list[Rule]:
        h, o = "model.layers.{i}.mlp.", "decoder.layers.{i}.mlp."
        return decoder_rules(configs[""], mlp=False, qk_norm=qk_norm(spec)) + [
            rule(f"{h}gate.weight", f"{o}router.weight"),
            rule(f"{h}experts.gate_up_proj", f"{o}experts.fc1_weight"),
            rule(f"{h}experts.down_proj", f"{o}experts.fc2_weight"),
        ]
