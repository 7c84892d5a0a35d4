"""Llama (GQA, Llama-3.1 RoPE scaling) and Mistral (sliding window) between HF and megaspec."""

import pytest
import torch
from hf_cases import VOCAB, assert_lm_parity, batch, lm_diffs, one_adamw_step

import megaspec
from megaspec import SpecError, build_module
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
SIZES = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, vocab_size=VOCAB,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def tiny_llama(kv_heads: int = 2, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    fields = {**SIZES, "num_key_value_heads": kv_heads, "rope_parameters": LLAMA3_ROPE, **overrides}
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()


def tiny_mistral(window: int | None = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.MistralConfig(**SIZES, num_key_value_heads=2, sliding_window=window)
    return transformers.MistralForCausalLM(config).eval()


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_llama_from_hf_matches_hf(kv_heads: int) -> None:
    hf = tiny_llama(kv_heads)
    ours = from_hf(hf)
    config = megaspec.build_record(ours).configs[""]
    assert config.query_groups == kv_heads and config.rope_scaling.factor == 8.0
    assert_lm_parity(ours, hf)


def test_llama3_rope_scaling_is_used() -> None:
    """Sequences longer than the original context see the scaled frequencies: without them, outputs differ."""
    hf = tiny_llama()
    ours = from_hf(hf)
    plain = from_hf(tiny_llama(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    assert lm_diffs(plain, hf)["logits"] > 1e-3
    torch.testing.assert_close(ours.position_embedding.inv_freq, hf.model.rotary_emb.inv_freq, atol=0, rtol=0)


def test_llama_untied_and_biased() -> None:
    hf = tiny_llama(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    ours = from_hf(hf)
    assert ours.output_layer.weight is None and ours.decoder.layers[0].mlp.linear_fc1.bias is not None
    assert_lm_parity(ours, hf)
    back = to_hf(ours)
    assert back.config.attention_bias and back.config.mlp_bias and back.config.tie_word_embeddings


def test_mistral_sliding_window_matches_hf() -> None:
    hf = tiny_mistral(window=4)
    ours = from_hf(hf)
    assert megaspec.build_record(ours).configs[""].window_size == (3, 0)
    assert_lm_parity(ours, hf)
    # The window matters at this length: a model without it differs.
    assert lm_diffs(from_hf(tiny_mistral(window=None)), hf)["logits"] > 1e-3
    back = to_hf(ours)
    assert type(back).__name__ == "MistralForCausalLM" and back.config.sliding_window == 4


@pytest.mark.parametrize("make", [tiny_llama, tiny_mistral], ids=["llama", "mistral"])
def test_to_hf_reproduces_megaspec_outputs(make) -> None:
    spec, configs = spec_from_hf(make().config)
    torch.manual_seed(3)
    ours = build_module(spec, configs).eval()
    assert_lm_parity(ours, to_hf(ours), atol=1e-5)


def test_save_pretrained_round_trip(tmp_path) -> None:
    hf = tiny_llama()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    assert_lm_parity(ours, hf)
    to_hf(ours, tmp_path / "back")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    input_ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, hf(input_ids).logits)


def test_one_adamw_step_changes_both_losses_alike() -> None:
    hf = tiny_llama()
    ours = from_hf(hf)
    (ours_before, ours_after), (hf_before, hf_after) = one_adamw_step(ours), one_adamw_step(hf)
    assert abs(ours_before - hf_before) <= 1e-4
    assert abs(ours_after - hf_after) <= 1e-4
    assert hf_before - hf_after > 1e-3


def test_unsupported_architecture_is_named() -> None:
    config = transformers.GPTJConfig(n_layer=1, n_embd=32, n_head=2, rotary_dim=8, vocab_size=VOCAB)
    hf = transformers.GPTJForCausalLM(config)
    with pytest.raises(SpecError, match=r"unsupported HF architecture 'gptj' \(model_type 'gptj'\)"):
        from_hf(hf)


def test_unsupported_rope_type_is_named() -> None:
    hf = tiny_llama(rope_parameters={"rope_type": "proportional", "rope_theta": 10000.0})
    with pytest.raises(SpecError, match=r"unsupported Llama configuration: rope_type 'proportional' \(megaspec "
                                        r"supports 'default', 'llama3', 'linear', 'dynamic', 'yarn', 'longrope'\)"):
        from_hf(hf)


def test_unplaceable_tensors_are_all_listed() -> None:
    """A tensor missing and one extra: both named in one error, and nothing is loaded."""
    hf = tiny_llama()
    state = hf.state_dict()

    class Edited(torch.nn.Module):
        config = hf.config
        training = False

        def state_dict(self):
            edited = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.weight"}
            edited["model.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
            return edited

    with pytest.raises(SpecError) as info:
        from_hf(Edited())
    message = str(info.value)
    assert "model.layers.1.self_attn.k_proj.weight: missing HF tensor" in message
    assert "model.layers.0.self_attn.rotary.weight: unexpected HF tensor" in message
    assert "decoder.layers.1.self_attention.linear_qkv.weight: no HF tensor fills this megaspec tensor" in message


def test_to_hf_refuses_what_hf_cannot_express() -> None:
    spec, configs = spec_from_hf(tiny_llama().config)
    configs = {"": configs[""].updated(rotary_interleaved=True)}
    ours = build_module(spec, configs, device="meta")
    with pytest.raises(SpecError, match=r"llama: HF cannot express rotary_interleaved"):
        to_hf(ours)
