"""TransformerConfig: the sizes and numerics every module is built with.

Field names follow Megatron-Core's TransformerConfig where one exists, so a
Megatron user can read a megaspec config without a glossary. A registered module
may add fields of its own (its `config_fields`): they live in the same config,
are set and overridden like the others (`model.config.<name>=...`), and are
validated against the types the module declares.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, TypeAdapter, ValidationError, model_validator
from pydantic_core import InitErrorDetails

from megaspec.rope import RopeScaling

# params_dtype names -> torch dtypes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Activation = Literal["gelu", "gelu_tanh", "relu", "squared_relu", "silu", "quick_gelu"]


@dataclass(frozen=True)
class ModuleField:
    """A config field that a registered module declares and reads (see `add_config_fields`)."""

    name: str
    annotation: Any
    default: Any
    owner: str  # the registered name that declared it

    @cached_property
    def adapter(self) -> TypeAdapter:
        """Validates a value of this field."""
        return TypeAdapter(self.annotation)


_MODULE_FIELDS: dict[str, ModuleField] = {}


def add_config_fields(owner: str, fields: Mapping[str, tuple[Any, Any]]) -> None:
    """Add `{name: (type, default)}` to TransformerConfig on behalf of module `owner`.

    A name already taken by a core field, or by another module with another type or
    default, is refused: two modules reading one field must mean the same thing by it.
    """
    for name, (annotation, default) in fields.items():
        field = ModuleField(name, annotation, default, owner)
        if name in TransformerConfig.model_fields:
            raise ValueError(f"{owner} declares config field '{name}', which TransformerConfig already has")
        taken = _MODULE_FIELDS.get(name)
        if taken is not None and (taken.annotation, taken.default) != (annotation, default):
            raise ValueError(f"{owner} declares config field '{name}' as {annotation} = {default!r}, but "
                             f"{taken.owner} declares it as {taken.annotation} = {taken.default!r}")
        try:
            field.adapter.validate_python(default)
        except ValidationError as exc:
            raise ValueError(f"{owner}: the default of config field '{name}' is invalid: {exc}") from None
        if taken is None:
            _MODULE_FIELDS[name] = field


def remove_config_fields(owner: str) -> None:
    """Drop the fields module `owner` declared (when it is unregistered), so later configs no longer carry them."""
    for name in [n for n, field in _MODULE_FIELDS.items() if field.owner == owner]:
        del _MODULE_FIELDS[name]


def module_fields() -> dict[str, ModuleField]:
    """The config fields modules declared, by name."""
    return dict(_MODULE_FIELDS)


def field_annotation(name: str) -> Any:
    """The type of a config field, core or module-declared (KeyError for neither)."""
    core = TransformerConfig.model_fields.get(name)
    return core.annotation if core is not None else _MODULE_FIELDS[name].annotation


def field_names() -> list[str]:
    """Every config field name: TransformerConfig's own, then those modules declared."""
    return [*TransformerConfig.model_fields, *_MODULE_FIELDS]


