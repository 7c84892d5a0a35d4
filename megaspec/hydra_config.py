"""What megaspec adds to Hydra composition.

- Every TransformerConfig field is present with its default: Hydra's `transformer_config`
  node (each model file lists it in its defaults), so `model.config.qk_layernorm=true`
  needs no `+`, for named configs and module-declared fields too.
- The fields a user gave (in the model file, or as an override) are told apart from
  defaults, because the builder refuses a given field that no module reads.
- A dict override of a spec node replaces the node, as its author wrote it, instead of
  merging into the node it replaces.
- Plug-in modules the caller names (`--plugins`, or `plugins:` in the caller's own
  config) are imported before anything is composed or built.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from megaspec.configs import field_defaults, is_named
from megaspec.errors import Problem, SpecError
from megaspec.registry import import_trusted
from megaspec.source import Key, SourceMap

CONFIG_DEFAULTS = "transformer_config"  # the Hydra config holding every field's default


def store_config_defaults() -> None:
    """Register `transformer_config` (every field with a default, module-declared ones included) with Hydra."""
    from hydra.core.config_store import ConfigStore

    import megaspec.catalog  # noqa: F401  (the built-in modules declare their fields when registered)
    from megaspec.registry import load_plugins

    load_plugins()
    ConfigStore.instance().store(name=CONFIG_DEFAULTS, node=field_defaults())


def _parsed(overrides: Sequence[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # Hydra reports a malformed override itself, with its own message
        return []


def overridden_keys(overrides: Sequence[str]) -> set[Key]:
    """The config keys the overrides set, as tuples ('model', 'config', 'hidden_size')."""
    keys = (text.split("=", 1)[0] for text in overrides if "=" in text and not text.startswith("~"))
    return {tuple(key.lstrip("+").split(".")) for key in keys}


def given_fields(data: Mapping[str, Any], smap: SourceMap, overridden: set[Key]) -> dict[str, Any]:
    """A composed `model.config` without the fields that only hold their defaults.

    A field counts as given when the model file sets it, an override sets it, or its
    value differs from the default (a change made in Python after composing).
    """
    defaults = field_defaults()

    def keep(fields: Mapping[str, Any], key: Key) -> dict[str, Any]:
        return {f: v for f, v in fields.items()
                if f not in defaults or v != defaults[f] or (*key, f) in smap.lines
                or ("model", *key, f) in overridden}

    if is_named(data):
        return {name: keep(fields, ("config", name)) for name, fields in data.items()}
    return keep(data, ("config",))


def _node_override(o: Any) -> bool:
    """A plain `model.spec...={...}` override: a spec node written out in full."""
    return (not o.is_delete() and not o.is_sweep_override() and isinstance(o.value(), dict)
            and o.key_or_group.startswith("model.spec"))


def node_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides, with each plain `model.spec...={...}` marked `++` so Hydra accepts a node of another shape.

    (Hydra merges a dict into the node already there, and refuses keys the old node lacks.)
    replace_nodes then puts the node in exactly as written.
    """
    out = []
    for text in overrides:
        parsed = [] if text.startswith("-") else _parsed([text])  # flags (--cfg job) are not overrides
        out.append(f"++{text}" if parsed and parsed[0].type.name == "CHANGE" and _node_override(parsed[0]) else text)
    return out


def replace_nodes(cfg: Any, overrides: Sequence[str]) -> None:
    """Make each `model.spec...={...}` override replace its node rather than merge into it.

    Hydra merges a dict into the node already there, so `mlp={module: my_mlp, params: {...}}`
    would keep the old node's submodules; a spec node written out is the whole node.
    """
    from omegaconf import OmegaConf, open_dict

    for o in _parsed(overrides):
        if _node_override(o):
            with open_dict(cfg):
                OmegaConf.update(cfg, o.key_or_group, o.value(), merge=False)


def plugins_in_overrides(overrides: Sequence[str]) -> list[str]:
    """The plug-in module names a `plugins=[...]` override lists."""
    for o in _parsed(overrides):
        if o.key_or_group == "plugins" and not o.is_delete() and not o.is_sweep_override():
            value = o.value()
            return [str(v) for v in (value if isinstance(value, list) else [value])]
    return []


def import_plugins(names: Iterable[str]) -> list[str]:
    """Import the caller's plug-in modules (importing one registers its modules); returns the names imported.

    The working directory is searched first, as `python -m` does, so a module that is
    not installed (`my_layers.py` beside the user's configs) can be named.
    """
    names = [n for n in names if n]
    problems = []
    for name in names:
        try:
            import_trusted(name)
        except Exception as exc:  # a plug-in's own error: report it, with its type
            problems.append(Problem(f"cannot import plug-in '{name}': {type(exc).__name__}: {exc}", "plugins"))
    if problems:
        raise SpecError(problems)
    return names


def plugins_option(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split `--plugins a,b` (or `--plugins=a,b`, repeatable) off a command line: (the rest, the names)."""
    rest, names = [], []
    args = iter(argv)
    for arg in args:
        if arg == "--plugins":
            value = next(args, None)
            if value is None:
                raise SpecError("--plugins needs module names: --plugins my_layers[,other]")
            names += value.split(",")
        elif arg.startswith("--plugins="):
            names += arg.removeprefix("--plugins=").split(",")
        else:
            rest.append(arg)
    return rest, [n.strip() for n in names if n.strip()]


def _flag(argv: Sequence[str], *flags: str) -> str | None:
    for i, arg in enumerate(argv):
        for flag in flags:
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def config_plugins(argv: Sequence[str], searchpath: str) -> list[str]:
    """The `plugins` list of the caller's own primary config (`--config-dir DIR --config-name NAME`), if one is given.

    Read before the real composition, so that a plug-in's config fields exist when its
    overrides are applied; overrides of `model.config` are left out of this first look.
    """
    config_dir = _flag(argv, "--config-dir", "-cd")
    config_name = _flag(argv, "--config-name", "-cn")
    if config_dir is None and config_name is None:
        return []
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from megaspec.paths import conf_dir

    primary = os.path.abspath(config_dir) if config_dir else str(conf_dir())
    overrides = [a for a in argv if "=" in a and not a.startswith(("-", "model.config", "hydra."))]
    store_config_defaults()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=primary, version_base=None):
            cfg = compose(config_name or "config", [searchpath.replace("=[", f"=[file://{conf_dir()},"), *overrides])
    except Exception:  # the real composition reports what is wrong with the config
        return []
    finally:
        GlobalHydra.instance().clear()
    return [str(p) for p in cfg.get("plugins") or ()]


# Hydra's command-line flags that take a value (--info takes one optionally).
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                "--experimental-rerun"}
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def flags_first(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the overrides): Hydra takes its overrides as one run of arguments."""
    flags, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and not arg.startswith(("~", "+")):
            flags.append(arg)
            takes = arg in _VALUE_FLAGS or (arg in ("--info", "-i") and i + 1 < len(argv)
                                            and argv[i + 1] in _INFO_CHOICES)
            if takes and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides
