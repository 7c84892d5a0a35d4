"""What models return: HF-style field names, so downstream code reads them as it would there."""

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ModelOutput:
    """Outputs of a forward pass; fields a model does not compute stay None."""

    logits: Tensor | None = None  # [b, s, vocab]
    loss: Tensor | None = None  # scalar, when labels were given
    last_hidden_state: Tensor | None = None  # [b, s, h], after the final norm
    aux_loss: Tensor | None = None  # scalar, auxiliary losses (e.g. MoE load balancing)
    pooler_output: Tensor | None = None  # [b, h], one vector per sequence (e.g. a class token)
    encoder_last_hidden_state: Tensor | None = None  # [b, s_enc, h], an encoder-decoder's encoder output
