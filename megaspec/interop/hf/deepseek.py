"""DeepSeek-V3 and DeepSeek-V2 (HF `DeepseekV3ForCausalLM`, `DeepseekV2ForCausalLM`) <-> specs/deepseek_v3.yaml.

Both are Multi-head Latent Attention plus shared and routed experts after the first
dense layers; they differ only in routing, which is config: V3 picks experts by sigmoid
scores plus a correction bias inside the best groups and renormalises the chosen weights,
V2 by softmax over all experts, kept as they are. HF stacks the experts as megaspec
stores them, so they move unchanged.
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
    halves,
    rule,
    set_activations,
    shipped_spec,
    token_ids,
    unsupported,
)
from megaspec.interop.hf.llama import llama_config_kwargs
from megaspec.interop.hf.rope import rope_fields


class DeepseekV3(Family):
    """DeepSeek-V3: MLA, sigmoid group-limited routing with a correction bias, first_k_dense_replace dense layers."""

    name = "deepseek_v3"
    model_types = ("deepseek_v3",)
    hf_class = "DeepseekV3ForCausalLM"
    requires = ("gpt_model", "multi_latent_attention", "moe", "topk_router", "grouped_experts", "shared_expert_mlp")
    architecture = "DeepSeek-V3"

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        act = activation(c.hidden_act, self.architecture)
        spec = shipped_spec("deepseek_v3")
        set_activations(spec, act)
        return spec, {**self.common_fields(c, act), **self.routing_fields(c)}

    def common_fields(self, c: Any, act: str) -> dict[str, Any]:
        """The fields V2 and V3 translate alike: sizes, attention, experts, RoPE."""
        unsupported(self.architecture, attention_bias=(getattr(c, "attention_bias", False), False),
                    mlp_bias=(getattr(c, "mlp_bias", False), False),
                    num_key_value_heads=(c.num_key_value_heads, c.num_attention_heads))
        if not c.n_shared_experts:
            raise SpecError(f"unsupported {self.architecture} configuration: n_shared_experts={c.n_shared_experts} "
                            "(megaspec's DeepSeek layout has shared experts)")
        fields = {
            "num_layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            # The rotary part of each query/key head, which the rotary embedding makes tables for (HF: head_dim).
            "kv_channels": c.qk_rope_head_dim,
            "q_lora_rank": c.q_lora_rank,
            "kv_lora_rank": c.kv_lora_rank,
            "qk_head_dim": c.qk_nope_head_dim,
            "v_head_dim": c.v_head_dim,
            "ffn_hidden_size": c.intermediate_size,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings,
            "layernorm_epsilon": c.rms_norm_eps,
            "activation": act,
            "gated_linear_unit": True,
            "add_bias_linear": False,
            **rope_fields(c, self.architecture),
            "rotary_interleaved": self.interleaved(c),
            "share_embeddings_and_output_weights": c.tie_word_embeddings,
            "hidden_dropout": 0.0,
            "attention_dropout": float(c.attention_dropout),
            "init_method_std": c.initializer_range,
            "num_moe_experts": c.n_routed_experts,
            "moe_router_topk": c.num_experts_per_tok,
            "moe_ffn_hidden_size": c.moe_intermediate_size,
            "moe_shared_expert_intermediate_size": c.n_shared_experts * c.moe_intermediate_size,
            "moe_first_k_dense": c.first_k_dense_replace,
            "moe_router_topk_scaling_factor": None if c.routed_scaling_factor == 1.0 else c.routed_scaling_factor,
        }
        if not c.first_k_dense_replace:  # intermediate_size is the dense layers' width: with none, nothing reads it
            del fields["ffn_hidden_size"]
        return fields

    def interleaved(self, c: Any) -> bool:
        """Whether the rotary part pairs adjacent channels (V3's rope_interleave; scores are the same either way
        of laying the pairs out, so HF's de-interleaving rotation is megaspec's interleaved one)."""
        return bool(c.rope_interleave)

    def routing_fields(self, c: Any) -> dict[str, Any]:
        """Sigmoid scores; selection by score plus e_score_correction_bias among the best topk_group of n_group
        groups, each scored by its best two; the chosen scores renormalised (megaspec: whenever top-k > 1)."""
        unsupported(self.architecture, norm_topk_prob=(bool(c.norm_topk_prob), c.num_experts_per_tok > 1))
        grouped = c.n_group is not None and c.topk_group is not None and c.topk_group < c.n_group
        return {
            "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "moe_router_num_groups": c.n_group if grouped else None,
            "moe_router_group_topk": c.topk_group if grouped else None,
            "moe_router_group_score_topk": 2 if grouped else None,
        }

    def hf_kwargs(self, spec: dict[str, Any], cfg: TransformerConfig) -> dict[str, Any]:
        """Keyword arguments V2's and V3's HF configs share (the experts' activation is the config's)."""
        shared = cfg.moe_shared_expert_intermediate_size
        if shared is None or shared % cfg.moe_ffn_size:
            raise SpecError(f"HF {self.architecture} has n_shared_experts experts of moe_intermediate_size: "
                            f"moe_shared_expert_intermediate_size ({shared}) must be a multiple of "
                            f"moe_ffn_hidden_size ({cfg.moe_ffn_size})")
        return {
            "num_hidden_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_attention_heads,
            "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_head_dim,
            "qk_rope_head_dim": cfg.rotary_dim,
            "v_head_dim": cfg.v_head_dim,
            "intermediate_size": cfg.ffn_size,
            "moe_intermediate_size": cfg.moe_ffn_size,
            "n_routed_experts": cfg.num_moe_experts,
            "n_shared_experts": shared // cfg.moe_ffn_size,
            "num_experts_per_tok": cfg.moe_router_topk,
            "first_k_dense_replace": cfg.moe_first_k_dense,
            "routed_scaling_factor": cfg.moe_router_topk_scaling_factor or 1.0,
            **llama_config_kwargs(cfg, cfg.activation),
            **token_ids(cfg.vocab_size, bos_token_id=0, eos_token_id=1),
        }

    def hf_config(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        groups = cfg.moe_router_num_groups or 1
        return transformers.DeepseekV3Config(
            **self.hf_kwargs(spec, cfg), n_group=groups, topk_group=cfg.moe_router_group_topk or groups,
            norm_topk_prob=cfg.moe_router_topk > 1, rope_interleave=cfg.rotary_interleaved)

    def rules(self, configs: Configs) -> list[Rule]:
        h, o = "model.layers.{i}.", "decoder.layers.{i}."
        attn, mla = f"{h}self_attn.", f"{o}self_attention."
        rules = [
            rule("model.embed_tokens.weight", "embedding.weight"),
            rule("model.norm.weight", "decoder.final_layernorm.weight"),
            rule(f"{h}input_layernorm.weight", f"{o}input_layernorm.weight"),
            rule(f"{h}post_attention_layernorm.weight", f"{o}pre_mlp_layernorm.weight"),
            rule(f"{attn}q_proj.weight", f"{mla}linear_q_proj.weight"),
            rule(f"{attn}q_a_proj.weight", f"{mla}linear_q_down_proj.weight"),
            rule(f"{attn}q_a_layernorm.weight", f"{mla}q_layernorm.weight"),
            rule(f"{attn}q_b_proj.weight", f"{mla}linear_q_up_proj.weight"),
            rule(f"{attn}kv_a_proj_with_mqa.weight", f"{mla}linear_kv_down_proj.weight"),
            rule(f"{attn}kv_a_layernorm.weight", f"{mla}kv_layernorm.weight"),
            rule(f"{attn}kv_b_proj.weight", f"{mla}linear_kv_up_proj.weight"),
            rule(f"{attn}o_proj.weight", f"{mla}linear_proj.weight"),
            rule(f"{h}mlp.gate.weight", f"{o}mlp.router.weight"),
            rule(f"{h}mlp.gate.e_score_correction_bias", f"{o}mlp.router.expert_bias"),
            rule(f"{h}mlp.experts.gate_up_proj", f"{o}mlp.experts.fc1_weight"),
            rule(f"{h}mlp.experts.down_proj", f"{o}mlp.experts.fc2_weight"),
        ]
        for hf_mlp, our_mlp in ((f"{h}mlp.", f"{o}mlp."), (f"{h}mlp.shared_experts.", f"{o}mlp.shared_experts.")):
            rules += [
                rule((f"{hf_mlp}gate_proj.weight", f"{hf_mlp}up_proj.weight"), f"{our_mlp}linear_fc1.weight",
                     concat, halves),
                rule(f"{hf_mlp}down_proj.weight", f"{our_mlp}linear_fc2.weight"),
            ]
        if not configs[""].share_embeddings_and_output_weights:
            rules.append(rule("lm_head.weight", "output_layer.weight"))
        return rules


class DeepseekV2(DeepseekV3):
    """DeepSeek-V2 (and V2-Lite): V3's layout, routed by softmax over all experts without renormalising
    (`greedy`, or `group_limited_greedy` with each group scored by its best expert), no correction bias,
    and the rotary part always in adjacent pairs."""

    name = "deepseek_v2"
    model_types = ("deepseek_v2",)
    hf_class = "DeepseekV2ForCausalLM"
    architecture = "DeepSeek-V2"

    def interleaved(self, c: Any) -> bool:
        return True  # HF's V2 rotates (x0, x1), (x2, x3), ... as complex numbers

    def routing_fields(self, c: Any) -> dict[str, Any]:
        method = c.topk_method
        if method not in ("greedy", "group_limited_greedy"):
            raise SpecError(f"unsupported {self.architecture} configuration: topk_method '{method}' "
                            "(megaspec supports 'greedy' and 'group_limited_greedy')")
        grouped = method == "group_limited_greedy" and c.topk_group < c.n_group
        return {
            "moe_router_score_function": "softmax",
            "moe_router_pre_softmax": True,  # HF's V2 never renormalises the chosen weights
            "moe_router_num_groups": c.n_group if grouped else None,
            "moe_router_group_topk": c.topk_group if grouped else None,
            "moe_router_group_score_topk": 1 if grouped else None,
        }

    def hf_config(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        grouped = cfg.moe_router_num_groups is not None
        return transformers.DeepseekV2Config(
            **self.hf_kwargs(spec, cfg), topk_method="group_limited_greedy" if grouped else "greedy",
            n_group=cfg.moe_router_num_groups, topk_group=cfg.moe_router_group_topk, norm_topk_prob=False)
