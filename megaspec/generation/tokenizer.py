"""The tokenizer a model directory holds: the byte tokenizer it was trained with, or its tokenizer.json.

A megaspec checkpoint's manifest may name its tokenizer (`tokenizer: bytes`, as
`megaspec train` writes, or a file in the directory); without that entry, the
directory's `tokenizer.json` (HF's format, read with the `tokenizers` package) is
used, as in an HF model directory or a checkpoint `megaspec convert` wrote.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from megaspec.checkpoint import MANIFEST, atomic_write, read_manifest
from megaspec.errors import SpecError

BYTES = "bytes"  # the manifest's name for the UTF-8 byte tokenizer (vocabulary 256)
TOKENIZER_JSON = "tokenizer.json"
# What `megaspec convert` copies from an HF directory into the checkpoint, when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class Tokenizer(Protocol):
    """Text <-> token ids."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class Bytes:
    """The byte tokenizer of `megaspec train`: token i is byte i."""

    def __init__(self) -> None:
        from megaspec.train.data import ByteTokenizer

        self.inner = ByteTokenizer()

    def encode(self, text: str) -> list[int]:
        """Text -> ids (its UTF-8 bytes)."""
        return self.inner.encode(text).tolist()

    def decode(self, ids: list[int]) -> str:
        """Ids -> text; an incomplete UTF-8 sequence at the end becomes U+FFFD."""
        return self.inner.decode(ids)


class TokenizerJson:
    """An HF tokenizer.json, through the `tokenizers` package; special tokens are left out of decoded text."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as Loaded
        except ImportError:
            raise SpecError(f"reading {path} needs the tokenizers package: pip install tokenizers") from None
        try:
            self.inner: Any = Loaded.from_file(str(path))
        except Exception as exc:  # the tokenizers package raises its own Exception type
            raise SpecError(f"{path}: not a tokenizer.json the tokenizers package can read: {exc}") from None

    def encode(self, text: str) -> list[int]:
        """Text -> ids, with the special tokens the tokenizer adds (e.g. a beginning-of-text token)."""
        return self.inner.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        """Ids -> text, without special tokens."""
        return self.inner.decode(ids, skip_special_tokens=True)


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a model directory: what its manifest names, else its tokenizer.json."""
    directory = Path(directory)
    named = read_manifest(directory).get("tokenizer") if (directory / MANIFEST).is_file() else None
    if named == BYTES:
        return Bytes()
    if named is not None and (not isinstance(named, str) or Path(named).name != named or named in ("", ".", "..")):
        raise SpecError(f"{directory / MANIFEST}: tokenizer must be '{BYTES}' or a file name in the directory, "
                        f"got {named!r}")
    file = directory / (named or TOKENIZER_JSON)
    if not file.is_file():
        raise SpecError(f"no tokenizer in {directory}: it has no {file.name}, and its manifest names none "
                        f"(`tokenizer: {BYTES}` for a model trained on bytes)")
    return TokenizerJson(file)


def copy_tokenizer_files(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> list[str]:
    """Copy an HF directory's tokenizer files (those of TOKENIZER_FILES it has) into a checkpoint; their names."""
    copied = []
    for name in TOKENIZER_FILES:
        file = Path(source) / name
        if file.is_file():
            data = file.read_bytes()
            atomic_write(Path(target) / name, lambda tmp, data=data: tmp.write_bytes(data))
            copied.append(name)
    return copied
