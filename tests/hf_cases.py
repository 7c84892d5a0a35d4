"""Shared inputs and checks for the HF conversion tests (tiny models, fp32, no download)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

VOCAB, SEQ = 101, 12


def batch(vocab: int = VOCAB, seq: int = SEQ) -> tuple[Tensor, Tensor]:
    """Token ids [3, seq] and a keep-mask with no padding, right padding and left padding."""
    input_ids = torch.randint(0, vocab, (3, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, -4:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    return input_ids, mask


def max_diff(a: Tensor, b: Tensor) -> float:
    """Largest absolute difference."""
    return (a - b).abs().max().item()


def lm_labels(input_ids: Tensor, mask: Tensor) -> Tensor:
    """Labels with no targets at pads, nor where a pad would predict (a left pad's next token).

    Logits at pad positions are arbitrary and differ between implementations.
    """
    keep = mask.bool()
    after_pad = torch.cat([torch.zeros(len(keep), 1, dtype=torch.bool), ~keep[:, :-1]], dim=1)
    return input_ids.masked_fill(~keep | after_pad, -100)


def lm_diffs(ours: nn.Module, hf: nn.Module) -> dict[str, float]:
    """Max abs logit / loss differences of two causal LMs: no padding, padding (real tokens only), loss."""
    input_ids, mask = batch()
    keep = mask.bool()
    labels = lm_labels(input_ids, mask)
    with torch.no_grad():
        plain = max_diff(ours(input_ids).logits, hf(input_ids).logits)
        padded = max_diff(ours(input_ids, attention_mask=mask).logits[keep],
                          hf(input_ids, attention_mask=mask).logits[keep])
        loss = max_diff(ours(input_ids, attention_mask=mask, labels=labels).loss,
                        hf(input_ids, attention_mask=mask, labels=labels).loss)
    return {"logits": plain, "padded logits": padded, "loss": loss}


def assert_lm_parity(ours: nn.Module, hf: nn.Module, atol: float = 1e-4) -> None:
    """Every difference lm_diffs measures is within atol."""
    diffs = lm_diffs(ours, hf)
    assert max(diffs.values()) <= atol, diffs


def one_adamw_step(model: nn.Module) -> tuple[float, float]:
    """(loss before, loss after) one AdamW step on the fixed batch, in train mode."""
    input_ids, mask = batch()
    labels = lm_labels(input_ids, mask)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(input_ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = model(input_ids, attention_mask=mask, labels=labels).loss
    return loss.item(), after.item()


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight, bias, norm scale and saved buffer (a router's correction bias) moved off its initial value.

    Norm scales start at one and biases at zero; a conversion that drops or swaps them
    would still match an unperturbed model. Vectors move by 0.1, matrices by 0.02 (their init's scale).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                tensor.add_(noise * (0.1 if tensor.dim() == 1 else 0.02))
    return model


def perturbed(hf: nn.Module, scale: float = 0.05) -> nn.Module:
    """Every weight nudged away from its init (HF starts norms at the identity, biases at zero), in eval mode."""
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * scale)
    return hf.eval()


def assert_round_trip(ours: nn.Module, hf: nn.Module, **to_hf_kwargs) -> nn.Module:
    """to_hf(ours) is an HF model of hf's class whose logits equal hf's; returns it."""
    from megaspec.interop.hf import to_hf

    back = to_hf(ours, **to_hf_kwargs)
    assert type(back) is type(hf)
    input_ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(back(input_ids, attention_mask=mask).logits, hf(input_ids, attention_mask=mask).logits)
    return back
