"""The `megaspec` command: build | train | generate | validate | list | schema | convert."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from megaspec.errors import SpecError

USAGE = """usage: megaspec COMMAND [ARGS]

commands:
  build [OVERRIDES]   build a model from conf/ + specs/ and print its summary (Hydra overrides; --help)
  train [OVERRIDES]   train it: trainer.*, data=text|synthetic; torchrun for several processes
  generate +checkpoint=DIR prompt=TEXT   continue a prompt with a saved, trained or HF model (--help)
  validate FILE...    check spec files without allocating weights
  list [KIND]         registered modules: name, kind, class, origin
  schema [-o FILE]    JSON Schema of the spec file format, for editors
  convert SRC OUT     HF save_pretrained directory -> megaspec checkpoint (--to hf: the reverse)
"""


def _run_hydra(argv: list[str], prog: str, task: Callable[[Any, Any], object],
               before: Sequence[str] = (), after: Sequence[str] = ()) -> int:
    """Run `task(cfg, hydra_config)` under hydra.main with conf/ + specs/ and the given overrides."""
    import hydra

    from megaspec.compose import record_sources, searchpath_override
    from megaspec.paths import conf_dir

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)
    def run(cfg) -> None:  # noqa: ANN001  (Hydra passes a DictConfig)
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        record_sources(cfg, hydra_cfg.runtime.choices)
        try:
            task(cfg, hydra_cfg)
        except SpecError as exc:  # one readable line, not a traceback
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

    sys.argv = [prog, searchpath_override(), *before, *argv, *after]
    run()
    return 0


def _build(argv: list[str]) -> int:
    from megaspec.build_report import build_and_report

    return _run_hydra(argv, "megaspec build", lambda cfg, _: build_and_report(cfg))


# No single quotes in here: it reaches Hydra as one quoted override, hydra.help.template='...'.
TRAIN_HELP = """megaspec train [OVERRIDES]: train a model on the bundled text corpus (bytes) or synthetic tokens.

Overrides use the Hydra grammar, as for megaspec build:
  model=llama model.config.num_layers=2   the model and its sizes
  trainer.max_steps=500 trainer.lr=1e-3   steps, optimizer, schedule, precision (see trainer:)
  trainer.global_batch_size=32 trainer.micro_batch_size=8   gradient accumulation makes up the rest
  data=synthetic                          random tokens (throughput) instead of text
  trainer.resume=outputs/DATE/TIME/checkpoints   continue from the latest checkpoint there
  parallel=fsdp_tp                        the layout under torchrun --nproc-per-node N -m megaspec train

Each run writes metrics.jsonl, loss.png, checkpoints/ and model/ to outputs/DATE/TIME (hydra.run.dir=...).

== Configuration groups ==
$APP_CONFIG_GROUPS
== Config ==
$CONFIG"""


def _train(argv: list[str]) -> int:
    import os

    from megaspec.train import train

    # Unlike `build`, a run writes files (metrics, loss curve, checkpoints): give it a fresh
    # Hydra run directory. Under torchrun only rank 0 makes one; the others are told its path.
    if int(os.environ.get("RANK", "0")) == 0:
        before = ["hydra.run.dir=outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}", "hydra.output_subdir=.hydra",
                  "hydra.help.app_name=megaspec train", f"hydra.help.template='{TRAIN_HELP}'"]
        after: list[str] = []
    else:
        before, after = [], ["hydra.run.dir=.", "hydra.output_subdir=null"]
    return _run_hydra(argv, "megaspec train", lambda cfg, h: train(cfg, run_dir=h.runtime.output_dir),
                      before, after)


def _list(argv: list[str]) -> int:
    from megaspec.registry import KINDS, entries, load_plugins

    parser = argparse.ArgumentParser(prog="megaspec list", description="List registered modules.")
    parser.add_argument("kind", nargs="?", choices=KINDS, metavar="KIND", help=f"one of: {', '.join(KINDS)}")
    parser.add_argument("--pattern", default="*", help="glob on names, e.g. '*norm*'")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    found = entries(args.kind, args.pattern)
    if args.json:
        from megaspec.registry import describe

        print(json.dumps([describe(e) for e in found], indent=2))
        return 0
    rows = [("NAME", "KIND", "CLASS", "ORIGIN")] + [(e.name, e.kind, e.qualname, e.origin) for e in found]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    for name, error in load_plugins().items():
        print(f"warning: plug-in {name} failed to load: {error}", file=sys.stderr)
    return 0


def _schema(argv: list[str]) -> int:
    from megaspec.schema import json_schema

    parser = argparse.ArgumentParser(prog="megaspec schema", description="Print the spec JSON Schema.")
    parser.add_argument("-o", "--output", help="write to this file instead of stdout")
    args = parser.parse_args(argv)
    text = json.dumps(json_schema(), indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


def _convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="megaspec convert",
        description="Convert weights between an HF transformers directory and a megaspec checkpoint.")
    parser.add_argument("source", help="an HF save_pretrained directory (or, with --to hf, a megaspec checkpoint)")
    parser.add_argument("output", help="the directory to write")
    parser.add_argument("--to", choices=("megaspec", "hf"), default="megaspec",
                        help="what to write (default: megaspec)")
    args = parser.parse_args(argv)
    from megaspec.checkpoint import load, save
    from megaspec.interop.hf import from_hf, to_hf

    if args.to == "hf":
        to_hf(load(args.source), args.output)
    else:
        from megaspec.generation.tokenizer import copy_tokenizer_files

        save(from_hf(args.source), args.output)
        copy_tokenizer_files(args.source, args.output)  # so generation reads text as the HF model does
    print(f"wrote {args.output}")
    return 0


def _generate(argv: list[str]) -> int:
    from megaspec.generation.command import main

    return main(argv)


def _validate(argv: list[str]) -> int:
    from megaspec.validate import main

    return main(argv)


COMMANDS = {"build": _build, "train": _train, "generate": _generate, "validate": _validate, "list": _list,
            "schema": _schema, "convert": _convert}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `megaspec` console script."""
    if hasattr(signal, "SIGPIPE"):  # `megaspec list | head` ends quietly, as shell tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        from megaspec.errors import did_you_mean

        print(f"megaspec: unknown command '{args[0]}'{did_you_mean(args[0], list(COMMANDS))}\n\n{USAGE}",
              file=sys.stderr)
        return 2
    try:
        return command(args[1:])
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
