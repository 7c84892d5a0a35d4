"""A user's own plug-in module, not pip-installed, named by the caller: --plugins, or plugins: in their config."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny import TINY

MLP = "model.spec.submodules.decoder.submodules.layers.submodules.mlp"
PLUGIN = '''
"""Importing this module registers `gated_scale_mlp`."""
from typing import ClassVar

import torch
from torch import nn

import megaspec


@megaspec.register("mlp", "gated_scale_mlp")
class GatedScaleMlp(nn.Module):
    """x * sigmoid(w) * scale, with its scale as a config field of its own."""

    config_fields: ClassVar[dict] = {"mlp_scale": (float, 1.0)}

    def __init__(self, config: megaspec.TransformerConfig, bias: float = 0.0) -> None:
        super().__init__()
        self.scale = config.mlp_scale
        self.gate = nn.Parameter(torch.full((config.hidden_size,), bias))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * torch.sigmoid(self.gate) * self.scale
'''
SIZES = [*TINY["gpt2"][1:], "~model.config.ffn_hidden_size", "build.seq_len=8"]


def megaspec(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megaspec", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    (tmp_path / "my_layers.py").write_text(textwrap.dedent(PLUGIN))
    return tmp_path


def test_plugins_option_imports_a_module_from_the_working_directory(user_dir: Path) -> None:
    # Its config field takes a plain override (no +), and a node with params replaces the MLP in one override.
    result = megaspec("build", "--plugins", "my_layers", *SIZES, "model.config.mlp_scale=2.5",
                      f"{MLP}={{module: gated_scale_mlp, params: {{bias: 1.0}}}}", cwd=user_dir)
    assert result.returncode == 0, result.stderr
    assert "mlp: gated_scale_mlp" in result.stdout
    without = megaspec("build", *SIZES, f"{MLP}=gated_scale_mlp", cwd=user_dir)
    assert without.returncode == 1
    assert "unknown module 'gated_scale_mlp'" in without.stderr and "Traceback" not in without.stderr


def test_plugins_listed_in_the_users_own_config(user_dir: Path) -> None:
    (user_dir / "conf").mkdir()
    (user_dir / "conf" / "my_run.yaml").write_text("defaults:\n  - config\n  - _self_\nplugins: [my_layers]\n")
    result = megaspec("build", "--config-dir", "conf", "--config-name", "my_run", *SIZES,
                      f"{MLP}=gated_scale_mlp", "model.config.mlp_scale=3.0", cwd=user_dir)
    assert result.returncode == 0, result.stderr
    assert "mlp: gated_scale_mlp" in result.stdout


def test_compose_imports_the_plugins_an_override_lists(user_dir: Path) -> None:
    script = (f"import megaspec\ncfg = megaspec.compose({[*TINY['gpt2'], '~model.config.ffn_hidden_size']!r} + "
              f"['plugins=[my_layers]', '{MLP}=gated_scale_mlp', 'model.config.mlp_scale=0.5'])\n"
              "print(megaspec.build_model(cfg, device='meta').decoder.layers[0].mlp.scale)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=user_dir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.5"


def test_a_plugin_that_cannot_be_imported_is_one_error(tmp_path: Path) -> None:
    result = megaspec("build", "--plugins", "no_such_layers", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: plugins: cannot import plug-in 'no_such_layers': ModuleNotFoundError: "
                                     "No module named 'no_such_layers'")
