"""Strict validation of plain data: `true` is not an int, "3" is not a float, NaN is no size.

Config fields and module params are validated by pydantic in strict mode: lax mode
would turn `True` into 1 and `"12"` into 12, so a typo would build a different model
than the one written. Strict mode also takes containers literally (a list is not a
tuple), while YAML has only lists and frozen specs hold only tuples; `conform`
reshapes containers to what the type declares and leaves every scalar as it is.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict

STRICT = ConfigDict(strict=True, allow_inf_nan=False)

_UNIONS = (typing.Union, getattr(types, "UnionType", typing.Union))


def _arms(hint: Any) -> list[Any]:
    """The alternatives of a hint: the arms of a Union, Annotated unwrapped."""
    while get_origin(hint) is Annotated:
        hint = get_args(hint)[0]
    if get_origin(hint) in _UNIONS:
        return [a for arm in get_args(hint) for a in _arms(arm)]
    return [hint]


def _origin(hint: Any) -> Any:
    return get_origin(hint) or hint


def _fits(model: type[BaseModel], value: Mapping[str, Any]) -> bool:
    """`value` names only fields of `model`, and each Literal-typed field it sets holds one of the literals."""
    fields = model.model_fields
    if not set(value) <= set(fields):
        return False
    for name, field in fields.items():
        if name in value and get_origin(field.annotation) is typing.Literal:
            if value[name] not in get_args(field.annotation):
                return False
    return True


def conform(hint: Any, value: Any) -> Any:
    """`value` with lists, tuples and mappings as `hint` declares them, recursively; scalars untouched."""
    arms = _arms(hint)
    if isinstance(value, Mapping):
        models = [arm for arm in arms if isinstance(arm, type) and issubclass(arm, BaseModel)]
        # A union of models (one per `rope_type`, say): the arm the value's keys and literals pick.
        model = next((m for m in models if _fits(m, value)), models[0] if models else None)
        if model is not None:
            fields = model.model_fields
            return {k: conform(fields[k].annotation if k in fields else Any, v) for k, v in value.items()}
        for arm in arms:
            if _origin(arm) in (dict, Mapping, typing.Mapping):
                args = get_args(arm)
                return {k: conform(args[1] if len(args) == 2 else Any, v) for k, v in value.items()}
        return dict(value)
    if isinstance(value, (list, tuple)):
        for arm in arms:
            origin = _origin(arm)
            if origin is tuple:
                args = get_args(arm)
                if len(args) == 2 and args[1] is Ellipsis:
                    return tuple(conform(args[0], v) for v in value)
                if len(args) == len(value):
                    return tuple(conform(a, v) for a, v in zip(args, value))
                return tuple(value)
            if origin in (list, typing.List):
                args = get_args(arm)
                return [conform(args[0] if args else Any, v) for v in value]
        return value
    return value
