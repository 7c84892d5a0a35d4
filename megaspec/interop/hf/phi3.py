"""Phi-3 (HF `Phi3ForCausalLM`) <-> specs/llama.yaml.

Phi-3 computes what Llama (or, with its sliding window, Mistral) computes: only its
tensors differ, q/k/v stored as one projection ([q; k; v], not per query group) and
gate/up as one ([gate; up], megaspec's own layout). A partial rotary factor becomes
rotary_percent. The same model converts to Mistral or Llama by default:
`to_hf(model, hf_class="Phi3ForCausalLM")` asks for Phi-3.
"""

from __future__ import annotations

from typing import Any

import torch

from megaspec.configs import Configs
from megaspec.interop.hf.core import Rule, fuse_qkv, rule, split_qkv, token_ids, unsupported
from megaspec.interop.hf.llama import Llama, hf_rope, partial_rope_fields
from megaspec.interop.hf.windows import hf_sliding_window


class Phi3(Llama):
    """Phi-3 / Phi-3.5 mini and medium (fused projections, optional sliding window, partial rotary)."""

    name = "phi3"
    model_types = ("phi3",)
    hf_class = "Phi3ForCausalLM"
    architecture = "Phi-3"

    def rope(self, c: Any) -> dict[str, Any]:
        return partial_rope_fields(c, self.architecture)

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        spec, config = super().spec_and_config(c)
        window = c.sliding_window
        config["window_size"] = None if window is None else (window - 1, 0)
        # resid_pdrop on each branch; embd_pdrop has no twin, megaspec drops embeddings with hidden_dropout.
        config["hidden_dropout"] = c.resid_pdrop
        return spec, config

    def hf_config(self, configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        unsupported(self.architecture, add_bias_linear=(cfg.add_bias_linear, False),
                    rope_scaling=(cfg.rope_scaling, None))
        kwargs = self.hf_kwargs(cfg)
        kwargs["rope_parameters"] = {**hf_rope(cfg), "partial_rotary_factor": cfg.rotary_percent}
        kwargs.update(token_ids(cfg.vocab_size, bos_token_id=1, eos_token_id=32000, pad_token_id=32000))
        return transformers.Phi3Config(**kwargs, sliding_window=hf_sliding_window(cfg.window_size),
                                       resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout)

    def rules(self, configs: Configs) -> list[Rule]:
        cfg = configs[""]
        heads, groups, d = cfg.num_attention_heads, cfg.query_groups, cfg.head_dim

        def qkv_to_ours(w: torch.Tensor) -> tuple[torch.Tensor]:
            return (fuse_qkv(*w.split([heads * d, groups * d, groups * d]), groups),)

        def qkv_to_hf(w: torch.Tensor) -> tuple[torch.Tensor]:
            return (torch.cat(split_qkv(w, heads, groups)),)

        h, o = "model.layers.{i}.", "decoder.layers.{i}."
        rules = [
            rule("model.embed_tokens.weight", "embedding.weight"),
            rule("model.norm.weight", "decoder.final_layernorm.weight"),
            rule(f"{h}input_layernorm.weight", f"{o}input_layernorm.weight"),
            rule(f"{h}post_attention_layernorm.weight", f"{o}pre_mlp_layernorm.weight"),
            rule(f"{h}self_attn.qkv_proj.weight", f"{o}self_attention.linear_qkv.weight", qkv_to_ours, qkv_to_hf),
            rule(f"{h}self_attn.o_proj.weight", f"{o}self_attention.linear_proj.weight"),
            rule(f"{h}mlp.gate_up_proj.weight", f"{o}mlp.linear_fc1.weight"),  # [gate; up], as megaspec's fc1
            rule(f"{h}mlp.down_proj.weight", f"{o}mlp.linear_fc2.weight"),
        ]
        if not cfg.share_embeddings_and_output_weights:
            rules.append(rule("lm_head.weight", "output_layer.weight"))
        return rules
