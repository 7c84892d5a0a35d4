"""OLMo 2 between HF and megaspec: norms on the branch outputs, QK-norm over whole projections."""

import pytest
import torch
from hf_cases import VOCAB, assert_lm_parity, assert_round_trip, perturbed

import megaspec
from megaspec import SpecError, build_module
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf

transformers = pytest.importorskip("transformers")

SIZES = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, rms_norm_eps=1e-6, max_position_embeddings=64, pad_token_id=1, eos_token_id=2)


def tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturbed(transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**{**SIZES, **overrides})))


@pytest.mark.parametrize("tied", [False, True])
def test_from_hf_matches_hf_and_to_hf_gives_it_back(tied: bool) -> None:
    hf = tiny(tie_word_embeddings=tied)
    ours = from_hf(hf)
    attention = ours.decoder.layers[0].self_attention
    assert attention.q_layernorm.weight.shape == (64,) and attention.k_layernorm.weight.shape == (32,)
    assert isinstance(ours.decoder.layers[0].input_layernorm, torch.nn.Identity)
    assert_lm_parity(ours, hf)
    assert_round_trip(ours, hf)


def test_to_hf_reproduces_megaspec_outputs() -> None:
    spec, configs = spec_from_hf(tiny().config)
    torch.manual_seed(3)
    ours = build_module(spec, configs).eval()
    assert_lm_parity(ours, to_hf(ours), atol=1e-5)


def test_biased_attention_is_refused() -> None:
    with pytest.raises(SpecError, match=r"unsupported OLMo 2 configuration: attention_bias=True"):
        from_hf(tiny(attention_bias=True))
    assert megaspec.build_model("olmo2", device="meta").decoder.layers[0].self_attention.qk_layernorm_per_head is False
