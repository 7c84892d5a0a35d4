"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megaspec.errors import SpecError


@dataclass(frozen=True)
class Sampler:
    """How the next token is chosen: temperature 0 is greedy (argmax); otherwise a draw, in HF's order:
    scale by 1 / temperature, keep the top_k scores, keep the smallest set holding top_p of the probability."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise SpecError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise SpecError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SpecError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature == 0:
            unused = [f"{name}={value}" for name, value in
                      (("top_k", self.top_k), ("top_p", self.top_p), ("seed", self.seed)) if value is not None]
            if unused:
                raise SpecError(f"{', '.join(unused)} only apply when sampling; temperature=0 is greedy: "
                                "set temperature > 0 to sample")

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded with `seed` (None: torch's global one)."""
        return None if self.seed is None else torch.Generator(device).manual_seed(self.seed)

    def __call__(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """logits [b, vocab] -> the chosen token ids [b]."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        scores = logits.float() / self.temperature  # [b, vocab]
        if self.top_k is not None and self.top_k < scores.size(-1):
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]  # [b, 1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            ascending, order = scores.sort(dim=-1)  # [b, vocab]
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= 1 - self.top_p  # the least likely tokens, together under 1 - top_p
            drop[:, -1] = False  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [b]
