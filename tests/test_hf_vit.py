"""ViT (HF ViTModel, with its pooler) between HF and megaspec: hidden states and pooled output,
with and without an attention mask over the tokens."""

import pytest
import torch
from hf_cases import max_diff, perturbed
from torch import nn

import megaspec
from megaspec import SpecError, build_module
from megaspec.interop.hf import from_hf, spec_from_hf, to_hf

transformers = pytest.importorskip("transformers")

IMAGE, PATCH = 28, 7  # 4 x 4 patches + the class token


def tiny(**overrides) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(**{"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                       "intermediate_size": 64, "image_size": IMAGE, "patch_size": PATCH,
                                       **overrides})
    return perturbed(transformers.ViTModel(config))


def vit_diffs(ours: nn.Module, hf: nn.Module) -> dict[str, float]:
    """Max abs differences of hidden states and pooled outputs, without and with a token mask."""
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, -5:] = 0  # the last patches hidden from every token
    mask[2, 3:9] = 0
    diffs = {}
    with torch.no_grad():
        for name, kwargs in (("", {}), ("masked ", {"attention_mask": mask})):
            got, want = ours(pixels, **kwargs), hf(pixel_values=pixels, **kwargs)
            diffs[f"{name}hidden"] = max_diff(got.last_hidden_state, want.last_hidden_state)
            diffs[f"{name}pooled"] = max_diff(got.pooler_output, want.pooler_output)
    return diffs


def test_from_hf_matches_hf_and_to_hf_gives_it_back() -> None:
    hf = tiny()
    ours = from_hf(hf)
    assert ours.pooler is not None and ours.embedding.bias is not None
    diffs = vit_diffs(ours, hf)
    assert max(diffs.values()) <= 1e-4, diffs
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():  # the mask matters

        assert max_diff(ours(pixels).last_hidden_state,
                        ours(pixels, attention_mask=torch.tensor([[1] * 12 + [0] * 5])).last_hidden_state) > 1e-3
    back = to_hf(ours)
    assert type(back) is type(hf)
    assert max(vit_diffs(ours, back).values()) <= 1e-4


def test_to_hf_reproduces_megaspec_outputs() -> None:
    spec, configs = spec_from_hf(tiny().config)
    torch.manual_seed(3)
    ours = build_module(spec, configs).eval()
    assert max(vit_diffs(ours, to_hf(ours)).values()) <= 1e-5


def test_what_has_no_slot_is_refused() -> None:
    with pytest.raises(SpecError, match=r"unsupported ViT configuration: qkv_bias=False"):
        from_hf(tiny(qkv_bias=False))
    with pytest.raises(SpecError, match=r"unsupported HF class 'ViTForImageClassification'"):
        from_hf(transformers.ViTForImageClassification(tiny().config))
    assert megaspec.build_model("vit", device="meta").pooler.dense.weight.shape == (768, 768)
