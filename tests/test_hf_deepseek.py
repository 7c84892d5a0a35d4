"""DeepSeek-V3 and DeepSeek-V2(-Lite) between HF and megaspec: Multi-head Latent Attention, routing, conversion."""

import pytest
import torch
from hf_cases import VOCAB, assert_lm_parity, batch, lm_diffs, perturb
from test_hf_mixtral import expert_choices

import megaspec
from megaspec import SpecError, build_module
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf
from megaspec.modules.attention.latent import MultiLatentAttention

transformers = pytest.importorskip("transformers")

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
        "mscale": 0.9, "mscale_all_dim": 0.7, "beta_fast": 32, "beta_slow": 1}
SIZES = dict(
    num_hidden_layers=3, first_k_dense_replace=1, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
    v_head_dim=12, n_routed_experts=8, n_shared_experts=2, vocab_size=VOCAB, max_position_embeddings=32,
    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, rope_parameters=YARN,
)  # fmt: skip


def tiny_v3(**overrides) -> torch.nn.Module:
    """Groups of 2 experts, the best 2 of 4 groups, top-2: the per-group rule (best 2) differs from k / groups."""
    torch.manual_seed(0)
    fields = {**SIZES, "q_lora_rank": 24, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
              "routed_scaling_factor": 2.5, "norm_topk_prob": True, "rope_interleave": True, **overrides}
    return perturb(transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**fields))).eval()


def tiny_v2(**overrides) -> torch.nn.Module:
    """V2-Lite's kind: a full-rank query, softmax over all experts, greedy top-k."""
    torch.manual_seed(0)
    fields = {**SIZES, "q_lora_rank": None, "num_experts_per_tok": 3, "topk_method": "greedy",
              "routed_scaling_factor": 1.0, **overrides}
    return perturb(transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**fields))).eval()


def routers(model: torch.nn.Module, ours: bool) -> list[torch.nn.Module]:
    layers = model.decoder.layers if ours else model.model.layers
    return [layer.mlp.router if ours else layer.mlp.gate for layer in layers[1:]]


@pytest.mark.parametrize("make", [tiny_v3, tiny_v2], ids=["v3", "v2"])
def test_from_hf_routes_and_computes_as_hf(make) -> None:
    hf = make()
    ours = from_hf(hf)
    input_ids, _ = batch()
    want = expert_choices(routers(hf, False), 2, lambda: hf(input_ids))
    got = expert_choices(routers(ours, True), 1, lambda: ours(input_ids))
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)  # the same experts for every token
    assert_lm_parity(ours, hf)


def test_v3_translation() -> None:
    ours = from_hf(tiny_v3())
    config = megaspec.build_record(ours).config
    assert (config.q_lora_rank, config.kv_lora_rank, config.qk_head_dim, config.rotary_dim, config.v_head_dim) == (
        24, 16, 8, 8, 12)
    assert config.moe_layer_pattern == ["dense", "moe", "moe"] and config.moe_first_k_dense == 1
    assert (config.moe_router_num_groups, config.moe_router_group_topk, config.moe_router_group_score_topk) == (4, 2, 2)
    assert config.moe_router_topk_scaling_factor == 2.5 and config.rope_scaling.rope_type == "yarn"
    attention = ours.decoder.layers[0].self_attention
    assert isinstance(attention, MultiLatentAttention) and attention.linear_q_proj is None
    # DeepSeek's softmax scale: 1/sqrt(8 + 8) * mscale(4, 0.7)^2; the rotary tables carry mscale(0.9) / mscale(0.7).
    mscale = 0.1 * 0.7 * torch.log(torch.tensor(4.0)).item() + 1
    assert attention.core_attention.softmax_scale == pytest.approx(16**-0.5 * mscale**2)
    assert ours.position_embedding.attention_scaling != 1.0


def test_the_pieces_matter() -> None:
    """Each DeepSeek-specific piece changes the logits: dropping it would fail the parity above."""
    hf = tiny_v3()
    ours = from_hf(hf)
    config = megaspec.build_record(ours).config
    spec = megaspec.build_record(ours).spec
    for change in ({"moe_router_group_score_topk": None}, {"moe_router_enable_expert_bias": False},
                   {"moe_router_topk_scaling_factor": None}, {"rope_scaling": None}, {"rotary_interleaved": False}):
        other = build_module(spec, config.updated(**change))
        other.load_state_dict(ours.state_dict(), strict=False)
        assert lm_diffs(other.eval(), hf)["logits"] > 1e-3, change


def test_v2_translation() -> None:
    ours = from_hf(tiny_v2())
    config = megaspec.build_record(ours).config
    assert config.q_lora_rank is None and ours.decoder.layers[0].self_attention.linear_q_down_proj is None
    assert (config.moe_router_score_function, config.moe_router_pre_softmax, config.moe_router_num_groups) == (
        "softmax", True, None)
    assert ours.decoder.layers[1].mlp.router.expert_bias is None


def test_v2_group_limited_greedy_matches_hf() -> None:
    hf = tiny_v2(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
                 routed_scaling_factor=16.0)
    ours = from_hf(hf)
    config = megaspec.build_record(ours).config
    assert (config.moe_router_num_groups, config.moe_router_group_score_topk) == (4, 1)
    assert_lm_parity(ours, hf)


@pytest.mark.parametrize("make", [tiny_v3, tiny_v2], ids=["v3", "v2"])
def test_to_hf_gives_back_hf_outputs(make, tmp_path) -> None:
    hf = make()
    ours = from_hf(hf)
    back = to_hf(ours, tmp_path / "hf")
    assert type(back).__name__ == type(hf).__name__
    assert_lm_parity(ours, back.eval(), atol=1e-5)
    again = getattr(transformers, type(hf).__name__).from_pretrained(tmp_path / "hf").eval()
    input_ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, hf(input_ids).logits, atol=1e-5, rtol=0)
    assert_lm_parity(from_hf(tmp_path / "hf"), hf)  # and the saved directory converts again


def test_to_hf_of_a_megaspec_built_model() -> None:
    spec, configs = spec_from_hf(tiny_v3().config)
    torch.manual_seed(3)
    ours = perturb(build_module(spec, configs)).eval()
    assert_lm_parity(ours, to_hf(ours), atol=1e-5)


def test_unsupported_settings_are_named() -> None:
    with pytest.raises(SpecError, match=r"unsupported DeepSeek-V3 configuration: norm_topk_prob=False "
                                        r"\(megaspec supports True\)"):
        spec_from_hf(tiny_v3(norm_topk_prob=False).config)
    with pytest.raises(SpecError, match=r"unsupported DeepSeek-V2 configuration: mlp_bias=True"):
        spec_from_hf(tiny_v2(mlp_bias=True).config)
    spec, configs = spec_from_hf(tiny_v3().config)
    model = build_module(spec, {"": configs[""].updated(moe_layer_freq=2)}, device="meta")
    with pytest.raises(SpecError, match=r"deepseek_v3: HF cannot express moe_layer_freq"):
        to_hf(model)
