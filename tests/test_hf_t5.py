"""T5 v1.0 (tied head, rescaled) and v1.1 (gated GELU, own head) between HF transformers and megaspec."""

import pytest
import torch
from hf_cases import max_diff
from torch import Tensor, nn

import megaspec
from megaspec import SpecError, build_model, build_module, compose
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf
from megaspec.spec import parse_spec

transformers = pytest.importorskip("transformers")

VOCAB, SRC, TGT = 99, 24, 9  # 24 > max_distance below, so the far (log-spaced) buckets are used


def tiny_t5(v1_1: bool, own_head: bool = True, **overrides) -> nn.Module:
    """A tiny HF T5, every weight perturbed; v1.1 gets an lm_head of its own, as the published checkpoints."""
    torch.manual_seed(0)
    config = transformers.T5Config(
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=VOCAB, dropout_rate=0.0,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
        feed_forward_proj="gated-gelu" if v1_1 else "relu", tie_word_embeddings=not v1_1, **overrides,
    )  # fmt: skip
    hf = transformers.T5ForConditionalGeneration(config).eval()
    if v1_1 and own_head:  # transformers 5 ties T5's lm_head whatever the config says
        hf.lm_head.weight = nn.Parameter(hf.shared.weight.detach().clone())
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def batch() -> dict[str, Tensor]:
    """Encoder ids [3, SRC] with no / right / left padding; decoder ids [3, TGT] with right padding."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(3, SRC, dtype=torch.long)
    mask[1, -7:] = 0
    mask[2, :5] = 0
    decoder_mask = torch.ones(3, TGT, dtype=torch.long)
    decoder_mask[1, -3:] = 0
    return {
        "input_ids": torch.randint(0, VOCAB, (3, SRC), generator=gen),
        "decoder_input_ids": torch.randint(0, VOCAB, (3, TGT), generator=gen),
        "attention_mask": mask,
        "decoder_attention_mask": decoder_mask,
    }


def diffs(ours: nn.Module, hf: nn.Module) -> dict[str, float]:
    """Max abs differences of logits (with and without padding, real decoder tokens), encoder output and loss."""
    inputs = batch()
    keep, enc_keep = inputs["decoder_attention_mask"].bool(), inputs["attention_mask"].bool()
    labels = inputs["decoder_input_ids"].roll(-1, dims=1).masked_fill(~keep, -100)
    plain = {k: inputs[k] for k in ("input_ids", "decoder_input_ids")}
    with torch.no_grad():
        got, want = ours(**inputs, labels=labels), hf(**inputs, labels=labels)
        return {
            "logits": max_diff(ours(**plain).logits, hf(**plain).logits),
            "padded logits": max_diff(got.logits[keep], want.logits[keep]),
            "encoder": max_diff(got.encoder_last_hidden_state[enc_keep], want.encoder_last_hidden_state[enc_keep]),
            "loss": max_diff(got.loss, want.loss),
        }


def assert_parity(ours: nn.Module, hf: nn.Module, atol: float = 1e-4) -> None:
    found = diffs(ours, hf)
    assert max(found.values()) <= atol, found


@pytest.mark.parametrize("v1_1", [False, True], ids=["v1_0", "v1_1"])
def test_from_hf_matches_hf(v1_1: bool) -> None:
    hf = tiny_t5(v1_1)
    ours = from_hf(hf)
    config = megaspec.build_record(ours).configs[""]
    activation = megaspec.build_record(ours).modules["encoder.layers.0.mlp.activation"].name
    assert (config.gated_linear_unit, activation) == ((True, "gelu_tanh") if v1_1 else (False, "relu"))
    # v1.0: the head reads the embedding and rescales; v1.1: its own weight, no rescale.
    assert config.share_embeddings_and_output_weights is not v1_1
    assert (ours.output_layer.weight is None) is not v1_1 and ours.output_scale == (1.0 if v1_1 else 64**-0.5)
    # One relative bias table per stack, HF's from the stack's first block.
    for stack, hf_stack in ((ours.encoder, hf.encoder), (ours.decoder, hf.decoder)):
        want = hf_stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert torch.equal(stack.attention_bias.weight, want)
    assert_parity(ours, hf)
    back = to_hf(ours)  # and back: every HF tensor exactly
    assert back.state_dict().keys() == hf.state_dict().keys()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_v1_1_with_the_head_transformers_ties() -> None:
    """transformers 5 builds v1.1 with lm_head = shared, unscaled: megaspec's own head gets a copy."""
    hf = tiny_t5(v1_1=True, own_head=False)
    assert hf.lm_head.weight is hf.shared.weight and not hf.config.scale_decoder_outputs
    ours = from_hf(hf)
    assert torch.equal(ours.output_layer.weight, ours.embedding.weight)
    assert ours.output_layer.weight.data_ptr() != ours.embedding.weight.data_ptr()
    assert_parity(ours, hf)


