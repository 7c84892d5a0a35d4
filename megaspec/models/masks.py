"""Attention masks built once per forward from a [b, s] keep-mask (1 = token, 0 = pad)."""

import torch
import torch.nn.functional as F
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


def decode_mask(attention_mask: Tensor, positions: Tensor, key_length: int) -> Tensor:
    """A decode step's mask [b, 1, s, K] over key positions 0 .. K - 1, from a keep-mask over positions.

    attention_mask [b, n] (1 = token, 0 = pad) covers positions 0 .. n - 1; positions it
    does not reach are tokens. The queries sit at `positions` [s], so each sees the
    tokens at or before its own position.
    """
    keep = attention_mask.bool()  # [b, n]
    n = keep.size(1)
    keep = keep[:, :key_length] if n >= key_length else F.pad(keep, (0, key_length - n), value=True)  # [b, K]
    causal = torch.arange(key_length, device=keep.device) <= positions[:, None]  # [s, K]
    return keep[:, None, None, :] & causal  # [b, 1, s, K]
