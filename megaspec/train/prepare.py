"""Tokenize a text or JSON-lines file once into flat memory-mapped token files, and reuse them.

nanoGPT's `prepare.py` shape: each split is one flat file of token ids (uint16 when
the vocabulary fits, else uint32) that every run, and every process of a torchrun
job, maps read-only. Files are streamed in chunks of whole lines, never held whole
in memory. A cache entry is named by a digest of everything that decides its
tokens (the file's path, size and modification time, the split, the tokenizer), so
a changed file or tokenizer gets a new entry and an unchanged one is never
tokenized twice. An entry's `.json` is written last: an interrupted preparation
leaves no entry. One lock file per cache directory keeps concurrent runs from
preparing the same entry twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megaspec.errors import SpecError
from megaspec.train.tokenizer import ByteTokenizer, Tokenizer, fingerprint, from_json, train_bpe

FORMAT = 1
CHUNK_BYTES = 1 << 22  # read 4 MiB of whole lines at a time
JSONL_BATCH = 1024  # documents per encode_batch call


@dataclass(frozen=True)
class Source:
    """A byte range [start, end) of a file, cut at line boundaries, read as text or JSON lines."""

    path: Path
    start: int
    end: int
    kind: str  # text | jsonl
    field: str = "text"

    def key(self) -> dict[str, Any]:
        """What identifies its content: the file as it is now, and the range."""
        stat = self.path.stat()
        return {"path": str(self.path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "start": self.start, "end": self.end, "kind": self.kind,
                "field": self.field if self.kind == "jsonl" else None}


def line_boundary(path: Path, offset: int) -> int:
    """The first line start at or after `offset` (the file size when none is)."""
    size = path.stat().st_size
    if offset <= 0:
        return 0
    with path.open("rb") as f:
        f.seek(offset - 1)
        while True:
            block = f.read(1 << 16)
            if not block:
                return size
            newline = block.find(b"\n")
            if newline >= 0:
                return f.tell() - len(block) + newline + 1


def _line_chunks(source: Source) -> Iterator[tuple[int, bytes]]:
    """(index of its first line within the range, bytes) of consecutive chunks of whole lines."""
    line = 0
    with source.path.open("rb") as f:
        f.seek(source.start)
        left, carry = source.end - source.start, b""
        while left > 0 or carry:
            block = f.read(min(CHUNK_BYTES, left)) if left > 0 else b""
            left = left - len(block) if block else 0  # a file cut short ends the range
            data = carry + block
            cut = data.rfind(b"\n") + 1 if left > 0 else len(data)
            if cut == 0:  # one line longer than a chunk: keep reading
                carry = data
                continue
            yield line, data[:cut]
            line += data.count(b"\n", 0, cut)
            carry = data[cut:]


def _line_number(source: Source, index: int) -> int:
    """The 1-based line number in the file of line `index` of the range (counted only for messages)."""
    with source.path.open("rb") as f:
        return _count_lines(f, source.start) + index + 1


def _count_lines(f: Any, upto: int) -> int:
    count, read = 0, 0
    while read < upto:
        block = f.read(min(1 << 20, upto - read))
        if not block:
            break
        count += block.count(b"\n")
        read += len(block)
    return count


def _decode(chunk: bytes, source: Source, line: int) -> str:
    try:
        return chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = _line_number(source, line + chunk.count(b"\n", 0, exc.start))
        raise SpecError(f"{source.path}:{at}: not valid UTF-8 ({exc.reason}); megaspec reads text files "
                        "as UTF-8") from None


def _documents(chunk: bytes, source: Source, line: int) -> Iterator[str]:
    for i, raw in enumerate(chunk.split(b"\n")):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as exc:
            raise SpecError(f"{source.path}:{_line_number(source, line + i)}: not a JSON object: {exc}") from None
        text = record.get(source.field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise SpecError(f"{source.path}:{_line_number(source, line + i)}: no string field '{source.field}' "
                            "(data.text_field names it)")
        yield text


def texts(source: Source) -> Iterator[str]:
    """The text of the range, as chunks (text) or documents (JSON lines)."""
    for line, chunk in _line_chunks(source):
        if source.kind == "jsonl":
            yield from _documents(chunk, source, line)
        else:
            yield _decode(chunk, source, line)


def _token_arrays(source: Source, tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """Token ids of the range, chunk by chunk; JSON-lines documents each end with end-of-text."""
    for line, chunk in _line_chunks(source):
        if source.kind == "text" and isinstance(tokenizer, ByteTokenizer):
            yield np.frombuffer(chunk, dtype=np.uint8)  # the bytes are the tokens
        elif source.kind == "text":
            yield np.asarray(tokenizer.encode(_decode(chunk, source, line)), dtype=np.int64)
        else:
            docs = list(_documents(chunk, source, line))
            end = tokenizer.end_of_text()
            for i in range(0, len(docs), JSONL_BATCH):
                for ids in tokenizer.encode_batch(docs[i:i + JSONL_BATCH]):
                    yield np.asarray([*ids, *end], dtype=np.int64)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _write_atomic(target: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with tmp.open(mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the cache directory's lock (processes of one job, or concurrent jobs, take turns)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class TokenFile:
    """One prepared split: its memory-mapped tokens and whether this call tokenized them."""

    path: Path
    tokens: np.ndarray  # [n] uint16 or uint32, read-only
    built: bool


def tokenize(source: Source, tokenizer: Tokenizer, cache: Path, name: str,
             log: Callable[[str], None]) -> TokenFile:
    """The tokens of `source` under `tokenizer`, from the cache or tokenized into it now."""
    key = _digest({"format": FORMAT, "source": source.key(), "tokenizer": fingerprint(tokenizer)})
    stem = f"{source.path.name}-{name}-{key}"
    meta_file, bin_file = cache / f"{stem}.json", cache / f"{stem}.bin"
    with locked(cache):
        built = not meta_file.is_file()
        if built:
            dtype = token_dtype(tokenizer.vocab_size)
            count = 0

            def write(f: Any) -> None:
                nonlocal count
                for ids in _token_arrays(source, tokenizer):
                    f.write(ids.astype(dtype, copy=False).tobytes())
                    count += len(ids)

            _write_atomic(bin_file, write)
            meta = {"format": FORMAT, "dtype": dtype.name, "tokens": count, "vocab_size": tokenizer.vocab_size,
                    "source": source.key(), "tokenizer": fingerprint(tokenizer)}
            _write_atomic(meta_file, lambda f: f.write(json.dumps(meta, indent=1)), mode="w")
            log(f"data: tokenized {source.path} [{name}] into {count:,} tokens: {bin_file}")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    n = int(meta["tokens"])
    # np.memmap cannot map an empty file; an empty split is refused by the caller anyway.
    tokens = np.memmap(bin_file, dtype=meta["dtype"], mode="r", shape=(n,)) if n else np.zeros(0, np.uint16)
    return TokenFile(bin_file, tokens, built)


def trained_bpe(source: Source, vocab_size: int, cache: Path, log: Callable[[str], None]) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens trained on `source`, trained once and cached."""
    key = _digest({"format": FORMAT, "source": source.key(), "bpe": vocab_size})
    file = cache / f"{source.path.name}-bpe{vocab_size}-{key}.tokenizer.json"
    with locked(cache):
        if not file.is_file():
            tokenizer = train_bpe(texts(source), vocab_size)
            _write_atomic(file, lambda f: f.write(tokenizer.to_json()), mode="w")
            got = tokenizer.vocab_size
            short = "" if got == vocab_size else f" ({got}: the text allows no more merges)"
            log(f"data: trained a byte-level BPE of {vocab_size} tokens{short} on {source.path}: {file}")
    tokenizer = from_json(file.read_text(encoding="utf-8"), str(file))
    tokenizer.name = f"byte-level BPE of {tokenizer.vocab_size} tokens"
    return tokenizer
