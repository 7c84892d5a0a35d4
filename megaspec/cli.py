"""The `megaspec` command: build | train | eval | compare | diff | generate | validate | list | schema | convert."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from megaspec.errors import SpecError

USAGE = """usage: megaspec COMMAND [ARGS]

commands:
  build [OVERRIDES]   build a model from conf/ + specs/ and print its summary (Hydra overrides; --help)
  train [OVERRIDES]   train it: trainer.*, data=text|jsonl|synthetic; -m to sweep; torchrun for several processes
  eval +checkpoint=DIR [OVERRIDES]   a saved model's held-out loss and perplexity on data=...
  compare DIR...      runs side by side: loss curves (PNG) and a table (terminal and markdown)
  diff A B            two specs, model configs, checkpoints or run directories: slots, config, params, FLOPs
  generate +checkpoint=DIR prompt=TEXT   continue a prompt with a saved, trained or HF model (--help)
  validate FILE...    check spec files without allocating weights
  list [KIND]         registered modules: name, kind, class, origin
  schema [-o FILE]    JSON Schema of the spec file format, for editors
  convert SRC OUT     HF save_pretrained directory -> megaspec checkpoint (--to hf: the reverse)
"""


def _split_hydra_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, overrides): argparse takes no flag after its positional overrides."""
    from hydra._internal.utils import get_args_parser

    actions = get_args_parser()._option_string_actions
    flags: list[str] = []
    overrides: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        action = actions.get(arg.split("=", 1)[0]) if arg.startswith("-") else None
        if action is None:
            (flags if arg.startswith("-") else overrides).append(arg)  # an unknown flag: argparse will say so
            continue
        flags.append(arg)
        if "=" in arg or action.nargs == 0:
            continue
        if action.nargs is None or (action.nargs == "?" and args and args[0] in (action.choices or ())):
            if args:
                flags.append(args.pop(0))
    return flags, overrides


def _swept_keys(overrides: Sequence[str]) -> set[str]:
    """The keys a sweep varies (model.config.num_layers=2,4): what tells its jobs apart."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return set()  # Hydra reports the bad override itself
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def _run_hydra(argv: list[str], prog: str, task: Callable[[Any, Any], object],
               before: Sequence[str] = (), after: Sequence[str] = (), sweep: Sequence[str] = ()) -> int:
    """Run `task(cfg, hydra_config)` under hydra.main with conf/ + specs/ and the given overrides.

    With -m/--multirun every job of the sweep runs, in its own directory, with `sweep`
    added to its overrides; a job that fails is reported and the others still run.
    """
    import hydra

    from megaspec.compose import record_sources, searchpath_override
    from megaspec.paths import conf_dir

    flags, overrides = _split_hydra_args(argv)
    multirun = bool({"-m", "--multirun"} & set(flags)) or "hydra.mode=MULTIRUN" in overrides
    swept = _swept_keys(overrides) if multirun else set()
    lead = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one process speaks for all
    failed: list[str] = []

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)
    def run(cfg) -> None:  # noqa: ANN001  (Hydra passes a DictConfig)
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        record_sources(cfg, hydra_cfg.runtime.choices)
        varied = [o for o in hydra_cfg.overrides.task if o.lstrip("+~").split("=", 1)[0] in swept]
        job = f"job {hydra_cfg.job.num} ({' '.join(varied)})" if multirun else ""
        if multirun and lead:
            print(f"== {job}: {hydra_cfg.runtime.output_dir}", flush=True)
        try:
            task(cfg, hydra_cfg)
        except SpecError as exc:  # one readable line, not a traceback
            print(f"error: {job + ': ' if multirun else ''}{exc}", file=sys.stderr, flush=True)
            failed.append(job)
        except Exception:  # a bug: show it, and let the sweep's other jobs run
            if not multirun:
                raise
            import traceback

            traceback.print_exc()
            failed.append(job)

    sys.argv = [prog, *flags, searchpath_override(), *before, *(sweep if multirun else ()), *overrides, *after]
    run()
    if multirun and failed and lead:
        print(f"error: {len(failed)} job(s) failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _build(argv: list[str]) -> int:
    from megaspec.build_report import build_and_report

    # Under -m each job gets its own directory, holding its config and overrides.
    return _run_hydra(argv, "megaspec build", lambda cfg, _: build_and_report(cfg),
                      sweep=["hydra.output_subdir=.hydra"])


# No single quotes in here: it reaches Hydra as one quoted override, hydra.help.template='...'.
TRAIN_HELP = """megaspec train [OVERRIDES]: train on a text or JSON-lines file, the bundled text or random tokens.

