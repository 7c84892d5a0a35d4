"""Property-based fuzzing: whatever the spec bytes, spec tree or override list, the result is a model or a SpecError.

Corrupted spec files go through load_spec; mutated spec trees through parse_spec and
validation; random override lists through compose; whatever survives is built on the
meta device. Any other exception fails the test with the example that raised it, and
hypothesis' deadline bounds the time of each example (a hang guard, not a speed goal).
Derandomized with fixed example budgets, so every run tries the same inputs.
"""

from __future__ import annotations

import copy
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import TINY

import megaspec
from megaspec import SpecError, build_module, load_spec, parse_spec
from megaspec.compose import cfg_inputs, compose
from megaspec.registry import names

REPO = Path(__file__).resolve().parent.parent
COMPOSED = {name: compose(TINY[name]) for name in TINY}
SPECS = {name: (REPO / cfg.sources.spec).read_bytes() for name, cfg in COMPOSED.items()}  # the spec each model uses
CONFIGS = {name: cfg_inputs(cfg)[1] for name, cfg in COMPOSED.items()}


def fuzz(examples: int):
    return settings(max_examples=examples, derandomize=True, database=None, deadline=timedelta(seconds=20),
                    suppress_health_check=list(HealthCheck), print_blob=True)


def build_or_spec_error(build) -> None:
    """The property: `build()` returns, or raises SpecError; anything else propagates and fails the test."""
    try:
        build()
    except SpecError as exc:
        assert exc.problems and all(str(p) for p in exc.problems)


# ---------------------------------------------------------------- spec files, corrupted byte by byte

TOKENS = [b"&a ", b"*a", b"<<: *a\n", b"!!python/object/apply:os.system [ls] ", b"!tag ", b"\t", b"\x00", b"\x07",
          b"\xef\xbb\xbf", b"\xff", b"[", b"]", b"{", b"}", b"- ", b": ", b"\n---\n", b"repeat: 1000000000\n",
          b"? ", b"'", b'"', b"#", b"|\n", b">\n", b"%YAML 1.1\n", b"\r", b"\xe2\x80\xa8", b"1e400", b".nan", b"true"]


@st.composite
def corrupted_spec(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(SPECS)))
    data = bytearray(SPECS[name])
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "token", "delete", "truncate", "duplicate"]))
        if op == "flip" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        elif op == "token":
            data[pos:pos] = draw(st.sampled_from(TOKENS))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 40))]
        elif op == "truncate":
            del data[pos:]
        elif op == "duplicate":
            end = min(len(data), pos + draw(st.integers(1, 200)))
            data[end:end] = data[pos:end]
    return name, bytes(data)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


@fuzz(150)
@given(corrupted_spec())
def test_corrupted_spec_files(scratch, case) -> None:
    name, data = case
    path = scratch / f"{name}.yaml"
    path.write_bytes(data)
    build_or_spec_error(lambda: build_module(load_spec(path), CONFIGS[name], device="meta"))


# ---------------------------------------------------------------- spec trees, mutated

REGISTERED = sorted(names())
PARAMS = ["eps", "hidden_size", "attn_mask_type", "bias", "tied", "image_token_index", "vision_feature_layer",
          "ffn_hidden_size", "num_heads", "dropout", "scale", "in_features", "out_features"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0, 10**9, 2**64, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(REGISTERED),
    st.text(max_size=12), st.sampled_from(["module", "params", "submodules", "config", "repeat", "pattern", "nodes",
                                           "os.system", "subprocess.Popen", "causal", "vision", "language"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=10), SCALARS.filter(
        lambda v: v is None or isinstance(v, (str, int, bool))), st.sampled_from(
        ["module", "params", "submodules", "config", "repeat", "num_layers", "hidden_size"])), inner, max_size=4)),
    max_leaves=12)


