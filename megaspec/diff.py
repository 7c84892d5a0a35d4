"""`megaspec diff A B`: what differs between two models, slot by slot.

A and B are each a spec file, a model name of conf/model, a megaspec checkpoint or a
run directory. Both trees are resolved (slot defaults filled in, params validated)
and compared node by node: a different module or params is reported with the file
and line on each side; below a swapped module only the swap is reported. Then the
config fields that differ, and parameters and forward FLOPs per token for every slot
where they change, from meta-device builds (nothing is allocated). Exit status as
diff(1): 0 identical, 1 different, 2 trouble.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaspec.configs import Configs, make_configs, root_config
from megaspec.errors import SpecError
from megaspec.resolve import Resolved, resolve
from megaspec.source import load_yaml
from megaspec.spec import ModuleSpec, parse_spec
from megaspec.train.metrics import si
from megaspec.train.record import RUN_FILE


@dataclass
class Side:
    """One model to compare: where it came from, its spec, configs and the import allow-list."""

    label: str
    spec: ModuleSpec
    configs: Configs
    allow: tuple[str, ...] = ()


def _from_recorded(label: str, file: Path, prefix: tuple[str, ...]) -> Side:
    """A spec and config recorded inside a YAML/JSON file (a run's run.json or .hydra/config.yaml)."""
    data, smap = load_yaml(file)
    node: Any = data
    for key in prefix:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or "spec" not in node or "config" not in node:
        raise SpecError(f"{file}: records no model.spec and model.config")
    spec = parse_spec(node["spec"], smap.child((*prefix, "spec")))
    # An allow-list only ever comes from the caller: never from a file being compared.
    return Side(label, spec, make_configs(node["config"], smap.child((*prefix, "config")), (*prefix, "config")))


def load_side(arg: str) -> Side:
    """A spec file, a conf/model name (or its file), a checkpoint directory or a run directory."""
    from megaspec.checkpoint import MANIFEST
    from megaspec.inputs import model_inputs
    from megaspec.paths import conf_dir

    path = Path(arg)
    if path.is_dir():
        if (path / MANIFEST).is_file():  # read as data: its allow_imports are not honoured either
            return _from_recorded(arg, path / MANIFEST, ())
        if (path / RUN_FILE).is_file():
            return _from_recorded(arg, path / RUN_FILE, ("config", "model"))
        if (path / ".hydra" / "config.yaml").is_file():
            return _from_recorded(arg, path / ".hydra" / "config.yaml", ("model",))
        raise SpecError(f"{arg}: neither a megaspec checkpoint ({MANIFEST}) nor a run directory ({RUN_FILE})")
    if path.suffix in (".yaml", ".yml") and path.is_file():
        models = (conf_dir() / "model").resolve()
        if path.resolve().parent == models:  # conf/model/NAME.yaml: the model NAME
            return Side(arg, *model_inputs(path.stem)[:2])
        spec, configs, _ = model_inputs(path)
        return Side(arg, spec, configs)
    if (conf_dir() / "model" / f"{arg}.yaml").is_file():
        spec, configs, allow = model_inputs(arg)
        return Side(f"{arg} (conf/model/{arg}.yaml)", spec, configs, allow)
    raise SpecError(f"{arg}: not a spec file, a model name of conf/model, a checkpoint or a run directory")


def nodes(root: Resolved) -> dict[str, Resolved]:
    """Every resolved node by tree path, root first ('' is the root); a repeated layer appears once."""
    out: dict[str, Resolved] = {}
    stack = [root]
    while stack:
        r = stack.pop()
        if r.path in out:
            continue
        out[r.path] = r
        children = [c for v in r.children.values() for c in (v if isinstance(v, list) else [v]) if c is not None]
        stack += reversed(children)
    return out


def _where(r: Resolved, key: tuple[Any, ...]) -> str:
    """file:line of a node's module (key ('module',)) or of one of its params, or 'command line'."""
    smap = r.spec.smap
    if key == ("module",) and key not in smap.lines:
        key = ()  # a node written as a bare name: its line is the name's
    value = smap.values.get(key, ...) if key else r.spec.module
    file, line = smap.locate(key, r.spec.module if key in ((), ("module",)) else value)
    if file is None:
        return "default"
    return f"{file}:{line}" if line else file


def _text(value: Any) -> str:
    return json.dumps(value, default=str) if not isinstance(value, str) else value


def _params(r: Resolved) -> dict[str, Any]:
    """The params a spec gives, with the constructor's defaults for those it leaves out (written or not, the same)."""
    sig = inspect.signature(r.entry.cls.__init__)
    defaults = {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **r.params}


def slot_changes(a: Resolved, b: Resolved) -> list[str]:
    """The slots whose module, params or config override differ, with file:line on each side."""
    left, right = nodes(a), nodes(b)
    lines, cut = [], []
    for path in [*left, *(p for p in right if p not in left)]:
        if any(path.startswith(c + ".") or path.startswith(c + "[") for c in cut):
            continue  # below a swapped or missing module: its own slots are not comparable
        x, y, name = left.get(path), right.get(path), path or "<root>"
        if x is None or y is None:
            r = x or y
            assert r is not None
            lines.append(f"{name}: only in {'A' if y is None else 'B'}: {r.entry.name} "
                         f"({_where(r, ('module',))})")
            cut.append(path)
        elif x.entry.name != y.entry.name:
            lines.append(f"{name}: {x.entry.name} ({_where(x, ('module',))}) -> "
                         f"{y.entry.name} ({_where(y, ('module',))})")
            cut.append(path)
        else:
            px, py = _params(x), _params(y)
            for key in sorted(set(px) | set(py)):
                if px.get(key) != py.get(key):
                    lines.append(f"{name}.params.{key}: {_text(px.get(key))} ({_where(x, ('params', key))}) -> "
                                 f"{_text(py.get(key))} ({_where(y, ('params', key))})")
            if dict(x.spec.config or {}) != dict(y.spec.config or {}) and x.spec.config != y.spec.config:
                lines.append(f"{name}.config: {_text(x.spec.config)} ({_where(x, ('config',))}) -> "
                             f"{_text(y.spec.config)} ({_where(y, ('config',))})")
    return lines


def config_changes(a: Configs, b: Configs) -> list[str]:
    """'field: A -> B' for every config field that differs (named configs as name.field)."""
    def flat(configs: Configs) -> dict[str, Any]:
        return {f"{name + '.' if name else ''}{k}": v for name, c in configs.items()
                for k, v in c.model_dump(mode="json").items()}

    x, y = flat(a), flat(b)
    return [f"{k}: {_text(x.get(k, '-'))} -> {_text(y.get(k, '-'))}" for k in sorted(set(x) | set(y))
            if x.get(k, "-") != y.get(k, "-")]


def slot_costs(root: Resolved, model: nn.Module, seq: int) -> dict[str, tuple[int, int, int]]:
    """Tree path -> (parameters, forward FLOPs over `seq` tokens, instances), summed over repeats."""
    from torch.utils.flop_counter import FlopCounterMode

    params: dict[str, int] = {}
    for name, p in model.named_parameters():  # tied weights once, under their first name
        parts = name.split(".")[:-1]
        for i in range(len(parts) + 1):
            key = ".".join(parts[:i])
            params[key] = params.get(key, 0) + p.numel()
    flops: dict[str, int] = {}
    make = getattr(model, "example_inputs", None)
    if make is not None:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(**make(batch=1, seq=seq, device="meta"))
        for key, by_op in counter.get_flop_counts().items():
            if key != "Global":
                flops[key.partition(".")[2]] = int(sum(by_op.values()))
    out: dict[str, tuple[int, int, int]] = {}

    def visit(r: Resolved, fqn: str) -> None:
        p, f, n = out.get(r.path, (0, 0, 0))
        out[r.path] = (p + params.get(fqn, 0), f + flops.get(fqn, 0), n + 1)
        for slot, child in r.children.items():
            if isinstance(child, list):
                for i, c in enumerate(child):
                    visit(c, f"{fqn}.{slot}.{i}" if fqn else f"{slot}.{i}")
            elif child is not None:
                visit(child, f"{fqn}.{slot}" if fqn else slot)

    visit(root, "")
    return out


def cost_table(a: dict[str, tuple[int, int, int]], b: dict[str, tuple[int, int, int]], seq: int) -> list[str]:
    """Rows of parameters and forward FLOPs per token for the slots where either differs."""
    header = ["slot", "params A", "params B", "change", "FLOPs/token A", "FLOPs/token B", "change"]
    rows = [header]
    for path in [*a, *(p for p in b if p not in a)]:
        x, y = a.get(path), b.get(path)
        if x is not None and y is not None and x[:2] == y[:2]:
            continue
        ca, cb = (x or y or (0, 0, 1))[2], (y or x or (0, 0, 1))[2]  # instances: layers repeat
        name = (path or "<model>") + (f" (x{ca})" if ca == cb > 1 else f" (x{ca} -> x{cb})" if ca != cb else "")
        px, py = (x[0] if x else 0), (y[0] if y else 0)
        fx, fy = (x[1] / seq if x else 0), (y[1] / seq if y else 0)
        rows.append([name, f"{px:,}" if x else "-", f"{py:,}" if y else "-", f"{py - px:+,}",
                     si(fx, 3) if x else "-", si(fy, 3) if y else "-", ("+" if fy >= fx else "") + si(fy - fx, 3)])
    if len(rows) == 1:
        return ["none"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]


def diff(a: Side, b: Side, seq: int = 128) -> tuple[bool, list[str]]:
    """(identical, report lines)."""
    from megaspec.build import build_module

    ra, rb = resolve(a.spec, a.configs, a.allow), resolve(b.spec, b.configs, b.allow)
    slots, config = slot_changes(ra, rb), config_changes(a.configs, b.configs)
    lines = [f"A: {a.label}", f"B: {b.label}"]
    if not slots and not config:
        return True, [*lines, f"identical: the same {len(nodes(ra))} slots, modules, params and config"]
    lines += ["", "slots that differ (module or params):", *(f"  {s}" for s in slots or ["none"])]
    lines += ["", "config fields that differ:", *(f"  {c}" for c in config or ["none"])]
    seq = min(seq, root_config(a.spec, a.configs).max_position_embeddings,
              root_config(b.spec, b.configs).max_position_embeddings)
    costs = []
    for side, root in ((a, ra), (b, rb)):
        model = build_module(side.spec, side.configs, device="meta", allow_imports=side.allow)
        costs.append(slot_costs(root, model, seq))
    lines += ["", f"parameters and forward FLOPs per token (at {seq} tokens), where they change:",
              *(f"  {row}" for row in cost_table(*costs, seq))]
    return False, lines


def main(argv: Sequence[str]) -> int:
    """Entry point of `megaspec diff`."""
    parser = argparse.ArgumentParser(
        prog="megaspec diff",
        description="Compare two models (spec files, conf/model names, checkpoints or run directories): the slots "
                    "whose module or params differ, config fields, parameters and FLOPs per token. "
                    "Exit status 0: identical, 1: different, 2: trouble.")
    parser.add_argument("a", metavar="A")
    parser.add_argument("b", metavar="B")
    parser.add_argument("--seq-len", type=int, default=128, help="context length for FLOPs per token (default 128)")
    args = parser.parse_args(argv)
    try:
        same, lines = diff(load_side(args.a), load_side(args.b), args.seq_len)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if same else 1
