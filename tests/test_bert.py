"""BERT from specs/bert.yaml: HF parity (encoder, pooler, masked-LM head), padding, published sizes."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_gpt_parity import fuse_qkv
from torch import Tensor, nn

from megaspec.build import build_module, meta_forward
from megaspec.config import TransformerConfig
from megaspec.inputs import build_model
from megaspec.models.bert import BertModel
from megaspec.modules.norm import LayerNorm
from megaspec.spec import parse_spec

SPECS = Path(__file__).resolve().parent.parent / "specs"
VOCAB, SEQ, HEADS = 99, 12, 4

TINY = TransformerConfig(
    num_layers=2, hidden_size=64, num_attention_heads=HEADS, ffn_hidden_size=128, vocab_size=VOCAB,
    max_position_embeddings=32, layernorm_epsilon=1e-12,
    hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip


def bert_spec(mlm: bool = False, core_attention: str = "sdpa") -> dict[str, Any]:
    """The shipped spec as data; `mlm` swaps the pooler for the masked-LM head, as its comment says."""
    data = yaml.safe_load((SPECS / "bert.yaml").read_text())
    if mlm:
        del data["submodules"]["pooler"]
        data["submodules"]["lm_head"] = "bert_lm_head"
    attention = data["submodules"]["encoder"]["submodules"]["layers"]["submodules"]["self_attention"]
    attention["submodules"]["core_attention"] = core_attention
    return data


def build_bert(config: TransformerConfig, mlm: bool = False, core_attention: str = "sdpa",
               device: str | None = None) -> BertModel:
    return build_module(parse_spec(bert_spec(mlm, core_attention)), config, device=device)


# ---- HF -> megaspec weight mapping ------------------------------------------------------------


@torch.no_grad()
def load_hf_bert(ours: BertModel, hf: nn.Module) -> None:
    """Copy HF BertModel or BertForMaskedLM weights into ours (fusing query/key/value)."""
    bert = getattr(hf, "bert", hf)
    emb = bert.embeddings
    ours.embedding.weight.copy_(emb.word_embeddings.weight)
    ours.position_embedding.weight.copy_(emb.position_embeddings.weight)
    ours.token_type_embedding.weight.copy_(emb.token_type_embeddings.weight)
    ours.embedding_layernorm.load_state_dict(emb.LayerNorm.state_dict())
    for layer, block in zip(ours.encoder.layers, bert.encoder.layer, strict=True):
        attn = block.attention.self
        qkv = layer.self_attention.linear_qkv
        qkv.weight.copy_(fuse_qkv(attn.query.weight, attn.key.weight, attn.value.weight, HEADS))
        qkv.bias.copy_(fuse_qkv(attn.query.bias, attn.key.bias, attn.value.bias, HEADS))
        layer.self_attention.linear_proj.load_state_dict(block.attention.output.dense.state_dict())
        layer.post_self_attn_layernorm.load_state_dict(block.attention.output.LayerNorm.state_dict())
        layer.mlp.linear_fc1.load_state_dict(block.intermediate.dense.state_dict())
        layer.mlp.linear_fc2.load_state_dict(block.output.dense.state_dict())
        layer.post_mlp_layernorm.load_state_dict(block.output.LayerNorm.state_dict())
    if ours.pooler is not None:
        ours.pooler.dense.load_state_dict(bert.pooler.dense.state_dict())
    if ours.lm_head is not None:
        head = hf.cls.predictions
        ours.lm_head.dense.load_state_dict(head.transform.dense.state_dict())
        ours.lm_head.layernorm.load_state_dict(head.transform.LayerNorm.state_dict())
        ours.lm_head.output_layer.bias.copy_(head.bias)


def tiny_pair(mlm: bool, core_attention: str = "sdpa") -> tuple[BertModel, nn.Module]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12,
    )  # fmt: skip
    hf = (transformers.BertForMaskedLM if mlm else transformers.BertModel)(hf_config).eval()
    with torch.no_grad():  # HF initialises norms to the identity: perturb so they are tested too
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = build_bert(TINY, mlm, core_attention).eval()
    load_hf_bert(ours, hf)
    return ours, hf


def batch() -> tuple[Tensor, Tensor, Tensor]:
    """Token ids, token type ids [3, SEQ] and a keep-mask: no padding, right padding, left padding."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (3, SEQ), generator=gen)
    token_type_ids = (torch.arange(SEQ) >= SEQ // 2).long().expand(3, SEQ)  # sentence A, then B
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, -4:] = 0
    mask[2, :5] = 0
    return input_ids, token_type_ids, mask


# ---- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("core_attention", ["sdpa", "eager"])
def test_bert_matches_hf_bert_model(core_attention: str) -> None:
    ours, hf = tiny_pair(mlm=False, core_attention=core_attention)
    input_ids, token_type_ids, mask = batch()
    with torch.no_grad():
        got, want = ours(input_ids), hf(input_ids)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-4, rtol=0)
        assert got.logits is None and got.loss is None

        got = ours(input_ids, attention_mask=mask, token_type_ids=token_type_ids)
        want = hf(input_ids, attention_mask=mask, token_type_ids=token_type_ids)
        keep = mask.bool()
        torch.testing.assert_close(got.last_hidden_state[keep], want.last_hidden_state[keep], atol=1e-4, rtol=0)
        first_is_token = keep[:, 0]  # the pooler reads position 0: compare where it is a real token
        torch.testing.assert_close(got.pooler_output[first_is_token], want.pooler_output[first_is_token],
                                   atol=1e-4, rtol=0)  # fmt: skip


