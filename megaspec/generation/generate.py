"""`megaspec.generate`: new tokens from any model whose modules declare a cache (megaspec/cache.py).

Nothing here knows a family. The model's `init_cache` builds the cache from its
slots down to every attention; a decoder-only model is called with the prompt,
then with one new token per step; an encoder-decoder (a model that sets
`is_encoder_decoder`) is called with the encoder input and a decoder sequence that
starts with its `decoder_start_token_id`. HF transformers' `generate` is the
reference for behaviour: left padding, position ids from the attention mask,
per-sequence stops at eos with the rest padded.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from megaspec.cache import Cache, CacheUnsupported, child_cache
from megaspec.errors import SpecError
from megaspec.generation.sampling import Sampler
from megaspec.record import build_record, has_record

# What a module of each kind implements to be cached (see megaspec/kinds.py).
_HOW = {
    "self_attention": "define init_cache(self, cache) returning megaspec.KVCache(cache), take cache=None in "
                      "forward and attend with `key, value, mask = cache.update(key, value, mask)`",
    "cross_attention": "define init_cache(self, cache) returning megaspec.ContextCache(), take cache=None in "
                       "forward and keep the context's keys and values in it",
    "layer": "define init_cache(self, cache) returning its attention children's caches "
             "(megaspec.cache.child_cache(child, cache)) and pass each back as cache= in forward",
    "block": "define init_cache(self, cache) returning one cache per layer (megaspec.cache.child_cache) "
             "and pass each back as cache= in forward",
    "model": "define init_cache(self, cache) returning its decoder's cache, and take cache= and "
             "position_ids= in forward",
}


@dataclass
class Step:
    """One new token per sequence, and the scores it was chosen from."""

    tokens: Tensor  # [b]: eos (the first given) for a sequence that has finished
    logits: Tensor  # [b, vocab], before temperature


def new_cache(model: nn.Module, max_length: int | None, device: torch.device | str = "cpu") -> Cache:
    """A generation's Cache for `model` (static with max_length, growing with None), built by its init_cache."""
    cache = Cache(max_length, device)
    try:
        cache.state = child_cache(model, cache)
    except CacheUnsupported as exc:
        raise SpecError(_unsupported(model, exc)) from None
    return cache


def _unsupported(model: nn.Module, exc: CacheUnsupported) -> str:
    """'cannot generate: self_attention 'x' (pkg.X) at decoder.layers.0.self_attention <reason>; <how>'."""
    path = next((name for name, module in model.named_modules() if module is exc.module), "")
    entry = build_record(model).modules.get(path) if has_record(model) else None
    cls = type(exc.module)
    what = f"{entry.kind} '{entry.name}'" if entry else "module"
    where = f"at {path}" if path else "(the model)"
    message = f"cannot generate: {what} ({cls.__module__}.{cls.__qualname__}) {where}: {exc.reason}"
    how = _HOW.get(entry.kind) if entry else None
    return f"{message}; to cache it, {how}" if how and exc.undeclared else message


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise SpecError(f"eos_token_id must be a token id or a list of them, got {eos_token_id!r}")
    return ids


