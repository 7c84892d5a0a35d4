"""RoPE settings between an HF config (`rope_parameters`, or transformers 4's `rope_theta` + `rope_scaling`)
and TransformerConfig (`rotary_base`, `rope_scaling`), for every family that uses RoPE."""

from __future__ import annotations

from typing import Any

from megaspec.config import TransformerConfig
from megaspec.errors import SpecError
from megaspec.interop.hf.core import unsupported
from megaspec.rope import ROPE_TYPES

# The keys each rope_type reads, as HF's rope init functions name them.
_KEYS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "factor", "attention_factor"),
}


def rope_parameters(c: Any) -> dict[str, Any]:
    """The HF config's RoPE settings as one dict (transformers 5 `rope_parameters`, or 4's fields)."""
    params = getattr(c, "rope_parameters", None)
    if params:
        return dict(params)
    scaling = dict(getattr(c, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    return {"rope_theta": getattr(c, "rope_theta", 10000.0), **scaling}


def rope_fields(c: Any, architecture: str, rope: dict[str, Any] | None = None) -> dict[str, Any]:
    """TransformerConfig RoPE fields (`rotary_base`, `rope_scaling`) from an HF config (or one of its RoPE dicts).

    Unknown types are refused.
    """
    rope = rope_parameters(c) if rope is None else rope
    kind = rope.get("rope_type", rope.get("type", "default"))
    unsupported(architecture, partial_rotary_factor=(rope.get("partial_rotary_factor", 1.0), 1.0))
    fields: dict[str, Any] = {"rotary_base": float(rope["rope_theta"])}
    if kind in ROPE_TYPES:
        scaling = {k: rope[k] for k in _KEYS[kind] if rope.get(k) is not None}
        if kind == "yarn":  # HF reads a missing or null beta as its default
            scaling.update(beta_fast=rope.get("beta_fast") or 32.0, beta_slow=rope.get("beta_slow") or 1.0)
        fields["rope_scaling"] = {"rope_type": kind, **scaling}
    elif kind != "default":
        raise SpecError(f"unsupported {architecture} configuration: rope_type '{kind}' "
                        f"(megaspec supports 'default', {', '.join(repr(t) for t in ROPE_TYPES)})")
    return fields


def partial_rope_fields(c: Any, architecture: str) -> dict[str, Any]:
    """rope_fields for families that rotate part of each head: partial_rotary_factor as rotary_percent."""
    rope = rope_parameters(c)
    partial = rope.pop("partial_rotary_factor", 1.0)
    return {**rope_fields(c, architecture, rope), "rotary_percent": float(partial)}


def hf_rope(cfg: TransformerConfig) -> dict[str, Any]:
    """TransformerConfig RoPE fields -> HF `rope_parameters`."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling is not None:
        scaling = cfg.rope_scaling.model_dump(mode="json")
        rope.update({k: v for k, v in scaling.items() if v is not None})
    return rope
