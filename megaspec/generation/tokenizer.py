"""The tokenizer a model directory holds, read for generation: its tokenizer.json.

`megaspec train` writes the tokenizer it trained with (the byte tokenizer too, in the
`tokenizers` format) into the run directory and the exported checkpoint; `megaspec
convert` copies an HF directory's tokenizer files into the checkpoint; an HF
directory has its own. One reader serves all of them (megaspec/train/tokenizer.py).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from megaspec.checkpoint import atomic_write
from megaspec.errors import SpecError
from megaspec.manifest import inside
from megaspec.source import read_limited
from megaspec.train.tokenizer import MAX_TOKENIZER_BYTES

TOKENIZER_JSON = "tokenizer.json"
# What `megaspec convert` copies from an HF directory into the checkpoint, when present.
TOKENIZER_FILES = (TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class Tokenizer(Protocol):
    """Text <-> token ids."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class PromptTokenizer:
    """A `tokenizers` tokenizer as a prompt is read: with the special tokens it adds (a beginning-of-text
    token), and decoded without them."""

    def __init__(self, tokenizer: Any) -> None:
        self.inner = tokenizer

    def encode(self, text: str) -> list[int]:
        """Text -> ids, special tokens included."""
        return self.inner.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        """Ids -> text, special tokens left out."""
        return self.inner.decode(ids, skip_special_tokens=True)


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer in `directory` (its tokenizer.json); the byte tokenizer needs no package to read."""
    from megaspec.train.tokenizer import ByteTokenizer
    from megaspec.train.tokenizer import load_tokenizer as read

    file = Path(directory) / TOKENIZER_JSON
    if not file.is_file():
        raise SpecError(f"no tokenizer in {directory}: it has no {TOKENIZER_JSON} (megaspec train writes the one "
                        "it trained with, megaspec convert copies an HF directory's)")
    found = read(directory)  # the directory, so that its tokenizer.json must lie inside it
    return found if isinstance(found, ByteTokenizer) else PromptTokenizer(found.tokenizer)


def read_tokenizer_files(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> dict[str, bytes]:
    """An HF directory's tokenizer files (those of TOKENIZER_FILES it has), read before anything is written.

    Each is a bounded regular file inside `source` (the directory may be a stranger's), and none may
    replace a file in `target` that differs from it.
    """
    files = {}
    for name in TOKENIZER_FILES:
        theirs, ours = Path(source) / name, Path(target) / name
        if not theirs.is_file():
            continue
        data = read_limited(inside(Path(source), name, "a tokenizer file"), str(theirs), MAX_TOKENIZER_BYTES)
        if (ours.exists() or ours.is_symlink()) and (
                not ours.is_file() or read_limited(ours, str(ours), MAX_TOKENIZER_BYTES) != data):
            raise SpecError(f"'{ours}' exists and differs from '{theirs}'; convert copies the HF directory's "
                            "tokenizer files: move it away or write to another directory")
        files[name] = data
    return files


def write_tokenizer_files(files: Mapping[str, bytes], target: str | os.PathLike[str]) -> None:
    """Write what `read_tokenizer_files` read into the checkpoint at `target`, each file atomically."""
    for name, data in files.items():
        tmp = Path(target) / f".{name}.{secrets.token_hex(4)}.tmp"  # a fresh name: no file there is reused
        atomic_write(Path(target) / name, lambda t, data=data: t.write_bytes(data), tmp)
