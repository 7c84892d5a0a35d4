"""A registered class's __init__ type hints are its params schema.

Params are validated with pydantic against those hints before any module is
constructed, so a typo or a wrong type is a located SpecError, not a torch
traceback from deep inside a constructor.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Iterable
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from megaspec.errors import did_you_mean
from megaspec.registry import accepts_extra_params, params_signature
from megaspec.strict import STRICT, conform


def type_name(hint: Any) -> str:
    """Human form of a type hint: 'int', 'float or None', "one of 'a', 'b'"."""
    if hint is Any or hint is inspect.Parameter.empty:
        return "any value"
    origin = get_origin(hint)
    if origin is typing.Annotated:  # PositiveInt and the like: the base type names it
        return type_name(get_args(hint)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join("None" if a is type(None) else type_name(a) for a in get_args(hint))
    if origin is not None:
        args = ", ".join(type_name(a) for a in get_args(hint))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable forward refs: fall back to no checking for those
        return {}


@functools.lru_cache(maxsize=None)
def params_model(cls: type, provided: tuple[str, ...] = ()) -> type[BaseModel]:
    """A pydantic model of the params `cls` accepts (minus those its parent provides)."""
    hints = _hints(cls)
    fields: dict[str, Any] = {}
    for name, param in params_signature(cls).items():
        if name in provided:
            continue
        hint = hints.get(name, Any)
        default = ... if param.default is inspect.Parameter.empty else param.default
        # Aliased field names: a param called `copy` or `schema` must not shadow BaseModel.
        fields[f"p_{name}"] = (hint, Field(default, alias=name))
    extra = "allow" if accepts_extra_params(cls) else "forbid"
    config = ConfigDict(extra=extra, arbitrary_types_allowed=True, populate_by_name=False, **STRICT)
    return create_model(f"{cls.__name__}Params", __config__=config, **fields)


def check_params(
    cls: type, params: dict[str, Any], provided: Iterable[str] = (), owner: str = ""
) -> tuple[dict[str, Any], list[tuple[str, str, Any]]]:
    """Validate `params` for `cls`; return (coerced params, [(param, message, value)])."""
    provided = tuple(sorted(provided))
    problems: list[tuple[str, str, Any]] = []
    for name in provided:
        if name in params:
            problems.append((name, f"'{name}' is supplied by the parent {owner}, not the spec".rstrip(), params[name]))
    hints = _hints(cls)
    params = {k: conform(hints.get(k, Any), v) for k, v in params.items() if k not in provided}
    model = params_model(cls, provided)
    try:
        validated = model.model_validate(params)
    except ValidationError as exc:
        accepted = [n for n in params_signature(cls) if n not in provided]
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else ""
            problems.append((name, _message(err, name, hints, accepted), err.get("input")))
        return {}, problems
    out = {name: getattr(validated, f"p_{name}") for name in params if f"p_{name}" in model.model_fields}
    out.update({k: v for k, v in (validated.model_extra or {}).items()})
    return out, problems


def _message(err: Any, name: str, hints: dict[str, Any], accepted: list[str]) -> str:
    kind = err["type"]
    if kind == "missing":
        return f"missing required param '{name}'"
    if kind == "extra_forbidden":
        listed = ", ".join(accepted) if accepted else "no params"
        return f"unknown param '{name}'{did_you_mean(name, accepted)}; accepted: {listed}"
    if name in hints and kind not in ("value_error", "assertion_error") and len(err["loc"]) == 1:
        finite = " (finite)" if kind == "finite_number" else ""
        return f"expected {type_name(hints[name])}{finite}, got {err.get('input')!r}"
    return str(err["msg"]).removeprefix("Value error, ")
