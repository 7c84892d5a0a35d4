"""BLOOM between HF and megaspec: ALiBi (112-head slopes included), the embedding LayerNorm, padding."""

import pytest
import torch
from hf_cases import VOCAB, assert_lm_parity, assert_round_trip, perturbed

from megaspec import SpecError, build_module
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf
from megaspec.modules.position.alibi import alibi_slopes

transformers = pytest.importorskip("transformers")


def tiny(heads: int = 4, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BloomConfig(**{"n_layer": 2, "hidden_size": 16 * heads, "n_head": heads,
                                         "vocab_size": VOCAB, **overrides})
    return perturbed(transformers.BloomForCausalLM(config))


@pytest.mark.parametrize("heads", [4, 6], ids=["power-of-two-heads", "other-heads"])
def test_from_hf_matches_hf_and_to_hf_gives_it_back(heads: int) -> None:
    hf = tiny(heads)
    ours = from_hf(hf)
    assert ours.position_embedding is None and ours.decoder.attention_bias.slopes.shape == (heads,)
    assert_lm_parity(ours, hf)
    assert_round_trip(ours, hf)


def test_alibi_slopes_are_blooms() -> None:
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    for heads in (4, 6, 112):  # BLOOM-176B has 112 heads: not a power of two
        torch.testing.assert_close(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")),
                                   rtol=0, atol=0)


def test_untied_head_and_to_hf_reproduces_megaspec_outputs() -> None:
    hf = tiny(tie_word_embeddings=False)
    assert_lm_parity(from_hf(hf), hf)
    spec, configs = spec_from_hf(hf.config)
    torch.manual_seed(3)
    ours = build_module(spec, configs).eval()
    assert_lm_parity(ours, to_hf(ours), atol=1e-5)


def test_post_layernorm_residuals_are_refused() -> None:
    with pytest.raises(SpecError, match=r"apply_residual_connection_post_layernorm=True"):
        from_hf(tiny(apply_residual_connection_post_layernorm=True))
