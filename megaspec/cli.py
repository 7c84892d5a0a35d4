"""The `megaspec` command: build | train | eval | compare | diff | generate | validate | list | schema | convert."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
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

build, train, validate and convert take --allow-imports PREFIX: an import path (module: pkg.mod.Class)
that specs and checkpoints may then name; a spec or checkpoint can never allow one itself.
"""


def _swept_keys(overrides: Sequence[str]) -> set[str]:
    """The keys a sweep varies (model.config.num_layers=2,4): what tells its jobs apart."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return set()  # Hydra reports the bad override itself
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


ALLOW_IMPORTS = "--allow-imports"
ALLOW_HELP = ("import-path prefix a spec or checkpoint may name as `module:` (repeatable); only for code you trust: "
              "a spec or checkpoint can never allow imports itself")


def _pop_allow_imports(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the --allow-imports prefixes, the other arguments) of a Hydra command line."""
    allow, rest = [], []
    args = iter(argv)
    for arg in args:
        if arg == ALLOW_IMPORTS:
            value = next(args, None)
            if value is None or value.startswith("-"):
                raise _UsageError(f"{ALLOW_IMPORTS} needs a prefix, e.g. {ALLOW_IMPORTS} my_package.layers")
            allow.append(value)
        elif arg.startswith(ALLOW_IMPORTS + "="):
            allow.append(arg.partition("=")[2])
        else:
            rest.append(arg)
    return allow, rest


class _UsageError(Exception):
    """A command line that cannot be run: exit status 2."""


class _TaskFailed(Exception):
    """An unexpected error inside the task itself (a bug, not a bad override): re-raised as it was."""


def _run_hydra(argv: list[str], prog: str, task: Callable[[Any, Any], object],
               before: Sequence[str] = (), after: Sequence[str] = (), sweep: Sequence[str] = ()) -> int:
    """Run `task(cfg, hydra_config)` under hydra.main with conf/ + specs/ and the given overrides.

    With -m/--multirun every job of the sweep runs, in its own directory, with `sweep`
    added to its overrides; a job that fails is reported and the others still run.
    `--plugins a,b` (and `plugins:` in the caller's own config) name plug-in modules to import first.
    """
    import hydra
    from omegaconf import OmegaConf, open_dict

    from megaspec.compose import record_sources, searchpath_override
    from megaspec.hydra_config import (
        config_plugins,
        flags_first,
        import_plugins,
        node_overrides,
        plugins_in_overrides,
        plugins_option,
        store_config_defaults,
    )
    from megaspec.hydra_errors import check_resolves, composition_error, is_grammar_error
    from megaspec.paths import conf_dir

    allow, argv = _pop_allow_imports(argv)
    argv, plugins = plugins_option(argv)
    flags, typed = flags_first(argv)
    overrides = node_overrides(typed)  # a dict override of a spec node replaces the node
    import_plugins([*plugins, *plugins_in_overrides(overrides), *config_plugins(argv, searchpath_override())])
    store_config_defaults()
    multirun = bool({"-m", "--multirun"} & set(flags)) or "hydra.mode=MULTIRUN" in overrides
    swept = _swept_keys(overrides) if multirun else set()
    lead = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one process speaks for all
    failed: list[str] = []

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)
    def run(cfg) -> None:  # noqa: ANN001  (Hydra passes a DictConfig)
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        job = ""
        # The overrides as typed: an interpolation in one is resolved (and checked) below, not here.
        task_overrides = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
        if multirun:
            varied = [o for o in task_overrides if o.lstrip("+~").split("=", 1)[0] in swept]
            job = f"job {hydra_cfg.job.num} ({' '.join(varied)})"
            if lead:
                print(f"== {job}: {hydra_cfg.runtime.output_dir}", flush=True)
        try:
            check_resolves(cfg, typed)
            import_plugins(cfg.get("plugins") or ())
            record_sources(cfg, hydra_cfg.runtime.choices, task_overrides)
            if allow:  # the caller's own allow-list: on the command line, as in the user's config
                with open_dict(cfg):
                    cfg.allow_imports = [*(cfg.get("allow_imports") or []), *allow]
            task(cfg, hydra_cfg)
        except SpecError as exc:  # one readable line, not a traceback
            print(f"error: {job + ': ' if multirun else ''}{exc}", file=sys.stderr, flush=True)
            failed.append(job)
        except Exception as exc:  # a bug: show it; in a sweep, let the other jobs run
            if not multirun:
                raise _TaskFailed() from exc
            import traceback

            traceback.print_exc()
            failed.append(job)

    sys.argv = [prog, *flags, searchpath_override(), *before, *(sweep if multirun else ()), *overrides, *after]
    # Hydra prints a composition error over several lines with a footer about HYDRA_FULL_ERROR;
    # with the variable set it raises instead, and the error is reported here as one paragraph.
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        run()
    except _TaskFailed as bug:
        raise bug.__cause__ from None  # type: ignore[misc]
    except Exception as exc:  # composing the config failed: the user's overrides are at fault
        print(f"error: {composition_error(exc, typed, _composition_fails)}", file=sys.stderr)
        return 2 if is_grammar_error(exc, typed) else 1
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved
    if multirun and failed and lead:
        print(f"error: {len(failed)} job(s) failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _composition_fails(overrides: Sequence[str]) -> bool:
    """Whether these overrides alone fail to compose (to find the one to blame)."""
    from megaspec.compose import compose

    try:
        compose(overrides)
    except SpecError:
        return True
    return False


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
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as exc:
            raise SpecError(f"cannot write '{args.output}': {exc.strerror or exc}") from None
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
    parser.add_argument(ALLOW_IMPORTS, action="append", default=[], metavar="PREFIX", help=ALLOW_HELP)
    args = parser.parse_args(argv)
    from megaspec.checkpoint import load, save
    from megaspec.interop.hf import from_hf, to_hf

    if args.to == "hf":
        out = Path(args.output)
        # save_pretrained replaces shard files it finds there: write only into a new or empty directory.
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise SpecError(f"'{out}' exists and is not an empty directory; convert --to hf writes a new one")
        to_hf(load(args.source, allow_imports=args.allow_imports), args.output, hf_class=args.hf_class)
    else:
        from megaspec.generation.tokenizer import read_tokenizer_files, write_tokenizer_files

        # Read (and checked) first: a user's own tokenizer file there is never replaced.
        tokenizer_files = read_tokenizer_files(args.source, args.output)
        save(from_hf(args.source), args.output)
        write_tokenizer_files(tokenizer_files, args.output)  # so generation reads text as the HF model does
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
    except _UsageError as exc:
        print(f"megaspec {args[0]}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named cannot be read or written
        where = f" '{exc.filename}'" if exc.filename else ""
        print(f"error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
