"""The checkpoint manifest, `megaspec.yaml`: read as untrusted data, every field checked.

A checkpoint may come from a stranger. Its manifest is parsed with the bounded
YAML loader (plain data only), each field is checked for type before use, and
every file it names must be a plain file name inside the checkpoint directory,
checked before anything is opened. Errors name the manifest, the line and the field.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megaspec.errors import Problem, SpecError
from megaspec.source import SourceMap, load_mapping

FORMAT = "megaspec-checkpoint/2"  # the config holds the fields the model was given (and read)
# Format 1 recorded every config field, read or not; it is still read (megaspec.checkpoint migrates it).
FORMAT_1 = "megaspec-checkpoint/1"
MANIFEST = "megaspec.yaml"
# A manifest's tensor entry: "float32 [101, 64]" (a scalar: "float32 []").
_ENTRY = re.compile(r"^([a-z0-9]+) \[((?:0|[1-9][0-9]{0,11})(?:, (?:0|[1-9][0-9]{0,11}))*)?\]$")
_FIELDS = ("format", "weights", "spec", "config", "allow_imports", "modules", "tensors", "tied", "pending")


def plain_name_problem(name: Any) -> str | None:
    """Why `name` is not a plain file name (no directories, no '..', no absolute path), or None."""
    if not isinstance(name, str) or not name:
        return f"expected a file name, got {name!r}"
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).name != name:
        return f"{name!r} is not a plain file name inside the checkpoint directory"
    return None


def inside(directory: Path, name: str, what: str) -> Path:
    """`directory/name`, a regular file that is (symlinks resolved) inside `directory`; SpecError otherwise."""
    problem = plain_name_problem(name)
    if problem is not None:
        raise SpecError(Problem(f"{what}: {problem}", "", str(directory)))
    path = directory / name
    real, root = os.path.realpath(path), os.path.realpath(directory)
    if os.path.dirname(real) != root:
        raise SpecError(Problem(f"{what} '{name}' is a link to a file outside the checkpoint directory", "",
                                str(directory)))
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        raise SpecError(Problem(f"{what} '{name}' cannot be read: {exc.strerror}", "", str(directory))) from None
    if not stat.S_ISREG(mode):
        raise SpecError(Problem(f"{what} '{name}' is not a regular file", "", str(directory)))
    return path


def parse_entry(entry: str) -> tuple[tuple[int, ...], str]:
    """A checked tensor entry "float32 [101, 64]" -> ((101, 64), "float32")."""
    found = _ENTRY.match(entry)
    assert found is not None, entry  # read_manifest checked every entry
    dims = found.group(2)
    return tuple(int(d) for d in dims.split(", ")) if dims else (), found.group(1)


class _Checker:
    """Collects every problem of a manifest, each located at its field."""

    def __init__(self, smap: SourceMap) -> None:
        self.smap = smap
        self.problems: list[Problem] = []

    def fail(self, key: tuple[Any, ...], message: str, path: str | None = None) -> None:
        self.problems.append(self.smap.problem(key, path or ".".join(str(k) for k in key), message))

    def mapping(self, data: Mapping[str, Any], field: str, required: bool = True) -> Mapping[Any, Any]:
        value = data.get(field)
        if field not in data or (value is None and not required):
            if required:
                self.fail((), f"missing field '{field}'", field)
            return {}
        if not isinstance(value, dict):
            self.fail((field,), f"expected a mapping, got {_kind(value)}")
            return {}
        return value

    def strings(self, data: Mapping[Any, Any], field: str) -> None:
        for key, value in data.items():
            if not isinstance(key, str) or not isinstance(value, str):
                self.fail((field, key), f"expected a name and a string, got {_kind(key)}: {_kind(value)}")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return f"{type(value).__name__} {value!r}"


def read_manifest_located(path: str | os.PathLike[str]) -> tuple[dict[str, Any], SourceMap]:
    """The checked manifest of the checkpoint at `path`, and where each field is in it."""
    directory = Path(path)
    if not directory.is_dir():
        raise SpecError(f"'{path}' is not a megaspec checkpoint: "
                        f"{'no such directory' if not directory.exists() else 'not a directory'}")
    file = directory / MANIFEST
    if not file.exists() and not file.is_symlink():
        raise SpecError(f"'{path}' is not a megaspec checkpoint (no {MANIFEST})")
    inside(directory, MANIFEST, "the manifest")
    data, smap = load_mapping(file, "a checkpoint manifest")
    check = _Checker(smap)
    if data.get("format") not in (FORMAT, FORMAT_1):
        found = data.get("format")
        raise SpecError(smap.problem(("format",) if "format" in data else (), "format",
                                     f"unknown checkpoint format {found!r}; this megaspec reads {FORMAT} "
                                     f"and {FORMAT_1}"))
    for extra in [k for k in data if k not in _FIELDS]:
        check.fail((extra,), f"unknown manifest field '{extra}'")
    problem = plain_name_problem(data.get("weights"))
    if problem is not None:
        check.fail(("weights",) if "weights" in data else (), problem, "weights")
    elif not data["weights"].endswith(".safetensors"):
        check.fail(("weights",), f"'{data['weights']}' is not a .safetensors file")
    if not isinstance(data.get("spec"), (dict, str)):
        check.fail(("spec",) if "spec" in data else (), f"expected the spec tree, got {_kind(data.get('spec'))}",
                   "spec")
    check.mapping(data, "config")
    allow = data.get("allow_imports")
    if allow is not None and not (isinstance(allow, list) and all(isinstance(a, str) for a in allow)):
        check.fail(("allow_imports",), f"expected a list of strings, got {_kind(allow)}")
    for name, info in check.mapping(data, "modules").items():
        if not isinstance(name, str) or not isinstance(info, dict) or \
                not all(isinstance(info.get(k), str) for k in ("kind", "class", "origin")):
            check.fail(("modules", name), "expected {kind, class, origin} strings")
    tensors = check.mapping(data, "tensors")
    check.strings(tensors, "tensors")
    for name, entry in tensors.items():
        if isinstance(entry, str) and not _ENTRY.match(entry):
            check.fail(("tensors", name), f"expected 'dtype [dim, ...]', got {entry!r}")
    check.strings(check.mapping(data, "tied", required=False), "tied")
    pending = data.get("pending")
    if pending is not None and not (isinstance(pending, list) and not any(map(plain_name_problem, pending))):
        check.fail(("pending",), f"expected a list of plain file names, got {_kind(pending)}")
    if check.problems:
        raise SpecError([Problem(f"{file}: not a valid megaspec checkpoint manifest"), *check.problems])
    return data, smap


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked manifest of the checkpoint at `path`."""
    return read_manifest_located(path)[0]


def owned_files(manifest: Mapping[str, Any]) -> set[str]:
    """The files a megaspec save wrote into its directory, by the manifest: the weights and any pending files."""
    return {manifest["weights"], *(manifest.get("pending") or [])}
