"""Qwen2 and Qwen3 (HF `Qwen2ForCausalLM`, `Qwen3ForCausalLM`) <-> specs/llama.yaml and specs/qwen3.yaml.

Qwen2 is Llama's layout with biases on the query, key and value projections only
(add_qkv_bias); Qwen3 drops them and normalises each query and key head (QK-norm).
Both may slide an attention window over some layers (`use_sliding_window`,
`layer_types`), which becomes a pattern of local and global layers.
"""

from __future__ import annotations

from typing import Any

from megaspec.configs import Configs
from megaspec.interop.hf.core import shipped_spec, unsupported
from megaspec.interop.hf.llama import Llama
from megaspec.interop.hf.windows import apply_layer_types, hf_layer_types, hf_sliding_window


class Qwen2(Llama):
    """Qwen2 / Qwen2.5: GQA, SwiGLU, RMSNorm, RoPE, q/k/v biases."""

    name = "qwen2"
    model_types = ("qwen2",)
    hf_class = "Qwen2ForCausalLM"
    architecture = "Qwen2"

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        spec, config = super().spec_and_config(c)
        config["add_qkv_bias"] = True  # HF's Qwen2 always biases q, k and v, and nothing else
        config["window_size"] = apply_layer_types(spec, c.layer_types, c.sliding_window, self.architecture)
        return spec, config

    def hf_kwargs_windowed(self, spec: dict[str, Any], configs: Configs) -> dict[str, Any]:
        """HF keyword arguments, with the sliding window and the per-layer types the spec says."""
        cfg = configs[""]
        window = hf_sliding_window(cfg.window_size)
        return {**self.hf_kwargs(cfg), "use_sliding_window": window is not None, "sliding_window": window,
                "layer_types": hf_layer_types(spec, cfg.num_layers, cfg.window_size)}

    def hf_config_from(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        unsupported(self.architecture, add_qkv_bias=(cfg.add_qkv_bias, True),
                    add_bias_linear=(cfg.add_bias_linear, False))
        return transformers.Qwen2Config(**self.hf_kwargs_windowed(spec, configs))

    def hf_config(self, configs: Configs) -> Any:
        return self.hf_config_from(shipped_spec(self.spec_name), configs)  # the shipped layout's layers


class Qwen3(Qwen2):
    """Qwen3 (dense): Qwen2 without the q/k/v biases, with per-head RMSNorm on queries and keys."""

    name = "qwen3"
    model_types = ("qwen3",)
    hf_class = "Qwen3ForCausalLM"
    architecture = "Qwen3"
    spec_name = "qwen3"

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        unsupported(self.architecture, attention_bias=(c.attention_bias, False))
        spec, config = Llama.spec_and_config(self, c)
        config["qk_layernorm"] = True
        config["window_size"] = apply_layer_types(spec, c.layer_types, c.sliding_window, self.architecture)
        return spec, config

    def hf_config_from(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        unsupported(self.architecture, add_bias_linear=(cfg.add_bias_linear, False),
                    add_qkv_bias=(cfg.add_qkv_bias, False), qk_layernorm=(cfg.qk_layernorm, True))
        return transformers.Qwen3Config(**self.hf_kwargs_windowed(spec, configs), attention_bias=False)
