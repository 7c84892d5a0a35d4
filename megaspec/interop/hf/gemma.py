"""Gemma, Gemma 2 and Gemma 3's text model (HF `GemmaForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM`)
<-> specs/gemma.yaml, gemma2.yaml, gemma3.yaml.

All three are Llama's tensors with embeddings scaled by sqrt(hidden_size) and norms
that scale by (1 + weight), stored as HF stores them. Gemma 2 adds sandwich norms,
soft-capped scores and logits and alternating local/global layers; Gemma 3 swaps
the score cap for QK-norm and gives local layers their own RoPE base. HF's Gemma 3
ignores `attn_logit_softcapping`, so it is not translated. QK-norm is the spec's
q_layernorm / k_layernorm slots, the activation its MLPs' activation slot.
"""

from __future__ import annotations

from typing import Any

from megaspec.config import TransformerConfig
from megaspec.configs import Configs
from megaspec.errors import SpecError
from megaspec.interop.hf.core import unsupported
from megaspec.interop.hf.llama import Llama, hf_rope, qk_norm, rope_fields
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

    def gemma_kwargs(self, spec: dict[str, Any], cfg: TransformerConfig) -> dict[str, Any]:
        """HF config arguments every Gemma takes, after checking what HF's Gemmas cannot express."""
        unsupported(self.architecture, add_bias_linear=(cfg.add_bias_linear, False),
                    layernorm_zero_centered_gamma=(cfg.layernorm_zero_centered_gamma, True))
        kwargs = self.hf_kwargs(spec, cfg)
        if self.hidden_act(spec, cfg) == "gelu_tanh":
            kwargs["hidden_act"] = "gelu_pytorch_tanh"  # Gemma's name for the same function
        return {**kwargs, "attention_bias": False}

    def hf_config(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        return transformers.GemmaConfig(**self.gemma_kwargs(spec, configs[""]))


class Gemma2(Gemma):
    """Gemma 2: sandwich norms, soft-capped scores and logits, local (sliding window) and global layers."""

    name = "gemma2"
    model_types = ("gemma2",)
    hf_class = "Gemma2ForCausalLM"
    architecture = "Gemma 2"
    spec_name = "gemma2"
    norms = SANDWICH_NORMS

    def hf_act(self, c: Any) -> str:
        return c.hidden_activation

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        unsupported(self.architecture,
                    use_bidirectional_attention=(bool(getattr(c, "use_bidirectional_attention", False)), False))
        spec, config = super().spec_and_config(c)
        apply_layer_types(spec, config, c.layer_types, c.sliding_window, self.architecture)
        config["query_pre_attn_scalar"] = float(c.query_pre_attn_scalar)
        config["final_logit_softcapping"] = _float(c.final_logit_softcapping)
        config["attn_logit_softcapping"] = _float(c.attn_logit_softcapping)
        return spec, config

    def windowed_kwargs(self, spec: dict[str, Any], cfg: TransformerConfig) -> dict[str, Any]:
        """Gemma's HF arguments plus the activation, scale, caps, window and per-layer types."""
        kwargs = self.gemma_kwargs(spec, cfg)
        window = hf_sliding_window(cfg.window_size)
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        if scalar != int(scalar):
            raise SpecError(f"HF {self.architecture} takes a whole query_pre_attn_scalar, got {scalar}")
        return {
            **kwargs,
            "hidden_activation": kwargs.pop("hidden_act"),
            "query_pre_attn_scalar": int(scalar),
            "final_logit_softcapping": cfg.final_logit_softcapping,
            # HF's Gemmas build a sliding mask even when no layer uses it: with no window, keep HF's default.
            **({} if window is None else {"sliding_window": window}),
            "layer_types": hf_layer_types(spec, cfg.num_layers, cfg.window_size),
        }

    def hf_config(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        return transformers.Gemma2Config(**self.windowed_kwargs(spec, cfg),
                                         attn_logit_softcapping=cfg.attn_logit_softcapping)


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
        spec, config = super().spec_and_config(c)  # QK-norm: the filled slots of specs/gemma3.yaml
        del config["attn_logit_softcapping"]  # HF's Gemma 3 never caps scores, whatever its config says
        return spec, config

    def hf_config(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        if not qk_norm(spec):
            raise SpecError(f"HF {self.architecture} normalises each query and key head: the spec's q_layernorm "
                            "and k_layernorm slots are empty")
        kwargs = self.windowed_kwargs(spec, cfg)
        kwargs["rope_parameters"] = {"full_attention": hf_rope(cfg),
                                     "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rotary_base_local}}
        return transformers.Gemma3TextConfig(**kwargs)
