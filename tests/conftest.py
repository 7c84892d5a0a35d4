"""Shared fixtures: toy modules and helpers for writing spec files."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from toys import TOY_CONFIG, register_toys, unregister_toys  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Token files of the shipped corpus are cached per test session, not in the user's cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))


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
