"""TransformerConfig: the sizes and numerics every module is built with.

Field names follow Megatron-Core's TransformerConfig where one exists, so a
Megatron user can read a megaspec config without a glossary.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator

Activation = Literal["gelu", "gelu_tanh", "relu", "squared_relu", "silu", "quick_gelu"]


class TransformerConfig(BaseModel):
    """Immutable, validated model hyper-parameters (Megatron-Core names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Sizes.
    num_layers: PositiveInt
    hidden_size: PositiveInt
    num_attention_heads: PositiveInt
    num_query_groups: PositiveInt | None = None  # None: one group per head (MHA)
    kv_channels: PositiveInt | None = None  # None: hidden_size // num_attention_heads
    ffn_hidden_size: PositiveInt | None = None  # None: 4 * hidden_size
    vocab_size: PositiveInt = 32000
    max_position_embeddings: PositiveInt = 2048

    # Numerics.
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    activation: Activation = "gelu"
    gated_linear_unit: bool = False
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    position_embedding_type: Literal["learned_absolute", "rope", "none"] = "learned_absolute"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False
    share_embeddings_and_output_weights: bool = True
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    # Megatron scales the init of the projections that write into the residual
    # stream by 1/sqrt(2 * num_layers), as GPT-2 does.
    scaled_output_init: bool = True
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _cross_field_rules(self) -> TransformerConfig:
        heads, groups = self.num_attention_heads, self.num_query_groups
        if self.kv_channels is None and self.hidden_size % heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({heads}), or set kv_channels"
            )
        if groups is not None and heads % groups:
            raise ValueError(
                f"num_attention_heads ({heads}) must be divisible by num_query_groups ({groups})"
            )
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        if self.position_embedding_type == "rope" and self.rotary_dim % 2:
            raise ValueError(
                f"rotary dimension kv_channels * rotary_percent ({self.rotary_dim}) must be even"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.layernorm_epsilon <= 0:
            raise ValueError(f"layernorm_epsilon must be positive, got {self.layernorm_epsilon}")
        return self

    # Derived sizes: read these rather than the Optional fields above.
    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """Number of key/value heads (GQA groups)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """Hidden width of the feed-forward network."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def rotary_dim(self) -> int:
        """Channels per head that RoPE rotates."""
        return int(self.head_dim * self.rotary_percent)

    def updated(self, **changes: Any) -> TransformerConfig:
        """Return a re-validated copy with `changes` applied (subtree overrides)."""
        return TransformerConfig.model_validate({**self.model_dump(), **changes})
