"""BERT (BertModel with its pooler, BertForMaskedLM tied and untied) between HF transformers and megaspec."""

import pytest
import torch
from hf_cases import max_diff
from torch import Tensor, nn

import megaspec
from megaspec import SpecError, build_model, build_module, compose
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 99, 12


def tiny_bert(cls_name: str = "BertModel", **overrides) -> nn.Module:
    """A tiny HF BERT with every weight perturbed (HF starts norms at the identity and biases at zero)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides,
    )  # fmt: skip
    hf = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def batch() -> tuple[Tensor, Tensor, Tensor]:
    """Token ids, token types (sentence A then B) [3, SEQ] and a keep-mask: none, right and left padding."""
    input_ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    token_type_ids = (torch.arange(SEQ) >= SEQ // 2).long().expand(3, SEQ)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, -4:] = 0
    mask[2, :5] = 0
    return input_ids, token_type_ids, mask


def diffs(ours: nn.Module, hf: nn.Module) -> dict[str, float]:
    """Max abs differences at real tokens, with and without padding; the pooler or the logits and loss."""
    input_ids, token_type_ids, mask = batch()
    keep = mask.bool()
    labels = input_ids.masked_fill((torch.arange(SEQ) % 3 != 0) | ~keep, -100)  # every third real token scored
    mlm = type(hf).__name__ == "BertForMaskedLM"
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, kwargs in (("plain", {}), ("padded", {"attention_mask": mask, "token_type_ids": token_type_ids})):
            got, want = ours(input_ids, **kwargs), hf(input_ids, **kwargs)
            if mlm:
                out[f"{name} logits"] = max_diff(got.logits[keep], want.logits[keep])
            else:
                out[f"{name} hidden"] = max_diff(got.last_hidden_state[keep], want.last_hidden_state[keep])
                first = keep[:, 0]  # the pooler reads position 0: compare where that is a real token
                out[f"{name} pooler"] = max_diff(got.pooler_output[first], want.pooler_output[first])
        if mlm:
            kwargs = {"attention_mask": mask, "token_type_ids": token_type_ids, "labels": labels}
            out["loss"] = max_diff(ours(input_ids, **kwargs).loss, hf(input_ids, **kwargs).loss)
    return out


def assert_parity(ours: nn.Module, hf: nn.Module, atol: float = 1e-4) -> None:
    found = diffs(ours, hf)
    assert max(found.values()) <= atol, found


def test_bert_model_from_hf_matches_hf() -> None:
    hf = tiny_bert()
    ours = from_hf(hf)
    assert not ours.training and ours.lm_head is None
    assert megaspec.build_record(ours).spec.to_dict()["submodules"]["pooler"] == {"module": "pooler"}
    assert_parity(ours, hf)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_masked_lm_from_hf_matches_hf(tied: bool) -> None:
    hf = tiny_bert("BertForMaskedLM", tie_word_embeddings=tied)
    ours = from_hf(hf)
    assert ours.pooler is None and megaspec.build_record(ours).configs[""].share_embeddings_and_output_weights is tied
    assert (ours.lm_head.output_layer.weight is None) is tied
    # The head's bias is the one HF adds: decoder.bias (untied HF keeps an unused `bias` beside it).
    torch.testing.assert_close(ours.lm_head.output_layer.bias, hf.cls.predictions.decoder.bias, atol=0, rtol=0)
    assert_parity(ours, hf)


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForMaskedLM"])
def test_to_hf_reproduces_megaspec_outputs(cls_name: str) -> None:
    """A megaspec-initialised BERT, carried to HF, computes what megaspec computes."""
    spec, configs = spec_from_hf(tiny_bert().config, hf_class=cls_name)
    torch.manual_seed(3)
    ours = build_module(spec, configs).eval()
    with torch.no_grad():  # megaspec also starts norms at the identity: perturb them
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf = to_hf(ours)
    assert type(hf).__name__ == cls_name and not hf.training
    assert_parity(ours, hf, atol=1e-5)


def test_round_trip_is_exact() -> None:
    for hf in (tiny_bert(), tiny_bert("BertForMaskedLM")):
        back = to_hf(from_hf(hf))
        assert back.state_dict().keys() == hf.state_dict().keys()
        for name, tensor in hf.state_dict().items():
            assert torch.equal(back.state_dict()[name], tensor), name


def test_save_pretrained_round_trip(tmp_path) -> None:
    """The directory's `architectures` picks the masked-LM layout; the saved HF model reloads exactly."""
    hf = tiny_bert("BertForMaskedLM", hidden_act="gelu_new", type_vocab_size=3)
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    assert ours.lm_head is not None and megaspec.build_record(ours).configs[""].activation == "gelu_tanh"
    assert ours.token_type_embedding.weight.shape == (3, 64)
    assert_parity(ours, hf)
    to_hf(ours, tmp_path / "back")
    again = transformers.BertForMaskedLM.from_pretrained(tmp_path / "back").eval()
    assert again.config.type_vocab_size == 3 and again.config.hidden_act == "gelu_new"
    input_ids, token_type_ids, mask = batch()
    with torch.no_grad():
        got = again(input_ids, attention_mask=mask, token_type_ids=token_type_ids).logits
        assert torch.equal(got, hf(input_ids, attention_mask=mask, token_type_ids=token_type_ids).logits)


def test_shipped_bert_conf_converts() -> None:
    """conf/model/bert.yaml at a tiny size is BertModel; without the pooler and with the head, BertForMaskedLM."""
    tiny = ["model=bert", "model.config.num_layers=2", "model.config.hidden_size=64",
            "model.config.num_attention_heads=4", "model.config.ffn_hidden_size=128",
            f"model.config.vocab_size={VOCAB}"]
    for extra, cls_name in (([], "BertModel"),
                            (["~model.spec.submodules.pooler", "+model.spec.submodules.lm_head=bert_lm_head"],
                             "BertForMaskedLM")):
        ours = build_model(compose([*tiny, *extra])).eval()
        hf = to_hf(ours)
        assert type(hf).__name__ == cls_name and hf.config.layer_norm_eps == 1e-12
        assert_parity(ours, hf, atol=1e-5)


def test_unsupported_options_and_classes_are_named() -> None:
    with pytest.raises(SpecError, match=r"unsupported BERT configuration: is_decoder=True \(megaspec supports False\)"):
        from_hf(tiny_bert(is_decoder=True))
    hf = tiny_bert("BertForSequenceClassification")
    with pytest.raises(SpecError, match=r"unsupported HF class 'BertForSequenceClassification': megaspec converts "
                                        r"BERT as BertModel or BertForMaskedLM"):
        from_hf(hf)


def test_unplaceable_tensors_are_all_listed() -> None:
    hf = tiny_bert()
    state = hf.state_dict()

    class Edited(nn.Module):
        config = hf.config
        training = False

        def state_dict(self):
            edited = {k: v for k, v in state.items() if k != "encoder.layer.1.attention.self.key.bias"}
            edited["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
            return edited

    Edited.__name__ = "BertModel"
    with pytest.raises(SpecError) as info:
        from_hf(Edited())
    message = str(info.value)
    assert "encoder.layer.1.attention.self.key.bias: missing HF tensor" in message
    assert "encoder.layer.0.attention.self.rotary.weight: unexpected HF tensor" in message
    assert "encoder.layers.1.self_attention.linear_qkv.bias: no HF tensor fills this megaspec tensor" in message
