"""megaspec: describe a transformer in YAML specs, build it as plain torch modules."""

from megaspec.build import build_model, build_module, meta_forward
from megaspec.checkpoint import load, save
from megaspec.compose import compose
from megaspec.config import TransformerConfig
from megaspec.errors import Problem, SpecError
from megaspec.registry import Slot, entries, lookup, register
from megaspec.spec import ModuleSpec, load_spec, parse_spec

__all__ = [
    "ModuleSpec",
    "Problem",
    "Slot",
    "SpecError",
    "TransformerConfig",
    "build_model",
    "build_module",
    "compose",
    "entries",
    "load",
    "load_spec",
    "lookup",
    "meta_forward",
    "parse_spec",
    "register",
    "save",
]
__version__ = "0.1.0"
