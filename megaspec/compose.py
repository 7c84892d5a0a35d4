"""Hydra composition of conf/ + specs/, and turning a composed config into (spec, configs).

After composition `cfg.model.config` holds the TransformerConfig fields and
`cfg.model.spec` the whole spec tree inline, so any size or slot can be
overridden with Hydra's grammar. `cfg.sources` records which files were
composed, so errors can still name the file and line a value came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from megaspec.configs import Configs, make_configs
from megaspec.errors import Problem, SpecError
from megaspec.paths import conf_dir, resource_root
from megaspec.source import SourceMap, load_yaml
from megaspec.spec import ModuleSpec, parse_spec

SPEC_GROUP = "specs@model.spec"


def searchpath_override() -> str:
    """The override that puts specs/ on Hydra's search path as the `specs` group."""
    return f"hydra.searchpath=[file://{resource_root()}]"


def record_sources(cfg: DictConfig, choices: Mapping[str, Any]) -> None:
    """Store which model and spec files were composed, as `cfg.sources`."""
    sources = {}
    if choices.get("model"):
        sources["model"] = f"conf/model/{choices['model']}.yaml"
    if choices.get(SPEC_GROUP):
        sources["spec"] = f"specs/{choices[SPEC_GROUP]}.yaml"
    with open_dict(cfg):
        cfg.sources = sources


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose conf/ with Hydra overrides (the CLI's grammar) into a DictConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = hydra_compose(config_name, [searchpath_override(), *overrides], return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise SpecError(Problem(f"{exc}".strip(), "", "command line")) from None
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    record_sources(cfg, choices)
    return cfg


def _source_map(rel: str | None, composed: bool) -> SourceMap:
    if not rel:
        return SourceMap()
    _, smap = load_yaml(resource_root() / rel, rel)
    smap.composed = composed
    return smap


def cfg_inputs(cfg: DictConfig | Mapping[str, Any]) -> tuple[ModuleSpec, Configs, tuple[str, ...]]:
    """(spec, configs, allow_imports) of a composed config, located in the files it was composed from."""
    if isinstance(cfg, DictConfig):
        data = OmegaConf.to_container(cfg, resolve=True)
    else:
        data = dict(cfg)
    model = data.get("model", data)
    if not isinstance(model, Mapping) or "spec" not in model or "config" not in model:
        raise SpecError("config has no model.spec and model.config; compose it with megaspec.compose()")
    sources = data.get("sources") or {}
    spec = parse_spec(model["spec"], _source_map(sources.get("spec"), composed=True))
    configs = make_configs(model["config"], _source_map(sources.get("model"), composed=True), ("config",))
    return spec, configs, tuple(data.get("allow_imports") or ())


def models_using_spec(spec_file: Path) -> list[str]:
    """Names of conf/model entries whose defaults pick this spec file."""
    found = []
    for model_file in sorted((conf_dir() / "model").glob("*.yaml")):
        data, _ = load_yaml(model_file)
        for item in (data or {}).get("defaults", []) or []:
            if isinstance(item, Mapping) and item.get("/specs@spec") == spec_file.stem:
                found.append(model_file.stem)
    return found
