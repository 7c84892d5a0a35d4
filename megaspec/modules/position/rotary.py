"""Rotary position embeddings (RoPE): the (cos, sin) tables, their scalings, and the rotation.

A rotary kind returns the hidden states unchanged plus the `(cos, sin)` pair the
attention layers apply to queries and keys. The pair's shape says how channels
are paired: [b, s, 1, rot] rotates channel i with i + rot/2 (GPT-NeoX, HF Llama);
[b, s, 1, rot/2, 2] rotates channel 2i with 2i + 1 (GPT-J, Meta's checkpoints).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaspec.config import RopeScaling, TransformerConfig
from megaspec.kinds import Rotary
from megaspec.registry import register

__all__ = ["Rotary", "RotaryEmbedding", "apply_rotary", "llama3_scaled"]


@register("position_embedding", "rotary_embedding")
class RotaryEmbedding(nn.Module):
    """RoPE (Su et al., 2021): returns the (cos, sin) tables; attention rotates q and k."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.rotary_dim = config.rotary_dim
        if self.rotary_dim % 2:
            raise ValueError(f"the rotary dimension, head_dim * rotary_percent = {self.rotary_dim}, must be even")
        self.base = config.rotary_base
        self.interleaved = config.rotary_interleaved
        self.scaling = config.rope_scaling
        # Positions 0 .. max_position_embeddings - 1 have precomputed angles; a longer
        # sequence is an index error, as with a learned position table.
        self.max_positions = config.max_position_embeddings
        # Not persistent: pure functions of the config, so checkpoints need not carry
        # them, and init_weights recomputes them after a meta-device build.
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        cos, sin = self._tables()
        self.register_buffer("cos_table", cos, persistent=False)  # [max_positions, rot]
        self.register_buffer("sin_table", sin, persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> Tensor:
        # base^(-2i/dim), computed in fp32 as HF Llama does, so the tables match bit for bit.
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.base ** (exponents / self.rotary_dim))  # [rot/2]
        return inv_freq if self.scaling is None else llama3_scaled(inv_freq, self.scaling)

    def _tables(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        # Angles in fp32: position * frequency loses precision in half types at long range.
        positions = torch.arange(self.max_positions, device=device).float()
        freqs = positions[:, None] * self._inv_freq(device)  # [max, rot/2]
        if self.interleaved:
            angles = freqs.repeat_interleave(2, dim=-1)  # [max, rot]: f0 f0 f1 f1 ...
        else:
            angles = torch.cat((freqs, freqs), dim=-1)  # [max, rot]: f0 f1 ... f0 f1 ...
        return angles.cos(), angles.sin()

    def init_weights(self) -> None:
        """Recompute `inv_freq` and the cos/sin tables (they hold garbage after `to_empty`)."""
        with torch.no_grad():
            self.inv_freq.copy_(self._inv_freq(self.inv_freq.device))
            cos, sin = self._tables(self.cos_table.device)
            self.cos_table.copy_(cos)
            self.sin_table.copy_(sin)

    def forward(self, hidden_states: Tensor, position_ids: Tensor) -> tuple[Tensor, Rotary]:
        # [b, s, 1, rot]: the 1 broadcasts over heads in the attention's [b, s, n, d] layout.
        cos = F.embedding(position_ids, self.cos_table).to(hidden_states.dtype).unsqueeze(2)
        sin = F.embedding(position_ids, self.sin_table).to(hidden_states.dtype).unsqueeze(2)
        if self.interleaved:  # [b, s, 1, rot/2, 2]: the shape tells apply_rotary to rotate adjacent pairs
            cos, sin = cos.unflatten(-1, (-1, 2)), sin.unflatten(-1, (-1, 2))
        return hidden_states, (cos, sin)

    def extra_repr(self) -> str:
        return (f"rotary_dim={self.rotary_dim}, base={self.base}, interleaved={self.interleaved}, "
                f"max_positions={self.max_positions}")


def llama3_scaled(inv_freq: Tensor, scaling: RopeScaling) -> Tensor:
    """Llama-3.1 frequency scaling: slow wavelengths beyond the original context by `factor`."""
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor  # longer than this: divide by factor
    high_freq_wavelen = old_context / scaling.high_freq_factor  # shorter than this: unchanged
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    # In between, blend the two smoothly so no frequency jumps.
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


def _rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim (HF Llama / GPT-NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_pairs(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) on adjacent pairs (GPT-J / Meta layout)."""
    pairs = x.unflatten(-1, (-1, 2))  # [..., d/2, 2]
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary(x: Tensor, rotary: Rotary) -> Tensor:
    """Rotate the first rotary_dim channels of x [b, s, n, d] by (cos, sin): [b, s, 1, rot], or [b, s, 1, rot/2, 2]
    to rotate adjacent pairs (interleaved)."""
    cos, sin = rotary
    interleaved = cos.dim() > x.dim()
    if interleaved:
        cos, sin = cos.flatten(-2), sin.flatten(-2)  # [b, s, 1, rot]: f0 f0 f1 f1 ...
    rotary_dim = cos.size(-1)
    rotate = _rotate_pairs if interleaved else _rotate_half
    if rotary_dim == x.size(-1):
        return x * cos + rotate(x) * sin
    # Partial rotary (rotary_percent < 1): the remaining channels carry no position.
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)
