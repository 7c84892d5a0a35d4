"""OLMo 2 (HF `Olmo2ForCausalLM`) <-> specs/olmo2.yaml: Llama's tensors, norms on the branch outputs,
and QK-norm over the whole query and key projections."""

from __future__ import annotations

from typing import Any

from megaspec.configs import Configs
from megaspec.interop.hf.core import Rule, token_ids, unsupported
from megaspec.interop.hf.llama import Llama, decoder_rules

# HF's per-layer norms -> transformer_layer slots: both on the branch outputs.
OUTPUT_NORMS = {"post_attention_layernorm": "self_attn_output_layernorm",
                "post_feedforward_layernorm": "mlp_output_layernorm"}


class Olmo2(Llama):
    """OLMo 2: no pre-norms, RMSNorm on each branch's output, whole-projection QK-norm, no biases."""

    name = "olmo2"
    model_types = ("olmo2",)
    hf_class = "Olmo2ForCausalLM"
    architecture = "OLMo 2"
    spec_name = "olmo2"

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        unsupported(self.architecture, attention_bias=(c.attention_bias, False))
        spec, config = super().spec_and_config(c)
        config["qk_layernorm"] = True
        return spec, config

    def hf_config(self, configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        unsupported(self.architecture, add_bias_linear=(cfg.add_bias_linear, False),
                    qk_layernorm=(cfg.qk_layernorm, True))
        kwargs = {**self.hf_kwargs(cfg), **token_ids(cfg.vocab_size, pad_token_id=1, eos_token_id=50279)}
        kwargs.pop("head_dim")  # OLMo 2's heads are hidden_size / heads
        return transformers.Olmo2Config(**kwargs, attention_bias=False)

    def rules(self, configs: Configs) -> list[Rule]:
        return decoder_rules(configs[""], norms=OUTPUT_NORMS)
