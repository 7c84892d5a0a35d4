"""Training data: a text or JSON-lines file tokenized once into memory-mapped tokens, or synthetic tokens.

Every batch is a pure function of (seed, step): the sequences of one global
batch are the same whatever the world size or micro-batch size, and a resumed
run reads exactly what the uninterrupted run would have read. Each process
takes its own contiguous slice of the global batch. The held-out split is a
separate range of the file (its last lines) or a separate file, tokenized into its
own token file: training windows are drawn from the training tokens only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from megaspec.errors import SpecError
from megaspec.train.prepare import Source, line_boundary, tokenize, trained_bpe
from megaspec.train.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

CORPUS = Path(__file__).with_name("corpus.txt")
KINDS = ("text", "jsonl", "synthetic")
DEFAULT_VAL_FRACTION = 0.1
# Held-out batches of synthetic data come from a stream no training step reaches.
EVAL_STREAM = 1 << 40


class TokenData:
    """Random windows of seq_len tokens from one token stream (a memory-mapped file, or any 1-D sequence)."""

    def __init__(self, tokens: Any, seq_len: int, seed: int, what: str = "the training split") -> None:
        if isinstance(tokens, Tensor):
            tokens = tokens.numpy()
        self.tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        if len(self.tokens) <= seq_len:
            raise SpecError(f"{what} has {len(self.tokens)} tokens, fewer than one sequence of "
                            f"trainer.seq_len={seq_len}; use a shorter seq_len or more data")
        self.seq_len = seq_len
        self.seed = seed

    def windows(self, starts: Tensor) -> Tensor:
        """The [len(starts), seq_len] windows starting at `starts`, as int64 token ids."""
        rows = np.stack([self.tokens[s:s + self.seq_len] for s in starts.tolist()])  # [n, s]
        return torch.from_numpy(rows.astype(np.int64))

    def global_batch(self, step: int, size: int) -> Tensor:
        """The [size, seq_len] token ids of optimizer step `step` (0-based)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq_len + 1, (size,), generator=gen)  # [size]
        return self.windows(starts)


class EvalWindows:
    """Fixed held-out windows, the same in every evaluation and every run: comparable losses."""

    def __init__(self, data: TokenData, count: int | None) -> None:
        n, seq = len(data.tokens), data.seq_len
        # `count` windows spread evenly over the split, or every non-overlapping one.
        self.starts = torch.linspace(0, n - seq, count).round().long() if count else torch.arange(0, n - seq + 1, seq)
        self.data = data

    def global_batch(self, index: int, size: int) -> Tensor:
        """Held-out batch `index`: [size, seq_len]."""
        return self.data.windows(self.starts[index * size:(index + 1) * size])

    def batches(self, size: int) -> int:
        """How many whole batches of `size` windows there are."""
        return len(self.starts) // size


class SyntheticData:
    """Uniformly random tokens, for throughput runs: the loss stays near ln(vocab_size)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, stream: int = 0) -> None:
        self.vocab_size, self.seq_len, self.seed, self.stream = vocab_size, seq_len, seed, stream

    def global_batch(self, step: int, size: int) -> Tensor:
        """The [size, seq_len] token ids of optimizer step `step` (0-based)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.stream + step)
        return torch.randint(0, self.vocab_size, (size, self.seq_len), generator=gen)  # [size, s]

    def batches(self, size: int) -> int:
        """Held-out synthetic batches never run out."""
        return 1 << 30


Batches = Union[TokenData, SyntheticData, EvalWindows]


def micro_batches(data: Batches, step: int, global_batch_size: int, micro_batch_size: int,
                  rank: int, world_size: int) -> list[Tensor]:
    """This process's micro-batches [micro, s] of step `step`, in accumulation order."""
    per_rank = global_batch_size // world_size
    mine = data.global_batch(step, global_batch_size)[rank * per_rank:(rank + 1) * per_rank]  # [per_rank, s]
    return list(mine.split(micro_batch_size))


@dataclass(frozen=True)
class Prepared:
    """The tokenizer and the token files of one `data` config (synthetic data has neither)."""

    kind: str
    tokenizer: Tokenizer | None
    train: np.ndarray | None
    val: np.ndarray | None
    description: str


def _file(value: Any, key: str) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise SpecError(f"{key}: no such file: {path}")
    return path


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/megaspec, or ~/.cache/megaspec."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megaspec"


def cache_dir(opts: dict[str, Any], data_file: Path) -> Path:
    """data.cache_dir, else .megaspec-cache/ next to the data (the user cache for the shipped corpus)."""
    if opts.get("cache_dir"):
        return Path(str(opts["cache_dir"])).expanduser()
    if data_file != CORPUS and os.access(data_file.parent, os.W_OK):
        return data_file.parent / ".megaspec-cache"
    return user_cache_dir() / "tokens"


