"""Training data: a bundled text corpus read as bytes, or synthetic tokens.

Every batch is a pure function of (seed, step): the sequences of one global
batch are the same whatever the world size or micro-batch size, and a resumed
run reads exactly what the uninterrupted run would have read. Each process
takes its own contiguous slice of the global batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from megaspec.errors import SpecError

CORPUS = Path(__file__).with_name("corpus.txt")


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no download, no unknown tokens."""

    vocab_size = 256

    def encode(self, text: str) -> Tensor:
        """Text -> token ids [n] (int64)."""
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids: Tensor | list[int]) -> str:
        """Token ids -> text (invalid UTF-8 sequences become U+FFFD)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class TokenData:
    """Random windows of seq_len tokens from one token stream, and the tokenizer that made it."""

    def __init__(self, tokens: Tensor, seq_len: int, seed: int, tokenizer: ByteTokenizer | None = None) -> None:
        if tokens.numel() <= seq_len:
            raise SpecError(f"the corpus has {tokens.numel()} tokens, fewer than one sequence of "
                            f"trainer.seq_len={seq_len}; use a shorter seq_len or a larger corpus")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.tokenizer = tokenizer

    def global_batch(self, step: int, size: int) -> Tensor:
        """The [size, seq_len] token ids of optimizer step `step` (0-based)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len + 1, (size,), generator=gen)  # [size]
        offsets = torch.arange(self.seq_len)  # [s]
        return self.tokens[starts[:, None] + offsets]  # [size, s]


class SyntheticData:
    """Uniformly random tokens, for throughput runs: the loss stays near ln(vocab_size)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int) -> None:
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed

    def global_batch(self, step: int, size: int) -> Tensor:
        """The [size, seq_len] token ids of optimizer step `step` (0-based)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.randint(0, self.vocab_size, (size, self.seq_len), generator=gen)  # [size, s]


def micro_batches(data: TokenData | SyntheticData, step: int, global_batch_size: int, micro_batch_size: int,
                  rank: int, world_size: int) -> list[Tensor]:
    """This process's micro-batches [micro, s] of step `step`, in accumulation order."""
    per_rank = global_batch_size // world_size
    mine = data.global_batch(step, global_batch_size)[rank * per_rank:(rank + 1) * per_rank]  # [per_rank, s]
    return list(mine.split(micro_batch_size))


def load_text(path: str | None) -> str:
    """The bundled corpus, or a UTF-8 text file."""
    file = Path(path) if path else CORPUS
    if not file.is_file():
        raise SpecError(f"data.path: no such file: {file}")
    return file.read_text(encoding="utf-8")


def make_data(data_cfg: dict, seq_len: int, seed: int, vocab_size: int) -> TokenData | SyntheticData:
    """The dataset named by the `data` config group (text or synthetic)."""
    kind = data_cfg.get("name")
    if kind == "synthetic":
        return SyntheticData(vocab_size, seq_len, seed)
    if kind == "text":
        tokenizer = ByteTokenizer()
        if vocab_size < tokenizer.vocab_size:
            raise SpecError(
                f"model.config.vocab_size ({vocab_size}) is smaller than the byte tokenizer's "
                f"{tokenizer.vocab_size} tokens; set model.config.vocab_size={tokenizer.vocab_size} "
                "or data.fit_vocab_size=true")
        return TokenData(tokenizer.encode(load_text(data_cfg.get("path"))), seq_len, seed, tokenizer)
    raise SpecError(f"data.name must be 'text' or 'synthetic', got {kind!r}")
