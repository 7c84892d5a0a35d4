"""JSON Schema of the spec file format, so editors complete and check spec files.

These pydantic models describe the YAML as written (before expansion); the
parser in spec.py turns it into the immutable ModuleSpec tree.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class ModuleSpec(BaseModel):
    """A spec node."""

    model_config = ConfigDict(extra="forbid")
    module: str = Field(description="A registered module name (see `megaspec list`).")
    params: dict[str, Any] = Field(default_factory=dict, description="Arguments of the module's constructor.")
    submodules: dict[str, Slot] = Field(default_factory=dict, description="Children by slot name.")
    config: Union[dict[str, Any], str] = Field(
        default_factory=dict, description="TransformerConfig fields overridden for this subtree, or a config's name.")
    repeat: PositiveInt | None = Field(None, description="In a list slot: how many copies of this node.")


class Pattern(BaseModel):
    """A list slot as a pattern of named nodes, cycled to the parent's count."""

    model_config = ConfigDict(extra="forbid")
    pattern: Union[list[Union[str, int]], str] = Field(
        description="Node names, one per layer, cycled; or a config field holding one name per layer.")
    nodes: dict[str, Union[str, ModuleSpec]]


Slot = Union[None, str, ModuleSpec, list[Union[str, ModuleSpec]], Pattern]
ModuleSpec.model_rebuild()
Pattern.model_rebuild()


def json_schema() -> dict[str, Any]:
    """JSON Schema of the spec file format, with registered names as completions."""
    from pydantic import TypeAdapter

    from megaspec.config import TransformerConfig
    from megaspec.registry import entries

    schema = TypeAdapter(Union[str, ModuleSpec]).json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "megaspec spec file"
    defs = schema.setdefault("$defs", {})
    names = [e.name for e in entries()]
    node = defs["ModuleSpec"]["properties"]
    # Editors complete from `examples`; an enum would reject plug-ins not installed yet.
    node["module"]["examples"] = names
    node["config"] = {"anyOf": [{"$ref": "#/$defs/ConfigOverrides"}, {"type": "string"}],
                      "description": node["config"]["description"]}
    overrides = TransformerConfig.model_json_schema()
    overrides.pop("required", None)
    overrides["title"] = "ConfigOverrides"
    defs.update(overrides.pop("$defs", {}))
    defs["ConfigOverrides"] = overrides
    return schema
