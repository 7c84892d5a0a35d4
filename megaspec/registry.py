"""The registry: spec names -> torch classes, with kinds, origins and plug-ins.

Names are one global namespace (a spec says `module: rms_norm`, not the kind),
so a taken name is an error rather than a silent overwrite. This module imports
no module or model: they import it to register themselves, and `megaspec.catalog`
imports the built-ins, before any plug-in is loaded.
"""

from __future__ import annotations

import contextvars
import importlib
import importlib.metadata
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any, TypeVar

from torch import nn

from megaspec.config import add_config_fields, remove_config_fields
from megaspec.errors import RegistryError, did_you_mean
from megaspec.kinds import KINDS as KIND_PROTOCOLS
from megaspec.kinds import contract_problems, signature_text

KINDS: tuple[str, ...] = tuple(KIND_PROTOCOLS)  # the slot kinds, in display order
PLUGIN_GROUP = "megaspec.plugins"
BUILTIN = "built-in"


@dataclass(frozen=True)
class Slot:
    """A named place for a child module, declared by the parent class.

    kind: the registry kind(s) allowed here; required: an empty slot is an
    error; many: the slot takes a list; count: for a list slot, the config
    field giving its length (a single node is then repeated that many times);
    provides: constructor arguments the parent supplies (sizes it alone knows,
    as Megatron's build_module extra args). A slot that provides arguments
    receives a ModuleFactory, which the parent calls with them. default: the
    registered name used when a spec leaves the slot out (an explicit `null`
    still empties an optional slot), so `mlp: mlp` alone is a complete node.
    """

    kind: str | tuple[str, ...]
    required: bool = True
    many: bool = False
    count: str | None = None
    provides: tuple[str, ...] = ()
    default: str | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        """The accepted kinds as a tuple."""
        return (self.kind,) if isinstance(self.kind, str) else tuple(self.kind)


@dataclass(frozen=True)
class Entry:
    """One registered name."""

    name: str
    kind: str
    cls: type[nn.Module]
    origin: str

    @property
    def qualname(self) -> str:
        """Import path of the class."""
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


_ENTRIES: dict[str, Entry] = {}
_PLUGIN_ERRORS: dict[str, str] = {}
_plugins_loaded = False
_loading_plugin: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "megaspec_loading_plugin", default=None
)
T = TypeVar("T", bound=type)


def slots_of(cls: type) -> dict[str, Slot]:
    """The slots a class declares (its `slots` class attribute)."""
    return dict(getattr(cls, "slots", {}) or {})


def _origin_for(cls: type) -> str:
    plugin = _loading_plugin.get()
    if plugin is not None:
        return f"plugin {plugin}"
    if cls.__module__ == "megaspec" or cls.__module__.startswith("megaspec."):
        return BUILTIN
    return f"user ({cls.__module__})"


def _check_slots_match_signature(cls: type, name: str) -> None:
    """Every declared slot must be an __init__ keyword, or building would fail late."""
    sig = inspect.signature(cls.__init__)
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    missing = [s for s in slots_of(cls) if s not in sig.parameters and not takes_kwargs]
    if missing:
        raise RegistryError(
            f"cannot register '{name}': {cls.__qualname__} declares slots {missing} "
            "that its __init__ does not accept"
        )
    for slot_name, slot in slots_of(cls).items():
        unknown = [k for k in slot.kinds if k not in KINDS]
        if unknown:
            raise RegistryError(
                f"cannot register '{name}': slot '{slot_name}' names unknown kind(s) {unknown}; "
                f"kinds are {', '.join(KINDS)}"
            )


def _check_contract(cls: type, name: str, kind: str) -> None:
    """A class must take the call its kind's parents make (megaspec.kinds), or building would fail late."""
    problems = contract_problems(cls, kind)
    if problems:
        raise RegistryError(
            f"cannot register '{name}' as {kind}: {cls.__qualname__} does not fit the {kind} contract "
            f"{signature_text(kind)}: {'; '.join(problems)}")


def _add_config_fields(cls: type, name: str) -> None:
    """The class's own config fields (`config_fields = {name: (type, default)}`) join TransformerConfig."""
    try:
        add_config_fields(name, getattr(cls, "config_fields", None) or {})
    except ValueError as exc:
        raise RegistryError(f"cannot register '{name}': {exc}") from None