def test_bert_mlm_head_matches_hf_bert_for_masked_lm() -> None:
    ours, hf = tiny_pair(mlm=True)
    input_ids, token_type_ids, mask = batch()
    labels = input_ids.masked_fill(torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(2)) > 0.3, -100)
    labels = labels.masked_fill(~mask.bool(), -100)
    with torch.no_grad():
        got = ours(input_ids, attention_mask=mask, token_type_ids=token_type_ids, labels=labels)
        want = hf(input_ids, attention_mask=mask, token_type_ids=token_type_ids, labels=labels)
    keep = mask.bool()
    torch.testing.assert_close(got.logits[keep], want.logits[keep], atol=1e-4, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)
    assert got.pooler_output is None
    # Tied: the decoder reads the word embedding, and only its bias is the head's own.
    assert ours.lm_head.output_layer.weight is None
    assert {n for n, _ in ours.lm_head.output_layer.named_parameters()} == {"bias"}


def test_padding_does_not_change_real_tokens() -> None:
    """Appending pads (any ids, any count) leaves every real token's output and the pooler unchanged."""
    ours, _ = tiny_pair(mlm=False)
    input_ids, token_type_ids, _ = batch()
    with torch.no_grad():
        alone = ours(input_ids[:1, :7], token_type_ids=token_type_ids[:1, :7])
        padded_ids = torch.cat([input_ids[:1, :7], torch.randint(0, VOCAB, (1, 5))], dim=1)
        mask = torch.tensor([[1] * 7 + [0] * 5])
        padded = ours(padded_ids, attention_mask=mask, token_type_ids=token_type_ids[:1])
    torch.testing.assert_close(padded.last_hidden_state[:, :7], alone.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.pooler_output, alone.pooler_output, atol=1e-5, rtol=0)


def test_all_padding_sequence_stays_finite() -> None:
    ours, _ = tiny_pair(mlm=True)
    input_ids, _, mask = batch()
    mask[0] = 0
    assert torch.isfinite(ours(input_ids, attention_mask=mask).logits).all()


def test_post_ln_is_spec_choice() -> None:
    """BERT's layers fill the post-norm slots and leave the pre-norm ones empty (identity)."""
    ours = build_bert(TINY, device="meta")
    layer = ours.encoder.layers[0]
    assert isinstance(layer.post_self_attn_layernorm, LayerNorm) and isinstance(layer.post_mlp_layernorm, LayerNorm)
    assert isinstance(layer.input_layernorm, nn.Identity) and isinstance(layer.pre_mlp_layernorm, nn.Identity)
    assert isinstance(ours.encoder.final_layernorm, nn.Identity)
    assert not layer.self_attention.causal


def test_bert_base_parameter_count() -> None:
    """The shipped conf/model/bert.yaml is HF BertModel (with pooler) bert-base-uncased; with the MLM head, BertForMaskedLM."""
    model = build_model("bert", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 109_482_240
    out = meta_forward(model, batch=2, seq=16)
    assert out.last_hidden_state.shape == (2, 16, 768) and out.pooler_output.shape == (2, 768)

    base = TransformerConfig(
        num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=3072, vocab_size=30522,
        max_position_embeddings=512, layernorm_epsilon=1e-12,
    )  # fmt: skip
    mlm = build_bert(base, mlm=True, device="meta")
    assert sum(p.numel() for p in mlm.parameters()) == 109_514_298
    assert meta_forward(mlm, seq=8).logits.shape == (1, 8, 30522)

    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf_config = transformers.BertConfig()  # bert-base-uncased's sizes are the defaults
        assert sum(p.numel() for p in transformers.BertModel(hf_config).parameters()) == 109_482_240
        assert sum(p.numel() for p in transformers.BertForMaskedLM(hf_config).parameters()) == 109_514_298


def test_bert_forward_traces_as_one_graph() -> None:
    ours, _ = tiny_pair(mlm=True)
    input_ids, token_type_ids, mask = batch()
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    want = ours(input_ids, attention_mask=mask, token_type_ids=token_type_ids, labels=input_ids)
    got = compiled(input_ids, attention_mask=mask, token_type_ids=token_type_ids, labels=input_ids)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)


def test_cli_build_prints_post_ln_layers(tmp_path: Path) -> None:
    tiny = ["model.config.num_layers=2", "model.config.hidden_size=64", "model.config.num_attention_heads=4",
            "model.config.ffn_hidden_size=128", "model.config.vocab_size=100", "build.seq_len=16"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "megaspec", "build", "model=bert", *tiny], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "      post_self_attn_layernorm: layer_norm" in out and "      post_mlp_layernorm: layer_norm" in out
    assert "input_layernorm" not in out and "lm_head" not in out
    assert "  pooler: pooler" in out
    # 2 layers of 33,472, embeddings 6,400 + 128 + 32,768 + 128, pooler 4,160.
    assert "total parameters: 110,528" in out
    assert "forward pass on random tokens [1, 16]" in out