class TransformerConfig(BaseModel):
    """Immutable, validated model hyper-parameters (Megatron-Core names, plus fields modules declare)."""

    # Extra keys are allowed only as module-declared fields (checked in _module_fields).
    model_config = ConfigDict(frozen=True, extra="allow")

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
    # Norm weights stored as gamma - 1, so the scale is (1 + weight) and starts at zero (Gemma; Megatron's name).
    layernorm_zero_centered_gamma: bool = False
    activation: Activation = "gelu"
    gated_linear_unit: bool = False
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    position_embedding_type: Literal["learned_absolute", "rope", "relative", "none"] = "learned_absolute"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False
    # T5 relative position bias: log-spaced distance buckets, the last one holding every
    # distance from max_distance on (Megatron-Core names).
    relative_attention_num_buckets: PositiveInt = 32
    relative_attention_max_distance: PositiveInt = 128
    share_embeddings_and_output_weights: bool = True
    # Vision transformers: square images cut into square patches (read only by patch embeddings).
    image_size: PositiveInt = 224
    patch_size: PositiveInt = 16
    num_channels: PositiveInt = 3
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    # Megatron scales the init of the projections that write into the residual
    # stream by 1/sqrt(2 * num_layers), as GPT-2 does.
    scaled_output_init: bool = True
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # RoPE frequency scaling (megaspec/rope.py: llama3, linear, dynamic, yarn, longrope); None: plain RoPE.
    rope_scaling: RopeScaling | None = None
    # Sliding-window attention (Megatron's, flash-attn's convention): a query at i
    # sees keys i - left .. i + right; -1 is unbounded. Mistral's window W is (W - 1, 0).
    window_size: tuple[int, int] | None = None

    # Mixture of experts (Megatron-Core names); inert while num_moe_experts is None.
    num_moe_experts: PositiveInt | None = None
    moe_router_topk: PositiveInt = 2
    moe_ffn_hidden_size: PositiveInt | None = None  # None: ffn_hidden_size
    moe_shared_expert_intermediate_size: PositiveInt | None = None  # None: no shared experts
    moe_shared_expert_gate: bool = False  # scale the shared experts' output by sigmoid(x . w)
    # Which layers are MoE: every N-th (layer i when i % N == 0), or one 0/1 per layer.
    moe_layer_freq: PositiveInt | list[int] = 1
    # The first k layers keep the dense MLP whatever moe_layer_freq says (DeepSeek's first_k_dense_replace).
    moe_first_k_dense: NonNegativeInt = 0
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    moe_router_pre_softmax: bool = False  # softmax over all experts, then top-k (no renormalising)
    moe_router_topk_scaling_factor: float | None = None
    # Group-limited routing (DeepSeek-V3): top-k only among the best `group_topk` of `num_groups` groups.
    moe_router_num_groups: PositiveInt | None = None
    moe_router_group_topk: PositiveInt | None = None
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias that steers selection, not weights.
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_aux_loss_coeff: float = 0.0  # switch-style load-balancing loss
    moe_z_loss_coeff: float | None = None  # router z-loss (ST-MoE)
    moe_expert_capacity_factor: float | None = None  # None: dropless
    moe_token_drop_policy: Literal["probs", "position"] = "probs"  # which tokens over capacity to drop

    @model_validator(mode="before")
    @classmethod
    def _module_fields(cls, data: Any) -> Any:
        """Unknown keys are refused; module-declared fields get their defaults and their types checked."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        errors: list[InitErrorDetails] = []
        for name in data:
            if name not in cls.model_fields and name not in _MODULE_FIELDS:
                errors.append(InitErrorDetails(type="extra_forbidden", loc=(name,), input=data[name]))
        for name, field in _MODULE_FIELDS.items():
            if name not in data:
                data[name] = field.default
                continue
            try:
                data[name] = field.adapter.validate_python(data[name])
            except ValidationError as exc:
                errors += [InitErrorDetails(type=e["type"], loc=(name, *e["loc"]), input=e["input"],
                                            ctx=e.get("ctx", {})) for e in exc.errors()]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data

    @model_validator(mode="after")
    def _moe_rules(self) -> TransformerConfig:
        freq = self.moe_layer_freq
        if isinstance(freq, list):
            if len(freq) != self.num_layers:
                raise ValueError(f"moe_layer_freq lists {len(freq)} layers but num_layers is {self.num_layers}")
            if any(v not in (0, 1) for v in freq):
                raise ValueError(f"moe_layer_freq as a list holds one 0 (dense) or 1 (MoE) per layer, got {freq}")
            if self.moe_first_k_dense:
                raise ValueError("moe_first_k_dense applies to an every-N-th moe_layer_freq; a list already says "
                                 "which layers are dense")
        experts = self.num_moe_experts
        if experts is None:
            return self
        if self.moe_router_topk > experts:
            raise ValueError(f"moe_router_topk ({self.moe_router_topk}) must be <= num_moe_experts ({experts})")
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if (groups is None) != (group_topk is None):
            raise ValueError("moe_router_num_groups and moe_router_group_topk are set together or not at all")
        if groups is not None and group_topk is not None:
            if experts % groups:
                raise ValueError(f"moe_router_num_groups ({groups}) must divide num_moe_experts ({experts})")
            if group_topk > groups:
                raise ValueError(f"moe_router_group_topk ({group_topk}) must be <= moe_router_num_groups ({groups})")
            if not group_topk <= self.moe_router_topk <= group_topk * (experts // groups):
                raise ValueError(
                    f"moe_router_topk ({self.moe_router_topk}) must be between moe_router_group_topk "
                    f"({group_topk}) and the experts in the chosen groups ({group_topk * (experts // groups)})")
        if self.moe_router_pre_softmax and self.moe_router_score_function != "softmax":
            raise ValueError("moe_router_pre_softmax applies only to moe_router_score_function 'softmax'")
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            raise ValueError("moe_router_enable_expert_bias needs moe_router_score_function 'sigmoid'")
        if self.moe_expert_capacity_factor is not None and self.moe_expert_capacity_factor <= 0:
            raise ValueError(
                f"moe_expert_capacity_factor must be positive or None, got {self.moe_expert_capacity_factor}"
            )
        for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            if (getattr(self, name) or 0.0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
            raise ValueError("moe_shared_expert_gate needs moe_shared_expert_intermediate_size (the shared experts)")
        return self

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
        scaling = self.rope_scaling
        if scaling is not None and scaling.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(scaling, name)) != self.rotary_dim // 2:
                    raise ValueError(f"rope_scaling.{name} holds {len(getattr(scaling, name))} factors but the "
                                     f"rotary dimension {self.rotary_dim} has {self.rotary_dim // 2} frequencies")
        if self.window_size is not None and min(self.window_size) < -1:
            raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {self.window_size}")
        if self.layernorm_epsilon <= 0:
            raise ValueError(f"layernorm_epsilon must be positive, got {self.layernorm_epsilon}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
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

    @property
    def num_patches(self) -> int:
        """Patches per image (vision transformers): (image_size / patch_size)^2."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def moe_ffn_size(self) -> int:
        """Hidden width of each routed expert's MLP."""
        return self.moe_ffn_hidden_size or self.ffn_size

    @property
    def moe_layer_pattern(self) -> list[str]:
        """'moe' or 'dense' per layer, from moe_layer_freq and moe_first_k_dense (all dense without experts).

        A spec's layer list can follow it: `layers: {pattern: moe_layer_pattern, nodes: {dense: ..., moe: ...}}`.
        """
        freq = self.moe_layer_freq
        if self.num_moe_experts is None:
            flags = [0] * self.num_layers
        elif isinstance(freq, list):
            flags = freq
        else:  # Megatron's convention: layer i is MoE when i % N == 0
            flags = [int(i % freq == 0 and i >= self.moe_first_k_dense) for i in range(self.num_layers)]
        return ["moe" if f else "dense" for f in flags]

    def updated(self, **changes: Any) -> TransformerConfig:
        """Return a re-validated copy with `changes` applied (subtree overrides)."""
        return TransformerConfig.model_validate({**self.model_dump(), **changes})
