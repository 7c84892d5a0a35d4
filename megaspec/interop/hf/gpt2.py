"""GPT-2 (HF `GPT2LMHeadModel`) <-> specs/gpt2.yaml."""

from __future__ import annotations

from typing import Any

import torch

from megaspec.configs import Configs
from megaspec.interop.hf.core import (
    Family,
    Rule,
    activation,
    fuse_qkv,
    hf_activation,
    rule,
    shipped_spec,
    spec_activation,
    split_qkv,
    token_ids,
    transposed,
    unsupported,
)


class GPT2(Family):
    """GPT-2. HF's Conv1D layers store weights as [in, out], so every projection is transposed."""

    name = "gpt2"
    model_types = ("gpt2",)
    hf_class = "GPT2LMHeadModel"
    requires = ("gpt_model",)

    def spec_and_config(self, c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        unsupported(
            "GPT-2",
            scale_attn_weights=(c.scale_attn_weights, True),
            scale_attn_by_inverse_layer_idx=(c.scale_attn_by_inverse_layer_idx, False),
            add_cross_attention=(c.add_cross_attention, False),
        )
        act = activation(c.activation_function, "GPT-2")
        spec = shipped_spec("gpt2")
        spec["submodules"]["decoder"]["submodules"]["layers"]["submodules"]["mlp"]["submodules"]["activation"] = act
        config = {
            "num_layers": c.n_layer,
            "hidden_size": c.n_embd,
            "num_attention_heads": c.n_head,
            "ffn_hidden_size": c.n_inner or 4 * c.n_embd,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.n_positions,
            "layernorm_epsilon": c.layer_norm_epsilon,
            "add_bias_linear": True,
            "share_embeddings_and_output_weights": c.tie_word_embeddings,
            # HF's embd_pdrop has no twin: megaspec drops the embeddings with hidden_dropout.
            "hidden_dropout": c.resid_pdrop,
            "attention_dropout": c.attn_pdrop,
            "init_method_std": c.initializer_range,
        }
        return spec, config

    def hf_config(self, spec: dict[str, Any], configs: Configs) -> Any:
        import transformers

        cfg = configs[""]
        return transformers.GPT2Config(
            n_layer=cfg.num_layers,
            n_embd=cfg.hidden_size,
            n_head=cfg.num_attention_heads,
            n_inner=cfg.ffn_size,
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_position_embeddings,
            layer_norm_epsilon=cfg.layernorm_epsilon,
            activation_function=hf_activation(spec_activation(spec, "decoder.layers.mlp.activation")),
            tie_word_embeddings=cfg.share_embeddings_and_output_weights,
            resid_pdrop=cfg.hidden_dropout,
            embd_pdrop=cfg.hidden_dropout,
            attn_pdrop=cfg.attention_dropout,
            initializer_range=cfg.init_method_std,
            **token_ids(cfg.vocab_size, bos_token_id=50256, eos_token_id=50256),
        )

    def rules(self, configs: Configs) -> list[Rule]:
        heads = configs[""].num_attention_heads

        def qkv_to_ours(w: torch.Tensor) -> tuple[torch.Tensor]:
            # Conv1D weight [h, 3h] (or bias [3h]): columns are [q | k | v].
            rows = w.t() if w.dim() == 2 else w
            return (fuse_qkv(*rows.chunk(3, dim=0), heads),)

        def qkv_to_hf(w: torch.Tensor) -> tuple[torch.Tensor]:
            rows = torch.cat(split_qkv(w, heads, heads), dim=0)
            return (rows.t() if w.dim() == 2 else rows,)

        h, o = "transformer.h.{i}.", "decoder.layers.{i}."
        rules = [
            rule("transformer.wte.weight", "embedding.weight"),
            rule("transformer.wpe.weight", "position_embedding.weight"),
            rule("transformer.ln_f.weight", "decoder.final_layernorm.weight"),
            rule("transformer.ln_f.bias", "decoder.final_layernorm.bias"),
        ]
        for p in ("weight", "bias"):
            rules += [
                rule(f"{h}ln_1.{p}", f"{o}input_layernorm.{p}"),
                rule(f"{h}ln_2.{p}", f"{o}pre_mlp_layernorm.{p}"),
                rule(f"{h}attn.c_attn.{p}", f"{o}self_attention.linear_qkv.{p}", qkv_to_ours, qkv_to_hf),
            ]
        for hf_name, ours in (("attn.c_proj", "self_attention.linear_proj"), ("mlp.c_fc", "mlp.linear_fc1"),
                              ("mlp.c_proj", "mlp.linear_fc2")):
            rules += [
                rule(f"{h}{hf_name}.weight", f"{o}{ours}.weight", transposed, transposed),
                rule(f"{h}{hf_name}.bias", f"{o}{ours}.bias"),
            ]
        if not configs[""].share_embeddings_and_output_weights:
            rules.append(rule("lm_head.weight", "output_layer.weight"))
        return rules
