"""T5 v1.0 and v1.1 (HF `T5ForConditionalGeneration`) <-> specs/t5.yaml and specs/t5_v1_1.yaml.

The two versions differ in the feed-forward (ReLU, or gated GELU: `wi_0`/`wi_1`
fused as [gate; up]) and in the output layer. megaspec ties the output layer to
the embedding exactly when it rescales the decoder output by d_model^-0.5, as
T5 v1.0 does; v1.1's head is untied and unscaled. transformers 5 always ties
T5's `lm_head` to `shared` and keeps v1.1's "no rescale" in `scale_decoder_outputs`:
such a model's head is copied into megaspec's own output layer, and `to_hf` of an
untied model gives HF back an `lm_head` of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from megaspec.configs import Configs
from megaspec.errors import SpecError
from megaspec.interop.hf.core import (
    Family,
    Rule,
    activation,
    check_class,
    concat,
    fuse_qkv,
    halves,
    hf_activation,
    node_at,
    rule,
    shipped_spec,
    spec_activation,
    split_qkv,
    token_ids,
    unsupported,
)


def fuse_kv(k: Tensor, v: Tensor, groups: int) -> Tensor:
    """Separate K, V [ng*d, h] -> cross-attention's fused rows, group by group: [k_0, v_0 | k_1, v_1 | ...]."""
    return torch.cat([k.unflatten(0, (groups, -1)), v.unflatten(0, (groups, -1))], dim=1).flatten(0, 1)


