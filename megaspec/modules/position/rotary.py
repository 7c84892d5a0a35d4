"""Rotary position embeddings (RoPE): the (cos, sin) tables, their scalings, and the rotation.

A rotary kind returns the hidden states unchanged plus the `(cos, sin)` pair the
attention layers apply to queries and keys.
"""

import torch
from torch import Tensor, nn

from megaspec.config import TransformerConfig
from megaspec.kinds import Rotary
from megaspec.modules.position.rope_scaling import attention_factor, dynamic_inv_freq, inv_freq, long_inv_freq
from megaspec.registry import register
from megaspec.rope import DynamicRopeScaling, LongRopeScaling

__all__ = ["Rotary", "RotaryEmbedding", "apply_rotary"]


@register("position_embedding", "rotary_embedding")
class RotaryEmbedding(nn.Module):
    """RoPE (Su et al., 2021): returns the (cos, sin) tables; attention rotates q and k.

    `config.rope_scaling` picks the frequencies (megaspec/rope.py). Dynamic NTK and LongRoPE
    choose theirs per forward from the longest sequence in `position_ids`; YaRN and LongRoPE
    multiply cos and sin by their attention factor.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.rotary_dim = config.rotary_dim
        self.base = config.rotary_base
        self.interleaved = config.rotary_interleaved
        self.scaling = config.rope_scaling
        self.max_positions = config.max_position_embeddings
        self.attention_scaling = attention_factor(self.scaling, self.max_positions)
        # Not persistent: pure functions of the config, so checkpoints need not carry them,
        # and init_weights recomputes them after a meta-device build.
        self.register_buffer("inv_freq", inv_freq(self.scaling, self.base, self.rotary_dim), persistent=False)
        self.register_buffer("long_inv_freq", long_inv_freq(self.scaling, self.base, self.rotary_dim),
                             persistent=False)

    def init_weights(self) -> None:
        """Recompute the frequency tables (they hold garbage after `to_empty`)."""
        with torch.no_grad():
            device = self.inv_freq.device
            self.inv_freq.copy_(inv_freq(self.scaling, self.base, self.rotary_dim, device))
            if self.long_inv_freq is not None:
                self.long_inv_freq.copy_(long_inv_freq(self.scaling, self.base, self.rotary_dim, device))

    def frequencies(self, position_ids: Tensor) -> Tensor:
        """The inverse frequencies [rot/2] for this forward's positions."""
        if isinstance(self.scaling, DynamicRopeScaling):
            grown = dynamic_inv_freq(self.scaling, self.base, self.rotary_dim, self.max_positions, position_ids)
            return torch.where(position_ids.max() + 1 > self.max_positions, grown, self.inv_freq)
        if isinstance(self.scaling, LongRopeScaling):
            long = position_ids.max() + 1 > self.scaling.original_max_position_embeddings
            return torch.where(long, self.long_inv_freq, self.inv_freq)
        return self.inv_freq

    def forward(self, hidden_states: Tensor, position_ids: Tensor) -> tuple[Tensor, Rotary]:
        # Angles in fp32: position * frequency loses precision in half types at long range.
        freqs = position_ids[..., None].float() * self.frequencies(position_ids)  # [b, s, rot/2]
        if self.interleaved:
            angles = freqs.repeat_interleave(2, dim=-1)  # [b, s, rot]: f0 f0 f1 f1 ...
        else:
            angles = torch.cat((freqs, freqs), dim=-1)  # [b, s, rot]: f0 f1 ... f0 f1 ...
        cos, sin = angles.cos(), angles.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        # [b, s, 1, rot]: the 1 broadcasts over heads in the attention's [b, s, n, d] layout.
        return hidden_states, (cos.to(hidden_states.dtype).unsqueeze(2), sin.to(hidden_states.dtype).unsqueeze(2))

    def extra_repr(self) -> str:
        scaling = "none" if self.scaling is None else self.scaling.rope_type
        return f"rotary_dim={self.rotary_dim}, base={self.base}, interleaved={self.interleaved}, scaling={scaling}"


def _rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim (HF Llama / GPT-NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_pairs(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) on adjacent pairs (GPT-J / Meta layout)."""
    pairs = x.unflatten(-1, (-1, 2))  # [..., d/2, 2]
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary(x: Tensor, rotary: Rotary, interleaved: bool = False) -> Tensor:
    """Rotate the first rotary_dim channels of x [b, s, n, d] by the angles in (cos, sin) [b, s, 1, rot]."""
    cos, sin = rotary
    rotary_dim = cos.size(-1)
    rotate = _rotate_pairs if interleaved else _rotate_half
    if rotary_dim == x.size(-1):
        return x * cos + rotate(x) * sin
    # Partial rotary (rotary_percent < 1): the remaining channels carry no position.
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)
