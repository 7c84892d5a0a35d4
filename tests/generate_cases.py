"""Tiny spec-built models and prompts shared by the generation tests."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tiny import TINY
from torch import Tensor, nn

from megaspec import build_model, compose
from megaspec.train.tokenizer import save_tokenizer, train_bpe

LAYER = "model.spec.submodules.decoder.submodules.layers.submodules"


def tiny(name: str, *overrides: str, seed: int = 0) -> nn.Module:
    """A tiny model, initialised wide enough that greedy outputs vary."""
    torch.manual_seed(seed)
    config = "model.config.language" if name == "llava" else "model.config"
    return build_model(compose([*TINY[name], f"{config}.init_method_std=0.3", *overrides])).eval()


def prompts() -> tuple[Tensor, Tensor]:
    """Three prompts of 7, 5 and 2 tokens, padded on the left, and their mask."""
    ids = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :5] = 0
    return ids, mask


def greedy_by_full_forwards(model: nn.Module, ids: Tensor, mask: Tensor, new: int) -> Tensor:
    """The reference: each token from a forward over the whole sequence so far, without a cache."""
    for _ in range(new):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = F.pad(mask, (0, 1), value=1)
    return ids


def write_hf_gpt2(directory: Path) -> Path:
    """A tiny HF GPT-2 directory with a byte-level BPE tokenizer.json (300 tokens), weights perturbed away from their
    initial values, eos = <|endoftext|> (id 0)."""
    import transformers

    directory.mkdir(parents=True)
    tokenizer = train_bpe(["the cat sat on the mat", "a dog ran to the cat", "the end of the story"] * 5, 300)
    save_tokenizer(tokenizer, directory)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=tokenizer.vocab_size, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(directory)
    return directory
