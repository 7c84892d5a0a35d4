"""Hydra composition of conf/ + specs/, and turning a composed config into (spec, configs).

After composition `cfg.model.config` holds the TransformerConfig fields and
`cfg.model.spec` the whole spec tree inline, so any size or slot can be
overridden with Hydra's grammar. `cfg.sources` records which files were
composed, so errors can still name the file and line a value came from.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from megaspec.configs import Configs, make_configs
from megaspec.errors import Problem, SpecError
from megaspec.hydra_config import (
    given_fields,
    import_plugins,
    node_overrides,
    overridden_keys,
    plugins_in_overrides,
    replace_nodes,
    store_config_defaults,
)
from megaspec.hydra_errors import check_resolves, composition_error
from megaspec.paths import conf_dir, resource_root
from megaspec.source import COMMAND_LINE, SourceMap, load_yaml
from megaspec.spec import ModuleSpec, parse_spec

SPEC_GROUP = "specs@model.spec"


def searchpath_override() -> str:
    """The override that puts specs/ on Hydra's search path as the `specs` group."""
    return f"hydra.searchpath=[file://{resource_root()}]"


def record_sources(cfg: DictConfig, choices: Mapping[str, Any], overrides: Sequence[str] = ()) -> None:
    """Store which model and spec files were composed, and the overrides, as `cfg.sources`.

    Also makes each dict override of a spec node replace that node (see replace_nodes).
    """
    sources: dict[str, Any] = {}
    if choices.get("model"):
        sources["model"] = f"conf/model/{choices['model']}.yaml"
    if choices.get(SPEC_GROUP):
        sources["spec"] = f"specs/{choices[SPEC_GROUP]}.yaml"
    sources["overrides"] = [o for o in overrides if not o.startswith("hydra.")]
    replace_nodes(cfg, overrides)
    with open_dict(cfg):
        cfg.sources = sources


def _hydra_compose(overrides: Sequence[str], config_name: str) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    store_config_defaults()  # every TransformerConfig field, module-declared ones included, with its default
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return hydra_compose(config_name, [searchpath_override(), *overrides], return_hydra_config=True)


def _without_hydra(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """The composed config without Hydra's own node, and the group choices recorded there."""
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def _fails(overrides: Sequence[str], config_name: str = "config") -> bool:
    try:
        check_resolves(_without_hydra(_hydra_compose(node_overrides(overrides), config_name))[0])
    except Exception:
        return True
    return False


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose conf/ with Hydra overrides (the CLI's grammar) into a DictConfig.

    Any failure, composing or resolving `${...}` interpolations, is a SpecError at
    `command line` naming the override as given. Plug-in modules listed in the config's
    `plugins` (or a `plugins=[...]` override) are imported first, so their modules and
    config fields exist when the overrides apply.
    """
    overrides = [str(o) for o in overrides]
    import_plugins(plugins_in_overrides(overrides))
    cfg = _compose(overrides, config_name)
    if import_plugins(p for p in cfg.get("plugins") or () if p not in sys.modules):
        cfg = _compose(overrides, config_name)  # again, with the fields the plug-ins declare
    return cfg


def _compose(overrides: list[str], config_name: str) -> DictConfig:
    hydra_overrides = node_overrides(overrides)  # a dict override of a spec node replaces the node
    try:
        cfg = _hydra_compose(hydra_overrides, config_name)
    except Exception as exc:  # Hydra raises its own errors, OmegaConf's, and plain ValueErrors
        raise composition_error(exc, overrides, lambda some: _fails(some, config_name)) from None
    cfg, choices = _without_hydra(cfg)
    check_resolves(cfg, overrides)
    record_sources(cfg, choices, hydra_overrides)
    return cfg


def _source_map(rel: str | None, composed: bool) -> SourceMap:
    if not rel or not (resource_root() / rel).is_file():  # e.g. a model file in the user's own config dir
        return SourceMap()
    _, smap = load_yaml(resource_root() / rel, rel)
    smap.composed = composed
    return smap


def given_config(cfg: DictConfig) -> Any:
    """A composed config's `model.config` with only the fields that were given (see given_fields)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    sources = data.get("sources") or {}
    return given_fields(data["model"]["config"], _source_map(sources.get("model"), composed=True),
                        overridden_keys(sources.get("overrides") or ()))


def cfg_inputs(cfg: DictConfig | Mapping[str, Any]) -> tuple[ModuleSpec, Configs, tuple[str, ...]]:
    """(spec, configs, allow_imports) of a composed config, located in the files it was composed from."""
    if isinstance(cfg, DictConfig):
        check_resolves(cfg)  # bounded, and a SpecError for an interpolation that does not resolve
        data = OmegaConf.to_container(cfg, resolve=True)
    else:
        data = dict(cfg)
    model = data.get("model", data)
    sources = data.get("sources")
    if not isinstance(model, Mapping) or "spec" not in model or "config" not in model:
        if sources is not None:  # composed: an override removed it
            raise SpecError(Problem("the composed config has no model.spec and model.config (did an override "
                                    "remove them?)", "", COMMAND_LINE))
        raise SpecError("config has no model.spec and model.config; compose it with megaspec.compose()")
    sources = sources or {}
    spec = parse_spec(model["spec"], _source_map(sources.get("spec"), composed=True))
    smap = _source_map(sources.get("model"), composed=True)
    fields = model["config"]
    if "sources" in data:  # composed: every field is present, most only with its default
        fields = given_fields(fields, smap, overridden_keys(sources.get("overrides") or ()))
    configs = make_configs(fields, smap, ("config",))
    allow = data.get("allow_imports") or ()
    if not isinstance(allow, (list, tuple)) or not all(isinstance(a, str) and a for a in allow):
        raise SpecError(Problem(f"allow_imports: expected a list of import-path prefixes, got {allow!r}", "",
                                COMMAND_LINE if sources else None))
    return spec, configs, tuple(allow)


def models_using_spec(spec_file: Path) -> list[str]:
    """Names of conf/model entries whose defaults pick this spec file."""
    found = []
    for model_file in sorted((conf_dir() / "model").glob("*.yaml")):
        data, _ = load_yaml(model_file)
        for item in (data or {}).get("defaults", []) or []:
            if isinstance(item, Mapping) and item.get("/specs@spec") == spec_file.stem:
                found.append(model_file.stem)
    return found
