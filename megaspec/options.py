"""The `build` and `trainer` option groups, validated strictly like config fields.

`trainer.max_steps=abc` must be a message naming the option, not a ValueError from
int() deep inside the loop; an option that is accepted takes effect, so an unknown
one is refused rather than ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt, ValidationError

from megaspec.errors import Problem, SpecError
from megaspec.signature import type_name
from megaspec.strict import STRICT, conform

Options = TypeVar("Options", bound=BaseModel)
# pydantic's bound errors, as the comparison they failed.
BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


class BuildOptions(BaseModel):
    """`megaspec build`: where to build and the forward pass it times."""

    model_config = ConfigDict(extra="forbid", frozen=True, **STRICT)

    device: str = Field("auto", pattern=r"^(auto|cpu|meta|cuda(:[0-9]+)?)$")
    batch_size: PositiveInt = 1
    seq_len: PositiveInt = 128
    seed: NonNegativeInt = 0


class TrainerOptions(BaseModel):
    """`megaspec train`: steps, batch, optimizer, precision, checkpoints (conf/trainer/default.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True, **STRICT)

    max_steps: NonNegativeInt = 200
    seed: NonNegativeInt = 0
    seq_len: PositiveInt = 128
    global_batch_size: PositiveInt = 8
    micro_batch_size: PositiveInt | None = None
    lr: NonNegativeFloat = 1e-3
    min_lr: NonNegativeFloat = 1e-4
    warmup_steps: NonNegativeInt = 20
    weight_decay: NonNegativeFloat = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: NonNegativeFloat = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    peak_flops: float | None = Field(None, gt=0)
    compile: bool = False
    eval_every: NonNegativeInt = 50
    eval_batches: PositiveInt | None = 4
    log_every: NonNegativeInt = 1
    progress: bool = True
    save_every: NonNegativeInt = 0
    save_final: bool = True
    checkpoint_dir: str = Field("checkpoints", min_length=1)
    resume: str | None = None
    export: bool = True


def validated(cls: type[Options], data: Mapping[str, Any] | None, group: str) -> Options:
    """`data` as `cls`; SpecError naming each bad option as `group.name`."""
    data = dict(data or {})
    try:
        return cls.model_validate({k: conform(cls.model_fields[k].annotation, v) if k in cls.model_fields else v
                                   for k, v in data.items()})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else ""
            field = cls.model_fields.get(name)
            if err["type"] == "extra_forbidden":
                message = f"unknown option; {group} has {', '.join(cls.model_fields)}"
            elif field is not None and len(err["loc"]) == 1 and "type" in err["type"]:
                message = f"expected {type_name(field.annotation)}, got {err.get('input')!r}"
            elif err["type"] in BOUNDS:
                bound = next(iter((err.get("ctx") or {}).values()), "?")
                message = f"must be {BOUNDS[err['type']]} {bound}, got {err.get('input')!r}"
            else:
                message = f"{str(err['msg']).removeprefix('Value error, ')}, got {err.get('input')!r}"
            problems.append(Problem(message, f"{group}.{name}" if name else group))
        raise SpecError(problems) from None
