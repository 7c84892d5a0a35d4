"""Attention numerics: sdpa against the eager reference, the fused QKV layout, mask types."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from megaspec.config import TransformerConfig
from megaspec.models.masks import causal_padding_mask
from megaspec.modules.attention.core import EagerAttention, SDPAttention
from megaspec.modules.attention.self_attention import SelfAttention
from megaspec.modules.linear import Linear
from megaspec.modules.norm import RMSNorm
from megaspec.modules.position.rotary import RotaryEmbedding

HEADS = {"mha": 4, "gqa": 2, "mqa": 1}  # query groups, for 4 query heads


def config(groups: int, **changes: object) -> TransformerConfig:
    return TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=groups,
        hidden_dropout=0.0, attention_dropout=0.0, position_embedding_type="rope", **changes,
    )  # fmt: skip


def padded_mask(b: int = 3, s: int = 10) -> Tensor:
    """[b, 1, s, s] causal & padding mask for: no padding, right padding, left padding."""
    keep = torch.ones(b, s, dtype=torch.long)
    keep[1, -3:] = 0
    keep[2, :4] = 0
    return causal_padding_mask(keep)


def attention(cfg: TransformerConfig, core: type, **params: object) -> SelfAttention:
    linear = functools.partial(Linear, cfg)
    module = SelfAttention(cfg, linear_qkv=linear, core_attention=core(cfg), linear_proj=linear, **params)
    for m in module.modules():
        if hasattr(m, "init_weights"):
            m.init_weights()
    return module


@pytest.mark.parametrize("groups", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("masking", ["causal", "padded", "none"])
def test_sdpa_matches_eager(groups: int, masking: str) -> None:
    cfg = config(groups)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 10, 8, generator=gen)  # [b, nh, s, d]
    k, v = (torch.randn(3, groups, 10, 8, generator=gen) for _ in range(2))  # [b, ng, s, d]
    mask = padded_mask() if masking == "padded" else None
    is_causal = masking == "causal"
    got = SDPAttention(cfg)(q, k, v, mask, is_causal)
    want = EagerAttention(cfg)(q, k, v, mask, is_causal)
    assert got.shape == (3, 4, 10, 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_eager_is_textbook_attention() -> None:
    """Eager GQA = every query head attending to its group's K/V head, with a causal softmax."""
    cfg = config(2)
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8, generator=gen), *torch.randn(2, 1, 2, 5, 8, generator=gen)
    got = EagerAttention(cfg)(q, k, v, None, True)
    causal = torch.ones(5, 5).tril().bool()
    for head in range(4):
        group = head // 2  # heads 0,1 -> group 0; heads 2,3 -> group 1
        scores = (q[0, head] @ k[0, group].T / 8**0.5).masked_fill(~causal, float("-inf"))
        torch.testing.assert_close(got[0, head], scores.softmax(-1) @ v[0, group])


@pytest.mark.parametrize("groups", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_self_attention_sdpa_matches_eager(groups: int, rotary_percent: float) -> None:
    cfg = config(groups, rotary_percent=rotary_percent)
    torch.manual_seed(0)
    ours = attention(cfg, SDPAttention)
    reference = attention(cfg, EagerAttention)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(3, 10, 32)
    _, rotary = RotaryEmbedding(cfg)(x, torch.arange(10)[None])
    for mask in (None, padded_mask()):
        torch.testing.assert_close(ours(x, mask, rotary), reference(x, mask, rotary), atol=1e-5, rtol=0)


def test_fused_qkv_rows_are_laid_out_per_query_group() -> None:
    """Rows: [q heads of group 0, k_0, v_0 | q heads of group 1, k_1, v_1] (Megatron-Core)."""
    cfg = config(2, add_bias_linear=False)
    torch.manual_seed(0)
    module = attention(cfg, EagerAttention)
    d, h = cfg.head_dim, cfg.hidden_size  # 8, 32
    w = module.linear_qkv.weight.detach()  # [2 * (2 + 2) * 8, 32]
    per_group = w.view(2, 4, d, h)  # [group, (q, q, k, v), d, h]
    wq = per_group[:, :2].reshape(4 * d, h)  # query heads 0..3 in order
    wk, wv = per_group[:, 2].reshape(2 * d, h), per_group[:, 3].reshape(2 * d, h)

    x = torch.randn(2, 6, h)
    q = (x @ wq.T).view(2, 6, 4, d).transpose(1, 2)  # [b, nh, s, d]
    k = (x @ wk.T).view(2, 6, 2, d).transpose(1, 2)  # [b, ng, s, d]
    v = (x @ wv.T).view(2, 6, 2, d).transpose(1, 2)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 6, h)
    torch.testing.assert_close(module(x), module.linear_proj(out), atol=1e-6, rtol=0)


def test_qkv_bias_and_sizes() -> None:
    gqa = attention(config(2, add_bias_linear=False), SDPAttention)
    assert gqa.linear_qkv.weight.shape == ((4 + 2 * 2) * 8, 32) and gqa.linear_qkv.bias is None
    assert gqa.linear_proj.bias is None
    qwen_like = attention(config(2, add_bias_linear=False, add_qkv_bias=True), SDPAttention)
    assert qwen_like.linear_qkv.bias.shape == (64,) and qwen_like.linear_proj.bias is None
    gpt2_like = attention(config(4), SDPAttention)
    assert gpt2_like.linear_qkv.bias.shape == (96,) and gpt2_like.linear_proj.bias.shape == (32,)


def test_mask_types() -> None:
    """causal: causal without a mask; padding: mask only (bidirectional); no_mask: ignores any mask."""
    cfg = config(4)
    torch.manual_seed(0)
    causal = attention(cfg, SDPAttention)
    padding = attention(cfg, SDPAttention, attn_mask_type="padding")
    no_mask = attention(cfg, SDPAttention, attn_mask_type="no_mask")
    padding.load_state_dict(causal.state_dict())
    no_mask.load_state_dict(causal.state_dict())
    x = torch.randn(1, 6, 32)
    everything = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    torch.testing.assert_close(causal(x), causal(x, causal_padding_mask(torch.ones(1, 6))), atol=1e-6, rtol=0)
    torch.testing.assert_close(padding(x), padding(x, everything), atol=1e-6, rtol=0)
    torch.testing.assert_close(no_mask(x, ~everything), padding(x), atol=1e-6, rtol=0)
    # Causal: the last position sees everything, so only it agrees with bidirectional attention.
    assert torch.allclose(causal(x)[:, -1], padding(x)[:, -1], atol=1e-6)
    assert not torch.allclose(causal(x)[:, 0], padding(x)[:, 0], atol=1e-3)


def test_qk_layernorm_is_per_head() -> None:
    cfg = config(2, qk_layernorm=True, normalization="RMSNorm")
    norm = functools.partial(RMSNorm, cfg)
    module = attention(cfg, SDPAttention, q_layernorm=norm, k_layernorm=norm)
    assert module.q_layernorm.weight.shape == (8,) and module.k_layernorm.weight.shape == (8,)
    assert module(torch.randn(2, 5, 32)).shape == (2, 5, 32)


def test_causal_padding_mask() -> None:
    mask = causal_padding_mask(torch.tensor([[1, 1, 0], [0, 1, 1]]))
    assert mask.shape == (2, 1, 3, 3) and mask.dtype == torch.bool
    want = torch.tensor([
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]],  # right pad: the pad query also sees itself (diagonal)
        [[1, 0, 0], [0, 1, 0], [0, 1, 1]],  # left pad: the all-pad row keeps only its diagonal
    ]).bool()  # fmt: skip
    assert torch.equal(mask[:, 0], want)
