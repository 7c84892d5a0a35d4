"""Rotary position embeddings (RoPE): the (cos, sin) tables, their scalings, and the rotation.

A rotary kind returns the hidden states unchanged plus the `(cos, sin)` pair the
attention layers apply to queries and keys. The pair's shape says how channels
are paired: [b, s, 1, rot] rotates channel i with i + rot/2 (GPT-NeoX, HF Llama);
[b, s, 1, rot/2, 2] rotates channel 2i with 2i + 1 (GPT-J, Meta's checkpoints).
"""

import torch
import torch.nn.functional as F
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

    `config.rope_scaling` picks the frequencies (megaspec/rope.py). Positions 0 ..
    max_position_embeddings - 1 have precomputed angles, so a longer sequence is an
    index error, as with a learned position table. Dynamic NTK alone computes its
    angles per forward: its frequencies grow with the sequence being run. LongRoPE
    keeps a second table for sequences past its original context. YaRN and LongRoPE
    multiply cos and sin by their attention factor.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.rotary_dim = config.rotary_dim
        if self.rotary_dim % 2:
            raise ValueError(f"the rotary dimension, head_dim * rotary_percent = {self.rotary_dim}, must be even")
        self.base = config.rotary_base
        self.interleaved = config.rotary_interleaved
        self.scaling = config.rope_scaling
        self.max_positions = config.max_position_embeddings
        self.attention_scaling = attention_factor(self.scaling, self.max_positions)
        self.dynamic = isinstance(self.scaling, DynamicRopeScaling)
        self.long = isinstance(self.scaling, LongRopeScaling)
        # Not persistent: pure functions of the config, so checkpoints need not carry them,
        # and init_weights recomputes them after a meta-device build.
        self.register_buffer("inv_freq", inv_freq(self.scaling, self.base, self.rotary_dim), persistent=False)
        self.register_buffer("long_inv_freq", long_inv_freq(self.scaling, self.base, self.rotary_dim),
                             persistent=False)
        for name, table in self._tables().items():
            self.register_buffer(name, table, persistent=False)  # [max_positions, rot] each, or None

    def _angles(self, positions: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin [..., rot] of positions [...] times freqs [rot/2], scaled by the attention factor."""
        # Angles in fp32: position * frequency loses precision in half types at long range.
        angles = positions[..., None].float() * freqs  # [..., rot/2]
        if self.interleaved:
            angles = angles.repeat_interleave(2, dim=-1)  # [..., rot]: f0 f0 f1 f1 ...
        else:
            angles = torch.cat((angles, angles), dim=-1)  # [..., rot]: f0 f1 ... f0 f1 ...
        cos, sin = angles.cos(), angles.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos, sin

    def _tables(self) -> dict[str, Tensor | None]:
        """The precomputed cos/sin tables (and LongRoPE's long-context pair); None where not used."""
        tables: dict[str, Tensor | None] = dict.fromkeys(("cos_table", "sin_table", "long_cos_table", "long_sin_table"))
        if self.dynamic:
            return tables
        positions = torch.arange(self.max_positions, device=self.inv_freq.device)  # [max]
        tables["cos_table"], tables["sin_table"] = self._angles(positions, self.inv_freq)
        if self.long:
            tables["long_cos_table"], tables["long_sin_table"] = self._angles(positions, self.long_inv_freq)
        return tables

    def init_weights(self) -> None:
        """Recompute the frequencies and tables (they hold garbage after `to_empty`)."""
        with torch.no_grad():
            device = self.inv_freq.device
            self.inv_freq.copy_(inv_freq(self.scaling, self.base, self.rotary_dim, device))
            if self.long_inv_freq is not None:
                self.long_inv_freq.copy_(long_inv_freq(self.scaling, self.base, self.rotary_dim, device))
            for name, table in self._tables().items():
                if table is not None:
                    getattr(self, name).copy_(table)

    def forward(self, hidden_states: Tensor, position_ids: Tensor) -> tuple[Tensor, Rotary]:
        if self.dynamic:
            grown = dynamic_inv_freq(self.scaling, self.base, self.rotary_dim, self.max_positions, position_ids)
            freqs = torch.where(position_ids.max() + 1 > self.max_positions, grown, self.inv_freq)
            cos, sin = self._angles(position_ids, freqs)  # [b, s, rot]
        else:
            cos, sin = F.embedding(position_ids, self.cos_table), F.embedding(position_ids, self.sin_table)
            if self.long:  # the long-context table once any sequence passes the original context
                past = position_ids.max() + 1 > self.scaling.original_max_position_embeddings
                cos = torch.where(past, F.embedding(position_ids, self.long_cos_table), cos)
                sin = torch.where(past, F.embedding(position_ids, self.long_sin_table), sin)
        # [b, s, 1, rot]: the 1 broadcasts over heads in the attention's [b, s, n, d] layout.
        cos, sin = cos.to(hidden_states.dtype).unsqueeze(2), sin.to(hidden_states.dtype).unsqueeze(2)
        if self.interleaved:  # [b, s, 1, rot/2, 2]: the shape tells apply_rotary to rotate adjacent pairs
            cos, sin = cos.unflatten(-1, (-1, 2)), sin.unflatten(-1, (-1, 2))
        return hidden_states, (cos, sin)

    def extra_repr(self) -> str:
        scaling = "none" if self.scaling is None else self.scaling.rope_type
        return (f"rotary_dim={self.rotary_dim}, base={self.base}, interleaved={self.interleaved}, "
                f"scaling={scaling}, max_positions={self.max_positions}")


def _rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim (HF Llama / GPT-NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_pairs(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) on adjacent pairs (GPT-J / Meta layout)."""
    pairs = x.unflatten(-1, (-1, 2))  # [..., d/2, 2]
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary(x: Tensor, rotary: tuple[Tensor, Tensor]) -> Tensor:
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
