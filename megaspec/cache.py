"""Generation caches: what a model keeps between the forward passes of one generation.

The contract (also in megaspec/kinds.py): a module that supports generation defines
`init_cache(cache: Cache) -> state`. Its parent calls it once when a generation
starts and then passes that state back as `forward(..., cache=state)` on every
forward of the generation, and never passes `cache` otherwise. A model's forward
takes the `Cache` itself, whose `state` is what the model's `init_cache` returned.

Positions: each forward writes `cache.positions` [s], absolute positions 0, 1, ...
shared by every sequence of the batch (left padding takes positions too). The first
forward, the prompt, attends as an ordinary forward does and fills the cache; each
later forward is a decode step (`cache.filled`), whose masks index key positions
0 .. cache.key_length - 1, and whose attention reads what earlier steps stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from megaspec.errors import SpecError


class Cache:
    """The state of one generation: where this forward writes, and the model's own cached state.

    Static (`max_length` given): every attention allocates its keys and values once, at the
    prompt, and no shape changes afterwards, so a decode step compiles once under
    torch.compile(fullgraph=True). Growing (`max_length=None`): keys and values are
    concatenated as they come, for open-ended use; each step has new shapes.
    """

    def __init__(self, max_length: int | None, device: torch.device | str = "cpu") -> None:
        if max_length is not None and max_length < 1:
            raise SpecError(f"a cache needs room for at least one position, got max_length={max_length}")
        self.max_length = max_length
        self.device = torch.device(device)
        self.length = 0  # positions stored by earlier forwards
        self.filled = False  # whether this forward continues earlier ones (a decode step)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # [s]
        self.state: Any = None  # what the model's init_cache returned

    def step(self, num_tokens: int) -> Tensor:
        """Call before each forward of `num_tokens` tokens; returns their positions [s]."""
        self.length += self.positions.numel()  # the previous forward's tokens are stored now
        self.filled = self.length > 0
        end = self.length + num_tokens
        if self.max_length is not None and end > self.max_length:
            raise SpecError(f"the cache holds {self.max_length} positions, but this forward would reach {end}; "
                            "make the cache larger")
        self.positions = torch.arange(self.length, end, device=self.device)
        return self.positions

    @property
    def key_length(self) -> int:
        """Key positions a decode step's mask covers: max_length (static), or every position so far (growing)."""
        return self.max_length if self.max_length is not None else self.length + self.positions.numel()


class CacheUnsupported(SpecError):
    """A module in the generating stack cannot be cached; `module` is it, `reason` says why.

    `undeclared`: it defines no init_cache at all (rather than refusing in one).
    """

    def __init__(self, module: nn.Module, reason: str, undeclared: bool = False) -> None:
        self.module = module
        self.reason = reason
        self.undeclared = undeclared
        super().__init__(reason)


def window_positions(window_size: tuple[int, int] | None) -> int | None:
    """How many positions a causal query sees, itself included, under config.window_size (None: all)."""
    return window_size[0] + 1 if window_size is not None and window_size[0] >= 0 else None


def child_cache(module: nn.Module, cache: Cache) -> Any:
    """`module.init_cache(cache)`: the state a parent passes back as `cache=`; refused if it declares none."""
    init = getattr(module, "init_cache", None)
    if not callable(init):
        raise CacheUnsupported(module, "it defines no init_cache", undeclared=True)
    return init(cache)


