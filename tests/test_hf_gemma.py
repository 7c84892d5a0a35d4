"""Gemma, Gemma 2 and Gemma 3 (text) between HF and megaspec: scaled embeddings, (1 + weight) norms,
sandwich norms, soft-capping, local and global layers with their own RoPE tables."""

import pytest
import torch
from hf_cases import VOCAB, assert_lm_parity, assert_round_trip, lm_diffs, perturbed

import megaspec
from megaspec import SpecError, build_module
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf

transformers = pytest.importorskip("transformers")

SIZES = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             head_dim=24, vocab_size=VOCAB, rms_norm_eps=1e-6, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=2, eos_token_id=1)
CLASSES = {"gemma": ("GemmaConfig", "GemmaForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
           "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM")}
# Small windows and a short cycle, so that 12 tokens see both kinds of layers at work.
WINDOWS = {"gemma": {}, "gemma2": {"sliding_window": 4, "query_pre_attn_scalar": 20},
           "gemma3": {"sliding_window": 4, "sliding_window_pattern": 2, "query_pre_attn_scalar": 20,
                      "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}}}


def tiny(family: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[family])
    # Soft caps small enough to bite at these sizes.
    caps = {"attn_logit_softcapping": 1.0, "final_logit_softcapping": 2.0} if family == "gemma2" else {}
    config = config_cls(**{**SIZES, **WINDOWS[family], **caps, **overrides})
    return perturbed(model_cls(config))


@pytest.mark.parametrize("family", list(CLASSES))
def test_from_hf_matches_hf_and_to_hf_gives_it_back(family: str) -> None:
    hf = tiny(family)
    ours = from_hf(hf)
    config = megaspec.build_record(ours).config
    assert config.layernorm_zero_centered_gamma and config.kv_channels == 24
    assert ours.output_layer.weight is None  # tied
    assert_lm_parity(ours, hf)
    assert_round_trip(ours, hf)


def test_gemma2_caps_scores_and_logits_and_alternates_windows() -> None:
    hf = tiny("gemma2")
    ours = from_hf(hf)
    config = megaspec.build_record(ours).config
    assert (config.attn_logit_softcapping, config.final_logit_softcapping, config.query_pre_attn_scalar) == (
        1.0, 2.0, 20.0)
    assert [layer.self_attention.core_attention.window_size for layer in ours.decoder.layers] == [(3, 0), None, (3, 0)]
    # Each of these matters at this size: without it the outputs differ.
    for change in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None}, {"sliding_window": 64},
                   {"query_pre_attn_scalar": 24}):
        assert lm_diffs(from_hf(tiny("gemma2", **change)), hf)["logits"] > 1e-3, change


def test_gemma3_local_and_global_layers_rotate_with_their_own_bases() -> None:
    hf = tiny("gemma3")
    ours = from_hf(hf)
    assert [layer.self_attention.rotary_table for layer in ours.decoder.layers] == ["local", "global", "local"]
    tables = ours.position_embedding.tables
    torch.testing.assert_close(tables["local"].inv_freq, hf.model.rotary_emb.sliding_attention_inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(tables["global"].inv_freq, hf.model.rotary_emb.full_attention_inv_freq, rtol=0, atol=0)
    same_base = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e6}}
    assert lm_diffs(from_hf(tiny("gemma3", rope_parameters=same_base)), hf)["logits"] > 1e-3


def test_gemma3_scaled_global_rope_waits_for_its_rope_type() -> None:
    scaled = {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    try:
        ours = from_hf(tiny("gemma3", rope_parameters=scaled))
    except SpecError as exc:  # until megaspec's RoPE knows the linear type, it is refused by name
        assert "rope_type 'linear'" in str(exc)
    else:
        assert_lm_parity(ours, tiny("gemma3", rope_parameters=scaled))


@pytest.mark.parametrize("family", list(CLASSES))
def test_to_hf_reproduces_megaspec_outputs(family: str) -> None:
    spec, configs = spec_from_hf(tiny(family).config)
    torch.manual_seed(3)
    ours = build_module(spec, configs).eval()
    with torch.no_grad():  # megaspec starts norms at the identity (zero weights): move them too
        for name, p in ours.named_parameters():
            if "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    assert_lm_parity(ours, to_hf(ours), atol=1e-5)


def test_hf_cannot_express_a_capped_gemma3() -> None:
    spec, configs = spec_from_hf(tiny("gemma3").config)
    ours = build_module(spec, {"": configs[""].updated(attn_logit_softcapping=30.0)}, device="meta")
    with pytest.raises(SpecError, match="gemma3: HF cannot express attn_logit_softcapping"):
        to_hf(ours)
