"""Hostile spec files, values and overrides: each a SpecError naming the file and line (or the override).

A spec is data from a possible stranger: it must never run code (marker files prove
nothing ran), never make megaspec expand or allocate without bound, and every bad
byte, tag, type or override must be a located SpecError, never a traceback.
"""

from __future__ import annotations

import time
import tracemalloc

import pytest

import megaspec
from megaspec import SpecError, build_module, load_spec
from megaspec.compose import compose
from megaspec.paths import conf_dir

LAYER = """\
module: toy_stack
submodules:
  layers:
    module: toy_layer
    submodules: {attn: toy_attn, mlp: toy_mlp}
"""


def error_of(call) -> str:
    with pytest.raises(SpecError) as info:
        call()
    return str(info.value)


def write(tmp_path, data: bytes | str, name: str = "spec.yaml"):
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# ---------------------------------------------------------------- bytes, tags and documents

@pytest.mark.parametrize("data, message", [
    (b"module: toy_stack\nsubmodules:\n  x: \xff\xfe\n", "3: not UTF-8 text: byte 0xff cannot be decoded"),
    (b"\xef\xbb\xbfmodule: toy_norm\n", "1: starts with a byte order mark (BOM); save the file as UTF-8 without one"),
    (b"module: toy_norm\nparams: {eps: \x07}\n",
     "2: control character U+0007 at column 15; a YAML file here holds printable text only"),
    (b"module: toy_norm\r\nparams: {eps: 1.0\xe2\x80\xa8}\n",
     "2: control character U+2028 at column 18; a YAML file here holds printable text only"),
    (b"module: toy_norm\nparams:\n  eps: !half 0.5\n",
     "3: YAML tag '!half' is not allowed: only plain data (strings, numbers, booleans, null, lists and mappings)"),
    (b"module: toy_norm\nparams: !!set {a, b}\n",
     "2: YAML tag '!!set' is not allowed: only plain data (strings, numbers, booleans, null, lists and mappings)"),
    (b"module: toy_norm\n---\nmodule: toy_mlp\n", "2: a second YAML document starts here; the file must hold exactly one"),
    (b"", "1: the file is empty; a spec (a node: module, params, submodules) is a YAML mapping"),
    (b"# only a comment\n", "1: the file is empty; a spec (a node: module, params, submodules) is a YAML mapping"),
    (b"- module: toy_norm\n", "1: a spec (a node: module, params, submodules) is a YAML mapping, but the file holds a list"),
    (b"toy_norm\n", "1: a spec (a node: module, params, submodules) is a YAML mapping, but the file holds "
                    "str 'toy_norm'"),
    (b"module: toy_norm\nparams: {eps: *nope}\n", "2: alias '*nope' refers to no anchor '&nope' defined before it"),
    (b"module: toy_norm\n? [a, b]\n: 1\n", "2: a mapping key must be a plain value, not a list or mapping"),
    (b"module: toy_norm\nparams: {eps: !!int abc}\n", "2: 'abc' is not a valid !!int"),
    (b"module: toy_norm\nparams: {eps: " + b"[" * 120 + b"]" * 120 + b"}\n", "2: nested more than 100 levels deep"),
])
def test_bad_bytes_tags_and_documents_name_file_and_line(tmp_path, data, message) -> None:
    path = write(tmp_path, data)
    assert error_of(lambda: load_spec(path)) == f"{path}:{message}"


def test_python_tags_run_no_code(tmp_path) -> None:
    marker = tmp_path / "marker"
    path = write(tmp_path, f'module: toy_norm\nparams:\n  eps: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert error_of(lambda: load_spec(path)) == (
        f"{path}:3: YAML tag '!!python/object/apply:os.system' is not allowed: only plain data (strings, numbers, "
        "booleans, null, lists and mappings)")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["a-fifo", "a-directory", "missing.yaml"])
def test_files_that_are_not_regular_are_refused_without_reading(tmp_path, name) -> None:
    import os

    path = tmp_path / name
    if name == "a-fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer forever
    elif name == "a-directory":
        path.mkdir()
    reason = "No such file or directory" if name == "missing.yaml" else "not a regular file"
    assert error_of(lambda: load_spec(path)) == f"{path}: cannot read file: {reason}"


