"""Shared fixtures: toy modules and helpers for writing spec files."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from toys import TOY_CONFIG, register_toys, unregister_toys  # noqa: E402


@pytest.fixture
def toys():
    """Register the toy modules for one test."""
    register_toys()
    yield TOY_CONFIG
    unregister_toys()


@pytest.fixture
def write_yaml(tmp_path: Path):
    """Write dedented YAML to a file in tmp_path and return its path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write
