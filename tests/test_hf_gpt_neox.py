"""GPT-NeoX / Pythia between HF and megaspec: parallel attention and MLP, partial RoPE, biases."""

import pytest
import torch
from hf_cases import VOCAB, assert_lm_parity, assert_round_trip, lm_diffs, perturbed

import megaspec
from megaspec import SpecError, build_module
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf

transformers = pytest.importorskip("transformers")

SIZES = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, vocab_size=VOCAB,
             max_position_embeddings=64, bos_token_id=0, eos_token_id=2)


def tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturbed(transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**SIZES, **overrides})))


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_from_hf_matches_hf_and_to_hf_gives_it_back(parallel: bool) -> None:
    hf = tiny(use_parallel_residual=parallel)
    ours = from_hf(hf)
    layer = ours.decoder.layers[0]
    assert type(layer).__name__ == ("ParallelTransformerLayer" if parallel else "TransformerLayer")
    assert megaspec.build_record(ours).config.rotary_dim == 4  # a quarter of each 16-channel head
    assert_lm_parity(ours, hf)
    back = assert_round_trip(ours, hf)
    assert back.config.use_parallel_residual is parallel


def test_the_parallel_residual_and_the_partial_rotary_matter() -> None:
    hf = tiny()
    assert lm_diffs(from_hf(tiny(use_parallel_residual=False)), hf)["logits"] > 1e-3
    full = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    assert lm_diffs(from_hf(tiny(rope_parameters=full)), hf)["logits"] > 1e-3


def test_to_hf_reproduces_megaspec_outputs() -> None:
    spec, configs = spec_from_hf(tiny().config)
    torch.manual_seed(3)
    ours = build_module(spec, configs).eval()
    assert_lm_parity(ours, to_hf(ours), atol=1e-5)


def test_unbiased_attention_is_refused() -> None:
    with pytest.raises(SpecError, match=r"unsupported GPT-NeoX configuration: attention_bias=False"):
        from_hf(tiny(attention_bias=False))
