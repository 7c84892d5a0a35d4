"""Numerics of the small modules: norms, activations, RoPE, linear init, MLP, layer, head."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megaspec.config import TransformerConfig
from megaspec.modules.activation import ACTIVATIONS, activation_from_config
from megaspec.modules.head.lm_head import LMHead
from megaspec.modules.layer.transformer_layer import TransformerLayer
from megaspec.modules.linear import Linear
from megaspec.modules.mlp.mlp import MLP
from megaspec.modules.norm import LayerNorm, Norm, RMSNorm
from megaspec.modules.position.learned import LearnedPositionEmbedding
from megaspec.modules.position.rotary import RotaryEmbedding, apply_rotary
from megaspec.modules.utils import init_normal_


def config(**changes: object) -> TransformerConfig:
    base = {"num_layers": 8, "hidden_size": 32, "num_attention_heads": 4, "hidden_dropout": 0.0}
    return TransformerConfig(**{**base, **changes})


def initialised(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if hasattr(m, "init_weights"):
            m.init_weights()
    return module


# ---- norms ------------------------------------------------------------------------------------


def test_layer_norm_matches_torch() -> None:
    ours = initialised(LayerNorm(config(layernorm_epsilon=1e-6)))
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    reference = nn.LayerNorm(32, eps=1e-6)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), reference(x))


def test_rms_norm_matches_formula() -> None:
    ours = initialised(RMSNorm(config(), hidden_size=16, eps=1e-6))
    with torch.no_grad():
        ours.weight.normal_()
    x = torch.randn(2, 5, 16)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * ours.weight
    torch.testing.assert_close(ours(x), want)
    assert not hasattr(ours, "bias")


def test_norm_follows_config() -> None:
    assert type(Norm(config(normalization="LayerNorm"))) is LayerNorm
    rms = Norm(config(normalization="RMSNorm"), hidden_size=8, eps=1e-3)
    assert type(rms) is RMSNorm and rms.hidden_size == 8 and rms.eps == 1e-3
    assert initialised(Norm(config())).weight.eq(1).all()


# ---- activations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "formula"),
    [
        ("gelu", lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))),
        ("gelu_tanh", lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
        ("relu", lambda x: x.clamp(min=0)),
        ("squared_relu", lambda x: x.clamp(min=0) ** 2),
        ("silu", lambda x: x / (1 + torch.exp(-x))),
        ("quick_gelu", lambda x: x / (1 + torch.exp(-1.702 * x))),
    ],
)
def test_activation(name: str, formula: object) -> None:
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(ACTIVATIONS[name](config())(x), formula(x))
    assert type(activation_from_config(config(activation=name))) is ACTIVATIONS[name]


# ---- position embeddings ----------------------------------------------------------------------


def rope_reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE from its definition: rotate channel pair (i, i + d/2) by position * base^(-2i/d)."""
    d = x.size(-1)
    theta = positions[:, None].double() * base ** (-torch.arange(0, d, 2).double() / d)  # [s, d/2]
    x1, x2 = x[..., : d // 2].double(), x[..., d // 2 :].double()
    cos, sin = theta.cos()[:, None], theta.sin()[:, None]  # broadcast over heads
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).float()


def test_rope_matches_definition() -> None:
    cfg = config(position_embedding_type="rope", rotary_base=500000.0)
    x = torch.randn(2, 7, 4, 8)  # [b, s, nh, d]
    positions = torch.arange(3, 10)
    hidden = torch.randn(2, 7, 32)
    same, rotary = RotaryEmbedding(cfg)(hidden, positions[None])
    assert same is hidden and rotary[0].shape == (1, 7, 1, 8)
    torch.testing.assert_close(apply_rotary(x, rotary), rope_reference(x, positions, 500000.0), atol=1e-5, rtol=0)


def test_rope_interleaved_is_a_channel_permutation() -> None:
    """Interleaved pairs (2i, 2i+1) = the half layout's pairs (i, i + d/2) after reordering channels."""
    x = torch.randn(2, 6, 4, 8)
    positions = torch.arange(6)[None]
    half = RotaryEmbedding(config(position_embedding_type="rope"))(x, positions)[1]
    pairs = RotaryEmbedding(config(position_embedding_type="rope", rotary_interleaved=True))(x, positions)[1]
    to_pairs = torch.arange(8).view(2, 4).T.flatten()  # [0, 4, 1, 5, 2, 6, 3, 7]
    assert pairs[0].shape == (1, 6, 1, 4, 2)  # the shape says "adjacent pairs" to apply_rotary
    got = apply_rotary(x[..., to_pairs], pairs)
    torch.testing.assert_close(got, apply_rotary(x, half)[..., to_pairs])


def test_partial_rope_leaves_the_tail() -> None:
    cfg = config(position_embedding_type="rope", rotary_percent=0.5)
    x = torch.randn(1, 5, 4, 8)
    _, rotary = RotaryEmbedding(cfg)(x, torch.arange(5)[None])
    y = apply_rotary(x, rotary)
    assert rotary[0].shape[-1] == 4
    torch.testing.assert_close(y[..., 4:], x[..., 4:])
    torch.testing.assert_close(y[..., :4], rope_reference(x[..., :4], torch.arange(5), 10000.0), atol=1e-5, rtol=0)