def locations(data: Any, path: tuple = ()) -> list[tuple]:
    """Every path into plain data (mapping keys and list indices)."""
    out = [path]
    if isinstance(data, dict):
        for key, value in data.items():
            out += locations(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out += locations(value, (*path, i))
    return out


@st.composite
def mutated_tree(draw) -> tuple[str, Any]:
    name = draw(st.sampled_from(sorted(SPECS)))
    tree = load_spec(REPO / COMPOSED[name].sources.spec).to_dict()
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(locations(tree)))
        if not where:
            tree = draw(VALUES)
            continue
        parent = tree
        for key in where[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["replace", "delete", "add", "copy", "module", "params"]))
        node = parent[where[-1]]
        if op == "module" and (isinstance(node, str) or (isinstance(node, dict) and "module" in node)):
            # Another registered module in the same place: deeper into validation and construction.
            name_ = draw(st.sampled_from([*REGISTERED, "os.system", "megaspec.modules.norm.LayerNorm"]))
            parent[where[-1]] = name_ if isinstance(node, str) else {**node, "module": name_}
        elif op == "params" and isinstance(node, dict) and "module" in node:
            node["params"] = draw(st.dictionaries(st.sampled_from(PARAMS), SCALARS, max_size=3))
        elif op == "replace":
            parent[where[-1]] = draw(VALUES)
        elif op == "delete":
            del parent[where[-1]]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["repeat", "config", "params", "extra", "pattern"]))] = draw(VALUES)
        elif op == "copy":  # a subtree somewhere else: deep and wide trees, or a node where a value was
            parent[where[-1]] = copy.deepcopy(draw(st.sampled_from([tree, parent])))
        if not isinstance(tree, (dict, str)):
            break
    return name, tree


@fuzz(150)
@given(mutated_tree())
def test_mutated_spec_trees(case) -> None:
    name, tree = case
    build_or_spec_error(lambda: build_module(parse_spec(tree), CONFIGS[name], device="meta"))


# ---------------------------------------------------------------- override lists

KEYS = ["model.config.num_layers", "model.config.hidden_size", "model.config.num_attention_heads",
        "model.config.num_query_groups", "model.config.layernorm_epsilon", "model.config.rotary_base",
        "model.config.window_size", "model.config.moe_layer_freq", "model.config.params_dtype",
        "model.spec.submodules.decoder.submodules.layers.submodules.mlp",
        "model.spec.submodules.decoder.submodules.layers.repeat", "model.spec.submodules.output_layer",
        "model.spec", "model.config", "model", "allow_imports", "build.seq_len", "a", "a.b"]
OVERRIDE_VALUES = st.one_of(
    st.integers(-2, 70).map(str), st.sampled_from(["1000000000", "1e400", "nan", "-inf", "true", "null", "[]",
                                                   "[1,2]", "{module: mlp}", "{a: ${a}}", "${model.config}",
                                                   "${nope}", "${oc.env:HOME}", "'${a}'", "???", "[", "}",
                                                   "mlp", "os.system", "gpt2", "llama", "bert", "t5", "''"]),
    st.sampled_from(REGISTERED), st.text(alphabet="ab1=,[]{}$:'\" ~+@.", max_size=8))


@st.composite
def override_list(draw) -> list[str]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(KEYS))
        form = draw(st.sampled_from(["set", "set", "add", "force", "delete", "group"]))
        if form == "delete":
            out.append(f"~{key}")
        elif form == "group":
            out.append(f"{draw(st.sampled_from(['model', 'specs@model.spec', 'trainer']))}="
                       f"{draw(st.sampled_from(['gpt2', 'llama', 'nope', '[gpt2,llama]', '']))}")
        else:
            prefix = {"set": "", "add": "+", "force": "++"}[form]
            out.append(f"{prefix}{key}={draw(OVERRIDE_VALUES)}")
    return out


@fuzz(40)
@given(st.sampled_from(["gpt2", "llama", "t5"]), override_list())
def test_random_override_lists(model, overrides) -> None:
    def build() -> None:
        cfg = compose([*TINY[model], *overrides])
        megaspec.build_model(cfg, device="meta")

    build_or_spec_error(build)
