"""RoPE scaling settings (`TransformerConfig.rope_scaling`): one model per HF `rope_type`.

Each names the same fields as HF's `rope_parameters`, so a config converts by copying
keys. The frequency math lives with the rotary embedding (modules/position/rope_scaling.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, PositiveFloat, PositiveInt, Tag


class _Scaling(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Llama3RopeScaling(_Scaling):
    """Llama-3.1: wavelengths beyond the original context slowed by `factor`, short ones kept, a blend between."""

    rope_type: Literal["llama3"] = "llama3"
    factor: PositiveFloat = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: PositiveInt = 8192


class LinearRopeScaling(_Scaling):
    """Position interpolation: every frequency divided by `factor` (Gemma-3's global layers)."""

    rope_type: Literal["linear"]
    factor: PositiveFloat


class DynamicRopeScaling(_Scaling):
    """Dynamic NTK: past max_position_embeddings, the base grows with the sequence being run."""

    rope_type: Literal["dynamic"]
    factor: PositiveFloat


class YarnRopeScaling(_Scaling):
    """YaRN (DeepSeek-V3, Qwen2 long context): interpolate low frequencies, keep high ones, ramp between.

    cos and sin are multiplied by `attention_factor` (default: from factor and mscale / mscale_all_dim).
    """

    rope_type: Literal["yarn"]
    factor: PositiveFloat
    original_max_position_embeddings: PositiveInt
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


class LongRopeScaling(_Scaling):
    """LongRoPE (Phi-3 long context): per-frequency factors, the long set once a sequence passes the original context.

    `factor` None: max_position_embeddings / original_max_position_embeddings, as HF.
    """

    rope_type: Literal["longrope"]
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: PositiveInt
    factor: PositiveFloat | None = None
    attention_factor: float | None = None


def _rope_type(value: Any) -> str:
    """The discriminator; a mapping without `rope_type` is Llama-3.1's, as before other types existed."""
    if isinstance(value, dict):
        return str(value.get("rope_type", "llama3"))
    return str(getattr(value, "rope_type", "llama3"))


RopeScaling = Annotated[
    Annotated[Llama3RopeScaling, Tag("llama3")]
    | Annotated[LinearRopeScaling, Tag("linear")]
    | Annotated[DynamicRopeScaling, Tag("dynamic")]
    | Annotated[YarnRopeScaling, Tag("yarn")]
    | Annotated[LongRopeScaling, Tag("longrope")],
    Discriminator(_rope_type),
]
ROPE_TYPES = ("llama3", "linear", "dynamic", "yarn", "longrope")