@pytest.mark.parametrize("v1_1", [False, True], ids=["v1_0", "v1_1"])
def test_to_hf_reproduces_megaspec_outputs(v1_1: bool) -> None:
    spec, configs = spec_from_hf(tiny_t5(v1_1).config)
    torch.manual_seed(3)
    ours = build_module(spec, configs).eval()
    hf = to_hf(ours)
    assert type(hf).__name__ == "T5ForConditionalGeneration"
    assert (hf.lm_head.weight is hf.shared.weight) is not v1_1  # v1.1's head untied in HF too
    assert hf.config.scale_decoder_outputs is not v1_1
    assert_parity(ours, hf, atol=1e-5)


@pytest.mark.parametrize("v1_1", [False, True], ids=["v1_0", "v1_1"])
def test_save_pretrained_round_trip(tmp_path, v1_1: bool) -> None:
    hf = tiny_t5(v1_1)
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    assert_parity(ours, hf)
    to_hf(ours, tmp_path / "back")
    again = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    assert (again.lm_head.weight is again.shared.weight) is not v1_1  # the own head survives the directory
    inputs = batch()
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, hf(**inputs).logits)


@pytest.mark.parametrize("model", ["t5", "t5_v1_1"])
def test_shipped_t5_confs_convert(model: str) -> None:
    """conf/model/t5*.yaml at a tiny size carry to HF T5, and compute the same."""
    ours = build_model(compose([f"model={model}", "model.config.num_layers=2", "model.config.hidden_size=64",
                                "model.config.num_attention_heads=4", "model.config.kv_channels=16",
                                "model.config.ffn_hidden_size=128", f"model.config.vocab_size={VOCAB}",
                                "model.config.relative_attention_num_buckets=8",
                                "model.config.relative_attention_max_distance=16"])).eval()
    hf = to_hf(ours)
    assert hf.config.feed_forward_proj == ("gated-gelu" if model == "t5_v1_1" else "relu")
    assert_parity(ours, hf, atol=1e-5)


def test_unsupported_options_are_named() -> None:
    with pytest.raises(SpecError, match=r"unsupported T5 configuration: num_decoder_layers=1 \(megaspec supports 2\)"):
        from_hf(tiny_t5(False, num_decoder_layers=1))
    hf = tiny_t5(False)
    hf.lm_head.weight = nn.Parameter(torch.randn_like(hf.shared.weight))
    with pytest.raises(SpecError, match=r"an lm_head of its own with the decoder output rescaled"):
        from_hf(hf)
    torch.manual_seed(0)
    encoder_only = transformers.T5EncoderModel(tiny_t5(False).config)
    with pytest.raises(SpecError, match=r"unsupported HF class 'T5EncoderModel': megaspec converts T5 as "
                                        r"T5ForConditionalGeneration"):
        from_hf(encoder_only)


def test_to_hf_refuses_what_hf_cannot_express() -> None:
    spec, configs = spec_from_hf(tiny_t5(True).config)
    data = spec.to_dict()
    for stack in ("encoder", "decoder"):
        data["submodules"][stack]["submodules"]["layers"]["submodules"]["mlp"]["submodules"]["activation"] = "gelu"
    ours = build_module(parse_spec(data), configs, device="meta")
    with pytest.raises(SpecError, match=r"t5: HF T5's gated GELU is the tanh approximation"):
        to_hf(ours)
