"""The translation core shared by every family: tensor-name rules applied both ways, and spec helpers.

A `Family` says how one HF architecture maps onto megaspec: the HF config becomes
a spec tree and a TransformerConfig, a TransformerConfig becomes an HF config, and
a list of `Rule`s ties HF tensor names to megaspec ones. A rule holds a function
for each direction (rename, transpose, fuse, split), so one table serves both
`from_hf` and `to_hf`, and a tensor no rule places is an error, never dropped.
"""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch import Tensor

from megaspec.config import TransformerConfig
from megaspec.configs import Configs
from megaspec.errors import Problem, SpecError
from megaspec.paths import specs_dir

Transform = Callable[..., tuple[Tensor, ...]]
_FIELD = re.compile(r"\{(\w+)\}")

# HF activation names -> TransformerConfig.activation.
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "quick_gelu": "quick_gelu",
}


def _same(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tensors


@dataclass(frozen=True)
class Rule:
    """n HF tensors <-> m megaspec tensors. Names may hold integer fields such as `{i}` (layer)."""

    hf: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Transform = _same
    to_hf: Transform = _same


def rule(hf: str | Iterable[str], ours: str | Iterable[str], to_ours: Transform = _same,
         to_hf: Transform = _same) -> Rule:
    """A Rule from one name or several on each side."""
    return Rule(_names(hf), _names(ours), to_ours, to_hf)


def _names(names: str | Iterable[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


@functools.cache
def _regex(pattern: str) -> re.Pattern[str]:
    parts = _FIELD.split(pattern)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>\\d+)" for k, p in enumerate(parts)))


# ---------------------------------------------------------------- layouts


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, groups: int) -> Tensor:
    """Separate q [nh*d, ...], k, v [ng*d, ...] -> megaspec's fused rows, group by group: [q.., k, v | ...]."""
    per_group = [t.unflatten(0, (groups, -1)) for t in (q, k, v)]  # [ng, rows/ng, ...] each
    return torch.cat(per_group, dim=1).flatten(0, 1)


def split_qkv(fused: Tensor, heads: int, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of fuse_qkv: fused per-group rows -> (q, k, v)."""
    per_group = fused.unflatten(0, (groups, -1))  # [ng, (nh/ng + 2) * d, ...]
    head_dim = per_group.size(1) // (heads // groups + 2)
    q, k, v = per_group.split([per_group.size(1) - 2 * head_dim, head_dim, head_dim], dim=1)
    return q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)


def transposed(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Each 2-D tensor transposed (HF Conv1D stores [in, out])."""
    return tuple(t.t() for t in tensors)


def concat(*tensors: Tensor) -> tuple[Tensor]:
    """Stacked along rows: gate and up into fc1 ([gate; up])."""
    return (torch.cat(tensors, dim=0),)


def halves(tensor: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of concat for two equal parts."""
    gate, up = tensor.chunk(2, dim=0)
    return gate, up


def megatron_layer_rules(hf_layer: str, attention: str, params: Iterable[str]) -> list[Rule]:
    """One layer's four projections under Megatron-LM's names, which BLOOM, Falcon and GPT-NeoX kept.

    Their fused `query_key_value` is already megaspec's per-group layout, so every
    tensor moves unchanged. `hf_layer` is the layer's HF prefix with `{i}`, `attention`
    the attention module's name in it.
    """
    o = "decoder.layers.{i}."
    names = {f"{attention}.query_key_value": "self_attention.linear_qkv",
             f"{attention}.dense": "self_attention.linear_proj",
             "mlp.dense_h_to_4h": "mlp.linear_fc1", "mlp.dense_4h_to_h": "mlp.linear_fc2"}
    return [rule(f"{hf_layer}{hf}.{p}", f"{o}{ours}.{p}") for p in params for hf, ours in names.items()]


# ---------------------------------------------------------------- translation


@dataclass
class Translated:
    """Tensors renamed into the other library's names, and what could not be placed."""

    tensors: dict[str, Tensor]
    problems: list[Problem]


def translate(state: Mapping[str, Tensor], rules: list[Rule], to_ours: bool,
              expected: Mapping[str, Tensor], source: str, target: str) -> Translated:
    """Apply `rules` to `state` one way and check the result against `expected` (name -> tensor).

    Every problem is collected: source tensors a rule needs but `state` lacks,
    source tensors no rule places, target tensors nothing produced, and shape or
    dtype mismatches. `source` and `target` name the two sides in messages.
    """
    out: dict[str, Tensor] = {}
    problems: list[Problem] = []
    used: set[str] = set()
    for r in rules:
        src, dst, fn = (r.hf, r.ours, r.to_ours) if to_ours else (r.ours, r.hf, r.to_hf)
        pattern = _regex(src[0])
        for key in state:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            fields = match.groupdict()
            names = [p.format(**fields) for p in src]
            absent = [n for n in names if n not in state]
            if absent:
                problems += [Problem(f"missing {source} tensor (needed with '{key}')", n) for n in absent]
                continue
            used.update(names)
            for p, tensor in zip(dst, fn(*(state[n] for n in names)), strict=True):
                out[p.format(**fields)] = tensor
    for name in state:
        if name not in used:
            problems.append(Problem(f"unexpected {source} tensor: no rule places it in the {target} model", name))
    for name, want in expected.items():
        if name not in out:
            wanted = _sources_of(name, rules, to_ours)
            hint = f" (from {source} {', '.join(repr(w) for w in wanted)})" if wanted else ""
            problems.append(Problem(f"no {source} tensor fills this {target} tensor{hint}", name))
    for name, got in out.items():
        want = expected.get(name)
        if want is None:
            problems.append(Problem(f"the {target} model has no such tensor (made from {source} tensors)", name))
        elif tuple(got.shape) != tuple(want.shape):
            problems.append(Problem(f"shape {tuple(got.shape)} from {source}, but the {target} model expects "
                                    f"{tuple(want.shape)}", name))
    return Translated(out, problems)


def _sources_of(name: str, rules: list[Rule], to_ours: bool) -> list[str]:
    """The source names a rule would read to produce target tensor `name`."""
    for r in rules:
        src, dst = (r.hf, r.ours) if to_ours else (r.ours, r.hf)
        for p in dst:
            match = _regex(p).fullmatch(name)
            if match is not None:
                return [s.format(**match.groupdict()) for s in src]
    return []


def raise_problems(problems: list[Problem], what: str) -> None:
    """One SpecError listing every problem, all at once."""
    if problems:
        head = Problem(f"{what}: {len(problems)} problem(s) with tensors; nothing was loaded")
        raise SpecError([head, *problems])


def unaliased(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop tied duplicates (same storage, same view): (first name of each, {alias: first name})."""
    seen: dict[tuple[Any, ...], str] = {}
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.device.type != "meta" and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = t
    return kept, aliases


# ---------------------------------------------------------------- families


class Family(ABC):
    """How one HF architecture maps onto megaspec: a spec and config each way, and tensor rules."""

    name: str = ""
    model_types: tuple[str, ...] = ()  # HF `config.model_type` values
    hf_class: str = ""  # the transformers class to_hf builds and from_hf loads a directory with
    requires: tuple[str, ...] = ()  # registered megaspec modules the family's spec needs
    # Per config name ("" when there is one): fields the family's models never read, which HF need not carry.
    unread_fields: Mapping[str, frozenset[str]] = {}

    @abstractmethod
    def spec_and_config(self, hf_config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """HF config -> (spec tree as plain data, TransformerConfig fields or named configs)."""

    @abstractmethod
    def hf_config(self, configs: Configs) -> Any:
        """megaspec config(s) -> an HF config object."""

    def hf_config_from(self, spec: dict[str, Any], configs: Configs) -> Any:
        """megaspec spec (plain data) and config(s) -> an HF config; override where HF options live in spec params."""
        return self.hf_config(configs)

    def adapt_hf(self, hf_model: Any, configs: Configs) -> None:
        """Adjust a freshly built HF model before to_hf loads weights into it (e.g. untie a head); default: nothing."""

    @abstractmethod
    def rules(self, configs: Configs) -> list[Rule]:
        """The tensor-name rules for this size of model."""

    def rules_from(self, spec: dict[str, Any], configs: Configs) -> list[Rule]:
        """The rules for this spec (plain data) and size; override where HF's tensor names follow the layout."""
        return self.rules(configs)

    def hf_state(self, hf_model: Any) -> dict[str, Tensor]:
        """The HF model's tensors under the names the rules use (those of `hf_class`)."""
        state = dict(hf_model.state_dict())
        prefix = getattr(hf_model, "base_model_prefix", "")
        # A bare base model (e.g. LlamaModel) lacks the head class's prefix: add it.
        if prefix and type(hf_model).__name__ != self.hf_class and getattr(hf_model, "base_model", None) is hf_model:
            state = {f"{prefix}.{k}": v for k, v in state.items()}
        return state


def shipped_spec(name: str) -> dict[str, Any]:
    """A spec file from specs/ as plain, editable data."""
    with open(specs_dir() / f"{name}.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def node_at(spec: dict[str, Any], path: str) -> dict[str, Any]:
    """The node at a dotted slot path (e.g. 'decoder.layers.mlp'), turning a bare name into a mapping."""
    node = spec
    for slot in path.split("."):
        subs = node.setdefault("submodules", {})
        child = subs.get(slot)
        if isinstance(child, str):
            child = subs[slot] = {"module": child}
        if not isinstance(child, dict):
            raise SpecError(f"spec has no single node at '{path}'")
        node = child
    return node


def layer_nodes(spec: dict[str, Any], block: str = "decoder") -> list[dict[str, Any]]:
    """The layer node(s) of a block: its one repeated node, or each node of its pattern."""
    layers = node_at(spec, block)["submodules"]["layers"]
    if isinstance(layers, dict) and "pattern" in layers:
        return list(layers["nodes"].values())
    return [node_at(spec, f"{block}.layers")]


def set_slot(spec: dict[str, Any], path: str, value: Any) -> None:
    """Put `value` (a module name, node or None) into the slot at a dotted path."""
    parent, _, slot = path.rpartition(".")
    node = node_at(spec, parent) if parent else spec
    node.setdefault("submodules", {})[slot] = value


def set_activations(spec: Any, name: str) -> None:
    """Fill every `activation` slot in a spec (plain data) with `name`, however deep (MLPs, shared experts)."""
    if isinstance(spec, dict):
        subs = spec.get("submodules")
        if isinstance(subs, dict) and "activation" in subs:
            subs["activation"] = name
        for value in spec.values():
            set_activations(value, name)
    elif isinstance(spec, list):
        for value in spec:
            set_activations(value, name)


def activation(hf_name: str, architecture: str) -> str:
    """HF activation name -> megaspec's, or a clear error."""
    if hf_name not in ACTIVATIONS:
        raise SpecError(f"{architecture}: activation '{hf_name}' has no megaspec equivalent; "
                        f"supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[hf_name]


def hf_activation(name: str) -> str:
    """megaspec activation -> the HF name for it."""
    return {"gelu_tanh": "gelu_new"}.get(name, name)


def unsupported(architecture: str, **found: tuple[Any, Any]) -> None:
    """Raise naming every HF config option whose value (first) differs from what megaspec supports (second)."""
    bad = [f"{k}={v!r} (megaspec supports {w!r})" for k, (v, w) in found.items() if v != w]
    if bad:
        raise SpecError(f"unsupported {architecture} configuration: {'; '.join(bad)}")


def check_class(hf_model: Any, architecture: str, *accepted: str) -> None:
    """Raise unless the HF model is one of the `accepted` classes (others hold heads megaspec cannot place)."""
    name = type(hf_model).__name__
    if name not in accepted:
        raise SpecError(f"unsupported HF class '{name}': megaspec converts {architecture} as {' or '.join(accepted)}")


def token_ids(vocab_size: int, **ids: int | None) -> dict[str, int | None]:
    """Special token ids, dropped (None) when outside the vocabulary, so HF does not warn on tiny models."""
    return {k: (v if v is not None and 0 <= v < vocab_size else None) for k, v in ids.items()}


def canonical(config: TransformerConfig) -> dict[str, Any]:
    """Config fields with derived sizes written out, so equal models compare equal."""
    data = config.model_dump(mode="json")
    data.update(num_query_groups=config.query_groups, kv_channels=config.head_dim,
                ffn_hidden_size=config.ffn_size)
    return data
