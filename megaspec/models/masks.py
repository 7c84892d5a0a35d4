"""Attention masks built once per forward from a [b, s] keep-mask (1 = token, 0 = pad)."""

from torch import Tensor


def padding_mask(attention_mask: Tensor) -> Tensor:
    """[b, s] keep-mask -> [b, 1, 1, s] bool, True = this key may be attended (bidirectional).

    A sequence with no tokens at all keeps every key, so its softmax has
    something to normalise over and no NaN leaks into a batch's loss.
    """
    keep = attention_mask.bool()  # [b, s]
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]  # [b, 1, 1, s]
