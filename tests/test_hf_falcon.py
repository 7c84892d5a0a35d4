"""Falcon between HF and megaspec: Falcon-7B's multi-query parallel layers with one norm, the new decoder
architecture's grouped heads and two norms (or one), and sequential layers."""

import pytest
import torch
from hf_cases import VOCAB, assert_lm_parity, assert_round_trip, lm_diffs, perturbed

import megaspec
from megaspec import SpecError, build_module
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf

transformers = pytest.importorskip("transformers")

SIZES = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=VOCAB,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
FORMS = {
    "7b": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
    "new-two-norms": dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True),
    "new-one-norm": dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True,
                         num_ln_in_parallel_attn=1),
    "sequential-mha": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True),
}


def tiny(form: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.FalconConfig(**{**SIZES, **FORMS[form], **overrides})
    return perturbed(transformers.FalconForCausalLM(config))


@pytest.mark.parametrize("form", list(FORMS))
def test_from_hf_matches_hf_and_to_hf_gives_it_back(form: str) -> None:
    hf = tiny(form)
    ours = from_hf(hf)
    layer = ours.decoder.layers[0]
    groups = {"7b": 1, "sequential-mha": 4}.get(form, 2)
    assert megaspec.build_record(ours).config.query_groups == groups
    assert type(layer).__name__ == ("TransformerLayer" if form == "sequential-mha" else "ParallelTransformerLayer")
    if form in ("7b", "new-one-norm"):
        assert layer.pre_mlp_layernorm is None  # the MLP shares the attention's norm
    assert_lm_parity(ours, hf)
    if form == "sequential-mha":  # the same math as a sequential GPT-NeoX, which comes first
        assert type(to_hf(ours)).__name__ == "GPTNeoXForCausalLM"
    back = assert_round_trip(ours, hf, hf_class="FalconForCausalLM")
    for field in ("new_decoder_architecture", "parallel_attn"):
        assert getattr(back.config, field) == getattr(hf.config, field), field


def test_one_norm_and_two_norms_differ() -> None:
    two = tiny("new-two-norms")
    assert lm_diffs(from_hf(tiny("new-one-norm")), two)["logits"] > 1e-3


@pytest.mark.parametrize("form", list(FORMS))
def test_to_hf_reproduces_megaspec_outputs(form: str) -> None:
    spec, configs = spec_from_hf(tiny(form).config)
    torch.manual_seed(3)
    ours = build_module(spec, configs).eval()
    assert_lm_parity(ours, to_hf(ours, hf_class="FalconForCausalLM"), atol=1e-5)


def test_alibi_falcon_is_refused() -> None:
    with pytest.raises(SpecError, match=r"unsupported Falcon configuration: alibi=True"):
        from_hf(tiny("sequential-mha", alibi=True))
