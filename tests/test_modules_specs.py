"""The shipped specs name registered modules in valid slots, and describe the published models."""

from pathlib import Path

import pytest
import torch
from torch import nn

from megaspec import build_module, load_spec
from megaspec.config import TransformerConfig
from megaspec.modules.attention.core import SDPAttention
from megaspec.modules.attention.self_attention import SelfAttention
from megaspec.modules.norm import LayerNorm, RMSNorm
from megaspec.modules.position.learned import LearnedPositionEmbedding
from megaspec.modules.position.rotary import RotaryEmbedding

SPECS = Path(__file__).resolve().parent.parent / "specs"

GPT2_SMALL = TransformerConfig(
    num_layers=12, hidden_size=768, num_attention_heads=12, vocab_size=50257,
    max_position_embeddings=1024,
)  # fmt: skip
LLAMA3_8B = TransformerConfig(
    num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
    ffn_hidden_size=14336, vocab_size=128256, max_position_embeddings=8192,
    gated_linear_unit=True, add_bias_linear=False, rotary_base=500000.0, share_embeddings_and_output_weights=False,
    hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip


def build(name: str, config: TransformerConfig, device: str = "meta") -> nn.Module:
    """The shipped spec `name`, built by megaspec's builder with `config`."""
    return build_module(load_spec(SPECS / f"{name}.yaml"), config, device=device)


def test_gpt2_spec_builds_gpt2_small() -> None:
    model = build("gpt2", GPT2_SMALL)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    layer = model.decoder.layers[0]
    assert len(model.decoder.layers) == 12
    assert isinstance(model.position_embedding, LearnedPositionEmbedding)
    assert isinstance(layer.input_layernorm, LayerNorm) and isinstance(model.decoder.final_layernorm, LayerNorm)
    assert isinstance(layer.self_attention, SelfAttention) and layer.self_attention.causal
    assert isinstance(layer.self_attention.core_attention, SDPAttention)
    out = model(**model.example_inputs(batch=2, seq=16))
    assert out.logits.shape == (2, 16, 50257)


def test_llama_spec_builds_llama3_8b() -> None:
    model = build("llama", LLAMA3_8B)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    layer = model.decoder.layers[0]
    assert isinstance(model.position_embedding, RotaryEmbedding)
    assert isinstance(layer.pre_mlp_layernorm, RMSNorm)
    assert layer.self_attention.linear_qkv.weight.shape == ((32 + 2 * 8) * 128, 4096)
    assert layer.mlp.linear_fc1.weight.shape == (2 * 14336, 4096)
    out = model(**model.example_inputs(batch=1, seq=4))
    assert out.logits.shape == (1, 4, 128256)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_spec_builds_tiny_and_runs(name: str) -> None:
    """Real weights, through meta -> to_empty -> init_weights."""
    base = GPT2_SMALL if name == "gpt2" else LLAMA3_8B
    config = base.updated(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=97,
                          ffn_hidden_size=128, num_query_groups=2 if name == "llama" else None)  # fmt: skip
    model = build(name, config, device="cpu")
    input_ids = torch.randint(0, 97, (2, 10))
    out = model(input_ids, attention_mask=torch.ones(2, 10), labels=input_ids)
    assert out.logits.shape == (2, 10, 97) and torch.isfinite(out.loss)
