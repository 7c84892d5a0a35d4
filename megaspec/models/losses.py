"""Token-level losses shared by the models."""

import torch.nn.functional as F
from torch import Tensor

from megaspec.models.gpt import IGNORE_INDEX


def token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits [b, s, vocab] against labels [b, s] at the same positions.

    No shift, unlike causal_lm_loss: a masked LM scores the token at each masked
    position, and a seq2seq decoder's labels are already its inputs moved left.
    Labels of -100 contribute nothing.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
