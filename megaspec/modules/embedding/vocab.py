"""Token embeddings: ids -> vectors (words, and BERT's segments)."""

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.modules.utils import init_normal_, params_dtype
from megaspec.registry import register


@register("embedding", "vocab_embedding")
class VocabEmbedding(nn.Module):
    """Token ids -> vectors. `weight` is public: a tied output layer reads it.

    `scale_by_sqrt_hidden` multiplies the vectors by sqrt(hidden_size) (Gemma), here rather than
    in the model, so that embeddings looked up by another model (a multimodal prompt) are scaled
    too and `inputs_embeds` passed in are not, as in HF.
    """

    tp_plan: ClassVar[dict[str, str]] = {"": "vocab_parallel_embedding"}  # rows split over ranks

    def __init__(self, config: TransformerConfig, *, scale_by_sqrt_hidden: bool = False) -> None:
        super().__init__()
        self.init_std = config.init_method_std
        self.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size, dtype=params_dtype(config)))
        self.scale = config.hidden_size**0.5 if scale_by_sqrt_hidden else None

    def init_weights(self) -> None:
        """Weight ~ N(0, init_method_std)."""
        init_normal_(self.weight, self.init_std)

    def forward(self, input_ids: Tensor) -> Tensor:  # [b, s] -> [b, s, h]
        x = F.embedding(input_ids, self.weight)
        if self.scale is None:
            return x
        # The factor rounded to the weights' dtype first, as Gemma does (sqrt(3072) is 55.5 in bf16).
        return x * torch.tensor(self.scale, dtype=x.dtype)

    def extra_repr(self) -> str:
        return "" if self.scale is None else f"scale={self.scale:g}"


@register("embedding", "token_type_embedding")
class TokenTypeEmbedding(nn.Module):
    """Segment ids (sentence A / B) -> vectors, added to the token embeddings (BERT)."""

    def __init__(self, config: TransformerConfig, *, num_token_types: PositiveInt = 2) -> None:
        super().__init__()
        self.init_std = config.init_method_std
        self.weight = nn.Parameter(torch.empty(num_token_types, config.hidden_size, dtype=params_dtype(config)))

    def init_weights(self) -> None:
        """Weight ~ N(0, init_method_std)."""
        init_normal_(self.weight, self.init_std)

    def forward(self, token_type_ids: Tensor) -> Tensor:  # [b, s] -> [b, s, h]
        return F.embedding(token_type_ids, self.weight)
