"""Qwen2 (q/k/v biases, per-layer sliding windows) and Qwen3 (QK-norm) between HF and megaspec."""

import pytest
import torch
from hf_cases import VOCAB, assert_lm_parity, assert_round_trip, lm_diffs, perturbed

import megaspec
from megaspec import build_module
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf

transformers = pytest.importorskip("transformers")

SIZES = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, rms_norm_eps=1e-6, max_position_embeddings=64)


def tiny(family: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                             "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    config = config_cls(**{**SIZES, **({"head_dim": 32} if family == "qwen3" else {}), **overrides})
    return perturbed(model_cls(config))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_from_hf_matches_hf_and_to_hf_gives_it_back(family: str) -> None:
    hf = tiny(family)
    ours = from_hf(hf)
    config = megaspec.build_record(ours).config
    assert (config.add_qkv_bias, config.qk_layernorm) == ((True, False) if family == "qwen2" else (False, True))
    if family == "qwen3":
        assert config.kv_channels == 32  # Qwen3's head_dim is not hidden / heads
        assert ours.decoder.layers[0].self_attention.q_layernorm.weight.shape == (32,)
    assert_lm_parity(ours, hf)
    assert_round_trip(ours, hf)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_sliding_window_on_the_upper_layers(family: str) -> None:
    """use_sliding_window slides a window over layers >= max_window_layers: a pattern of global and local layers."""
    hf = tiny(family, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    ours = from_hf(hf)
    record = megaspec.build_record(ours)
    assert record.config.window_size == (3, 0)
    assert record.spec.to_dict()["submodules"]["decoder"]["submodules"]["layers"]["pattern"] == [
        "global", "local", "local"]
    windows = [layer.self_attention.core_attention.window_size for layer in ours.decoder.layers]
    assert windows == [None, (3, 0), (3, 0)]
    assert_lm_parity(ours, hf)
    assert lm_diffs(from_hf(tiny(family)), hf)["logits"] > 1e-3  # the window matters at this length
    back = assert_round_trip(ours, hf)
    assert back.config.layer_types == hf.config.layer_types and back.config.sliding_window == 4


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_to_hf_reproduces_megaspec_outputs(family: str) -> None:
    spec, configs = spec_from_hf(tiny(family, tie_word_embeddings=True).config)
    torch.manual_seed(3)
    ours = build_module(spec, configs).eval()
    assert_lm_parity(ours, to_hf(ours), atol=1e-5)

