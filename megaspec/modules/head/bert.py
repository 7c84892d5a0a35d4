"""BERT's heads: the pooler (a sequence vector from the first token) and the masked-LM head."""

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.modules.activation import activation_from_config
from megaspec.registry import Slot, register


@register("pooler", "pooler")
class Pooler(nn.Module):
    """tanh(dense(h[:, 0])): one vector per sequence, read from its first ([CLS]) token (BERT)."""

    slots: ClassVar[dict[str, Slot]] = {
        "dense": Slot("linear", provides=("in_features", "out_features", "bias"), default="linear"),
    }

    def __init__(self, config: TransformerConfig, *, dense: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.dense = dense(in_features=config.hidden_size, out_features=config.hidden_size, bias=True)

    def forward(self, hidden_states: Tensor) -> Tensor:  # [b, s, h] -> [b, h]
        return torch.tanh(self.dense(hidden_states[:, 0]))


@register("head", "bert_lm_head")
class BertLMHead(nn.Module):
    """Masked-LM head: output_layer(norm(act(dense(h)))), logits over the vocabulary.

    The output layer is an `lm_head` with a bias; when the config ties embeddings it
    owns no weight and reads the word embedding's, which the model passes in.
    """

    slots: ClassVar[dict[str, Slot]] = {
        "dense": Slot("linear", provides=("in_features", "out_features", "bias"), default="linear"),
        "activation": Slot("activation", required=False),
        "layernorm": Slot("norm", default="layer_norm"),
        "output_layer": Slot("head", provides=("bias",), default="lm_head"),
    }

    def __init__(
        self,
        config: TransformerConfig,
        *,
        bias: bool = True,
        dense: Callable[..., nn.Module],
        activation: nn.Module | None = None,
        layernorm: nn.Module,
        output_layer: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        h = config.hidden_size
        self.dense = dense(in_features=h, out_features=h, bias=config.add_bias_linear)
        self.activation = activation if activation is not None else activation_from_config(config)
        self.layernorm = layernorm
        self.output_layer = output_layer(bias=bias)

    def forward(self, hidden_states: Tensor, weight: Tensor | None = None) -> Tensor:
        # [b, s, h] -> [b, s, vocab]; `weight` is the word embedding's when tied.
        x = self.layernorm(self.activation(self.dense(hidden_states)))  # [b, s, h]
        return self.output_layer(x, weight)
