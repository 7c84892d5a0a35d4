"""What `megaspec eval +checkpoint=DIR data...` does: a saved model's held-out loss and perplexity."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from megaspec.errors import SpecError
from megaspec.train.data import EvalWindows, TokenData, check_vocab, prepare_data
from megaspec.train.evaluate import held_out_loss, perplexity
from megaspec.train.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer


def checkpoint_dir(value: Any) -> Path:
    """+checkpoint=DIR: an exported megaspec checkpoint, or a run directory holding one in model/."""
    from megaspec.checkpoint import MANIFEST

    if value is None:
        raise SpecError("megaspec eval needs +checkpoint=DIR: a saved megaspec checkpoint, e.g. a run's "
                        "outputs/DATE/TIME/model")
    path = Path(str(value))
    if not (path / MANIFEST).is_file() and (path / "model" / MANIFEST).is_file():
        return path / "model"
    return path


def _tokenizer(directory: Path, opts: dict[str, Any], explicit: Collection[str]) -> Tokenizer | None:
    """The checkpoint's own tokenizer; data.tokenizer only for checkpoints without one."""
    given = sorted(k for k in explicit if k.lstrip("+~").split("=", 1)[0] in ("data.tokenizer", "data.vocab_size"))
    if (directory / TOKENIZER_FILE).is_file():
        if given:
            raise SpecError(f"{directory} carries the tokenizer it was trained with ({TOKENIZER_FILE}); "
                            f"drop {' '.join(given)}")
        return load_tokenizer(directory)
    if str(opts.get("tokenizer")) == "bpe":
        raise SpecError(f"{directory} has no {TOKENIZER_FILE}, and a BPE trained now would not be the one the model "
                        "learned; give data.tokenizer=PATH of its tokenizer.json")
    return None  # data.tokenizer: byte, or a tokenizer.json


def _device(option: str) -> torch.device:
    if option not in ("auto", "cpu", "cuda"):
        raise SpecError(f"trainer.device must be auto, cpu or cuda, got {option!r}")
    return torch.device("cuda" if option == "cuda" or (option == "auto" and torch.cuda.is_available()) else "cpu")


def evaluate_checkpoint(cfg: DictConfig, explicit: Collection[str] = (),
                        out: Callable[[str], None] = print) -> dict[str, float]:
    """Load the checkpoint, tokenize the held-out split of `data` with its tokenizer, print loss and perplexity."""
    import megaspec
    from megaspec.configs import root_config
    from megaspec.inputs import model_inputs
    from megaspec.train.loop import PRECISIONS, check_causal_lm

    directory = checkpoint_dir(cfg.get("checkpoint"))
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    opts = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(trainer, dict) and isinstance(opts, dict)
    seq_len, global_bs = int(trainer["seq_len"]), int(trainer["global_batch_size"])
    micro = int(trainer.get("micro_batch_size") or global_bs)
    batches = trainer.get("eval_batches")
    precision = str(trainer.get("precision", "fp32"))
    if precision not in PRECISIONS:
        raise SpecError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if global_bs % micro:
        raise SpecError(f"trainer.global_batch_size ({global_bs}) must be a multiple of trainer.micro_batch_size "
                        f"({micro})")

    tokenizer = _tokenizer(directory, opts, explicit)
    spec, configs, _ = model_inputs(str(directory))
    config = root_config(spec, configs)
    if seq_len > config.max_position_embeddings:
        raise SpecError(f"trainer.seq_len ({seq_len}) exceeds the checkpoint's max_position_embeddings "
                        f"({config.max_position_embeddings})")
    prepared = prepare_data(opts, out, tokenizer, train=False)
    if prepared.val is None or prepared.tokenizer is None:
        raise SpecError("megaspec eval scores the held-out split: give data.val_path=FILE (a whole file), or "
                        "data.path=FILE with data.val_fraction > 0 (its last lines)")
    check_vocab(prepared.tokenizer, config.vocab_size, "the checkpoint's vocab_size")
    windows = EvalWindows(TokenData(prepared.val, seq_len, 0, "the held-out split"),
                          None if batches is None else int(batches) * global_bs)
    count = windows.batches(global_bs)
    if count == 0:
        raise SpecError(f"the held-out split ({len(prepared.val):,} tokens) has fewer than one batch of "
                        f"trainer.global_batch_size={global_bs} windows of {seq_len} tokens")

    device = _device(str(trainer.get("device", "auto")))
    model = megaspec.load(directory, device=device)
    check_causal_lm(model)
    loss = held_out_loss(model, windows, count, global_bs, micro, 0, 1, device, PRECISIONS[precision])
    result = {"loss": loss, "perplexity": perplexity(loss), "tokens": count * global_bs * seq_len}
    out(f"held-out loss {loss:.4f}, perplexity {result['perplexity']:.2f}: {count * global_bs} windows of "
        f"{seq_len} tokens ({result['tokens']:,} tokens) from {prepared.description}")
    return result

