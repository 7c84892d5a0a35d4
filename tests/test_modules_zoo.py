"""The pieces today's architectures need, each usable in any spec: norms, attention options, ALiBi,
layer topologies, embedding transforms, several RoPE tables, per-layer windows, a ViT pooler."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY
from torch import nn

import megaspec
from megaspec import SpecError, build_model, compose
from megaspec.config import TransformerConfig
from megaspec.modules.attention.core import EagerAttention, SDPAttention
from megaspec.modules.attention.self_attention import SelfAttention
from megaspec.modules.head.lm_head import LMHead
from megaspec.modules.linear import Linear
from megaspec.modules.norm import LayerNorm, RMSNorm
from megaspec.modules.position.alibi import ALiBi, alibi_slopes

SPEC = "model.spec.submodules"
LAYER = f"{SPEC}.decoder.submodules.layers"
ATTENTION = f"{LAYER}.submodules.self_attention"


def config(**changes: object) -> TransformerConfig:
    base = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "hidden_dropout": 0.0,
            "attention_dropout": 0.0}
    return TransformerConfig(**{**base, **changes})


def initialised(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if hasattr(m, "init_weights"):
            m.init_weights()
    return module


def test_zero_centred_norms_scale_by_one_plus_weight_and_start_at_the_identity() -> None:
    cfg = config(layernorm_zero_centered_gamma=True)
    x = torch.randn(2, 5, 32)
    for norm, plain in ((RMSNorm(cfg), F.rms_norm(x, (32,), eps=1e-5)),
                        (LayerNorm(cfg), F.layer_norm(x, (32,), eps=1e-5))):
        initialised(norm)
        assert torch.equal(norm.weight, torch.zeros(32))
        torch.testing.assert_close(norm(x), plain)
        with torch.no_grad():
            norm.weight.normal_()
        torch.testing.assert_close(norm(x), plain * (1 + norm.weight) + getattr(norm, "bias", 0))


@pytest.mark.parametrize("core", [SDPAttention, EagerAttention], ids=["sdpa", "eager"])
def test_scores_are_soft_capped_and_scaled_by_query_pre_attn_scalar(core: type) -> None:
    cfg = config(attn_logit_softcapping=2.0, query_pre_attn_scalar=9.0)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=gen) * 3 for _ in range(3))
    scores = torch.tanh(q @ k.transpose(-2, -1) / 3 / 2.0) * 2.0  # scale 9^-0.5, cap 2
    scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    want = scores.softmax(-1) @ v
    torch.testing.assert_close(core(cfg)(q, k, v, None, True), want)
    uncapped = core(config(query_pre_attn_scalar=9.0))(q, k, v, None, True)
    assert (uncapped - want).abs().max() > 1e-2  # the cap changes these large scores


def test_two_scales_are_refused() -> None:
    with pytest.raises(ValueError, match=r"softmax_scale \(1.0\) and config.query_pre_attn_scalar \(9.0\) both set"):
        SDPAttention(config(query_pre_attn_scalar=9.0), softmax_scale=1.0)
    with pytest.raises(SpecError, match=r"building 'sdpa' \(SDPAttention\) failed: ValueError: "
                                        r"config.attn_logit_softcapping must be positive, got -1.0"):
        build_model(compose([*TINY["llama"], "+model.config.attn_logit_softcapping=-1.0"]), device="meta")


def test_final_logits_are_soft_capped_from_the_config() -> None:
    model = build_model(compose([*TINY["llama"], "+model.config.final_logit_softcapping=0.5"])).eval()
    head = model.output_layer
    assert isinstance(head, LMHead) and head.softcap == 0.5
    hidden = torch.randn(1, 8, 32) * 100
    raw = F.linear(hidden, head.weight)
    assert raw.abs().max() > 1
    torch.testing.assert_close(head(hidden), 0.5 * torch.tanh(raw / 0.5))


def test_alibi_slopes_follow_the_paper() -> None:
    torch.testing.assert_close(alibi_slopes(8), 2.0 ** -torch.arange(1.0, 9.0))
    # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads (2^-0.5, 2^-1.5, ...).
    torch.testing.assert_close(alibi_slopes(12)[8:], 2.0 ** -torch.arange(0.5, 4.5))
    bias = initialised(ALiBi(config()))(2, 5)  # the last two of five positions
    assert bias.shape == (1, 4, 2, 5)
    torch.testing.assert_close(bias[0, 0, 1], -0.25 * torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]))


@pytest.mark.parametrize("core", ["sdpa", "eager"])
def test_alibi_keeps_causal_attention_causal(core: str) -> None:
    torch.manual_seed(0)
    model = build_model(compose([*TINY["llama"], f"~{SPEC}.position_embedding",
                                 f"+{SPEC}.decoder.submodules.attention_bias=alibi",
                                 f"{ATTENTION}.submodules.core_attention={core}"])).eval()
    ids = torch.randint(0, 64, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 64
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
        padded = model(ids, attention_mask=torch.ones(1, 8)).logits
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=0)
    assert not torch.equal(a[:, -1], b[:, -1])
    torch.testing.assert_close(padded, a)


def test_qk_norm_over_the_whole_projection() -> None:
    cfg = config(num_query_groups=2, qk_layernorm=True, normalization="RMSNorm")
    norm, linear = functools.partial(RMSNorm, cfg), functools.partial(Linear, cfg)
    per_head, whole = (initialised(SelfAttention(cfg, linear_qkv=linear, core_attention=SDPAttention(cfg),
                                                 linear_proj=linear, q_layernorm=norm, k_layernorm=norm,
                                                 qk_layernorm_per_head=flag)) for flag in (True, False))
    assert per_head.q_layernorm.weight.shape == (8,) and per_head.k_layernorm.weight.shape == (8,)
    assert whole.q_layernorm.weight.shape == (32,) and whole.k_layernorm.weight.shape == (16,)
    whole.load_state_dict({k: v for k, v in per_head.state_dict().items() if "layernorm" not in k}, strict=False)
    x = torch.randn(2, 5, 32)
    assert not torch.allclose(whole(x), per_head(x), atol=1e-3)  # one RMS over all heads, not one per head


def test_sandwich_norms_normalise_each_branch_before_the_residual_add() -> None:
    model = build_model(compose([*TINY["llama"], f"+{LAYER}.submodules.self_attn_output_layernorm=rms_norm",
                                 f"+{LAYER}.submodules.mlp_output_layernorm=rms_norm"])).eval()
    layer = model.decoder.layers[0]
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        layer.self_attn_output_layernorm.weight.fill_(0.5)
        h = x + layer.self_attn_output_layernorm(layer.self_attention(layer.input_layernorm(x)))
        want = h + layer.mlp_output_layernorm(layer.mlp(layer.pre_mlp_layernorm(h)))
        torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("norms", [1, 2])
def test_parallel_layer_adds_attention_and_mlp_of_one_input(norms: int) -> None:
    overrides = [f"~{LAYER}", f"+{LAYER}={{module: parallel_transformer_layer, submodules: {{input_layernorm: "
                 f"rms_norm, self_attention: self_attention, mlp: mlp" + (", pre_mlp_layernorm: rms_norm" if norms == 2
                                                                         else "") + "}}"]
    model = build_model(compose([*TINY["llama"], *overrides])).eval()
    layer = model.decoder.layers[0]
    assert type(layer).__name__ == "ParallelTransformerLayer"
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        normed = layer.input_layernorm(x)
        mlp_in = normed if norms == 1 else layer.pre_mlp_layernorm(x)
        torch.testing.assert_close(layer(x), x + layer.self_attention(normed) + layer.mlp(mlp_in))


def test_embedding_scale_and_embedding_norm() -> None:
    scaled = [f"~{SPEC}.embedding", f"+{SPEC}.embedding={{module: vocab_embedding, params: "
              "{scale_by_sqrt_hidden: true}}"]
    model = build_model(compose([*TINY["llama"], *scaled, f"+{SPEC}.embedding_layernorm=layer_norm"])).eval()
    ids = torch.randint(0, 64, (1, 4))
    torch.testing.assert_close(model.embedding(ids), F.embedding(ids, model.embedding.weight) * math.sqrt(32))
    assert isinstance(model.embedding_layernorm, LayerNorm)
    # In bf16 the factor is rounded first, as Gemma's (sqrt(3072) = 55.43 becomes 55.5).
    bf16 = build_model(compose([*TINY["llama"], *scaled, "+model.config.params_dtype=bfloat16",
                                "model.config.hidden_size=3072", "model.config.num_attention_heads=16"]))
    ids = torch.randint(0, 64, (1, 4))
    torch.testing.assert_close(bf16.embedding(ids), F.embedding(ids, bf16.embedding.weight) * 55.5, rtol=0, atol=0)


def test_global_layers_of_a_pattern_drop_the_window() -> None:
    layers = ("{pattern: [local, global], nodes: {local: {module: transformer_layer, submodules: {input_layernorm: "
              "rms_norm, self_attention: self_attention, pre_mlp_layernorm: rms_norm, mlp: mlp}}, global: {module: "
              "transformer_layer, config: {window_size: null}, submodules: {input_layernorm: rms_norm, "
              "self_attention: self_attention, pre_mlp_layernorm: rms_norm, mlp: mlp}}}}")
    model = build_model(compose([*TINY["llama"], "model.config.num_layers=4", "+model.config.window_size=[2,0]",
                                 f"~{LAYER}", f"+{LAYER}={layers}"]), device="meta")
    windows = [layer.self_attention.core_attention.window_size for layer in model.decoder.layers]
    assert windows == [(2, 0), None, (2, 0), None]


def test_rotary_tables_are_picked_by_name() -> None:
    base = [*TINY["llama"], "+model.config.rotary_base_local=100.0", f"{SPEC}.position_embedding="
            "local_global_rotary_embedding"]
    model = build_model(compose([*base, f"+{ATTENTION}.params.rotary_table=local"])).eval()
    tables = model.position_embedding.tables
    assert tables["local"].base == 100.0 and tables["global"].base == 500000.0  # llama's rotary_base
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        model(ids)
        with pytest.raises(ValueError, match=r"gives RoPE tables \['global', 'local'\]; set the self-attention's "
                                             r"rotary_table param to one of them \(it is None\)"):
            build_model(compose(base)).eval()(ids)
        with pytest.raises(ValueError, match=r"rotary_table is 'local' but the position embedding gives a single"):
            build_model(compose([*TINY["llama"], f"+{ATTENTION}.params.rotary_table=local"])).eval()(ids)


def test_vision_pooler_and_post_layernorm_are_exclusive() -> None:
    vision = "model.spec.submodules.vision_model.submodules"
    with pytest.raises(SpecError, match=r"fill one of pooler \(which pools itself\) and post_layernorm"):
        build_model(compose([*TINY["llava"], f"+{vision}.pooler=pooler"]), device="meta")


def test_new_config_fields_are_overridable_and_typed() -> None:
    with pytest.raises(SpecError, match=r"config.attn_logit_softcapping: expected float or None, got 'big'"):
        build_model(compose([*TINY["llama"], "+model.config.attn_logit_softcapping=big"]), device="meta")
    record = megaspec.build_record(build_model(compose([*TINY["llama"], "+model.config.query_pre_attn_scalar=16"]),
                                               device="meta"))
    assert record.config.query_pre_attn_scalar == 16.0
