"""Gemma, Gemma 2 and Gemma 3's text model (HF `GemmaForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM`)
<-> specs/gemma.yaml, gemma2.yaml, gemma3.yaml.

All three are Llama's tensors with embeddings scaled by sqrt(hidden_size) and norms
that scale by (1 + weight), stored as HF stores them. Gemma 2 adds sandwich norms,
soft-capped scores and logits and alternating local/global layers; Gemma 3 swaps
the score cap for QK-norm and gives local layers their own RoPE base. HF's Gemma 3
ignores `attn_logit_softcapping`, so it is not translated.
"""

from __future__ import annotations

from typing import Any

from megaspec.config import TransformerConfig
from megaspec.configs import Configs
from megaspec.errors import SpecError
from megaspec.interop.hf.core import Rule, shipped_spec, unsupported
from megaspec.interop.hf.llama import Llama, decoder_rules, hf_rope, rope_fields
from megaspec.interop.hf.windows import apply_layer_types, hf_layer_types, hf_sliding_window

# HF's per-layer norms -> transformer_layer slots: post_* norms are on the branch outputs (sandwich).
SANDWICH_NORMS = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "self_attn_output_layernorm",
    "pre_feedforward_layernorm": "pre_mlp_layernorm",
    "post_feedforward_layernorm": "mlp_output_layernorm",
}


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


class Gemma(Llama):
    """Gemma: Llama's layout with GeGLU, scaled embeddings, zero-centred RMSNorm weights and a tied head."""

    name = "gemma"
    model_types = ("gemma",)
    hf_class = "GemmaForCausalLM"
    architecture = "Gemma"
    spec_name = "gemma"

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        unsupported(self.architecture, attention_bias=(c.attention_bias, False))
        spec, config = super().spec_and_config(c)
        config["layernorm_zero_centered_gamma"] = True
        return spec, config

    def gemma_kwargs(self, cfg: TransformerConfig) -> dict[str, Any]:
        """HF config arguments every Gemma takes, after checking what HF's Gemmas cannot express."""
        unsupported(self.architecture, add_bias_linear=(cfg.add_bias_linear, False),
                    layernorm_zero_centered_gamma=(cfg.layernorm_zero_centered_gamma, True))
        kwargs = self.hf_kwargs(cfg)
        if cfg.activation == "gelu_tanh":
            kwargs["hidden_act"] = "gelu_pytorch_tanh"  # Gemma's name for the same function
        return {**kwargs, "attention_bias": False}

    def hf_config(self, configs: Configs) -> Any:
        import transformers

        return transformers.GemmaConfig(**self.gemma_kwargs(configs[""]))


class Gemma2(Gemma):
    """Gemma 2: sandwich norms, soft-capped scores and logits, local (sliding window) and global layers."""

    name = "gemma2"
    model_types = ("gemma2",)
    hf_class = "Gemma2ForCausalLM"
    architecture = "Gemma 2"
    spec_name = "gemma2"

    def hf_act(self, c: Any) -> str:
        return c.hidden_activation

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        unsupported(self.architecture,
                    use_bidirectional_attention=(bool(getattr(c, "use_bidirectional_attention", False)), False))
        spec, config = super().spec_and_config(c)
        config["window_size"] = apply_layer_types(spec, c.layer_types, c.sliding_window, self.architecture)
        config["query_pre_attn_scalar"] = float(c.query_pre_attn_scalar)
        config["final_logit_softcapping"] = _float(c.final_logit_softcapping)
        config["attn_logit_softcapping"] = _float(c.attn_logit_softcapping)
        return spec, config

    def windowed_kwargs(self, spec: dict[str, Any], cfg: TransformerConfig) -> dict[str, Any]:
        """Gemma's HF arguments plus the activation, scale, caps, window and per-layer types."""
        kwargs = self.gemma_kwargs(cfg)
        window = hf_sliding_window(cfg.window_size)
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        if scalar != int(scalar):
            raise SpecError(f"HF {self.architecture} takes a whole query_pre_attn_scalar, got {scalar}")
        return {
            **kwargs,
            "hidden_activation": kwargs.pop("hidden_act"),
            "query_pre_attn_scalar": int(scalar),
            "final_logit_softcapping": cfg.final_logit_softcapping,
            "sliding_window": window,
            "layer_types": hf_layer_types(spec, cfg.num_layers, cfg.window_size),
        }

    def hf_config_from(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        return transformers.Gemma2Config(**self.windowed_kwargs(spec, cfg),
                                         attn_logit_softcapping=cfg.attn_logit_softcapping)

    def hf_config(self, configs: Configs) -> Any:
        return self.hf_config_from(shipped_spec(self.spec_name), configs)

    def rules(self, configs: Configs) -> list[Rule]:
        return decoder_rules(configs[""], norms=SANDWICH_NORMS)


class Gemma3(Gemma2):
    """Gemma 3's text model: Gemma 2 with QK-norm for the score cap and a RoPE base of its own for local layers."""

    name = "gemma3"
    model_types = ("gemma3_text",)
    hf_class = "Gemma3ForCausalLM"
    architecture = "Gemma 3"
    spec_name = "gemma3"

    def rope(self, c: Any) -> dict[str, Any]:
        """The global layers' RoPE as rotary_base (+ rope_scaling); the local layers' base as rotary_base_local."""
        local = dict(c.rope_parameters["sliding_attention"])
        if local.get("rope_type", "default") != "default":
            raise SpecError(f"unsupported {self.architecture} configuration: local layers' rope_type "
                            f"'{local['rope_type']}' (megaspec scales only the global layers' RoPE)")
        global_ = rope_fields(c, self.architecture, dict(c.rope_parameters["full_attention"]))
        return {**global_, "rotary_base_local": float(local["rope_theta"])}

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        spec, config = super().spec_and_config(c)
        config["qk_layernorm"] = True
        config["attn_logit_softcapping"] = None  # HF's Gemma 3 never caps scores, whatever its config says
        return spec, config

    def hf_config_from(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        unsupported(self.architecture, qk_layernorm=(cfg.qk_layernorm, True))
        kwargs = self.windowed_kwargs(spec, cfg)
        kwargs["rope_parameters"] = {"full_attention": hf_rope(cfg),
                                     "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rotary_base_local}}
        return transformers.Gemma3TextConfig(**kwargs)
