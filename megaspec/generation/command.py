"""`megaspec generate`: a prompt in, its continuation streamed to stdout as it is produced."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaspec.checkpoint import MANIFEST
from megaspec.errors import SpecError, did_you_mean
from megaspec.generation.generate import Generation, Step
from megaspec.generation.tokenizer import Tokenizer, load_tokenizer

HELP = """megaspec generate +checkpoint=DIR prompt=TEXT [OPTION=VALUE ...]: continue a prompt, streaming the text.

  +checkpoint=DIR      a megaspec checkpoint (megaspec.yaml), a training run directory (its model/),
                       or an HF save_pretrained directory (config.json; converted on the fly)
  prompt=TEXT          the text to continue, read with the model's own tokenizer: the byte
                       tokenizer a `megaspec train` model was trained with, else DIR/tokenizer.json
  max_new_tokens=64    how many tokens to add at most
  temperature=0        0: greedy; above 0: sampling
  top_k=K top_p=P      keep the K most likely tokens / the most likely ones holding P of the probability
  seed=S               makes sampling reproducible
  eos_token_id=ID      stop there (default: the directory's generation_config.json or config.json, if any)
  device=auto          auto (cuda when available), cpu or cuda
"""

# option -> how its value is read from the command line
OPTIONS: dict[str, Callable[[str], Any]] = {
    "checkpoint": str, "prompt": str, "max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float,
    "seed": int, "eos_token_id": int, "device": str,
}


def parse(argv: list[str]) -> dict[str, Any]:
    """KEY=VALUE arguments (`+checkpoint=` as in megaspec build) -> options; SpecError naming a bad one."""
    options: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0, "device": "auto"}
    for arg in argv:
        key, eq, value = arg.partition("=")
        key = key.removeprefix("+")
        if not eq or key not in OPTIONS:
            hint = did_you_mean(key, list(OPTIONS)) if eq else " (options are KEY=VALUE)"
            raise SpecError(f"command line: unknown option '{arg}'{hint}; see megaspec generate --help")
        try:
            options[key] = OPTIONS[key](value)
        except ValueError:
            raise SpecError(f"command line: {key} takes {OPTIONS[key].__name__}, got {value!r}") from None
    for key in ("checkpoint", "prompt"):
        if key not in options:
            raise SpecError(f"command line: give {'+checkpoint=DIR' if key == 'checkpoint' else 'prompt=TEXT'}; "
                            "see megaspec generate --help")
    return options


def load_model(source: str, device: torch.device) -> tuple[nn.Module, Path]:
    """The model at `source` (checkpoint, training run or HF directory) and the directory holding its files."""
    directory = Path(source)
    if not (directory / MANIFEST).is_file() and (directory / "model" / MANIFEST).is_file():
        directory = directory / "model"  # a `megaspec train` run: its exported model
    if (directory / MANIFEST).is_file():
        from megaspec.checkpoint import load

        return load(directory, device=device), directory
    if (directory / "config.json").is_file():
        from megaspec.interop.hf import from_hf

        return from_hf(directory, device=device), directory
    raise SpecError(f"+checkpoint={source}: not a megaspec checkpoint ({MANIFEST}), a training run (model/{MANIFEST}) "
                    "or an HF directory (config.json)")


def default_eos(directory: Path) -> list[int] | None:
    """The eos token id(s) an HF directory declares (generation_config.json, then config.json), if any."""
    for name in ("generation_config.json", "config.json"):
        file = directory / name
        if file.is_file():
            try:
                found = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
            except (ValueError, AttributeError):
                raise SpecError(f"{file}: not a JSON object") from None
            if isinstance(found, int) or (isinstance(found, list) and found):
                return [found] if isinstance(found, int) else found
    return None


def stream(run: Iterable[Step], tokenizer: Tokenizer, eos: list[int], out: Any = None) -> str:
    """Write the text of each new token to `out` (stdout) as it comes, holding back an unfinished character."""
    out = out or sys.stdout
    ids: list[int] = []
    shown = ""
    for step in run:
        token = int(step.tokens[0])
        if token in eos:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):  # the first bytes of a character: wait for the rest
            continue
        out.write(text[len(shown):])
        out.flush()
        shown = text
    text = tokenizer.decode(ids)
    out.write(text[len(shown):] + "\n")
    out.flush()
    return text


def main(argv: list[str]) -> int:
    """Run `megaspec generate`."""
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    options = parse(argv)
    name = options.pop("device")
    if name not in ("auto", "cpu", "cuda"):
        raise SpecError(f"command line: device must be auto, cpu or cuda, got {name!r}")
    device = torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")
    model, directory = load_model(options.pop("checkpoint"), device)
    tokenizer = load_tokenizer(directory)
    prompt = options.pop("prompt")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise SpecError("command line: the prompt is empty; give prompt=TEXT with at least one token")
    given = options.pop("eos_token_id", None)
    eos = [given] if given is not None else default_eos(directory) or []
    run = Generation(model, torch.tensor([ids]), eos_token_id=eos or None, **options)
    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a character gets '?', not an error
        sys.stdout.reconfigure(errors="replace")
    sys.stdout.write(prompt)
    stream(run, tokenizer, eos)
    return 0