Overrides use the Hydra grammar, as for megaspec build:
  model=llama model.config.num_layers=2   the model and its sizes
  trainer.max_steps=500 trainer.lr=1e-3   steps, optimizer, schedule, precision (see trainer:)
  trainer.global_batch_size=32 trainer.micro_batch_size=8   gradient accumulation makes up the rest
  data.path=FILE data=jsonl               your own text (tokenized once, cached); data=synthetic: random tokens
  data.tokenizer=bpe data.vocab_size=4096 train a byte-level BPE on it (or a tokenizer.json; default: bytes)
  trainer.eval_every=50 data.val_fraction=0.1   held-out loss and perplexity
  trainer.resume=outputs/DATE/TIME/checkpoints   continue from the latest checkpoint there
  parallel=fsdp_tp                        the layout under torchrun --nproc-per-node N -m megaspec train
  -m model.config.num_layers=2,4          a sweep: every variant, one after another, same data and seed

Each run writes run.json, metrics.jsonl, loss.png, tokenizer.json, checkpoints/ and model/ to
outputs/DATE/TIME (hydra.run.dir=...); a sweep writes one such directory per job under multirun/DATE/TIME/.

== Configuration groups ==
$APP_CONFIG_GROUPS
== Config ==
$CONFIG"""


def _train(argv: list[str]) -> int:
    import shutil
    import tempfile

    import torch.distributed as dist
    from hydra.types import RunMode

    from megaspec.train import train

    def task(cfg: Any, hydra_cfg: Any) -> None:
        # A sweep's jobs run one after another in the same torchrun processes: one process group serves them all.
        train(cfg, run_dir=hydra_cfg.runtime.output_dir, keep_process_group=hydra_cfg.mode == RunMode.MULTIRUN)

    # Unlike `build`, a run writes files (metrics, loss curve, checkpoints): give it a fresh
    # Hydra run directory. Under torchrun only rank 0 makes one; the others are told its path,
    # and Hydra's own directories for them (a sweep's multirun.yaml, its job folders) go to a scratch folder.
    scratch = None
    if int(os.environ.get("RANK", "0")) == 0:
        before = ["hydra.run.dir=outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}", "hydra.output_subdir=.hydra",
                  "hydra.sweep.dir=multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}",
                  "hydra.help.app_name=megaspec train", f"hydra.help.template='{TRAIN_HELP}'"]
        after: list[str] = []
    else:
        scratch = tempfile.mkdtemp(prefix="megaspec-rank-")
        before, after = [], ["hydra.run.dir=.", "hydra.output_subdir=null", f"hydra.sweep.dir={scratch}"]
    try:
        return _run_hydra(argv, "megaspec train", task, before, after)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


EVAL_HELP = """megaspec eval +checkpoint=DIR [OVERRIDES]: the held-out loss and perplexity of a saved model.

The model is read from DIR (an exported megaspec checkpoint, or a run directory holding model/), with the
tokenizer saved beside it. The data and its held-out split are given as for megaspec train:
  data.path=FILE                          the last data.val_fraction (default 0.1) of FILE, never trained on
  data.val_path=FILE                      all of FILE
  data=jsonl                              JSON lines (data.text_field)
  trainer.seq_len=128 trainer.global_batch_size=8 trainer.eval_batches=4   the windows scored (null: all of them)

== Configuration groups ==
$APP_CONFIG_GROUPS
== Config ==
$CONFIG"""


def _eval(argv: list[str]) -> int:
    from megaspec.train.eval_cli import evaluate_checkpoint

    before = ["hydra.help.app_name=megaspec eval", f"hydra.help.template='{EVAL_HELP}'"]
    return _run_hydra(argv, "megaspec eval",
                      lambda cfg, h: evaluate_checkpoint(cfg, h.overrides.task, lambda m: print(m, flush=True)),
                      before)


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
    parser.add_argument("--hf-class", help="with --to hf: the HF class to write where several compute the model "
                                           "(e.g. Phi3ForCausalLM rather than MistralForCausalLM)")
    args = parser.parse_args(argv)
    from megaspec.checkpoint import load, save
    from megaspec.interop.hf import from_hf, to_hf

    if args.to == "hf":
        to_hf(load(args.source), args.output, hf_class=args.hf_class)
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


def _compare(argv: list[str]) -> int:
    from megaspec.train.compare import main

    return main(argv)


def _diff(argv: list[str]) -> int:
    from megaspec.diff import main

    return main(argv)


COMMANDS = {"build": _build, "train": _train, "eval": _eval, "compare": _compare, "diff": _diff,
            "generate": _generate, "validate": _validate, "list": _list, "schema": _schema, "convert": _convert}


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
