"""Tokenizers for training: UTF-8 bytes, a `tokenizer.json`, or a byte-level BPE trained here.

Every tokenizer is saved as one `tokenizer.json` in the format of the `tokenizers`
package (HF's fast tokenizers), into the run directory and the exported checkpoint,
so `load_tokenizer(dir)` gives back exactly what a run trained with. The byte
tokenizer is written in that format too (256 byte tokens, no merges, token id =
byte value) and read back without the `tokenizers` package.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from megaspec.errors import SpecError
from megaspec.manifest import inside
from megaspec.source import decode_utf8, read_limited

TOKENIZER_FILE = "tokenizer.json"
# The largest tokenizer.json read: published ones are at most a few tens of MB (Gemma's: 34 MB).
MAX_TOKENIZER_BYTES = 256 * 2**20
# Documents of a JSON-lines file are separated by the first of these the tokenizer has.
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


class Tokenizer(Protocol):
    """What training needs of a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Text -> token ids."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts -> their token ids."""

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text."""

    def end_of_text(self) -> list[int]:
        """The tokens that end a document."""

    def to_json(self) -> str:
        """The tokenizer as a `tokenizers` JSON document."""


@lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
    """GPT-2's byte -> printable character map (byte-level BPE's alphabet), indexed by byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": use_regex}


@lru_cache(maxsize=1)
def _byte_tokenizer_data() -> dict[str, Any]:
    """The byte tokenizer as a `tokenizers` document: a BPE over the 256 byte tokens with no merges."""
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": _byte_level(False), "post_processor": None, "decoder": _byte_level(False),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {c: b for b, c in enumerate(_byte_chars())}, "merges": []},
    }


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download, no unknown tokens."""

    vocab_size = 256
    name = "byte"

    def encode(self, text: str) -> list[int]:
        """Text -> its UTF-8 bytes."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts -> their UTF-8 bytes."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text (invalid UTF-8 sequences become U+FFFD)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def end_of_text(self) -> list[int]:
        """No token is free for it: documents end with a blank line."""
        return self.encode("\n\n")

    def to_json(self) -> str:
        """The equivalent `tokenizers` document."""
        return json.dumps(_byte_tokenizer_data(), ensure_ascii=False)


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise SpecError("this tokenizer needs the tokenizers package: pip install tokenizers "
                        "(or megaspec[train])") from None
    return tokenizers


class HFTokenizer:
    """A `tokenizers.Tokenizer` (a `tokenizer.json`, or a BPE trained by `train_bpe`)."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Text -> token ids (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts -> their token ids, encoded in parallel."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text, special tokens included."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def end_of_text(self) -> list[int]:
        """The end-of-text token when the vocabulary has one, else a blank line."""
        for token in END_OF_TEXT:
            found = self.tokenizer.token_to_id(token)
            if found is not None:
                return [int(found)]
        return self.encode("\n\n")

    def to_json(self) -> str:
        """The `tokenizers` document."""
        return self.tokenizer.to_str()


def from_json(text: str, name: str) -> ByteTokenizer | HFTokenizer:
    """A tokenizer from its `tokenizers` JSON text; the byte tokenizer's needs no package."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SpecError(f"{name}: not a tokenizer.json ({exc})") from None
    if data == _byte_tokenizer_data():
        return ByteTokenizer()
    try:
        tokenizer = _tokenizers().Tokenizer.from_str(text)
    except Exception as exc:  # the Rust parser's own message, whatever its type
        raise SpecError(f"{name}: not a tokenizer.json the tokenizers package can read: {exc}") from None
    return HFTokenizer(tokenizer, name)


def tokenizer_file(path: str | Path) -> Path:
    """`path` itself if it is a file, else the tokenizer.json inside it (a run or checkpoint directory).

    A directory may come from someone else: its tokenizer.json must be a file in it, not a link out of it.
    """
    p = Path(path)
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        where = f"{p} has no {TOKENIZER_FILE}" if p.is_dir() else f"no such file: {p}"
        raise SpecError(f"tokenizer: {where}")
    return inside(p, TOKENIZER_FILE, "the tokenizer") if p.is_dir() else file


def load_tokenizer(path: str | Path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a run or exported checkpoint was trained with (its directory), or a tokenizer.json."""
    file = tokenizer_file(path)
    return from_json(decode_utf8(read_limited(file, str(file), MAX_TOKENIZER_BYTES), str(file)), str(file))


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write `directory/tokenizer.json`; returns its path."""
    target = Path(directory) / TOKENIZER_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(tokenizer.to_json(), encoding="utf-8")
    return target


def fingerprint(tokenizer: Tokenizer) -> str:
    """A digest of the tokenizer's JSON: equal for tokenizers that tokenize alike."""
    return hashlib.sha256(tokenizer.to_json().encode("utf-8")).hexdigest()


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2's scheme: 256 byte tokens, merges, `<|endoftext|>`) on `texts`."""
    if vocab_size < 257:
        raise SpecError(f"data.vocab_size ({vocab_size}) must be at least 257 for a byte-level BPE "
                        "(256 byte tokens and <|endoftext|>)")
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT[0]], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tokenizer, f"byte-level BPE, {vocab_size} tokens")
