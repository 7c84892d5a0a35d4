"""Slot kinds: what a module of each kind must be, written as a typed Protocol of its forward call.

A parent calls the module in its slot exactly as the Protocol says: parameters
before `/` positionally (so an implementation may name them as it likes), the
rest by keyword (so their names are part of the contract). `register` checks a
class's `forward` against its kind's Protocol, so a plug-in that would break its
parent at the first forward is refused when it is registered, with the reason.

Generation (megaspec/cache.py) is part of the contract of the model, block, layer,
self_attention and cross_attention kinds, and optional: a module supports it by
defining `init_cache(cache: megaspec.Cache) -> state`. Its parent calls that once
when a generation starts, then passes the state back as `forward(..., cache=state)`
on every forward of the generation, and passes no `cache` otherwise, so a module
without `init_cache` need not take the keyword (and asking it to generate is a
SpecError naming it). An attention's state is usually `megaspec.KVCache(cache)`;
its forward then attends with `key, value, mask = cache.update(key, value, mask)`.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

# (cos, sin) from a rotary position embedding: [b, s, 1, rot], or [b, s, 1, rot/2, 2] for adjacent pairs;
# or several such tables by name, for models whose layers rotate differently (Gemma-3's local and global
# layers), each attention picking one.
Rotary = tuple[Tensor, Tensor] | dict[str, tuple[Tensor, Tensor]]
# Keywords a parent passes only to a child that defines the named method (see the module docstring).
OPTIONAL_KEYWORDS = {"cache": "init_cache"}


@runtime_checkable
class ModelKind(Protocol):
    """A whole model: keyword inputs -> a ModelOutput; `example_inputs` sizes a shape-check forward.

    One that generates defines `init_cache(cache) -> state` and takes `cache=` (the Cache
    itself, `cache.state` being that state) and `position_ids=` in forward; an encoder-decoder
    also sets `is_encoder_decoder = True` and a `decoder_start_token_id`.
    """

    def forward(self, *args: Any, **inputs: Any) -> Any: ...

    def example_inputs(self, batch: int = 1, seq: int = 8, device: Any = None) -> dict[str, Tensor]: ...


class EmbeddingKind(Protocol):
    """Ids (or pixels) -> hidden states [b, s, h]."""

    def forward(self, inputs: Tensor, /) -> Tensor: ...


class PositionEmbeddingKind(Protocol):
    """(hidden [b, s, h], position_ids [b or 1, s]) -> (hidden, rotary or None)."""

    def forward(self, hidden_states: Tensor, position_ids: Tensor, /) -> tuple[Tensor, Rotary | None]: ...


class AttentionBiasKind(Protocol):
    """(query_length, key_length) -> an additive score bias [1, nh, sq, sk] (T5's relative positions)."""

    def forward(self, query_length: int, key_length: int, /) -> Tensor: ...


class BlockKind(Protocol):
    """A stack of layers: hidden [b, s, h] -> [b, s, h], masks and context passed to every layer."""

    def forward(self, hidden_states: Tensor, /, attention_mask: Tensor | None = None, rotary: Rotary | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None, cache: Any = None) -> Tensor: ...


class LayerKind(Protocol):
    """One transformer layer: hidden [b, s, h] -> [b, s, h]."""

    def forward(self, hidden_states: Tensor, /, attention_mask: Tensor | None = None, rotary: Rotary | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None, cache: Any = None) -> Tensor: ...


class SelfAttentionKind(Protocol):
    """hidden [b, s, h] -> [b, s, h]; mask broadcastable to [b, nh, s, s] (bool: True = attend, or additive).

    With a cache (a decode step), the mask's key axis counts absolute positions 0 .. K - 1,
    which `KVCache.update` maps onto the keys it returns.
    """

    def forward(self, hidden_states: Tensor, /, attention_mask: Tensor | None = None,
                rotary: Rotary | None = None, cache: Any = None) -> Tensor: ...


class CrossAttentionKind(Protocol):
    """Queries from hidden [b, sq, h], keys and values from context [b, sk, h] -> [b, sq, h]."""

    def forward(self, hidden_states: Tensor, /, context: Tensor,
                attention_mask: Tensor | None = None, cache: Any = None) -> Tensor: ...


class CoreAttentionKind(Protocol):
    """(q [b, nh, sq, d], k and v [b, ng, sk, d], mask, is_causal) -> [b, nh, sq, d]."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                is_causal: bool, /) -> Tensor: ...


class MlpKind(Protocol):
    """hidden [..., h] -> [..., h] (a projector maps [..., in] -> [..., out])."""

    def forward(self, hidden_states: Tensor, /) -> Tensor: ...


class MoEKind(Protocol):
    """hidden [b, s, h] -> [b, s, h]; leaves `aux_loss` (a scalar or None) after each forward."""

    aux_loss: Tensor | None

    def forward(self, hidden_states: Tensor, /) -> Tensor: ...


class RouterKind(Protocol):
    """tokens [t, h] -> (probs [t, k], expert indices [t, k], aux_loss)."""

    def forward(self, hidden_states: Tensor, /) -> tuple[Tensor, Tensor, Tensor]: ...


class ExpertsKind(Protocol):
    """(tokens [t, h], probs [t, k], indices [t, k], tokens_per_expert [E]) -> [t, h]."""

    num_experts: int

    def forward(self, hidden_states: Tensor, probs: Tensor, indices: Tensor, tokens_per_expert: Tensor, /
                ) -> Tensor: ...


class NormKind(Protocol):
    """x [..., h] -> [..., h]."""

    def forward(self, x: Tensor, /) -> Tensor: ...


class LinearKind(Protocol):
    """x [..., in] -> [..., out]."""

    def forward(self, x: Tensor, /) -> Tensor: ...


class ActivationKind(Protocol):
    """Elementwise: x -> x (a gated one maps [..., 2f] -> [..., f])."""

    def forward(self, x: Tensor, /) -> Tensor: ...


class HeadKind(Protocol):
    """hidden [b, s, h] -> scores; `weight` is the shared embedding when the head is tied."""

    def forward(self, hidden_states: Tensor, /, weight: Tensor | None = None) -> Tensor: ...


class PoolerKind(Protocol):
    """hidden [b, s, h] -> one vector per sequence [b, h] (BERT's first-token pooler)."""

    def forward(self, hidden_states: Tensor, /) -> Tensor: ...


KINDS: dict[str, type] = {
    "model": ModelKind,
    "embedding": EmbeddingKind,
    "position_embedding": PositionEmbeddingKind,
    "attention_bias": AttentionBiasKind,
    "block": BlockKind,
    "layer": LayerKind,
    "self_attention": SelfAttentionKind,
    "cross_attention": CrossAttentionKind,
    "core_attention": CoreAttentionKind,
    "mlp": MlpKind,
    "moe": MoEKind,
    "router": RouterKind,
    "experts": ExpertsKind,
    "norm": NormKind,
    "linear": LinearKind,
    "activation": ActivationKind,
    "head": HeadKind,
    "pooler": PoolerKind,
}


def contract_problems(cls: type, kind: str) -> list[str]:
    """How `cls.forward` fails the call its kind's Protocol promises parents (empty: it fits)."""
    protocol = KINDS[kind]
    problems = [f"it has no method '{name}'" for name in ("forward", "example_inputs")
                if name in vars(protocol) and not callable(getattr(cls, name, None))]
    if problems or "forward" not in vars(protocol):
        return problems
    want = list(inspect.signature(protocol.forward).parameters.values())[1:]  # drop self
    have = list(inspect.signature(cls.forward).parameters.values())[1:]
    if any(p.kind is p.VAR_POSITIONAL for p in want):
        return []  # the protocol itself takes anything
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in have)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in have)
    positional = [p for p in have if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    by_name = {p.name: p for p in have}
    used: set[str] = set()
    n_pos = sum(p.kind is p.POSITIONAL_ONLY for p in want)
    if len(positional) < n_pos and not var_pos:
        problems.append(f"forward takes {len(positional)} positional argument(s) but is called with {n_pos}")
    used |= {p.name for p in positional[:n_pos]}
    for p in want[n_pos:]:
        method = OPTIONAL_KEYWORDS.get(p.name)
        if p.name in by_name and by_name[p.name].kind is not p.POSITIONAL_ONLY:
            used.add(p.name)
        elif method is not None and not callable(getattr(cls, method, None)):
            continue  # parents pass it only to modules that define `method`
        elif method is not None and not var_kw:
            problems.append(f"it defines {method}, but forward has no parameter '{p.name}', "
                            f"which parents then pass by keyword")
        elif not var_kw:
            problems.append(f"forward has no parameter '{p.name}', which parents pass by keyword")
    for p in have:
        required = p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        if required and p.name not in used:
            problems.append(f"forward requires '{p.name}', which parents never pass")
        elif required and p.name in OPTIONAL_KEYWORDS:
            problems.append(f"forward requires '{p.name}', which parents pass only while generating; "
                            "give it a default of None")
    return problems


def signature_text(kind: str) -> str:
    """A kind's forward call as text for messages: 'forward(hidden_states, /, attention_mask=None, ...)'."""
    sig = inspect.signature(KINDS[kind].forward)
    params = [p.replace(annotation=p.empty) for p in list(sig.parameters.values())[1:]]
    return f"forward{sig.replace(parameters=params, return_annotation=sig.empty)}"
