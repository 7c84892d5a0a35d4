"""Qwen2-MoE between HF and megaspec: q/k/v biases, softmax top-k, the gated shared expert, dense layers."""

import pytest
import torch
from hf_cases import VOCAB, assert_lm_parity, batch, lm_diffs, perturb
from test_hf_mixtral import expert_choices

import megaspec
from megaspec import SpecError, build_module
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf
from megaspec.modules.mlp.mlp import MLP
from megaspec.modules.moe.layer import MoELayer

transformers = pytest.importorskip("transformers")


def tiny_qwen2_moe(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(**{
        "num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_key_value_heads": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
        "num_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": False, "vocab_size": VOCAB,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, **overrides})
    return perturb(transformers.Qwen2MoeForCausalLM(config)).eval()


@pytest.mark.parametrize("norm", [False, True], ids=["kept", "renormalised"])
def test_from_hf_routes_and_computes_as_hf(norm: bool) -> None:
    hf = tiny_qwen2_moe(norm_topk_prob=norm)
    ours = from_hf(hf)
    config = megaspec.build_record(ours).config
    assert config.moe_router_pre_softmax is not norm and config.add_qkv_bias and not config.add_bias_linear
    input_ids, _ = batch()
    want = expert_choices([layer.mlp.gate for layer in hf.model.layers], 2, lambda: hf(input_ids))
    got = expert_choices([layer.mlp.router for layer in ours.decoder.layers], 1, lambda: ours(input_ids))
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert_lm_parity(ours, hf)


def test_the_shared_expert_gate_and_qkv_biases_matter() -> None:
    hf = tiny_qwen2_moe()
    ours = from_hf(hf)
    for name in ("decoder.layers.0.mlp.shared_experts.gate_weight", "decoder.layers.1.self_attention.linear_qkv.bias"):
        other = from_hf(hf)
        other.get_parameter(name).data.zero_()
        assert lm_diffs(other, hf)["logits"] > 1e-3, name
    assert lm_diffs(ours, hf)["logits"] <= 1e-4


def test_dense_layers_from_mlp_only_layers_and_sparse_step() -> None:
    """HF's (i + 1) % decoder_sparse_step rule and mlp_only_layers become one 0/1 per layer."""
    hf = tiny_qwen2_moe(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
    ours = from_hf(hf)
    assert megaspec.build_record(ours).config.moe_layer_freq == [0, 1, 0, 0]
    assert [type(layer.mlp) for layer in ours.decoder.layers] == [MLP, MoELayer, MLP, MLP]
    assert_lm_parity(ours, hf)
    back = to_hf(ours)
    assert [type(layer.mlp).__name__ for layer in back.model.layers] == [
        "Qwen2MoeMLP", "Qwen2MoeSparseMoeBlock", "Qwen2MoeMLP", "Qwen2MoeMLP"]
    assert_lm_parity(ours, back, atol=1e-5)


def test_to_hf_gives_back_hf_outputs(tmp_path) -> None:
    hf = tiny_qwen2_moe(output_router_logits=True, router_aux_loss_coef=0.02)
    ours = from_hf(hf)
    assert megaspec.build_record(ours).config.moe_aux_loss_coeff == pytest.approx(0.04)
    back = to_hf(ours, tmp_path / "hf")
    assert back.config.router_aux_loss_coef == pytest.approx(0.02) and back.config.output_router_logits
    input_ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids, attention_mask=mask).logits,
                                   hf(input_ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    again = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, hf(input_ids).logits, atol=1e-5, rtol=0)


def test_to_hf_of_a_megaspec_built_model() -> None:
    spec, configs = spec_from_hf(tiny_qwen2_moe().config)
    torch.manual_seed(3)
    ours = perturb(build_module(spec, configs)).eval()
    assert_lm_parity(ours, to_hf(ours), atol=1e-5)


def test_unsupported_settings_are_named() -> None:
    config = tiny_qwen2_moe().config
    config.use_sliding_window = True
    with pytest.raises(SpecError, match=r"unsupported Qwen2-MoE configuration: use_sliding_window=True"):
        spec_from_hf(config)


def test_yarn_long_context_config() -> None:
    """Qwen2's long-context configs scale RoPE by YaRN: converted, and equal past the original context."""
    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 4}
    hf = tiny_qwen2_moe(rope_parameters=yarn, max_position_embeddings=16)
    ours = from_hf(hf)
    assert megaspec.build_record(ours).config.rope_scaling.factor == 4.0
    assert_lm_parity(ours, hf)
    assert to_hf(ours).config.rope_parameters["rope_type"] == "yarn"