def test_rope_survives_meta_build() -> None:
    cfg = config(position_embedding_type="rope")
    with torch.device("meta"):
        rope = RotaryEmbedding(cfg)
    rope.to_empty(device="cpu").init_weights()
    torch.testing.assert_close(rope.inv_freq, RotaryEmbedding(cfg).inv_freq)
    assert "inv_freq" not in rope.state_dict()


def test_learned_positions_add_the_table() -> None:
    emb = initialised(LearnedPositionEmbedding(config(max_position_embeddings=16)))
    hidden = torch.randn(2, 5, 32)
    out, rotary = emb(hidden, torch.arange(5)[None])
    assert rotary is None
    torch.testing.assert_close(out, hidden + emb.weight[:5])


# ---- linear, MLP, layer, head -----------------------------------------------------------------


def test_linear_init() -> None:
    torch.manual_seed(0)
    cfg = config(num_layers=8, init_method_std=0.02)
    plain = initialised(Linear(cfg, in_features=256, out_features=512))
    output = initialised(Linear(cfg, in_features=256, out_features=512, output_proj=True))
    unscaled = initialised(
        Linear(config(scaled_output_init=False), in_features=256, out_features=512, output_proj=True)
    )
    assert plain.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert output.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.02)
    assert unscaled.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert plain.bias.eq(0).all()
    assert Linear(cfg, in_features=4, out_features=2, bias=False).bias is None
    x = torch.randn(3, 256)
    torch.testing.assert_close(plain(x), x @ plain.weight.T)


def test_init_normal_is_reproducible_and_parallel_safe() -> None:
    """Large tensors are filled chunk-wise in threads; a seed still fixes every value."""
    big = torch.empty(3 * (1 << 20) + 5)  # several chunks and a ragged tail
    torch.manual_seed(0)
    init_normal_(big, 0.02)
    again = torch.empty_like(big)
    torch.manual_seed(0)
    init_normal_(again, 0.02)
    assert torch.equal(big, again)
    assert big.mean().abs().item() < 1e-4 and big.std().item() == pytest.approx(0.02, rel=1e-2)
    chunks = big[: 3 << 20].view(3, -1)
    assert not torch.equal(chunks[0], chunks[1])  # independent streams, not one repeated


def test_params_dtype() -> None:
    linear = Linear(config(params_dtype="bfloat16"), in_features=4, out_features=2)
    assert linear.weight.dtype == torch.bfloat16 and linear.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("gated", [False, True])
def test_mlp(gated: bool) -> None:
    cfg = config(gated_linear_unit=gated, activation="silu", ffn_hidden_size=48)
    mlp = initialised(MLP(cfg, linear_fc1=functools.partial(Linear, cfg), linear_fc2=functools.partial(Linear, cfg)))
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    assert fc1.weight.shape == ((96 if gated else 48), 32) and fc2.weight.shape == (32, 48)
    x = torch.randn(2, 3, 32)
    h = x @ fc1.weight.T + fc1.bias
    if gated:  # [gate | up], Megatron's layout
        h = F.silu(h[..., :48]) * h[..., 48:]
    else:
        h = F.silu(h)
    torch.testing.assert_close(mlp(x), h @ fc2.weight.T + fc2.bias)


def test_mlp_activation_slot_overrides_config() -> None:
    cfg = config(activation="silu")
    linear = functools.partial(Linear, cfg)
    mlp = MLP(cfg, linear_fc1=linear, linear_fc2=linear, activation=ACTIVATIONS["relu"](cfg))
    assert type(mlp.activation) is ACTIVATIONS["relu"]


class Double(nn.Module):
    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return 2 * x


def test_layer_residuals_and_empty_slots() -> None:
    cfg = config()
    x = torch.randn(2, 3, 32)
    # Both branches: x -> x + 2x = 3x -> 3x + 6x = 9x.
    full = TransformerLayer(cfg, self_attention=Double(), mlp=Double())
    torch.testing.assert_close(full(x), 9 * x)
    torch.testing.assert_close(TransformerLayer(cfg, mlp=Double())(x), 3 * x)
    torch.testing.assert_close(TransformerLayer(cfg)(x), x)
    assert isinstance(full.input_layernorm, nn.Identity)


def test_lm_head_tied_and_untied() -> None:
    tied = LMHead(config(vocab_size=50))
    assert tied.weight is None and sum(p.numel() for p in tied.parameters()) == 0
    untied = initialised(LMHead(config(vocab_size=50, share_embeddings_and_output_weights=False), bias=True))
    assert untied.weight.shape == (50, 32) and untied.bias.shape == (50,)
    x, shared = torch.randn(2, 3, 32), torch.randn(50, 32)
    torch.testing.assert_close(tied(x, shared), x @ shared.T)
    torch.testing.assert_close(untied(x), x @ untied.weight.T)
