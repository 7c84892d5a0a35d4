"""Every config field that was set takes effect: the settings no module read are refused.

The builder records which set fields the modules of a model read while they are
constructed (`megaspec.config.FieldReads`). Modules read a field only where it
changes what they build or compute, so a set field that nothing read would have
done nothing: it is a SpecError naming the field, where it was set and, for a
structural choice, the spec slots that decide it instead. The rule needs no code
per field, so it covers the fields modules declare (`config_fields`) too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from megaspec.config import FieldReads, Setting, TransformerConfig, module_fields
from megaspec.configs import Configs
from megaspec.errors import Problem, SpecError
from megaspec.registry import lookup
from megaspec.resolve import Resolved


@dataclass(frozen=True)
class Home:
    """Where a core field takes effect: the part that reads it, or the spec slots that decide it."""

    part: str = ""  # the part that reads it, for "this model has no <part>"
    readers: tuple[str, ...] = ()  # registered names of the modules that read it
    kinds: tuple[str, ...] = ()  # kinds of the modules that read it (or of the slots that decide it)
    slots: tuple[str, ...] = ()  # slot names that decide it
    decided_by_spec: bool = False  # a structural choice the spec makes through `kinds`/`slots`
    only: str = ""  # the condition under which its reader reads it


_MOE = Home("mixture-of-experts layer (moe)", kinds=("moe", "router", "experts"))
_ROPE = Home("rotary position embedding (rotary_embedding)", readers=("rotary_embedding",))
_RELATIVE = Home("relative position bias (relative_position_bias)", readers=("relative_position_bias",))
_PATCHES = Home("patch embedding (patch_embedding)", readers=("patch_embedding",))

# Core fields whose refusal can say more than "no module read it". A field missing here
# still gets refused; this only improves the message.
HOMES: dict[str, Home] = {
    "activation": Home(kinds=("activation",), decided_by_spec=True),
    "normalization": Home(kinds=("norm",), decided_by_spec=True),
    "position_embedding_type": Home(slots=("position_embedding", "attention_bias"), decided_by_spec=True),
    "qk_layernorm": Home(slots=("q_layernorm", "k_layernorm"), decided_by_spec=True),
    "gated_linear_unit": Home(kinds=("mlp", "experts"), decided_by_spec=True),
    "share_embeddings_and_output_weights": Home(slots=("output_layer", "lm_head"), decided_by_spec=True),
    "moe_shared_expert_intermediate_size": Home(slots=("shared_experts",), decided_by_spec=True),
    "moe_shared_expert_gate": Home(slots=("shared_experts",), decided_by_spec=True),
    "num_moe_experts": _MOE,
    "moe_layer_freq": Home("mixture-of-experts layer pattern (layers: {pattern: moe_layer_pattern})"),
    "moe_token_drop_policy": Home(only="with moe_expert_capacity_factor"),
    "moe_router_bias_update_rate": Home(only="with moe_router_enable_expert_bias"),
    "add_qkv_bias": Home(only="where add_bias_linear is false"),
    "ffn_hidden_size": Home(only="in MLPs that read it, and in experts when moe_ffn_hidden_size is not set"),
    "max_position_embeddings": Home("position table or context length (learned_position_embedding, gpt_model)",
                                    readers=("learned_position_embedding", "gpt_model")),
    "rotary_base": _ROPE,
    "rotary_percent": _ROPE,
    "rotary_interleaved": _ROPE,
    "rope_scaling": _ROPE,
    "relative_attention_num_buckets": _RELATIVE,
    "relative_attention_max_distance": _RELATIVE,
    "image_size": _PATCHES,
    "patch_size": _PATCHES,
    "num_channels": _PATCHES,
}
for _name in TransformerConfig.model_fields:
    if _name.startswith("moe_") and _name not in HOMES:
        HOMES[_name] = _MOE


REQUIRED = frozenset(name for name, f in TransformerConfig.model_fields.items() if f.is_required())


def config_settings(configs: Configs) -> list[tuple[TransformerConfig, dict[str, Setting]]]:
    """Each config with a Setting (field, where it was written) for every field it was given."""
    out = []
    for name, cfg in configs.items():
        values = cfg.model_dump()
        prefix = f"config.{name}." if name else "config."
        # Required fields (num_layers, hidden_size, ...) cannot be left out, so they need no reader.
        given = [f for f in cfg.model_fields_set if f not in REQUIRED]
        out.append((cfg, {f: Setting(f, prefix + f, *configs.smap.locate(configs.field_key(name, f), values[f]),
                                     scope=name) for f in given}))
    return out


def _nodes(root: Resolved, scope: Setting | None = None) -> Iterator[tuple[str, Resolved | None, Resolved]]:
    """(slot name, child or None when empty, parent) for every slot a setting applies to, each node once.

    A named config's setting applies where that config is in force (a node selecting
    another named config starts another scope); a spec node's setting, to its subtree.
    """
    root_name = root.spec.config if isinstance(root.spec.config, str) else ""
    seen: set[int] = set()
    todo: list[tuple[Resolved, str, bool]] = [(root, root_name, scope is None or not scope.node)]
    while todo:
        node, name, inside = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if scope is not None and scope.node and node.path == scope.scope:
            inside = True
        for slot, child in node.children.items():
            for c in child if isinstance(child, list) else [child]:
                if scope is None or (inside and (scope.node or name == scope.scope)):
                    yield slot, c, node
                if c is not None:
                    todo.append((c, c.spec.config if isinstance(c.spec.config, str) else name, inside))


def _deciding_slots(home: Home, root: Resolved, setting: Setting) -> list[str]:
    """'path: module (file:line)' for each slot the setting applies to that decides it instead (empty ones if none)."""
    filled: dict[str, None] = {}
    empty: dict[str, None] = {}
    for slot, child, parent in _nodes(root, setting):
        if slot not in home.slots and (child is None or child.entry.kind not in home.kinds):
            continue
        path = f"{parent.path}.{slot}" if parent.path else slot
        if child is None:
            empty[f"{path}: empty"] = None
            continue
        smap = child.spec.smap
        file, line = smap.locate(("module",) if ("module",) in smap.lines else ())
        where = f" at {file}:{line}" if file and line else (f" at {file}" if file else "")
        filled[f"{path}: {child.entry.name}{where}"] = None
    return sorted(filled or empty)


def _why(setting: Setting, root: Resolved) -> str:
    """Why nothing read the field, and what to do instead."""
    field = setting.field
    reached = [c for _, c, _ in _nodes(root, setting) if c is not None]
    if setting.scope == root.path or (not setting.node and setting.scope in ("", root.spec.config)):
        reached.append(root)
    names = {c.entry.name for c in reached}
    kinds = {c.entry.kind for c in reached}
    owner = ("this model" if not setting.scope else
             f"the subtree at {setting.scope}" if setting.node else f"the part built with config '{setting.scope}'")
    declared = module_fields().get(field)
    if declared is not None:
        if declared.owner in names:
            return f"{declared.owner}, which declares it, does not use it in this configuration; remove it"
        try:
            owner_kind = lookup(declared.owner).kind
        except SpecError:
            owner_kind = "module"
        return (f"it belongs to {declared.owner} ({owner_kind}), which {owner} does not contain; "
                "remove it or put that module in the spec")
    home = HOMES.get(field, Home())
    if home.decided_by_spec:
        slots = _deciding_slots(home, root, setting)
        where = f" ({'; '.join(slots)})" if slots else ""
        return f"the spec decides it{where}; change the spec or remove the field"
    if home.part and not (set(home.kinds) & kinds or set(home.readers) & names):
        return f"{owner} has no {home.part}; remove it"
    if home.only:
        return f"it takes effect only {home.only}; remove it"
    return f"it would have no effect on {owner}; remove it"


def refuse_unread(reads: FieldReads, root: Resolved) -> None:
    """SpecError listing every set config field that no module of the built model read."""
    unread = sorted((s for s in reads.unread() if isinstance(s, Setting)),
                    key=lambda s: (s.file or "", s.line or 0, s.path))
    if unread:
        raise SpecError([Problem(f"set, but no module of this model reads it: {_why(s, root)}", s.path, s.file,
                                 s.line) for s in unread])


def refuse_kept_configs(built: dict[nn.Module, tuple[str, str]], paths: dict[nn.Module, str]) -> None:
    """A module must copy the config values it needs in __init__: only reads there are seen by the builder."""
    problems = []
    for module, entry in built.items():
        for attr, value in vars(module).items():
            if isinstance(value, TransformerConfig):
                problems.append(Problem(
                    f"{entry[0]} keeps its TransformerConfig as self.{attr}; copy the values it needs in __init__ "
                    "instead (the builder checks that every config field that was set is read there)",
                    paths.get(module, "") or "<root>"))
    if problems:
        raise SpecError(problems)
