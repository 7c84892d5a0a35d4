"""Output heads: hidden states -> per-token scores."""

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.modules.utils import init_normal_, params_dtype
from megaspec.registry import register


@register("head", "lm_head")
class LMHead(nn.Module):
    """Hidden states -> vocabulary logits.

    With `config.share_embeddings_and_output_weights` the head owns no weight:
    the model passes the word embedding's weight to forward (as Megatron does),
    so the tie survives meta-device builds and `to_empty`, and is counted once.
    `config.final_logit_softcapping` c caps the logits at c * tanh(logits / c) (Gemma-2).
    """

    tp_plan: ClassVar[dict[str, str]] = {"": "vocab_parallel_output"}  # rows split over ranks, logits gathered
    config_fields: ClassVar[dict] = {"final_logit_softcapping": (float | None, None)}

    def __init__(self, config: TransformerConfig, *, bias: bool = False) -> None:
        super().__init__()
        self.init_std = config.init_method_std
        self.vocab_size = config.vocab_size
        dtype = params_dtype(config)
        tied = config.share_embeddings_and_output_weights
        self.tied = tied  # read by summaries: no weight of its own, yet not an empty head
        self.weight = None if tied else nn.Parameter(torch.empty(config.vocab_size, config.hidden_size, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(config.vocab_size, dtype=dtype)) if bias else None
        self.softcap = config.final_logit_softcapping
        if self.softcap is not None and self.softcap <= 0:
            raise ValueError(f"config.final_logit_softcapping must be positive, got {self.softcap}")

    def init_weights(self) -> None:
        """Own weight ~ N(0, init_method_std), bias zeros."""
        if self.weight is not None:
            init_normal_(self.weight, self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, hidden_states: Tensor, weight: Tensor | None = None) -> Tensor:
        # [b, s, h] -> [b, s, vocab]; `weight` is the shared embedding when tied.
        logits = F.linear(hidden_states, self.weight if weight is None else weight, self.bias)
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def extra_repr(self) -> str:
        cap = "" if self.softcap is None else f", softcap={self.softcap}"
        return f"vocab_size={self.vocab_size}, tied={self.weight is None}, bias={self.bias is not None}{cap}"
