"""T5 (v1.0 and v1.1) from specs/t5*.yaml: HF parity, masks, causality, published sizes, CLI summary."""

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
from megaspec.errors import SpecError
from megaspec.inputs import build_model
from megaspec.models.t5 import T5Model
from megaspec.modules.position.relative import relative_position_buckets
from megaspec.spec import parse_spec
from megaspec.validate import main as validate_main

ROOT = Path(__file__).resolve().parent.parent
VOCAB, HEADS = 99, 4
SRC, TGT = 24, 9  # encoder / decoder lengths; 24 > max_distance below, so far buckets are used

TINY_V1 = TransformerConfig(
    num_layers=2, hidden_size=64, num_attention_heads=HEADS, kv_channels=16, ffn_hidden_size=128,
    vocab_size=VOCAB, layernorm_epsilon=1e-6, add_bias_linear=False, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip
TINY_V1_1 = TINY_V1.updated(gated_linear_unit=True, share_embeddings_and_output_weights=False)


def t5_spec(name: str, core_attention: str = "sdpa") -> dict[str, Any]:
    """A shipped spec as data, with every core attention set to `core_attention` (softmax_scale kept)."""
    data = yaml.safe_load((ROOT / "specs" / f"{name}.yaml").read_text())

    def swap(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("module") in ("sdpa", "eager"):
                node["module"] = core_attention
            for value in node.values():
                swap(value)

    swap(data)
    return data


def build_t5(name: str, config: TransformerConfig, core_attention: str = "sdpa") -> T5Model:
    return build_module(parse_spec(t5_spec(name, core_attention)), config)


# ---- HF -> megaspec weight mapping ------------------------------------------------------------


def fuse_kv(k: Tensor, v: Tensor, groups: int) -> Tensor:
    """Separate K, V [ng*d, ...] -> the fused per-group rows [k_0, v_0 | k_1, v_1 | ...]."""
    return torch.cat([k.unflatten(0, (groups, -1)), v.unflatten(0, (groups, -1))], dim=1).flatten(0, 1)


@torch.no_grad()
def load_hf_t5(ours: T5Model, hf: nn.Module) -> None:
    """Copy T5ForConditionalGeneration weights into ours (fusing q/k/v, k/v and wi_0/wi_1)."""
    ours.embedding.weight.copy_(hf.shared.weight)
    for stack, hf_stack in ((ours.encoder, hf.encoder), (ours.decoder, hf.decoder)):
        # T5 keeps the stack's one bias table in layer 0.
        stack.attention_bias.weight.copy_(hf_stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight)
        for layer, block in zip(stack.layers, hf_stack.block, strict=True):
            attn = block.layer[0].SelfAttention
            layer.input_layernorm.weight.copy_(block.layer[0].layer_norm.weight)
            layer.self_attention.linear_qkv.weight.copy_(fuse_qkv(attn.q.weight, attn.k.weight, attn.v.weight, HEADS))
            layer.self_attention.linear_proj.weight.copy_(attn.o.weight)
            if layer.cross_attention is not None:
                cross = block.layer[1].EncDecAttention
                layer.pre_cross_attn_layernorm.weight.copy_(block.layer[1].layer_norm.weight)
                layer.cross_attention.linear_q.weight.copy_(cross.q.weight)
                layer.cross_attention.linear_kv.weight.copy_(fuse_kv(cross.k.weight, cross.v.weight, HEADS))
                layer.cross_attention.linear_proj.weight.copy_(cross.o.weight)
            ff = block.layer[-1]
            layer.pre_mlp_layernorm.weight.copy_(ff.layer_norm.weight)
            dense = ff.DenseReluDense
            gated = hasattr(dense, "wi_0")
            fc1 = torch.cat([dense.wi_0.weight, dense.wi_1.weight]) if gated else dense.wi.weight
            layer.mlp.linear_fc1.weight.copy_(fc1)
            layer.mlp.linear_fc2.weight.copy_(dense.wo.weight)
        stack.final_layernorm.weight.copy_(hf_stack.final_layer_norm.weight)
    if ours.output_layer.weight is not None:
        ours.output_layer.weight.copy_(hf.lm_head.weight)


def untie_lm_head(hf: nn.Module) -> None:
    """Give HF's lm_head its own weight, as the published T5 v1.1 checkpoints have.

    transformers 5 always ties T5's lm_head to `shared` (its config forces
    tie_word_embeddings); v1.1's `tie_word_embeddings: false` then only turns off
    the output rescaling. Earlier versions untie it themselves; either way this is a no-op there.
    """
    if hf.lm_head.weight is hf.shared.weight:
        hf.lm_head.weight = nn.Parameter(torch.randn_like(hf.shared.weight) * 0.05)


def hf_t5(v1_1: bool, device: str | None = None) -> nn.Module:
    """HF T5ForConditionalGeneration with the tiny sizes above (or t5-base / t5-v1_1-base on meta)."""
    transformers = pytest.importorskip("transformers")
    sizes = (
        {"d_model": 768, "d_kv": 64, "d_ff": 2048 if v1_1 else 3072, "num_layers": 12, "num_heads": 12,
         "vocab_size": 32128}
        if device == "meta"
        else {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": HEADS, "vocab_size": VOCAB,
              "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16}
    )  # fmt: skip
    config = transformers.T5Config(
        **sizes, dropout_rate=0.0, layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu" if v1_1 else "relu", tie_word_embeddings=not v1_1,
    )  # fmt: skip
    with torch.device(device or "cpu"):
        hf = transformers.T5ForConditionalGeneration(config).eval()
        if v1_1:
            untie_lm_head(hf)
    return hf


def tiny_pair(v1_1: bool, core_attention: str = "sdpa") -> tuple[T5Model, nn.Module]:
    torch.manual_seed(0)
    hf = hf_t5(v1_1)
    with torch.no_grad():  # HF initialises norms to ones: perturb so they are tested too
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = build_t5("t5_v1_1" if v1_1 else "t5", TINY_V1_1 if v1_1 else TINY_V1, core_attention).eval()
    load_hf_t5(ours, hf)
    return ours, hf


def batch() -> dict[str, Tensor]:
    """Encoder ids [3, SRC] with no / right / left padding; decoder ids [3, TGT] with right padding."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(3, SRC, dtype=torch.long)
    mask[1, -7:] = 0
    mask[2, :5] = 0
    decoder_mask = torch.ones(3, TGT, dtype=torch.long)
    decoder_mask[1, -3:] = 0
    decoder_mask[2, -1:] = 0
    return {
        "input_ids": torch.randint(0, VOCAB, (3, SRC), generator=gen),
        "decoder_input_ids": torch.randint(0, VOCAB, (3, TGT), generator=gen),
        "attention_mask": mask,
        "decoder_attention_mask": decoder_mask,
    }


# ---- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("core_attention", ["sdpa", "eager"])
@pytest.mark.parametrize("v1_1", [False, True], ids=["v1_0", "v1_1"])
def test_t5_matches_hf(v1_1: bool, core_attention: str) -> None:
    ours, hf = tiny_pair(v1_1, core_attention)
    inputs = batch()
    keep = inputs["decoder_attention_mask"].bool()
    labels = inputs["decoder_input_ids"].roll(-1, dims=1).masked_fill(~keep, -100)
    with torch.no_grad():
        plain = {k: inputs[k] for k in ("input_ids", "decoder_input_ids")}
        torch.testing.assert_close(ours(**plain).logits, hf(**plain).logits, atol=1e-4, rtol=0)

        got, want = ours(**inputs, labels=labels), hf(**inputs, labels=labels)
        torch.testing.assert_close(got.logits[keep], want.logits[keep], atol=1e-4, rtol=0)
        torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)
        enc_keep = inputs["attention_mask"].bool()
        torch.testing.assert_close(got.encoder_last_hidden_state[enc_keep],
                                   want.encoder_last_hidden_state[enc_keep], atol=1e-4, rtol=0)  # fmt: skip


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_hf(bidirectional: bool) -> None:
    transformers = pytest.importorskip("transformers")
    hf_bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    relative = torch.arange(-300, 301)[None, :] - torch.arange(5)[:, None]
    for buckets, distance in ((32, 128), (8, 16)):
        want = hf_bucket(relative, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
        assert torch.equal(relative_position_buckets(relative, bidirectional, buckets, distance), want)


def test_encoder_padding_does_not_change_decoder_outputs() -> None:
    """Extra encoder pads (any ids) leave the decoder's logits unchanged."""
    ours, _ = tiny_pair(v1_1=False)
    inputs = batch()
    src, tgt = inputs["input_ids"][:1, :10], inputs["decoder_input_ids"][:1]
    with torch.no_grad():
        alone = ours(src, tgt).logits
        padded_src = torch.cat([src, torch.randint(0, VOCAB, (1, 6))], dim=1)
        mask = torch.tensor([[1] * 10 + [0] * 6])
        padded = ours(padded_src, tgt, attention_mask=mask).logits
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("v1_1", [False, True], ids=["v1_0", "v1_1"])
def test_decoder_is_causal(v1_1: bool) -> None:
    """Changing decoder token k changes logits from k on, never before."""
    ours, _ = tiny_pair(v1_1)
    inputs = batch()
    src, tgt = inputs["input_ids"], inputs["decoder_input_ids"]
    changed = tgt.clone()
    changed[:, 5] = (changed[:, 5] + 1) % VOCAB
    with torch.no_grad():
        before, after = ours(src, tgt).logits, ours(src, changed).logits
    torch.testing.assert_close(after[:, :5], before[:, :5], atol=0, rtol=0)
    assert (after[:, 5:] - before[:, 5:]).abs().amax(dim=-1).min() > 1e-4


def test_relative_bias_is_shared_by_the_stack() -> None:
    """One table per stack, owned by the block (not by each layer), causal in the decoder."""
    ours, _ = tiny_pair(v1_1=False)
    tables = [n for n, _ in ours.named_parameters() if "attention_bias" in n]
    assert tables == ["encoder.attention_bias.weight", "decoder.attention_bias.weight"]
    assert ours.encoder.attention_bias.bidirectional and not ours.decoder.attention_bias.bidirectional
    bias = ours.decoder.attention_bias(4, 4)
    assert bias.shape == (1, HEADS, 4, 4)
    assert (bias[0, :, 0, 1:] == torch.finfo(bias.dtype).min).all()  # keys after the query are masked
    assert ours.decoder.layers[0].cross_attention is not None and ours.encoder.layers[0].cross_attention is None


@pytest.mark.parametrize(("model", "published"), [("t5", 222_903_552), ("t5_v1_1", 247_577_856)])
def test_t5_base_parameter_counts(model: str, published: int) -> None:
    """conf/model/t5*.yaml build t5-base and t5-v1_1-base; a meta forward runs at that size."""
    ours = build_model(model, device="meta")
    assert sum(p.numel() for p in ours.parameters()) == published
    assert meta_forward(ours, batch=2, seq=16).logits.shape == (2, 16, 32128)
    assert (ours.output_layer.weight is None) == (model == "t5")  # v1.0 tied, v1.1 not

    hf = hf_t5(v1_1=model == "t5_v1_1", device="meta")
    assert sum(p.numel() for p in hf.parameters()) == published  # shared embedding counted once


def test_t5_forward_traces_as_one_graph() -> None:
    ours, _ = tiny_pair(v1_1=False)
    inputs = batch()
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(**inputs).logits, ours(**inputs).logits)


def test_validate_shipped_specs() -> None:
    files = [str(ROOT / "specs" / f"{name}.yaml") for name in ("bert", "t5", "t5_v1_1")]
    assert validate_main(["-q", *files]) == 0


def test_cli_build_prints_cross_attention_in_decoder_layers(tmp_path: Path) -> None:
    tiny = ["model.config.num_layers=2", "model.config.hidden_size=64", "model.config.num_attention_heads=4",
            "model.config.kv_channels=16", "model.config.ffn_hidden_size=128", "model.config.vocab_size=100",
            "build.seq_len=16"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "megaspec", "build", "model=t5", *tiny], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    encoder = next(i for i, line in enumerate(lines) if line.startswith("  encoder: transformer_block"))
    decoder = next(i for i, line in enumerate(lines) if line.startswith("  decoder: transformer_block"))
    cross = [i for i, line in enumerate(lines) if line.strip().startswith("cross_attention: cross_attention")]
    assert len(cross) == 1 and cross[0] > decoder > encoder
    assert any(line.strip().startswith("attention_bias: relative_position_bias") for line in lines[encoder:decoder])
    assert "layers[0..1]: transformer_layer x2" in result.stdout
    assert "forward pass on random tokens [1, 16] -> logits (1, 16, 100)" in result.stdout


def test_too_few_buckets_is_a_located_spec_error() -> None:
    with pytest.raises(SpecError) as exc:
        build_module(parse_spec(t5_spec("t5")), TINY_V1.updated(relative_attention_num_buckets=3), device="meta")
    assert str(exc.value).endswith(
        "encoder.attention_bias: building 'relative_position_bias' (RelativePositionBias) failed: ValueError: "
        "relative_attention_num_buckets must be at least 4 for a bidirectional bias, got 3; T5 uses 32"
    )