class KVCache:
    """One attention's keys and values, [b, g, slots, d]: only the g key/value heads are stored (GQA, MQA).

    Static: `cache.max_length` slots (slot j holds position j), or a ring of `window` slots
    (slot = position % window) for an attention that sees only its last `window`
    positions, itself included. Allocated at the first write with that key's batch,
    heads, size, dtype and device. Growing: concatenated, keeping only the last
    `window - 1` positions when there is a window. Keys and values may differ in
    their last dimension (a latent attention may store anything [b, g, s, *]).
    """

    def __init__(self, cache: Cache, *, window: int | None = None) -> None:
        if window is not None and window < 1:
            raise SpecError(f"a sliding window covers at least the query itself, got window={window}")
        self.cache = cache
        self.window = window
        self.key: Tensor | None = None
        self.value: Tensor | None = None
        self.slot_positions: Tensor | None = None  # [slots]: the position each slot holds, -1 while empty

    @property
    def ring(self) -> bool:
        """Whether the slots wrap around (a window shorter than the static cache)."""
        return self.window is not None and self.cache.max_length is not None and self.window < self.cache.max_length

    def update(self, key: Tensor, value: Tensor, attention_mask: Tensor | None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store this forward's key, value [b, g, s, *]; return the keys, values and mask its queries attend with.

        The prompt attends over its own keys with the mask it came with. A decode step
        attends over every slot, with the mask mapped from key positions onto slots and
        restricted to slots holding a position at or before each query (and inside the
        window): the core attention's own causal and window folding then removes nothing more.
        """
        if self.cache.max_length is None:
            return self._grow(key, value, attention_mask)
        positions = self.cache.positions
        if self.cache.filled and self.ring and key.size(2) > 1:
            raise SpecError(f"a sliding-window cache takes one token per decode step, got {key.size(2)}")
        self._write(key, value, positions)
        if not self.cache.filled:
            return key, value, attention_mask
        assert self.key is not None and self.value is not None and self.slot_positions is not None
        return self.key, self.value, self._slot_mask(attention_mask, positions)

    def _write(self, key: Tensor, value: Tensor, positions: Tensor) -> None:
        if self.key is None or self.value is None or self.slot_positions is None:
            max_length = self.cache.max_length
            assert max_length is not None
            slots = max_length if self.window is None else min(self.window, max_length)
            b, g = key.shape[:2]
            self.key = key.new_zeros(b, g, slots, key.size(-1))
            self.value = value.new_zeros(b, g, slots, value.size(-1))
            held = torch.arange(slots, device=key.device) if not self.ring else torch.full(
                (slots,), -1, dtype=torch.long, device=key.device)
            self.slot_positions = held
        slots = self.key.size(2)
        if key.size(2) > slots:  # a prompt longer than the window: only its last `slots` positions stay
            key, value, positions = key[:, :, -slots:], value[:, :, -slots:], positions[-slots:]
        index = positions % slots if self.ring else positions
        self.key.index_copy_(2, index, key.to(self.key.dtype))
        self.value.index_copy_(2, index, value.to(self.value.dtype))
        if self.ring:
            self.slot_positions.index_copy_(0, index, positions)

    def _slot_mask(self, attention_mask: Tensor | None, positions: Tensor) -> Tensor:
        """The mask over slots [.., s, slots]: the caller's (over key positions) where given, AND slot validity."""
        assert self.slot_positions is not None
        held = self.slot_positions  # [slots]
        valid = (held >= 0) & (held <= positions[:, None])  # [s, slots]: stored, and not after the query
        if self.window is not None:
            valid = valid & (held > positions[:, None] - self.window)
        if attention_mask is None:
            return valid
        if self.ring:  # the caller's key axis counts positions: read each slot's column
            attention_mask = attention_mask[..., held.clamp(min=0)]
        if attention_mask.dtype == torch.bool:
            return attention_mask & valid
        return attention_mask.masked_fill(~valid, torch.finfo(attention_mask.dtype).min)

    def _grow(self, key: Tensor, value: Tensor, attention_mask: Tensor | None
              ) -> tuple[Tensor, Tensor, Tensor | None]:
        # Keys stay contiguous positions ending at the last query, so the core's bottom-right
        # causal and window folding is exact and the mask only loses its older columns.
        if self.key is not None and self.value is not None:
            key = torch.cat([self.key, key], dim=2)
            value = torch.cat([self.value, value], dim=2)
        n = key.size(2)
        keep = n if self.window is None else min(n, self.window - 1)
        self.key, self.value = key[:, :, n - keep:], value[:, :, n - keep:]
        if attention_mask is not None and attention_mask.size(-1) > n:
            attention_mask = attention_mask[..., -n:]
        return key, value, attention_mask


@dataclass
class ContextCache:
    """Keys and values of a fixed context (an encoder's output), computed at the first forward and reused."""

    key: Tensor | None = None
    value: Tensor | None = None


@dataclass
class StackCache:
    """A block's state: the generation's Cache (positions) and one state per layer, in layer order."""

    cache: Cache
    layers: list[Any] = field(default_factory=list)


__all__ = ["Cache", "CacheUnsupported", "ContextCache", "KVCache", "StackCache", "child_cache", "window_positions"]
