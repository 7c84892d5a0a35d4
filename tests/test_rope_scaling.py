"""RoPE scaling types (linear, dynamic NTK, YaRN, LongRoPE, Llama-3.1) against HF's rope init functions,
and through whole Llama models converted both ways."""

from typing import ClassVar

import pytest
import torch
from hf_cases import VOCAB, assert_lm_parity, lm_diffs

import megaspec
from megaspec import TransformerConfig, build_module
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf
from megaspec.modules.position.rotary import RotaryEmbedding

transformers = pytest.importorskip("transformers")
ROPE_INIT_FUNCTIONS = pytest.importorskip("transformers.modeling_rope_utils").ROPE_INIT_FUNCTIONS

MAX_POS = 8  # heads of 16 channels (8 frequencies); sequences of 12 tokens run past the context
LONG = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]
SHORT = [1.0, 1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0]
ROPES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 8.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4},
    "yarn_mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4, "mscale": 0.707,
                    "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2},
    "yarn_untruncated": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2,
                         "truncate": False, "attention_factor": 1.25},
    "longrope": {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                 "original_max_position_embeddings": 4},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 4},
}


def hf_config(rope: dict, **extra) -> object:
    return transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=MAX_POS, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_theta": 10000.0, **rope}, **extra)  # fmt: skip


def ours(name: str) -> RotaryEmbedding:
    _, configs = spec_from_hf(hf_config(dict(ROPES[name])))
    return RotaryEmbedding(configs[""])


@pytest.mark.parametrize("name", sorted(ROPES))
@pytest.mark.parametrize("seq", [3, 6, 12], ids=["within", "past_original", "past_max"])
def test_frequencies_and_attention_factor_equal_hf_rope_init(name: str, seq: int) -> None:
    config = hf_config(dict(ROPES[name]))
    # HF's dynamic NTK and LongRoPE recompute their tables from the running length; the others ignore it.
    want, want_factor = ROPE_INIT_FUNCTIONS[ROPES[name]["rope_type"]](config, "cpu", seq_len=seq)
    rotary = ours(name)
    positions = torch.arange(seq).unsqueeze(0)
    torch.testing.assert_close(rotary.frequencies(positions), want, atol=0, rtol=1e-6)
    assert rotary.attention_scaling == pytest.approx(want_factor, rel=1e-12)


@pytest.mark.parametrize("name", sorted(ROPES))
@pytest.mark.parametrize("seq", [4, 12], ids=["within", "beyond"])
def test_cos_sin_equal_hf_rotary_embedding(name: str, seq: int) -> None:
    config = hf_config(dict(ROPES[name]))
    hf = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)  # fresh: HF's dynamic is stateful
    positions = torch.arange(seq).unsqueeze(0)
    x = torch.zeros(1, seq, 64)
    want_cos, want_sin = hf(x, positions)
    _, (cos, sin) = ours(name)(x, positions)
    torch.testing.assert_close(cos.squeeze(2), want_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.squeeze(2), want_sin, atol=1e-6, rtol=0)


def test_meta_build_recomputes_every_table() -> None:
    spec, configs = spec_from_hf(hf_config(dict(ROPES["longrope"])))
    model = build_module(spec, configs)
    reference = RotaryEmbedding(configs[""])
    assert torch.equal(model.position_embedding.inv_freq, reference.inv_freq)
    assert torch.equal(model.position_embedding.long_inv_freq, reference.long_inv_freq)


@pytest.mark.parametrize("name", sorted(ROPES))
def test_llama_with_scaled_rope_matches_hf_both_ways(name: str) -> None:
    """Logits equal HF's with sequences past the original context, and to_hf writes the same rope_parameters."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config(dict(ROPES[name]))).eval()
    model = from_hf(hf)
    scaling = megaspec.build_record(model).config.rope_scaling
    assert scaling.rope_type == ROPES[name]["rope_type"]
    assert_lm_parity(model, hf)
    back = to_hf(model)
    assert {k: v for k, v in back.config.rope_parameters.items() if k in ROPES[name]} == ROPES[name]
    assert_lm_parity(model, back, atol=1e-5)


@pytest.mark.parametrize("name", ["linear", "longrope"])
def test_mistral_carries_the_scaling(name: str) -> None:
    torch.manual_seed(0)
    config = transformers.MistralConfig(**{k: getattr(hf_config({}), k) for k in (
        "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "max_position_embeddings")}, sliding_window=6, rope_parameters={"rope_theta": 1e4, **ROPES[name]})
    hf = transformers.MistralForCausalLM(config).eval()
    model = from_hf(hf)
    assert megaspec.build_record(model).config.rope_scaling.rope_type == name
    assert_lm_parity(model, hf)
    assert to_hf(model).config.rope_parameters["rope_type"] == name


@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn", "longrope"])
def test_the_scaling_changes_outputs(name: str) -> None:
    """Without the scaling the logits differ, so the parity above is not met by accident."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config(dict(ROPES[name]))).eval()
    plain = from_hf(transformers.LlamaForCausalLM(hf_config({"rope_type": "default"})).eval())
    plain.load_state_dict(from_hf(hf).state_dict())
    assert lm_diffs(plain, hf)["logits"] > 1e-3


def test_transformers_4_rope_scaling_dict_converts() -> None:
    """Configs saved by transformers 4 carry `rope_scaling` with `type` and a separate `rope_theta`."""

    class Saved:
        rope_theta = 500.0
        rope_scaling: ClassVar[dict] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}

    from megaspec.interop.hf.rope import rope_fields

    fields = rope_fields(Saved(), "Qwen2")
    assert fields == {"rotary_base": 500.0, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "beta_fast": 32.0,
        "beta_slow": 1.0}}


def test_bad_scaling_settings_are_refused() -> None:
    base = {"num_layers": 1, "hidden_size": 64, "num_attention_heads": 4, "position_embedding_type": "rope"}
    with pytest.raises(ValueError, match=r"rope_scaling.short_factor holds 3 factors but the rotary dimension 16 "
                                         r"has 8 frequencies"):
        TransformerConfig(**base, rope_scaling={"rope_type": "longrope", "short_factor": [1, 1, 1],
                                                "long_factor": LONG, "original_max_position_embeddings": 4})
    with pytest.raises(ValueError, match="factor"):
        TransformerConfig(**base, rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 4})
    with pytest.raises(ValueError, match="rope_type"):
        TransformerConfig(**base, rope_scaling={"rope_type": "ntk", "factor": 2.0})
    # Without rope_type a mapping is Llama-3.1's, as before the other types existed.
    assert TransformerConfig(**base, rope_scaling={"factor": 2.0}).rope_scaling.rope_type == "llama3"



def test_checkpoint_keeps_the_scaling(tmp_path) -> None:
    spec, configs = spec_from_hf(hf_config(dict(ROPES["longrope"])))
    model = build_module(spec, configs).eval()
    megaspec.save(model, tmp_path / "ckpt")
    again = megaspec.load(tmp_path / "ckpt").eval()
    assert megaspec.build_record(again).config.rope_scaling == configs[""].rope_scaling
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