def test_oversized_file_is_refused_before_reading(tmp_path) -> None:
    from megaspec.source import MAX_FILE_BYTES

    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    assert error_of(lambda: load_spec(path)) == (
        f"{path}: file is larger than {MAX_FILE_BYTES:,} bytes; refusing to read it")


# ---------------------------------------------------------------- anchors, aliases and merge keys

def laughs(levels: int = 9) -> str:
    """A "billion laughs" document: nine aliases of nine aliases of ... (9**9 strings when expanded)."""
    rows = ["  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    rows += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "module: toy_norm\nparams:\n" + "\n".join(rows) + "\n"


def test_billion_laughs_stops_early(tmp_path) -> None:
    path = write(tmp_path, laughs())
    start = time.perf_counter()
    message = error_of(lambda: load_spec(path))
    elapsed = time.perf_counter() - start
    assert message == (f"{path}:8: the document expands to more than 100,000 values (aliases included); refusing "
                       "to expand it")
    assert elapsed < 5, f"{elapsed:.1f} s"  # a hang guard: the bound makes it a fraction of a second


def test_recursive_alias_names_its_line(tmp_path) -> None:
    path = write(tmp_path, "module: toy_norm\nparams:\n  eps: &loop\n    - 1\n    - *loop\n")
    assert error_of(lambda: load_spec(path)) == (
        f"{path}:5: recursive alias '*loop': it is inside the node its anchor '&loop' names")


def test_merge_keys_work_and_keep_lines(toys, tmp_path) -> None:
    merged = write(tmp_path, """\
module: toy_stack
submodules:
  layers:
    - &dense {module: toy_layer, submodules: {attn: toy_attn, mlp: toy_mlp}}
    - <<: *dense
      repeat: 2
    - <<: [{module: toy_layer}, *dense]
      submodules: {attn: {module: toy_attn, params: {mask: padding}}, mlp: toy_mlp}
""", "merged.yaml")
    explicit = write(tmp_path, """\
module: toy_stack
submodules:
  layers:
    - {module: toy_layer, submodules: {attn: toy_attn, mlp: toy_mlp}}
    - {module: toy_layer, submodules: {attn: toy_attn, mlp: toy_mlp}, repeat: 2}
    - module: toy_layer
      submodules: {attn: {module: toy_attn, params: {mask: padding}}, mlp: toy_mlp}
""", "explicit.yaml")
    assert load_spec(merged).to_dict() == load_spec(explicit).to_dict()
    model = build_module(load_spec(merged), {**toys, "num_layers": 4}, device="meta")
    assert [layer.attn.mask for layer in model.layers] == ["causal", "causal", "causal", "padding"]
    # A value merged in is located where the anchor wrote it.
    bad = write(tmp_path, "module: toy_stack\nbase: &b {mask: sideways}\nsubmodules:\n  layers:\n"
                          "    module: toy_layer\n    submodules:\n      attn: {module: toy_attn, params: {<<: *b}}\n"
                          "      mlp: toy_mlp\n", "bad.yaml")
    assert error_of(lambda: load_spec(bad)) == (
        f"{bad}:2: unknown node field 'base'; a node has module, params, submodules, config, repeat")


def test_merge_of_a_scalar_is_an_error_at_its_line(tmp_path) -> None:
    path = write(tmp_path, "module: toy_norm\nparams:\n  <<: 3\n")
    assert error_of(lambda: load_spec(path)) == (
        f"{path}:3: a merge key '<<' takes a mapping or a list of mappings (e.g. '<<: *defaults')")


# ---------------------------------------------------------------- sizes: nothing built before they are checked

def bounded(call, limit_bytes: int = 50 * 2**20) -> str:
    """The SpecError `call` raises, asserting Python allocated under `limit_bytes` on the way."""
    tracemalloc.start()
    try:
        message = error_of(call)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit_bytes, f"peak {peak / 2**20:.0f} MiB"
    return message


def test_huge_repeat_is_refused_at_parse_time(toys, tmp_path) -> None:
    path = write(tmp_path, "module: toy_stack\nsubmodules:\n  layers:\n    - {module: toy_layer, repeat: 1000000000}\n")
    assert bounded(lambda: load_spec(path)) == (
        f"{path}:4: layers[0]: 'repeat' must be an int from 1 to 1024, got 1000000000")


def test_huge_layer_count_is_refused_before_any_list(toys, tmp_path) -> None:
    path = write(tmp_path, LAYER)
    assert bounded(lambda: build_module(load_spec(path), {**toys, "num_layers": 10**9}, device="meta")) == (
        "config: num_layers (1,000,000,000) must be at most 1024")
    item = "    - {module: toy_layer, repeat: 1000, submodules: {attn: toy_attn, mlp: toy_mlp}}\n"
    many = write(tmp_path, "module: toy_stack\nsubmodules:\n  layers:\n" + item * 3, "many.yaml")
    assert bounded(lambda: build_module(load_spec(many), toys, device="meta")) == (
        f"{many}:3: layers: 3000 modules given but num_layers is 3 (write one node to repeat it, or set num_layers)")


def test_huge_layer_count_from_the_command_line(tmp_path) -> None:
    cfg = compose(["model=mixtral", "model.config.num_layers=1000000000"])
    message = bounded(lambda: megaspec.build_model(cfg, device="meta"))
    assert message == "command line: config: num_layers (1,000,000,000) must be at most 1024"


# ---------------------------------------------------------------- strict values

SIZES = "config: {num_layers: 1, hidden_size: 8, num_attention_heads: 2, vocab_size: 16}"


@pytest.mark.parametrize("text, message", [
    ("params: {eps: true}", "2: params.eps: expected float, got True"),
    ("params: {eps: .nan}", "2: params.eps: expected float (finite), got nan"),
    ("params: {eps: -.inf}", "2: params.eps: expected float (finite), got -inf"),
    ("params: {hidden_size: 8.0}", "2: params.hidden_size: expected int or None, got 8.0"),
    ("params: {hidden_size: '8'}", "2: params.hidden_size: expected int or None, got '8'"),
])
def test_params_are_strict(toys, tmp_path, text, message) -> None:
    path = write(tmp_path, f"module: toy_norm\n{text}\n{SIZES}\n")
    assert error_of(lambda: megaspec.build_model(path, device="meta")) == f"{path}:{message}"


@pytest.mark.parametrize("fields, message", [
    ("num_layers: true", "config.num_layers: expected int, got True"),
    ("hidden_size: 8.0", "config.hidden_size: expected int, got 8.0"),
    ("vocab_size: '16'", "config.vocab_size: expected int, got '16'"),
    ("gated_linear_unit: 1", "config.gated_linear_unit: expected bool, got 1"),
    ("layernorm_epsilon: .nan", "config.layernorm_epsilon: expected float (finite), got nan"),
    ("hidden_dropout: .inf", "config.hidden_dropout: expected float (finite), got inf"),
    ("rotary_base: 0", "config: rotary_base must be positive, got 0.0"),
    ("init_method_std: -0.02", "config: init_method_std must be >= 0, got -0.02"),
    ("rope_scaling: {factor: 8.0, low_freq_factor: 4.0, high_freq_factor: 1.0}",
     "config.rope_scaling: rope_scaling needs 0 < low_freq_factor < high_freq_factor, got 4.0, 1.0"),
])
def test_config_fields_are_strict_and_physical(toys, tmp_path, fields, message) -> None:
    sizes = {"num_layers": "1", "hidden_size": "8", "num_attention_heads": "2"}
    sizes.pop(fields.partition(":")[0], None)
    path = write(tmp_path, f"module: toy_norm\nconfig: {{{', '.join(f'{k}: {v}' for k, v in sizes.items())}, "
                           f"{fields}}}\n")
    assert error_of(lambda: megaspec.build_model(path, device="meta")) == f"{path}:2: {message}"


def test_exponent_floats_are_floats(toys, tmp_path) -> None:
    """YAML 1.1 reads `1e-6` as a string; a float param and a float config field both take it as 1e-06."""
    sizes = "config: {num_layers: 1, hidden_size: 8, num_attention_heads: 2"
    param = megaspec.build_model(write(tmp_path, f"module: toy_norm\nparams: {{eps: 1e-6}}\n{sizes}}}\n"), device="meta")
    field = megaspec.build_model(write(tmp_path, f"module: layer_norm\n{sizes}, layernorm_epsilon: 1e-6}}\n"),
                                 device="meta")
    assert param.eps == 1e-6 and field.eps == 1e-6 and megaspec.build_record(field).config.layernorm_epsilon == 1e-6


# ---------------------------------------------------------------- overrides

@pytest.mark.parametrize("overrides, message", [
    (["model.config.num_layers=true"], "command line: config.num_layers: expected int, got True"),
    (["model.config.layernorm_epsilon=nan"], "command line: config.layernorm_epsilon: expected float (finite), got nan"),
    (["~model.config.num_layers"], "command line: config.num_layers: missing required config field 'num_layers'"),
    (["model.spec=3"], "command line: expected a module name or a mapping with 'module', got int 3"),
    (["~model.config"], "command line: the composed config has no model.spec and model.config (did an override "
                        "remove them?)"),
])
def test_values_from_overrides_are_blamed_on_the_command_line(overrides, message) -> None:
    assert error_of(lambda: megaspec.build_model(compose(overrides), device="meta")) == message


# Each failure of composition: (overrides as typed, the override named, the start of the reason).
COMPOSITION = [
    (["model.config.num_layers=2", "model.config.x=["], "model.config.x=[", "no viable alternative at input '['"),
    (["a b"], "a b", "LexerNoViableAltException: a b"),
    (["model=nope"], "model=nope", "In 'config': Could not find 'model/nope'. Available options in 'model': "
                                   + ", ".join(sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml")))),
    (["specs@model.spec=nope"], "specs@model.spec=nope", "In 'model/gpt2': Could not find 'specs/nope'"),
    (["model.config.num_layerz=3"], "model.config.num_layerz=3", "Could not override 'model.config.num_layerz'. "
                                                                  "To append to your config use +model.config.num_layerz=3"),
    (["~model.config.nope"], "~model.config.nope", "Could not delete from config. 'model.config.nope' does not exist."),
    (["+model.config.num_layers=3"], "+model.config.num_layers=3", "Could not append to config. An item is already "
                                                                   "at 'model.config.num_layers'."),
    (["model.config=[1,2]"], "model.config=[1,2]", "Error merging override model.config=[1,2]; Cannot merge "
                                                   "DictConfig with ListConfig (at model.config)"),
    (["model=[gpt2,llama]"], "model=[gpt2,llama]", "Multiple values for specs@model.spec."),
    (["specs@=3"], "specs@=3", "Config group override must be a string or a list. Got int"),
    (["model.config.hidden_size=64", "model.config.num_layers=${nope}"], "model.config.num_layers=${nope}",
     "Interpolation key 'nope' not found (at model.config.num_layers)"),
    (["+a=${b}", "+b=${a}"], "+a=${b}", "Recursive interpolation detected (at a)"),
    (["model.config.num_layers='${oc.env:MEGASPEC_NO_SUCH_VARIABLE}'"],
     "model.config.num_layers='${oc.env:MEGASPEC_NO_SUCH_VARIABLE}'",
     "KeyError raised while resolving interpolation: \"Environment variable 'MEGASPEC_NO_SUCH_VARIABLE' not found\""),
]


@pytest.mark.parametrize("overrides, culprit, reason", COMPOSITION)
def test_composition_failures_name_the_override(overrides, culprit, reason) -> None:
    message = error_of(lambda: compose(overrides))
    assert message.startswith(f"command line: {culprit}: {reason}"), message
    assert "\n" not in message and "HYDRA_FULL_ERROR" not in message and "search path" not in message


def test_interpolations_cannot_expand_without_bound() -> None:
    doubling = ["+x0=[1,1,1,1,1,1,1,1,1,1]"] + [f"+x{i}=[{','.join(['${x%d}' % (i - 1)] * 10)}]" for i in range(1, 8)]
    start = time.perf_counter()
    assert error_of(lambda: compose(doubling)) == (
        "command line: the composed config expands to more than 10,000 values (interpolations included); "
        "refusing to expand it")
    assert time.perf_counter() - start < 30  # a hang guard: 10**8 values would take hours
