"""Phi-3 between HF and megaspec: fused q/k/v and gate/up tensors, a sliding window, partial rotary."""

import pytest
import torch
from hf_cases import VOCAB, assert_lm_parity, assert_round_trip, lm_diffs, perturbed

import megaspec
from megaspec import SpecError, build_module
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf

transformers = pytest.importorskip("transformers")

SIZES = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, rms_norm_eps=1e-5, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
             pad_token_id=None)


def tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturbed(transformers.Phi3ForCausalLM(transformers.Phi3Config(**{**SIZES, **overrides})))


@pytest.mark.parametrize("window", [None, 4])
def test_from_hf_matches_hf_and_to_hf_gives_it_back(window: int | None) -> None:
    hf = tiny(sliding_window=window)
    ours = from_hf(hf)
    assert megaspec.build_record(ours).config.window_size == (None if window is None else (3, 0))
    assert_lm_parity(ours, hf)
    # Phi-3 computes what Mistral (with a window) or Llama computes: that is the default, Phi-3 on request.
    assert type(to_hf(ours)).__name__ == ("LlamaForCausalLM" if window is None else "MistralForCausalLM")
    assert_lm_parity(ours, to_hf(ours))
    assert_round_trip(ours, hf, hf_class="Phi3ForCausalLM")


def test_partial_rotary_factor_becomes_rotary_percent() -> None:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    hf = tiny(rope_parameters=rope)
    ours = from_hf(hf)
    assert megaspec.build_record(ours).config.rotary_dim == 8
    assert_lm_parity(ours, hf)
    assert lm_diffs(from_hf(tiny()), hf)["logits"] > 1e-3
    back = assert_round_trip(ours, hf, hf_class="Phi3ForCausalLM")
    assert back.config.rope_parameters["partial_rotary_factor"] == 0.5


def test_to_hf_reproduces_megaspec_outputs() -> None:
    spec, configs = spec_from_hf(tiny(sliding_window=4).config)
    torch.manual_seed(3)
    ours = build_module(spec, configs).eval()
    assert_lm_parity(ours, to_hf(ours, hf_class="Phi3ForCausalLM"), atol=1e-5)


def test_long_rope_is_refused_by_name_and_unknown_classes_too() -> None:
    long_rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                 "original_max_position_embeddings": 32}
    hf = tiny(rope_parameters=long_rope)
    try:
        ours = from_hf(hf)
    except SpecError as exc:  # until megaspec's RoPE knows LongRoPE
        assert "rope_type 'longrope'" in str(exc)
    else:
        assert_lm_parity(ours, hf)
    ours = from_hf(tiny())
    with pytest.raises(SpecError, match="megaspec does not convert to HF class 'Phi4ForCausalLM'"):
        to_hf(ours, hf_class="Phi4ForCausalLM")


def test_convert_command_writes_the_hf_class_asked_for(tmp_path) -> None:
    from megaspec.cli import main

    hf = tiny(sliding_window=4)
    megaspec.save(from_hf(hf), tmp_path / "ckpt")
    assert main(["convert", "--to", "hf", "--hf-class", "Phi3ForCausalLM", str(tmp_path / "ckpt"),
                 str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back).__name__ == "Phi3ForCausalLM"
    assert_lm_parity(back, hf, atol=0)
