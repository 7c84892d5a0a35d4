"""Check spec files without allocating weights: parse, resolve, meta build, meta forward."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from megaspec.errors import Problem, SpecError

NO_SIZES = ("sizes were not checked: the spec has no root `config:` and no model in conf/model uses it; "
            "give --model NAME (or a root `config:`) to build it on the meta device too")


def validate_file(path: str | Path, model: str | None = None,
                  allow_imports: tuple[str, ...] | list[str] = ()) -> tuple[list[Problem], str]:
    """Return (problems, one-line summary) for a spec file; no problems means valid.

    Without sizes, only what needs none is checked (names, kinds, slots, params); the
    summary then says so (it is NO_SIZES). Import paths are allowed only by `allow_imports`.
    """
    from megaspec.build import build_module, meta_forward
    from megaspec.inputs import NoSizes, spec_file_inputs
    from megaspec.resolve import check_without_sizes
    from megaspec.summary import count_parameters

    shown = str(path)
    try:
        spec, configs, _ = spec_file_inputs(Path(path), shown, model)
        built = build_module(spec, configs, device="meta", allow_imports=tuple(allow_imports))
    except NoSizes as exc:
        return check_without_sizes(exc.spec, tuple(allow_imports)), NO_SIZES
    except SpecError as exc:
        return exc.problems, ""
    try:
        out = meta_forward(built)
    except SpecError as exc:  # a shape mismatch between slots, at the module that failed
        return [Problem(p.message, p.path, p.file or shown, p.line) for p in exc.problems], ""
    main = getattr(out, "logits", None)
    if main is None:
        main = getattr(out, "last_hidden_state", None)
    shape = f", output {tuple(main.shape)}" if main is not None else ""
    return [], f"{count_parameters(built):,} parameters, meta forward ok{shape}"


def main(argv: Sequence[str] | None = None) -> int:
    """`megaspec validate FILE...`: print every problem as file:line: path: message."""
    parser = argparse.ArgumentParser(prog="megaspec validate", description=main.__doc__)
    parser.add_argument("files", nargs="+", help="spec YAML files")
    parser.add_argument("--model", help="take sizes from this conf/model entry (default: the model using the spec)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    parser.add_argument("--allow-imports", action="append", default=[], metavar="PREFIX",
                        help="import-path prefix the spec may name as `module:` (repeatable); only for code you trust")
    args = parser.parse_args(argv)
    bad = 0
    for file in args.files:
        problems, summary = validate_file(file, args.model, args.allow_imports)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            bad += 1
        if summary == NO_SIZES:
            print(f"{file}: {'' if problems else 'names, kinds and params ok; '}{NO_SIZES}",
                  file=sys.stderr if problems else sys.stdout)
        elif not problems and not args.quiet:
            print(f"{file}: ok ({summary})")
    return 1 if bad else 0