class Generation:
    """One generation, checked before anything runs: iterate it for one Step per new token.

    `prefix` is what the output starts with: the prompt (decoder-only) or the decoder
    start token (encoder-decoder). `compile=True` (or a torch.compile backend's name)
    runs the decode steps through torch.compile(fullgraph=True); the cache is static,
    so they compile once.
    """

    def __init__(self, model: nn.Module, input_ids: Tensor, *, max_new_tokens: int,
                 attention_mask: Tensor | None = None, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                 seed: int | None = None, compile: bool | str = False, **model_inputs: Any) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise SpecError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
                or input_ids.size(1) == 0:
            raise SpecError("input_ids must be token ids [batch, length] (an integer tensor, length >= 1), got "
                            f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        self._check_vocabulary(model, input_ids)
        self.sampler = Sampler(temperature, top_k, top_p, seed)
        self.eos = _eos_ids(eos_token_id)
        self.model = model
        self.encoder_decoder = bool(getattr(model, "is_encoder_decoder", False))
        self.device = _device(model)
        self.input_ids = input_ids.to(self.device)
        self.attention_mask = None if attention_mask is None else self._checked_mask(attention_mask)
        self.model_inputs = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in model_inputs.items()}
        self.max_new_tokens = max_new_tokens
        self.compile = compile
        b, p = self.input_ids.shape
        if self.encoder_decoder:
            start = getattr(model, "decoder_start_token_id", None)
            if not isinstance(start, int):
                raise SpecError(f"{type(model).__name__} is an encoder-decoder but names no decoder_start_token_id")
            self.prefix = torch.full((b, 1), start, dtype=torch.long, device=self.device)
            length = 1 + max_new_tokens
        else:
            self.prefix = self.input_ids
            length = p + max_new_tokens
        self.cache = new_cache(model, length, self.device)
        self.keeps_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    @staticmethod
    def _check_vocabulary(model: nn.Module, input_ids: Tensor) -> None:
        """Token ids must index the vocabulary (a placeholder such as LLaVA's image token aside)."""
        if not has_record(model):
            return
        vocab = build_record(model).config.vocab_size
        outside = (input_ids < 0) | (input_ids >= vocab)
        placeholder = getattr(model, "image_token_index", None)
        if placeholder is not None:
            outside &= input_ids != placeholder
        if outside.any():
            raise SpecError(f"input_ids hold {int(input_ids[outside][0])}, outside the model's vocabulary "
                            f"(0 .. {vocab - 1}); was the prompt read with another tokenizer?")

    def _checked_mask(self, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.to(self.device)
        if mask.shape != self.input_ids.shape:
            raise SpecError(f"attention_mask has shape {tuple(mask.shape)}, but input_ids "
                            f"{tuple(self.input_ids.shape)}")
        if not ((mask == 0) | (mask == 1)).all():
            raise SpecError("attention_mask holds 1 for a token and 0 for padding, nothing else")
        if not getattr(self.model, "is_encoder_decoder", False) and not mask[:, -1].all():
            rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
            raise SpecError(f"attention_mask: the prompts in rows {rows} end with padding; generation continues "
                            "from the last position, so pad prompts on the left")
        return mask.long()

    def __iter__(self) -> Iterator[Step]:
        model, was_training = self.model, self.model.training
        model.eval()
        try:
            with torch.no_grad():
                yield from self._steps()
        finally:
            model.train(was_training)

    def _steps(self) -> Iterator[Step]:
        b = self.input_ids.size(0)
        generator = self.sampler.generator(self.device)
        eos = torch.tensor(self.eos, dtype=torch.long, device=self.device)
        finished = torch.zeros(b, dtype=torch.bool, device=self.device)
        backend = self.compile if isinstance(self.compile, str) else "inductor"
        decode = torch.compile(self.model, fullgraph=True, backend=backend) if self.compile else self.model
        logits = self._prefill()
        for i in range(self.max_new_tokens):
            tokens = self.sampler(logits, generator)  # [b]
            if self.eos:
                tokens = tokens.masked_fill(finished, self.eos[0])
                finished = finished | torch.isin(tokens, eos)
            yield Step(tokens, logits)
            if i == self.max_new_tokens - 1 or (self.eos and bool(finished.all())):
                return
            self.cache.step(1)
            logits = decode(**self.decode_inputs(tokens)).logits[:, -1]  # [b, vocab]

    def _prefill(self) -> Tensor:
        """The first forward: the prompt (or the encoder input and the start token); logits [b, vocab]."""
        if self.encoder_decoder:
            self.cache.step(1)
            inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                      "decoder_input_ids": self.prefix}
        else:
            b, p = self.input_ids.shape
            self.cache.step(p)
            position_ids = None
            mask = self.attention_mask
            if mask is not None:  # as HF: positions count tokens, pads sit at 0
                position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [b, p]
                self.next_positions = position_ids[:, -1:] + 1  # [b, 1]
                # Every position the generation will reach: generated tokens are never padding.
                self.full_mask = torch.cat([mask, mask.new_ones(b, self.max_new_tokens)], dim=1)
            inputs = {"input_ids": self.input_ids, "attention_mask": mask, "position_ids": position_ids}
            if self.keeps_last:
                inputs["logits_to_keep"] = 1
        return self.model(**inputs, **self.model_inputs, cache=self.cache).logits[:, -1]

    def decode_inputs(self, tokens: Tensor) -> dict[str, Any]:
        """The keyword arguments of a decode step's forward, with the new tokens [b]."""
        new = tokens[:, None]  # [b, 1]
        if self.encoder_decoder:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                    "decoder_input_ids": new, "cache": self.cache}
        if self.attention_mask is None:
            return {"input_ids": new, "cache": self.cache}
        positions = self.next_positions + (self.cache.positions - self.input_ids.size(1))  # [b, 1]
        return {"input_ids": new, "attention_mask": self.full_mask, "position_ids": positions, "cache": self.cache}


def generate(model: nn.Module, input_ids: Tensor, *, max_new_tokens: int, attention_mask: Tensor | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
             **model_inputs: Any) -> torch.LongTensor:
    """Continue each sequence by up to max_new_tokens tokens: [b, prompt + new] (encoder-decoder: [b, 1 + new]).

    temperature=0 is greedy; otherwise sampling with top_k / top_p, reproducible with seed.
    Prompts of different lengths are padded on the left, with attention_mask (1 = token).
    A sequence stops at eos_token_id (one id or several) and is padded with the first; the
    output ends when all have stopped. model_inputs go to the first forward (LLaVA's
    pixel_values); compile=True compiles the decode steps.
    """
    run = Generation(model, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                     temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, seed=seed,
                     **model_inputs)
    new = [step.tokens for step in run]
    return torch.cat([run.prefix, torch.stack(new, dim=1)], dim=1)  # type: ignore[return-value]