def split_sources(opts: dict[str, Any], kind: str) -> tuple[Source | None, Source | None]:
    """(training range, held-out range): the file and data.val_path, or the file cut at data.val_fraction.

    With data.val_path and no data.path (megaspec eval of a file) there is no training range.
    """
    field = str(opts.get("text_field") or "text")
    val_path, fraction = opts.get("val_path"), opts.get("val_fraction")
    if val_path is not None:
        if fraction:
            raise SpecError(f"data.val_path and data.val_fraction={fraction} both name a held-out split; "
                            "give one of them")
        held = _file(val_path, "data.val_path")
        held_src = Source(held, 0, held.stat().st_size, kind, field)
        if opts.get("path") is None and kind == "jsonl":
            return None, held_src
    if opts.get("path") is None and kind == "jsonl":
        raise SpecError("data=jsonl needs data.path=FILE (one JSON object per line, text in data.text_field)")
    path = _file(opts["path"], "data.path") if opts.get("path") is not None else CORPUS
    size = path.stat().st_size
    if val_path is not None:
        return Source(path, 0, size, kind, field), held_src
    fraction = DEFAULT_VAL_FRACTION if fraction is None else float(fraction)
    if not 0 <= fraction < 1:
        raise SpecError(f"data.val_fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return Source(path, 0, size, kind, field), None
    cut = line_boundary(path, round(size * (1 - fraction)))
    if cut == 0 or cut >= size:
        raise SpecError(f"data.val_fraction={fraction} of {path} ({size:,} bytes) leaves "
                        f"{'no training' if cut == 0 else 'no held-out'} lines; the split is cut at a line end")
    return Source(path, 0, cut, kind, field), Source(path, cut, size, kind, field)


def make_tokenizer(opts: dict[str, Any], train: Source, cache: Path, log: Callable[[str], None]) -> Tokenizer:
    """data.tokenizer: byte, bpe (trained on the training range, data.vocab_size tokens) or a tokenizer.json."""
    name = str(opts.get("tokenizer") or "byte")
    vocab = opts.get("vocab_size")
    if name == "bpe":
        if vocab is None:
            raise SpecError("data.tokenizer=bpe needs data.vocab_size (e.g. data.vocab_size=4096)")
        return trained_bpe(train, int(vocab), cache, log)
    if vocab is not None:
        raise SpecError(f"data.vocab_size={vocab} sets the size of a trained BPE (data.tokenizer=bpe); "
                        f"data.tokenizer={name} has its own vocabulary")
    return ByteTokenizer() if name == "byte" else load_tokenizer(name)


def prepare_data(opts: dict[str, Any], log: Callable[[str], None] = lambda _: None,
                 tokenizer: Tokenizer | None = None, train: bool = True) -> Prepared:
    """The `data` config group's tokenizer and token files, tokenized once and cached.

    `tokenizer`: use this one (a checkpoint's) instead of data.tokenizer. `train=False`:
    only the held-out split (evaluation).
    """
    kind = opts.get("name")
    if kind not in KINDS:
        raise SpecError(f"data.name must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "synthetic":
        return Prepared(kind, None, None, None, "synthetic tokens")
    train_src, val_src = split_sources(opts, kind)
    if tokenizer is None:
        if train_src is None:
            raise SpecError("data.path is needed: the tokenizer is made from the training split")
        tokenizer = make_tokenizer(opts, train_src, cache_dir(opts, train_src.path), log)
    parts, caches = [], []
    tokens = held = None
    if train and train_src is not None:
        caches.append(cache_dir(opts, train_src.path))
        tokens = tokenize(train_src, tokenizer, caches[-1], "train", log).tokens
        parts.append(f"{train_src.path.name}: {len(tokens):,} training tokens")
    if val_src is not None:
        caches.append(cache_dir(opts, val_src.path))
        held = tokenize(val_src, tokenizer, caches[-1], "val", log).tokens
        same = bool(parts) and train_src is not None and val_src.path == train_src.path
        parts.append(f"{len(held):,} held out" if same else f"{val_src.path.name}: {len(held):,} held out")
    where = " and ".join(str(c) for c in dict.fromkeys(caches))
    name = getattr(tokenizer, "name", "tokenizer")
    return Prepared(kind, tokenizer, tokens, held,
                    f"{', '.join(parts)} ({name}, vocabulary {tokenizer.vocab_size:,}; cached in {where})")


def check_vocab(tokenizer: Tokenizer, vocab_size: int, what: str) -> None:
    """Refuse a model whose embedding has fewer rows than the tokenizer has tokens."""
    if vocab_size < tokenizer.vocab_size:
        name = getattr(tokenizer, "name", "tokenizer")
        raise SpecError(f"{what} ({vocab_size}) is smaller than the tokenizer's {tokenizer.vocab_size} tokens "
                        f"({name}); set model.config.vocab_size={tokenizer.vocab_size} or data.fit_vocab_size=true")


def datasets(prepared: Prepared, seq_len: int, seed: int, vocab_size: int,
             eval_windows: int | None) -> tuple[TokenData | SyntheticData, EvalWindows | SyntheticData | None]:
    """(training batches, held-out batches or None) for a model with `vocab_size` tokens."""
    if prepared.kind == "synthetic":
        return SyntheticData(vocab_size, seq_len, seed), SyntheticData(vocab_size, seq_len, seed, EVAL_STREAM)
    assert prepared.tokenizer is not None
    check_vocab(prepared.tokenizer, vocab_size, "model.config.vocab_size")
    if prepared.train is None:
        raise SpecError("there is no training split (data.path)")
    train = TokenData(prepared.train, seq_len, seed)
    if prepared.val is None:
        return train, None
    return train, EvalWindows(TokenData(prepared.val, seq_len, seed, "the held-out split"), eval_windows)
