"""GPT-2 between HF transformers and megaspec: outputs, the reverse direction, save_pretrained, training."""

import pytest
import torch
from hf_cases import VOCAB, assert_lm_parity, batch, max_diff, one_adamw_step

import megaspec
from megaspec import SpecError, build_module
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf

transformers = pytest.importorskip("transformers")


def tiny_gpt2(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **overrides,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def test_from_hf_matches_hf() -> None:
    hf = tiny_gpt2()
    ours = from_hf(hf)
    assert not ours.training
    assert_lm_parity(ours, hf)
    # The tie survives: one vocab matrix, read by the head.
    assert ours.output_layer.weight is None
    assert torch.equal(ours.embedding.weight, hf.transformer.wte.weight)


def test_translated_spec_and_config_are_plain_data() -> None:
    spec, configs = spec_from_hf(tiny_gpt2().config)
    config = configs[""]
    assert (config.num_layers, config.hidden_size, config.num_attention_heads, config.ffn_size) == (2, 64, 4, 256)
    assert config.share_embeddings_and_output_weights
    assert "activation" not in config.model_fields_set  # the spec holds it (below)
    data = spec.to_dict()
    assert data["module"] == "gpt_model"
    assert data["submodules"]["decoder"]["submodules"]["layers"]["submodules"]["mlp"]["submodules"][
        "activation"] == {"module": "gelu_tanh"}


def test_to_hf_reproduces_megaspec_outputs() -> None:
    """A megaspec-initialised model, carried to HF, computes what megaspec computes."""
    spec, configs = spec_from_hf(tiny_gpt2().config)
    torch.manual_seed(3)
    ours = build_module(spec, configs).eval()
    hf = to_hf(ours)
    assert type(hf).__name__ == "GPT2LMHeadModel" and not hf.training
    assert hf.lm_head.weight is hf.transformer.wte.weight
    assert_lm_parity(ours, hf, atol=1e-5)


def test_round_trip_is_exact() -> None:
    hf = tiny_gpt2()
    back = to_hf(from_hf(hf))
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_save_pretrained_round_trip(tmp_path) -> None:
    hf = tiny_gpt2(activation_function="gelu")
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    assert megaspec.build_record(ours).configs[""].activation == "gelu"
    assert_lm_parity(ours.eval(), hf)
    to_hf(ours, tmp_path / "back")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    input_ids, _ = batch()
    with torch.no_grad():
        assert max_diff(again(input_ids).logits, hf(input_ids).logits) == 0.0


def test_one_adamw_step_changes_both_losses_alike() -> None:
    hf = tiny_gpt2()
    ours = from_hf(hf)
    (ours_before, ours_after), (hf_before, hf_after) = one_adamw_step(ours), one_adamw_step(hf)
    assert abs(ours_before - hf_before) <= 1e-4
    assert abs(ours_after - hf_after) <= 1e-4
    assert hf_before - hf_after > 1e-3  # the step did something


def test_unsupported_options_are_named() -> None:
    hf = tiny_gpt2(scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(SpecError, match=r"unsupported GPT-2 configuration: scale_attn_by_inverse_layer_idx=True"):
        from_hf(hf)
    hf = tiny_gpt2(activation_function="tanh")
    with pytest.raises(SpecError, match=r"GPT-2: activation 'tanh' has no megaspec equivalent"):
        from_hf(hf)
