"""Token-level losses shared by the models."""

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # label value that contributes no loss (HF and PyTorch convention)


def token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits [b, s, vocab] against labels [b, s] at the same positions.

    No shift, unlike causal_lm_loss: a masked LM scores the token at each masked
    position, and a seq2seq decoder's labels are already its inputs moved left.
    Labels of -100 contribute nothing.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t + 1] (so labels=input_ids works)."""
    # Shift the labels, not the logits: slicing [b, s, vocab] logits would copy them.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [b, s]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
