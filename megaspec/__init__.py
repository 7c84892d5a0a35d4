"""megaspec: describe a transformer in YAML specs, build it as plain torch modules."""

import megaspec.catalog  # noqa: F401  (registers the built-in modules before any plug-in or lookup)
from megaspec.build import build_module, meta_forward
from megaspec.cache import Cache, ContextCache, KVCache
from megaspec.checkpoint import load, save
from megaspec.compose import compose
from megaspec.config import TransformerConfig
from megaspec.errors import Problem, SpecError
from megaspec.generation import generate
from megaspec.inputs import build_model
from megaspec.record import BuildRecord, build_record
from megaspec.registry import Slot, entries, lookup, register
from megaspec.spec import ModuleSpec, load_spec, parse_spec

__all__ = [
    "BuildRecord",
    "Cache",
    "ContextCache",
    "KVCache",
    "ModuleSpec",
    "Problem",
    "Slot",
    "SpecError",
    "TransformerConfig",
    "build_model",
    "build_module",
    "build_record",
    "compose",
    "entries",
    "generate",
    "load",
    "load_spec",
    "lookup",
    "meta_forward",
    "parse_spec",
    "register",
    "save",
]
__version__ = "0.1.0"
