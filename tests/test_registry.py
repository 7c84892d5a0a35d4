"""Registry: name conflicts, kinds, listing, import-path allow-list, entry-point plug-ins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

import megaspec
from megaspec import SpecError, build_module, load_spec, register
from megaspec.registry import RegistryError, entries, lookup, unregister

PLUGIN_SRC = Path(__file__).parent / "plugin_pkg"


class Custom(nn.Module):
    """An unregistered module reachable only by import path."""

    megaspec_kind = "norm"

    def __init__(self, config: megaspec.TransformerConfig, hidden_size: int | None = None) -> None:
        super().__init__()


def test_taken_name_raises_unless_override(toys):
    with pytest.raises(RegistryError, match="name 'toy_norm' is already registered to .*ToyNorm \\(norm, user"):

        @register("norm", "toy_norm")
        class Other(nn.Module):
            def __init__(self, config) -> None:
                super().__init__()

    @register("norm", "toy_norm", override=True)
    class Replacement(nn.Module):
        def __init__(self, config) -> None:
            super().__init__()

    assert lookup("toy_norm").cls is Replacement


def test_builtin_names_cannot_be_taken_silently():
    with pytest.raises(RegistryError, match="name 'rms_norm' is already registered .*built-in"):

        @register("norm", "rms_norm")
        class Mine(nn.Module):
            def __init__(self, config) -> None:
                super().__init__()


def test_unknown_kind_and_bad_slot_declarations():
    with pytest.raises(RegistryError, match="unknown kind 'nrom' \\(did you mean 'norm'\\?\\)"):
        register("nrom", "x")
    with pytest.raises(RegistryError, match="declares slots \\['inner'\\] that its __init__ does not accept"):

        @register("mlp", "bad_slots")
        class Bad(nn.Module):
            slots = {"inner": megaspec.Slot("mlp")}

            def __init__(self, config) -> None:
                super().__init__()


def test_entries_have_kind_class_and_origin():
    by_name = {e.name: e for e in entries()}
    assert by_name["self_attention"].kind == "self_attention"
    assert by_name["cross_attention"].kind == "cross_attention"
    assert by_name["sdpa"].kind == "core_attention"
    assert by_name["gpt_model"].origin == "built-in"
    assert {e.name for e in entries("norm")} >= {"layer_norm", "rms_norm"}
    kinds = {e.kind for e in entries()}
    assert kinds >= {"model", "embedding", "position_embedding", "block", "layer", "self_attention", "cross_attention",
                     "core_attention", "mlp", "norm", "linear", "activation", "head"}


def test_import_paths_refused_unless_allow_listed(write_yaml):
    path = write_yaml("module: tests.test_registry.Custom\n")
    spec = load_spec(path)
    with pytest.raises(SpecError, match="import paths are refused unless you allow their prefix"):
        build_module(spec, {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2})
    sys.path.insert(0, str(Path(__file__).parent.parent))
    try:
        model = build_module(spec, {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2},
                             allow_imports=["tests.test_registry"])
    finally:
        sys.path.pop(0)
    assert type(model).__name__ == "Custom"
    with pytest.raises(SpecError, match="refused"):
        lookup("tests.test_registrynot.Custom", allow_imports=["tests.test_registry"])


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The demo plug-in package installed (with its entry points) into a fresh directory."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(PLUGIN_SRC)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return target


def _run(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "megaspec", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_installed_plugin_shows_in_list_without_import(plugin_site, tmp_path):
    result = _run(["list"], plugin_site, tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows["demo_mlp"][1:] == ["mlp", "megaspec_demo_plugin.layers.DemoMlp",
                                    "plugin", "megaspec-demo-plugin:layers"]
    assert rows["demo_norm"][1] == "norm"
    assert rows["demo_norm"][3:] == ["plugin", "megaspec-demo-plugin:extra"]
    assert rows["rms_norm"][3] == "built-in"


def test_installed_plugin_fills_a_slot_from_the_command_line(plugin_site, tmp_path):
    result = _run(["build", "model.config.num_layers=2", "model.config.hidden_size=64",
                   "model.config.num_attention_heads=4", "model.config.vocab_size=100",
                   "~model.config.ffn_hidden_size",  # demo_mlp has no hidden layer to size
                   "model.spec.submodules.decoder.submodules.layers.submodules.mlp=demo_mlp",
                   "build.seq_len=8"], plugin_site, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "mlp: demo_mlp" in result.stdout


def test_unregister_removes_a_name(toys):
    unregister("toy_norm")
    with pytest.raises(SpecError, match="unknown module 'toy_norm'"):
        lookup("toy_norm")