def register(kind: str, name: str, *, override: bool = False) -> Callable[[T], T]:
    """Class decorator: make `cls` buildable as `module: name` in a spec."""
    if kind not in KINDS:
        raise RegistryError(f"unknown kind '{kind}'{did_you_mean(kind, KINDS)}; kinds are {', '.join(KINDS)}")
    if not name or "." in name:
        raise RegistryError(f"invalid name {name!r}: names are non-empty and contain no '.'")

    def decorator(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise RegistryError(f"cannot register '{name}': {cls!r} is not an nn.Module subclass")
        _check_slots_match_signature(cls, name)
        _check_contract(cls, name, kind)
        taken = _ENTRIES.get(name)
        if taken is not None and taken.cls is not cls and not override:
            raise RegistryError(
                f"name '{name}' is already registered to {taken.qualname} ({taken.kind}, "
                f"{taken.origin}); pass override=True to replace it"
            )
        _add_config_fields(cls, name)
        _ENTRIES[name] = Entry(name, kind, cls, _origin_for(cls))
        return cls

    return decorator


def unregister(name: str) -> None:
    """Remove a name and the config fields it declared (tests and interactive use)."""
    _ENTRIES.pop(name, None)
    remove_config_fields(name)


def load_plugins(force: bool = False) -> dict[str, str]:
    """Import every `megaspec.plugins` entry point once; return failures by name."""
    global _plugins_loaded
    if _plugins_loaded and not force:
        return dict(_PLUGIN_ERRORS)
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        label = f"{dist}:{ep.name}"
        token = _loading_plugin.set(label)
        try:
            obj = ep.load()
            if callable(obj) and not inspect.ismodule(obj):
                obj()
        except Exception as exc:  # a broken plug-in must not break unrelated builds
            _PLUGIN_ERRORS[label] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"megaspec plug-in {label} failed to load: {exc}", stacklevel=2)
        finally:
            _loading_plugin.reset(token)
    return dict(_PLUGIN_ERRORS)


def entries(kind: str | None = None, pattern: str = "*") -> list[Entry]:
    """Registered entries, optionally of one kind and matching a glob, sorted."""
    load_plugins()
    if kind is not None and kind not in KINDS:
        raise RegistryError(f"unknown kind '{kind}'{did_you_mean(kind, KINDS)}; kinds are {', '.join(KINDS)}")
    found = [e for e in _ENTRIES.values() if (kind is None or e.kind == kind) and fnmatch(e.name, pattern)]
    return sorted(found, key=lambda e: (KINDS.index(e.kind), e.name))


def names(kind: str | None = None) -> list[str]:
    """Registered names, optionally of one kind."""
    return [e.name for e in entries(kind)]


def _import_dotted(path: str, allow_imports: tuple[str, ...]) -> Entry:
    if not any(path == p or path.startswith(p.rstrip(".") + ".") for p in allow_imports):
        raise RegistryError(
            f"'{path}' is an import path, and import paths are refused unless their prefix is "
            "allow-listed (allow_imports in the config); register the class instead"
        )
    module_name, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RegistryError(f"cannot import '{path}': {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise RegistryError(f"'{path}' is not an nn.Module subclass")
    _check_slots_match_signature(cls, path)
    kind = getattr(cls, "megaspec_kind", None)
    if kind in KINDS:
        _check_contract(cls, path, kind)
    _add_config_fields(cls, path)
    return Entry(path, kind or "*", cls, f"import ({module_name})")


def lookup(name: str, allow_imports: tuple[str, ...] | list[str] = ()) -> Entry:
    """Resolve a spec's module name to its entry, or raise with a suggestion."""
    load_plugins()
    if name in _ENTRIES:
        return _ENTRIES[name]
    if "." in name:
        return _import_dotted(name, tuple(allow_imports))
    hint = did_you_mean(name, list(_ENTRIES))
    broken = f"; plug-ins that failed to load: {', '.join(_PLUGIN_ERRORS)}" if _PLUGIN_ERRORS else ""
    raise RegistryError(f"unknown module '{name}'{hint}; see `megaspec list`{broken}")


def iter_entries() -> Iterator[Entry]:
    """All entries in registration order (no plug-in loading)."""
    return iter(list(_ENTRIES.values()))


def params_signature(cls: type) -> dict[str, inspect.Parameter]:
    """The __init__ parameters that are params: not self, config, slots or *args."""
    sig = inspect.signature(cls.__init__)
    skip = {"self", "config", *slots_of(cls)}
    return {
        n: p
        for n, p in sig.parameters.items()
        if n not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def accepts_extra_params(cls: type) -> bool:
    """True when __init__ takes **kwargs (any param is then accepted)."""
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


def describe(entry: Entry) -> dict[str, Any]:
    """A plain-dict description of an entry (for `megaspec list --json`)."""
    return {"name": entry.name, "kind": entry.kind, "class": entry.qualname, "origin": entry.origin}
