"""Attention masks built once per forward from a [b, s] keep-mask (1 = token, 0 = pad)."""

import torch
from torch import Tensor


def padding_mask(attention_mask: Tensor) -> Tensor:
    """[b, s] keep-mask -> [b, 1, 1, s] bool, True = this key may be attended (bidirectional).

    A sequence with no tokens at all keeps every key, so its softmax has
    something to normalise over and no NaN leaks into a batch's loss.
    """
    keep = attention_mask.bool()  # [b, s]
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]  # [b, 1, 1, s]


def causal_padding_mask(attention_mask: Tensor) -> Tensor:
    """[b, s] keep-mask (1 = token, 0 = pad) -> [b, 1, s, s] bool, True = may attend."""
    s = attention_mask.size(-1)
    keep = attention_mask.bool()[:, None, None, :]  # [b, 1, 1, s]: which keys exist
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()  # [s, s]
    # Every query also sees itself, so a query row that is all padding (e.g. left
    # padding's first positions) still has one key and its softmax is not NaN.
    diagonal = torch.eye(s, dtype=torch.bool, device=attention_mask.device)
    return (causal & keep) | diagonal  # [b, 1, s, s]
