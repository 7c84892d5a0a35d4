"""The tensor-parallel declaration registry: how each module kind shards, as data.

A module declares its plan beside its code, as a class attribute (or property)
`tp_plan`, or with `register_tp_plan(name_or_class, plan)` (for a class one
cannot edit, e.g. a plug-in's). A plan maps a submodule name, or "" for the
module itself, to a style name, and an int attribute to "per_rank":

    tp_plan = {"linear_qkv": "colwise", "linear_proj": "rowwise",
               "num_heads": "per_rank", "num_query_groups": "per_rank"}

Styles (implemented in megaspec.parallel.tp with DTensor's parallel styles):
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from megaspec.errors import SpecError

STYLES: dict[str, str] = {
    "colwise": "split the output features (weight rows, bias); the input is replicated",
    "colwise_gated": "colwise for a fused [gate | up] output: each rank takes its slice of both halves",
    "rowwise": "split the input features (weight columns); outputs are summed across ranks",
    "vocab_parallel_embedding": "an embedding table split over the vocabulary",
    "vocab_parallel_output": "an output layer split over the vocabulary; logits gathered",
    "sequence_parallel": "a norm run on this rank's slice of the sequence (sequence_parallel only)",
    "gather_sequence": "the module's first input is gathered over the sequence (sequence_parallel only)",
    "scatter_sequence": "the module's first input is split over the sequence (sequence_parallel only)",
    "split_heads_output": "the module's output [b, nh, ...] is computed whole; each rank keeps its heads",
    "per_rank": "an int attribute (a head count) divided by the tensor-parallel size",
}
__doc__ = (__doc__ or "") + "".join(f"\n- {name}: {what}" for name, what in STYLES.items()) + "\n"

_PLANS: dict[str | type, dict[str, str]] = {}


def _checked(plan: Mapping[str, str], owner: str) -> dict[str, str]:
    bad = {k: v for k, v in plan.items() if v not in STYLES}
    if bad:
        raise SpecError(f"tp_plan of {owner}: unknown style(s) {bad}; styles are {', '.join(STYLES)}")
    return dict(plan)


def register_tp_plan(module: str | type[nn.Module], plan: Mapping[str, str]) -> None:
    """Declare how a registered module (by name or class) shards under tensor parallelism."""
    _PLANS[module] = _checked(plan, module if isinstance(module, str) else module.__qualname__)


def tp_plan_of(module: nn.Module, registered_name: str | None = None) -> dict[str, str] | None:
    """The plan a module declares (registered by class, by its registered name, or its `tp_plan`), or None."""
    for key in (type(module), registered_name):
        if key is not None and key in _PLANS:
            return _PLANS[key]
    plan = getattr(module, "tp_plan", None)
    return None if plan is None else _checked(plan, type(module).__qualname__)
