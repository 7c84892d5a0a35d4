"""Qwen2-MoE (HF `Qwen2MoeForCausalLM`: Qwen1.5-MoE, Qwen2-57B-A14B) <-> specs/qwen2_moe.yaml.

Llama's tensor layout with biased q/k/v projections; each MoE layer routes by softmax over
all experts and adds one shared expert scaled by a sigmoid gate. HF stacks the experts as
megaspec stores them, so they move unchanged.
"""

from __future__ import annotations

from typing import Any

from megaspec.configs import Configs
from megaspec.errors import SpecError
from megaspec.interop.hf.core import Rule, concat, halves, rule, set_activations, shipped_spec, unsupported
from megaspec.interop.hf.llama import Llama, decoder_rules
from megaspec.interop.hf.moe import aux_loss_coeff, hf_aux_loss


def moe_layers(c: Any) -> list[int]:
    """HF's rule, one 0/1 per layer: MoE unless in mlp_only_layers, on every decoder_sparse_step-th layer (1-based)."""
    only_mlp = set(c.mlp_only_layers or [])
    return [int(i not in only_mlp and (i + 1) % c.decoder_sparse_step == 0) for i in range(c.num_hidden_layers)]


class Qwen2Moe(Llama):
    """Qwen2-MoE: Llama's fields and tensors plus q/k/v biases, softmax top-k routing (renormalised when
    norm_topk_prob) and a gated shared expert."""

    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
    hf_class = "Qwen2MoeForCausalLM"
    requires = ("gpt_model", "moe", "topk_router", "grouped_experts", "shared_expert_mlp")
    architecture = "Qwen2-MoE"

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        unsupported(self.architecture, use_sliding_window=(c.use_sliding_window, False))
        if not c.num_experts:
            raise SpecError(f"unsupported {self.architecture} configuration: num_experts={c.num_experts} "
                            "(a model without experts is Qwen2)")
        _, config = super().spec_and_config(c)
        spec = shipped_spec("qwen2_moe")
        set_activations(spec, config["activation"])
        flags = moe_layers(c)
        config.update(
            add_qkv_bias=bool(c.qkv_bias),
            num_moe_experts=c.num_experts,
            moe_router_topk=c.num_experts_per_tok,
            # Softmax over all experts, then the top-k: renormalised (softmax over the chosen k) or kept.
            moe_router_pre_softmax=not c.norm_topk_prob,
            moe_ffn_hidden_size=c.moe_intermediate_size,
            moe_shared_expert_intermediate_size=c.shared_expert_intermediate_size,
            moe_shared_expert_gate=True,
            moe_layer_freq=1 if all(flags) else flags,
            moe_aux_loss_coeff=aux_loss_coeff(c),
        )
        return spec, config

    def hf_config(self, configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        unsupported(self.architecture, add_bias_linear=(cfg.add_bias_linear, False))
        if cfg.moe_shared_expert_intermediate_size is None:
            raise SpecError("HF Qwen2-MoE has a shared expert: set moe_shared_expert_intermediate_size")
        dense = [i for i, kind in enumerate(cfg.moe_layer_pattern) if kind == "dense"]
        return transformers.Qwen2MoeConfig(
            **self.hf_kwargs(cfg), qkv_bias=cfg.add_qkv_bias, num_experts=cfg.num_moe_experts,
            num_experts_per_tok=cfg.moe_router_topk, norm_topk_prob=not cfg.moe_router_pre_softmax,
            moe_intermediate_size=cfg.moe_ffn_size, decoder_sparse_step=1, mlp_only_layers=dense,
            shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size, **hf_aux_loss(cfg))

    def rules(self, configs: Configs) -> list[Rule]:
        h, o = "model.layers.{i}.mlp.", "decoder.layers.{i}.mlp."
        shared, ours = f"{h}shared_expert.", f"{o}shared_experts."
        return decoder_rules(configs[""]) + [
            rule(f"{h}gate.weight", f"{o}router.weight"),
            rule(f"{h}experts.gate_up_proj", f"{o}experts.fc1_weight"),
            rule(f"{h}experts.down_proj", f"{o}experts.fc2_weight"),
            rule((f"{shared}gate_proj.weight", f"{shared}up_proj.weight"), f"{ours}linear_fc1.weight", concat, halves),
            rule(f"{shared}down_proj.weight", f"{ours}linear_fc2.weight"),
            rule(f"{h}shared_expert_gate.weight", f"{ours}gate_weight"),
        ]
