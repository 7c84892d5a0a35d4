"""Where the shipped conf/ and specs/ live: the source tree or the installed package."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def resource_root() -> Path:
    """The directory holding conf/ and specs/ (package dir when installed, repo root in a checkout)."""
    package = Path(__file__).resolve().parent
    for root in (package, package.parent):
        if (root / "conf" / "config.yaml").is_file() and (root / "specs").is_dir():
            return root
    raise FileNotFoundError("megaspec cannot find its conf/ and specs/ directories; reinstall the package")


def conf_dir() -> Path:
    """The Hydra config tree."""
    return resource_root() / "conf"


def specs_dir() -> Path:
    """The shipped spec files."""
    return resource_root() / "specs"