def split_kv(fused: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Inverse of fuse_kv."""
    k, v = fused.unflatten(0, (groups, 2, -1)).unbind(1)  # [ng, d, h] each
    return k.flatten(0, 1), v.flatten(0, 1)


def _scales_output(c: Any) -> bool:
    """Whether HF T5 rescales the decoder output (transformers 5's field; 4 used the tie itself)."""
    return bool(getattr(c, "scale_decoder_outputs", c.tie_word_embeddings))


class T5(Family):
    """T5 encoder-decoder: RMSNorm pre-LN layers, unscaled attention, a relative position bias per stack."""

    name = "t5"
    model_types = ("t5",)
    hf_class = "T5ForConditionalGeneration"
    requires = ("t5_model", "relative_position_bias", "cross_attention")
    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        unsupported("T5", num_decoder_layers=(c.num_decoder_layers, c.num_layers))
        act = activation(c.dense_act_fn, "T5")
        spec = shipped_spec("t5_v1_1" if c.is_gated_act else "t5")
        for stack in ("encoder", "decoder"):
            node_at(spec, f"{stack}.layers.mlp")["submodules"]["activation"] = act
        start = getattr(c, "decoder_start_token_id", None)
        if start:  # T5's is 0, the spec's default; generation starts decoder sequences with it
            spec["params"] = {"decoder_start_token_id": start}
        config = {
            "num_layers": c.num_layers,
            "hidden_size": c.d_model,
            "num_attention_heads": c.num_heads,
            "kv_channels": c.d_kv,
            "ffn_hidden_size": c.d_ff,
            "vocab_size": c.vocab_size,
            "layernorm_epsilon": c.layer_norm_epsilon,
            "gated_linear_unit": c.is_gated_act,
            "add_bias_linear": False,
            "relative_attention_num_buckets": c.relative_attention_num_buckets,
            "relative_attention_max_distance": c.relative_attention_max_distance,
            "share_embeddings_and_output_weights": _scales_output(c),
            "hidden_dropout": c.dropout_rate,
            "attention_dropout": c.dropout_rate,
        }
        return spec, config

    def hf_config(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        ours = spec_activation(spec, "encoder.layers.mlp.activation")
        act = hf_activation(ours)
        start = spec.get("params", {}).get("decoder_start_token_id", 0)
        if cfg.gated_linear_unit:
            if ours == "gelu":
                raise SpecError("HF T5's gated GELU is the tanh approximation: activation gelu_tanh, not gelu")
            act = "gated-gelu" if act == "gelu_new" else f"gated-{act}"
        unsupported("T5", add_bias_linear=(cfg.add_bias_linear, False))
        return transformers.T5Config(
            vocab_size=cfg.vocab_size,
            d_model=cfg.hidden_size,
            d_kv=cfg.head_dim,
            d_ff=cfg.ffn_size,
            num_layers=cfg.num_layers,
            num_decoder_layers=cfg.num_layers,
            num_heads=cfg.num_attention_heads,
            relative_attention_num_buckets=cfg.relative_attention_num_buckets,
            relative_attention_max_distance=cfg.relative_attention_max_distance,
            dropout_rate=cfg.hidden_dropout,
            layer_norm_epsilon=cfg.layernorm_epsilon,
            feed_forward_proj=act,
            tie_word_embeddings=cfg.share_embeddings_and_output_weights,
            **token_ids(cfg.vocab_size, pad_token_id=0, eos_token_id=1, decoder_start_token_id=start),
        )

    def hf_state(self, hf_model: Any) -> dict[str, Tensor]:
        check_class(hf_model, "T5", self.hf_class)
        state = dict(hf_model.state_dict())
        head, shared = hf_model.lm_head.weight, hf_model.shared.weight
        tied = head is shared or head.data_ptr() == shared.data_ptr()
        if _scales_output(hf_model.config):
            if not (tied or torch.equal(head, shared)):
                raise SpecError("unsupported T5 configuration: an lm_head of its own with the decoder output "
                                "rescaled (scale_decoder_outputs=True); megaspec rescales only a head tied "
                                "to the embedding")
            state.pop("lm_head.weight")  # the embedding, read by the tied head
        elif tied:
            state["lm_head.weight"] = head.detach().clone()  # becomes the untied output layer's own weight
        return state

    def adapt_hf(self, hf_model: Any, configs: Configs) -> None:
        if not configs[""].share_embeddings_and_output_weights and hf_model.lm_head.weight is hf_model.shared.weight:
            # transformers 5 ties T5's head whatever the config says: give it its own weight to load.
            hf_model.lm_head.weight = nn.Parameter(torch.empty_like(hf_model.shared.weight))

    def rules(self, configs: Configs) -> list[Rule]:
        cfg = configs[""]
        heads = cfg.num_attention_heads

        def qkv_to_ours(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor]:
            return (fuse_qkv(q, k, v, heads),)

        def qkv_to_hf(w: Tensor) -> tuple[Tensor, ...]:
            return split_qkv(w, heads, heads)

        def kv_to_ours(k: Tensor, v: Tensor) -> tuple[Tensor]:
            return (fuse_kv(k, v, heads),)

        def kv_to_hf(w: Tensor) -> tuple[Tensor, ...]:
            return split_kv(w, heads)

        rules = [rule("shared.weight", "embedding.weight")]
        for stack in ("encoder", "decoder"):
            h, o = f"{stack}.block.{{i}}.layer.", f"{stack}.layers.{{i}}."
            ff = f"{h}{2 if stack == 'decoder' else 1}."  # the feed-forward follows cross-attention
            attn = f"{h}0.SelfAttention."
            rules += [
                # T5 keeps the stack's one bias table in its first block; megaspec in the block.
                rule(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     f"{stack}.attention_bias.weight"),
                rule(f"{h}0.layer_norm.weight", f"{o}input_layernorm.weight"),
                rule((f"{attn}q.weight", f"{attn}k.weight", f"{attn}v.weight"),
                     f"{o}self_attention.linear_qkv.weight", qkv_to_ours, qkv_to_hf),
                rule(f"{attn}o.weight", f"{o}self_attention.linear_proj.weight"),
                rule(f"{ff}layer_norm.weight", f"{o}pre_mlp_layernorm.weight"),
                rule(f"{ff}DenseReluDense.wo.weight", f"{o}mlp.linear_fc2.weight"),
                rule(f"{stack}.final_layer_norm.weight", f"{stack}.final_layernorm.weight"),
            ]
            if cfg.gated_linear_unit:
                rules.append(rule((f"{ff}DenseReluDense.wi_0.weight", f"{ff}DenseReluDense.wi_1.weight"),
                                  f"{o}mlp.linear_fc1.weight", concat, halves))
            else:
                rules.append(rule(f"{ff}DenseReluDense.wi.weight", f"{o}mlp.linear_fc1.weight"))
        h, o = "decoder.block.{i}.layer.1.", "decoder.layers.{i}."
        cross = f"{h}EncDecAttention."
        rules += [
            rule(f"{h}layer_norm.weight", f"{o}pre_cross_attn_layernorm.weight"),
            rule(f"{cross}q.weight", f"{o}cross_attention.linear_q.weight"),
            rule((f"{cross}k.weight", f"{cross}v.weight"), f"{o}cross_attention.linear_kv.weight",
                 kv_to_ours, kv_to_hf),
            rule(f"{cross}o.weight", f"{o}cross_attention.linear_proj.weight"),
        ]
        if not cfg.share_embeddings_and_output_weights:
            rules.append(rule("lm_head.weight", "output_layer.weight"))
        return rules
