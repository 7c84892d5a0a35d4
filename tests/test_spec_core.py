"""Spec parsing, expansion forms, immutability and located validation errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megaspec import ModuleSpec, SpecError, build_module, load_spec
from megaspec.spec import walk

LAYER = """
module: toy_stack
submodules:
  layers:
    module: toy_layer
    submodules:
      norm: toy_norm
      attn: toy_attn
      mlp:
        module: toy_mlp
        submodules: {fc: toy_linear}
"""


def errors_of(path, config) -> list[str]:
    with pytest.raises(SpecError) as info:
        build_module(load_spec(path), config, device="meta")
    return [str(p) for p in info.value.problems]


def test_bare_string_is_a_node_and_tree_is_walkable(toys, write_yaml):
    spec = load_spec(write_yaml(LAYER))
    paths = [p for p, _ in walk(spec)]
    assert paths == ["", "layers", "layers.norm", "layers.attn", "layers.mlp", "layers.mlp.fc"]
    assert spec.submodules["layers"].submodules["norm"] == ModuleSpec("toy_norm")
    assert spec.to_dict()["submodules"]["layers"]["submodules"]["attn"] == {"module": "toy_attn"}


def test_single_node_repeats_by_config_count(toys, write_yaml):
    model = build_module(load_spec(write_yaml(LAYER)), toys, device="meta")
    assert len(model.layers) == 3
    assert model.layers[0] is not model.layers[1]  # separate modules, not shared weights


def test_explicit_list_with_repeat_and_count_check(toys, write_yaml):
    path = write_yaml("""
        module: toy_stack
        submodules:
          layers:
            - module: toy_layer
              repeat: 2
              submodules: {attn: toy_attn, mlp: {module: toy_mlp, submodules: {fc: toy_linear}}}
            - module: toy_layer
              config: {ffn_hidden_size: 99}
              submodules: {attn: toy_attn, mlp: {module: toy_mlp, submodules: {fc: toy_linear}}}
    """)
    model = build_module(load_spec(path), toys, device="meta")
    assert [layer.mlp.width for layer in model.layers] == [32, 32, 99]
    problems = errors_of(path, {**toys, "num_layers": 4})
    assert problems == [f"{path}:3: layers: 3 modules given but num_layers is 4 "
                        "(write one node to repeat it, or set num_layers)"]


def test_pattern_cycles_named_nodes(toys, write_yaml):
    path = write_yaml("""
        module: toy_stack
        submodules:
          layers:
            pattern: [a, a, b]
            nodes:
              a: {module: toy_layer, submodules: {attn: toy_attn, mlp: {module: toy_mlp, submodules: {fc: toy_linear}}}}
              b:
                module: toy_layer
                config: {num_query_groups: 1}
                submodules: {attn: toy_attn, mlp: {module: toy_mlp, submodules: {fc: toy_linear}}}
    """)
    model = build_module(load_spec(path), {**toys, "num_layers": 6}, device="meta")
    assert [layer.attn.groups for layer in model.layers] == [2, 2, 1, 2, 2, 1]


def test_wrong_param_type_names_file_line_and_path(toys, write_yaml):
    path = write_yaml("""
        module: toy_stack
        submodules:
          layers:
            - module: toy_layer
              submodules:
                attn: toy_attn
                mlp:
                  module: toy_mlp
                  params:
                    ffn_hidden_size: big
                  submodules: {fc: toy_linear}
    """)
    assert errors_of(path, {**toys, "num_layers": 1}) == [
        f"{path}:10: layers[0].mlp.params.ffn_hidden_size: expected int or None, got 'big'"
    ]


def test_unknown_missing_and_provided_params(toys, write_yaml):
    path = write_yaml("""
        module: toy_stack
        submodules:
          layers:
            module: toy_layer
            submodules:
              norm: {module: toy_norm, params: {epps: 1.0}}
              attn: {module: toy_attn, params: {mask: diagonal}}
              mlp: {module: toy_mlp, submodules: {fc: {module: toy_linear, params: {in_features: 3}}}}
    """)
    assert errors_of(path, toys) == [
        f"{path}:6: layers[*].norm.params.epps: unknown param 'epps' (did you mean 'eps'?); accepted: eps, hidden_size",
        f"{path}:7: layers[*].attn.params.mask: expected one of 'causal', 'padding', got 'diagonal'",
        f"{path}:8: layers[*].mlp.fc.params.in_features: 'in_features' is supplied by the parent toy_mlp, not the spec",
    ]


def test_slot_errors_unknown_required_and_wrong_kind(toys, write_yaml):
    path = write_yaml("""
        module: toy_stack
        submodules:
          layers:
            module: toy_layer
            submodules:
              attn: toy_mlp
              mlpp: toy_mlp
    """)
    assert errors_of(path, toys) == [
        f"{path}:7: layers[*].mlpp: toy_layer has no slot 'mlpp' (did you mean 'mlp'?); slots: norm, attn, mlp",
        f"{path}:6: layers[*].attn: 'toy_mlp' is of kind mlp, but slot 'attn' of toy_layer takes self_attention",
        f"{path}:4: layers[*].mlp: required slot 'mlp' of toy_layer is empty (needs a module of kind mlp or moe)",
    ]


def test_unknown_module_suggests_a_name(toys, write_yaml):
    path = write_yaml("""
        module: toy_stak
    """)
    (problem,) = errors_of(path, toys)
    assert problem.startswith(f"{path}:1: unknown module 'toy_stak' (did you mean 'toy_stack'?)")


def test_format_errors_are_all_reported(write_yaml):
    path = write_yaml("""
        module: toy_stack
        parms: {}
        submodules:
          layers:
            - 42
            - {module: toy_layer, repeat: 0}
    """)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:2: unknown node field 'parms' (did you mean 'params'?); a node has module, params, submodules, config, repeat",
        f"{path}:5: layers[0]: expected a module name or a mapping with 'module', got int 42",
        f"{path}:6: layers[1]: 'repeat' must be an int from 1 to 1024, got 0",
    ]


def test_invalid_yaml_names_the_line(write_yaml):
    path = write_yaml("module: x\nsubmodules: {a: [b\n")
    with pytest.raises(SpecError, match=rf"^{path}:3: invalid YAML"):
        load_spec(path)


def test_config_cross_field_rules_and_node_overrides(toys, write_yaml):
    path = write_yaml("""
        module: toy_stack
        submodules:
          layers:
            module: toy_layer
            config: {num_query_groups: 3, ffn_hiden_size: 4}
            submodules: {attn: toy_attn, mlp: {module: toy_mlp, submodules: {fc: toy_linear}}}
    """)
    assert errors_of(path, toys) == [
        f"{path}:5: layers[*].config.ffn_hiden_size: unknown config field 'ffn_hiden_size' (did you mean 'ffn_hidden_size'?)",
    ]
    with pytest.raises(SpecError, match="num_attention_heads \\(2\\) must be divisible by num_query_groups \\(3\\)"):
        build_module(load_spec(write_yaml(LAYER)), {**toys, "num_query_groups": 3}, device="meta")
    with pytest.raises(SpecError, match="hidden_size \\(9\\) must be divisible by num_attention_heads \\(2\\)"):
        build_module(load_spec(write_yaml(LAYER)), {**toys, "hidden_size": 9}, device="meta")


def test_specs_are_immutable_and_unchanged_by_building(toys, write_yaml):
    spec = load_spec(write_yaml(LAYER))
    before = spec.to_dict()
    build_module(spec, toys, device="meta")
    assert spec.to_dict() == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.module = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.submodules["layers"] = None  # type: ignore[index]


def test_meta_build_allocates_nothing_and_real_build_inits(toys, write_yaml):
    spec = load_spec(write_yaml(LAYER))
    meta = build_module(spec, toys, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    real = build_module(spec, toys)
    assert torch.equal(real.layers[0].norm.weight, torch.ones(8))


def test_pattern_read_from_a_config_field(toys, write_yaml):
    path = write_yaml("""
        module: toy_stack
        submodules:
          layers:
            pattern: num_layers
            nodes: {a: {module: toy_layer, submodules: {attn: toy_attn, mlp: toy_mlp}}}
    """)
    problems = errors_of(path, toys)
    assert problems == [f"{path}:4: layers.pattern: config field 'num_layers' does not hold a per-layer list"]


def test_named_configs_switch_per_subtree(toys, write_yaml):
    path = write_yaml("""
        module: toy_stack
        submodules:
          layers:
            - {module: toy_layer, submodules: {attn: toy_attn, mlp: toy_mlp}}
            - {module: toy_layer, config: vision, submodules: {attn: toy_attn, mlp: toy_mlp}}
            - {module: toy_layer, config: visoin, submodules: {attn: toy_attn, mlp: toy_mlp}}
    """)
    configs = {"text": toys, "vision": {**toys, "ffn_hidden_size": 5}}
    assert errors_of(path, configs) == [
        f"{path}:6: layers[2].config: no config named 'visoin' (did you mean 'vision'?); configs: text, vision"]
    spec = load_spec(path)
    ok = dataclasses.replace(spec, submodules={"layers": spec.submodules["layers"][:2] + spec.submodules["layers"][:1]})
    model = build_module(ok, configs, device="meta")
    assert [layer.mlp.width for layer in model.layers] == [32, 5, 32]
