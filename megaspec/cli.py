"""The `megaspec` command: build | train | validate | list | schema | convert."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megaspec.errors import SpecError

USAGE = """usage: megaspec COMMAND [ARGS]

commands:
  build [OVERRIDES]   build a model from conf/ + specs/ and print its summary (Hydra overrides; --help)
  train [OVERRIDES]   train it: trainer.*, data=text|synthetic; torchrun for several processes
  validate FILE...    check spec files without allocating weights
  list [KIND]         registered modules: name, kind, class, origin
  schema [-o FILE]    JSON Schema of the spec file format, for editors
  convert SRC OUT     HF save_pretrained directory -> megaspec checkpoint (--to hf: the reverse)

build, train, validate and convert take --allow-imports PREFIX: an import path (module: pkg.mod.Class)
that specs and checkpoints may then name; a spec or checkpoint can never allow one itself.
"""


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
               before: Sequence[str] = (), after: Sequence[str] = ()) -> int:
    """Run `task(cfg, hydra_config)` under hydra.main with conf/ + specs/ and the given overrides."""
    import os

    import hydra
    from omegaconf import open_dict

    from megaspec.compose import record_sources, searchpath_override
    from megaspec.hydra_errors import check_resolves, composition_error, is_grammar_error, overrides_in
    from megaspec.paths import conf_dir

    allow, argv = _pop_allow_imports(argv)
    overrides = overrides_in(argv)

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)
    def run(cfg) -> None:  # noqa: ANN001  (Hydra passes a DictConfig)
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        record_sources(cfg, hydra_cfg.runtime.choices)
        try:
            check_resolves(cfg, overrides)
            if allow:  # the caller's own allow-list: on the command line, as in the user's config
                with open_dict(cfg):
                    cfg.allow_imports = [*(cfg.get("allow_imports") or []), *allow]
            task(cfg, hydra_cfg)
        except SpecError as exc:  # one readable line, not a traceback
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except Exception as exc:
            raise _TaskFailed() from exc

    sys.argv = [prog, searchpath_override(), *before, *argv, *after]
    # Hydra prints a composition error over several lines with a footer about HYDRA_FULL_ERROR;
    # with the variable set it raises instead, and the error is reported here as one paragraph.
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        run()
    except _TaskFailed as failed:
        raise failed.__cause__ from None  # type: ignore[misc]
    except Exception as exc:  # composing the config failed: the user's overrides are at fault
        print(f"error: {composition_error(exc, overrides, _composition_fails)}", file=sys.stderr)
        return 2 if is_grammar_error(exc, overrides) else 1
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved
    return 0


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
    parser.add_argument(ALLOW_IMPORTS, action="append", default=[], metavar="PREFIX", help=ALLOW_HELP)
    args = parser.parse_args(argv)
    from megaspec.checkpoint import load, save
    from megaspec.interop.hf import from_hf, to_hf

    if args.to == "hf":
        out = Path(args.output)
        # save_pretrained replaces shard files it finds there: write only into a new or empty directory.
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise SpecError(f"'{out}' exists and is not an empty directory; convert --to hf writes a new one")
        to_hf(load(args.source, allow_imports=args.allow_imports), args.output)
    else:
        save(from_hf(args.source), args.output)
    print(f"wrote {args.output}")
    return 0


def _validate(argv: list[str]) -> int:
    from megaspec.validate import main

    return main(argv)


COMMANDS = {"build": _build, "train": _train, "validate": _validate, "list": _list, "schema": _schema,
            "convert": _convert}


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
