"""Generation for every other family megaspec converts, with nothing family-specific: HF's greedy tokens, and
each cached step equal to a full forward. Their pieces meet the cache here: per-layer sliding windows, score
soft-capping, local and global RoPE tables, ALiBi, parallel layers, QK-norm, partial rotary, MLA and MoE."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import test_hf_bloom
import test_hf_deepseek
import test_hf_falcon
import test_hf_gemma
import test_hf_gpt_neox
import test_hf_olmo2
import test_hf_phi3
import test_hf_qwen
import test_hf_qwen2_moe
import torch
from hf_cases import VOCAB
from test_generate_hf import NEW, full_logits, prompts
from torch import nn

from megaspec.generation import Generation
from megaspec.interop.hf import from_hf

pytest.importorskip("transformers")

# The families' own tiny HF models (tests/test_hf_*.py); windows of 4 positions where they slide one.
FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "qwen2_windows": lambda: test_hf_qwen.tiny("qwen2", use_sliding_window=True, sliding_window=4,
                                               max_window_layers=1),
    "qwen3": lambda: test_hf_qwen.tiny("qwen3"),
    "gemma": lambda: test_hf_gemma.tiny("gemma"),
    "gemma2": lambda: test_hf_gemma.tiny("gemma2"),
    "gemma3": lambda: test_hf_gemma.tiny("gemma3"),
    "phi3_window": lambda: test_hf_phi3.tiny(sliding_window=4),
    "olmo2": lambda: test_hf_olmo2.tiny(),
    "gpt_neox": lambda: test_hf_gpt_neox.tiny(rotary_pct=0.5),
    **{f"falcon_{form}": (lambda form=form: test_hf_falcon.tiny(form)) for form in test_hf_falcon.FORMS},
    "bloom": lambda: test_hf_bloom.tiny(),
    "qwen2_moe": lambda: test_hf_qwen2_moe.tiny_qwen2_moe(),
    "deepseek_v3": lambda: test_hf_deepseek.tiny_v3(),
    "deepseek_v2": lambda: test_hf_deepseek.tiny_v2(),
}


def for_generation(hf: nn.Module) -> nn.Module:
    """Weights moved further (greedy outputs then vary), no eos to stop at, eval mode."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_equals_hf_and_full_forwards(family: str) -> None:
    hf = for_generation(FAMILIES[family]())
    ours = from_hf(hf)
    ids, mask = prompts(3, VOCAB - 1)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    run = Generation(ours, ids, attention_mask=mask, max_new_tokens=NEW)
    steps = list(run)
    got = torch.cat([ids, torch.stack([s.tokens for s in steps], dim=1)], dim=1)
    assert torch.equal(got, want), (got, want)
    with torch.no_grad():
        full = full_logits(ours, family, {"input_ids": ids, "attention_mask": mask}, got)
    torch.testing.assert_close(torch.stack([s.logits for s in steps], dim=1), full, atol=1e-4, rtol=0)
