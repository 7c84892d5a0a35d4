"""`megaspec compare DIR...`: training runs side by side, as loss curves (PNG) and a table.

A run is a directory `megaspec train` wrote (run.json, metrics.jsonl); a sweep's
directory (multirun/DATE/TIME) stands for all its jobs. The table's setting columns are
the config values that differ between the runs, read from each run's recorded
config, so runs launched by different commands compare as well as a sweep's jobs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaspec.errors import SpecError
from megaspec.train.metrics import pyplot, read_metrics, si
from megaspec.train.record import RUN_FILE, read_run, status_of

MISSING = "-"


@dataclass
class Run:
    """One run directory, as recorded."""

    path: Path
    status: str
    record: dict[str, Any]
    metrics: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)  # flattened config
    name: str = ""

    def held_out(self) -> list[float]:
        """Held-out losses in step order."""
        return [r["val_loss"] for r in self.metrics if r.get("val_loss") is not None]


def is_run(path: Path) -> bool:
    """A directory megaspec train wrote into (or a sweep's job that failed before training)."""
    return (path / RUN_FILE).is_file() or (path / "metrics.jsonl").is_file() or (path / ".hydra").is_dir()


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(paths: Sequence[str]) -> list[Path]:
    """The run directories named, with a sweep's directory standing for its jobs, in order."""
    found: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if not path.is_dir():
            raise SpecError(f"{arg}: no such directory")
        if is_run(path):
            found.append(path)
            continue
        jobs = sorted((p for p in path.iterdir() if p.is_dir() and is_run(p)), key=_natural)
        if not jobs:
            raise SpecError(f"{arg}: not a run directory (no {RUN_FILE}) and holds none")
        found += jobs
    return found


def _normalized(config: dict[str, Any]) -> dict[str, Any]:
    """The config with its spec tree in canonical form (a bare name and {module: name} compare equal)."""
    from megaspec.spec import parse_spec

    model = config.get("model")
    if isinstance(model, dict) and model.get("spec") is not None:
        try:
            model = {**model, "spec": parse_spec(model["spec"]).to_dict()}
        except SpecError:
            pass  # an invalid spec (a failed run) compares as written
        config = {**config, "model": model}
    return config


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': leaf}; lists are leaves."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def load_run(path: Path) -> Run:
    """Read a run directory; what is missing shows as missing, never as an error."""
    record = read_run(path) or {}
    metrics_file = path / "metrics.jsonl"
    try:
        metrics = read_metrics(metrics_file) if metrics_file.is_file() else []
    except ValueError:  # a line cut short by a run that is still writing
        metrics = []
    config = record.get("config")
    if config is None and (path / ".hydra" / "config.yaml").is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"), resolve=False)
    settings = {k: v for k, v in flatten(_normalized(config or {})).items() if not k.startswith("sources.")}
    return Run(path, status_of(record if record else None), record, metrics, settings)


def short_key(key: str) -> str:
    """model.spec.submodules.decoder.submodules.layers.submodules.mlp.module -> spec.decoder.layers.mlp."""
    key = key.removeprefix("model.").replace(".submodules.", ".")
    return key.removesuffix(".module")


def differing(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values are not the same in every run; below a swapped module, only the swap."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.settings if k not in keys]
    diff = [k for k in keys if len({json.dumps(r.settings.get(k, MISSING), sort_keys=True) for r in runs}) > 1]
    swapped = [k.removesuffix(".module") for k in diff if k.endswith(".module")]
    return [k for k in diff if not any(k.startswith(node + ".") and k != node + ".module" for node in swapped)]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _si(value: float | None) -> str:
    return MISSING if value is None else si(value, 2)


def _loss(value: float | None) -> str:
    return MISSING if value is None or not math.isfinite(value) else f"{value:.4f}"


def table(runs: Sequence[Run], keys: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): run, status, the differing settings, size, cost, speed and held-out losses."""
    header = ["run", "status", *(short_key(k) for k in keys), "params", "FLOPs/token", "tokens/s", "steps",
              "final loss", "final val", "best val"]
    rows = []
    for run in runs:
        held = run.held_out()
        speeds = [r["tokens_per_s"] for r in run.metrics if r.get("tokens_per_s")]
        last = run.metrics[-1] if run.metrics else {}
        rows.append([run.name, run.status, *(_value(run.settings.get(k, MISSING)) for k in keys),
                     _si(run.record.get("parameters")), _si(run.record.get("flops_per_token")),
                     _si(statistics.median(speeds) if speeds else None), str(last.get("step", MISSING)),
                     _loss(last.get("loss")), _loss(held[-1] if held else None), _loss(min(held) if held else None)])
    return header, rows


def format_text(header: list[str], rows: list[list[str]]) -> str:
    """An aligned plain-text table."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def format_markdown(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)])


def label(run: Run, keys: Sequence[str]) -> str:
    """A legend entry: the run's name and its values of the settings that differ."""
    names = [short_key(k).rsplit(".", 1)[-1] for k in keys]
    if len(set(names)) < len(names):
        names = [short_key(k) for k in keys]
    values = ", ".join(f"{n}={_value(run.settings.get(k, MISSING))}" for n, k in zip(names, keys))
    return f"{run.name}: {values}" if values else run.name


def plot(runs: Sequence[Run], keys: Sequence[str], path: Path) -> bool:
    """Training (thin) and held-out (dots) loss against tokens and training FLOPs; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (by_tokens, by_flops) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80, sharey=True)
    for i, run in enumerate(r for r in runs if r.metrics):
        color = f"C{i % 10}"
        flops = float(run.record.get("flops_per_token") or 0)
        tokens = [float(r.get("tokens", 0)) for r in run.metrics]
        losses = [r["loss"] for r in run.metrics]
        held = [(float(r.get("tokens", 0)), r["val_loss"]) for r in run.metrics if r.get("val_loss") is not None]
        for ax, scale in ((by_tokens, 1.0), (by_flops, flops)):
            if scale == 0:
                continue
            name = label(run, keys) if ax is by_tokens else None
            ax.plot([t * scale for t in tokens], losses, color=color, alpha=0.35, linewidth=1,
                    label=None if held else name)
            if held:
                ax.plot([t * scale for t, _ in held], [v for _, v in held], color=color, marker="o", markersize=3,
                        label=name)
    by_tokens.set_xlabel("tokens")
    by_flops.set_xlabel("training FLOPs")
    by_tokens.set_ylabel("loss (thin: training, dots: held-out)")
    for ax in (by_tokens, by_flops):
        ax.grid(True, alpha=0.3)
    if by_tokens.get_legend_handles_labels()[0]:
        by_tokens.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def compare(paths: Sequence[str]) -> tuple[list[Run], list[str]]:
    """The runs named (sweeps expanded), named relative to their common folder, and the differing keys."""
    found = find_runs(paths)
    runs = [load_run(p) for p in found]
    parts = [p.resolve().parts for p in found]
    common = 0
    while len(runs) > 1 and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    for run, p, arg in zip(runs, parts, found):
        run.name = "/".join(p[common:]) if len(runs) > 1 else str(arg)
    return runs, differing(runs)


def main(argv: Sequence[str]) -> int:
    """Entry point of `megaspec compare`."""
    parser = argparse.ArgumentParser(
        prog="megaspec compare",
        description="Compare training runs: loss curves against tokens and FLOPs (PNG) and a table "
                    "(printed, and written as markdown beside the PNG).")
    parser.add_argument("runs", nargs="+", metavar="DIR", help="run directories, or a sweep's directory")
    parser.add_argument("-o", "--output", default="compare.png", help="the PNG to write (default: compare.png)")
    parser.add_argument("--markdown", help="the markdown table to write (default: the PNG's name with .md)")
    args = parser.parse_args(argv)
    runs, keys = compare(args.runs)
    header, rows = table(runs, keys)
    print(format_text(header, rows))
    png = Path(args.output)
    md = Path(args.markdown) if args.markdown else png.with_suffix(".md")
    md.write_text(format_markdown(header, rows) + "\n", encoding="utf-8")
    print(f"table: {md}")
    if plot(runs, keys, png):
        print(f"plot: {png}")
    else:
        print("plot: skipped (pip install matplotlib, or megaspec[train])")
    return 0
