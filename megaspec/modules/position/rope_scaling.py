"""RoPE frequency tables for each scaling type, computed in fp32 as HF's rope init functions do.

`inv_freq` gives the table a rotary embedding starts from, `long_inv_freq` the second
table LongRoPE switches to past its original context, `dynamic_inv_freq` the table
dynamic NTK recomputes from the sequence being run, and `attention_factor` the factor
YaRN and LongRoPE multiply cos and sin by.
"""

import math

import torch
from torch import Tensor

from megaspec.rope import (
    DynamicRopeScaling,
    LinearRopeScaling,
    Llama3RopeScaling,
    LongRopeScaling,
    RopeScaling,
    YarnRopeScaling,
)


def _exponents(dim: int, device: torch.device | None) -> Tensor:
    """2i / dim for i < dim / 2 [dim/2], fp32."""
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


def plain_inv_freq(base: float, dim: int, device: torch.device | None = None) -> Tensor:
    """base^(-2i/dim) [dim/2]: unscaled RoPE."""
    return 1.0 / (base ** _exponents(dim, device))


def inv_freq(scaling: RopeScaling | None, base: float, dim: int, device: torch.device | None = None) -> Tensor:
    """The frequencies [dim/2] a rotary embedding holds (LongRoPE: the short-context set)."""
    if isinstance(scaling, LongRopeScaling):
        return _longrope(scaling.short_factor, base, dim, device)
    freqs = plain_inv_freq(base, dim, device)
    if isinstance(scaling, Llama3RopeScaling):
        return llama3_scaled(freqs, scaling)
    if isinstance(scaling, LinearRopeScaling):
        return freqs / scaling.factor
    if isinstance(scaling, YarnRopeScaling):
        return _yarn(scaling, base, dim, device)
    return freqs  # None, and dynamic below its threshold


def long_inv_freq(scaling: RopeScaling | None, base: float, dim: int, device: torch.device | None = None
                  ) -> Tensor | None:
    """LongRoPE's frequencies for sequences past the original context; None for other types."""
    if not isinstance(scaling, LongRopeScaling):
        return None
    return _longrope(scaling.long_factor, base, dim, device)


def _longrope(factors: tuple[float, ...], base: float, dim: int, device: torch.device | None) -> Tensor:
    ext = torch.tensor(factors, dtype=torch.float32, device=device)  # [dim/2]
    return 1.0 / (ext * base ** _exponents(dim, device))


def dynamic_inv_freq(scaling: DynamicRopeScaling, base: float, dim: int, max_positions: int,
                     position_ids: Tensor) -> Tensor:
    """Dynamic NTK's frequencies [dim/2] for the longest sequence in `position_ids` (plain up to max_positions).

    The base grows as base * (factor * s / max_positions - (factor - 1))^(dim / (dim - 2)) for s
    tokens; tensor math throughout, so a forward stays free of host syncs.
    """
    seq = torch.clamp(position_ids.max() + 1, min=max_positions)  # scalar, int64
    grown = base * ((scaling.factor * seq / max_positions) - (scaling.factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (grown ** _exponents(dim, position_ids.device))


def llama3_scaled(freqs: Tensor, scaling: Llama3RopeScaling) -> Tensor:
    """Llama-3.1 frequency scaling: slow wavelengths beyond the original context by `factor`."""
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor  # longer than this: divide by factor
    high_freq_wavelen = old_context / scaling.high_freq_factor  # shorter than this: unchanged
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scaling.factor, freqs)
    # In between, blend the two smoothly so no frequency jumps.
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(scaling: YarnRopeScaling, base: float, dim: int, device: torch.device | None) -> Tensor:
    """YaRN: frequencies that turn fewer than beta_slow times in the original context are interpolated,
    more than beta_fast times kept, with a linear ramp over the dimensions between."""
    pos_freqs = base ** _exponents(dim, device)  # [dim/2]
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (scaling.factor * pos_freqs)
    context = scaling.original_max_position_embeddings

    def dim_of(rotations: float) -> float:  # the dimension whose frequency turns `rotations` times in context
        return (dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    keep = 1 - ramp  # [dim/2]: 1 = extrapolate (keep), 0 = interpolate
    return interpolated * (1 - keep) + extrapolated * keep


def _mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 without scaling)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(scaling: RopeScaling | None, max_positions: int) -> float:
    """The factor cos and sin are multiplied by: YaRN's and LongRoPE's, 1 for every other type."""
    if isinstance(scaling, YarnRopeScaling):
        if scaling.attention_factor is not None:
            return scaling.attention_factor
        if scaling.mscale and scaling.mscale_all_dim:
            return _mscale(scaling.factor, scaling.mscale) / _mscale(scaling.factor, scaling.mscale_all_dim)
        return _mscale(scaling.factor)
    if isinstance(scaling, LongRopeScaling):
        if scaling.attention_factor is not None:
            return scaling.attention_factor
        factor = longrope_factor(scaling, max_positions)
        context = scaling.original_max_position_embeddings
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(context))
    return 1.0


def longrope_factor(scaling: LongRopeScaling, max_positions: int) -> float:
    """LongRoPE's context extension: `factor`, else max_position_embeddings over the original context."""
    return scaling.factor or max_positions / scaling.original_max_position_embeddings


def yarn_softmax_scale(scaling: RopeScaling | None) -> float:
    """The factor on 1/sqrt(d) that DeepSeek's attention applies under YaRN: mscale(factor, mscale_all_dim)^2."""
    if isinstance(scaling, YarnRopeScaling) and scaling.mscale_all_dim:
        return _mscale(scaling.factor, scaling.mscale_all_dim) ** 2
    return 1.0
