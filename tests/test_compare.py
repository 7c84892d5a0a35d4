"""`megaspec compare`: fixed runs give a fixed table; failed, running and stopped runs are listed as such."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from megaspec.train.compare import compare, format_markdown, format_text, main, table

SPEC = "model.spec.submodules.decoder.submodules.layers.submodules.mlp"


def run_dir(root: Path, name: str, status: str, config: dict, metrics: list[dict], **record: object) -> Path:
    path = root / name
    path.mkdir(parents=True)
    run = {"status": status, "host": socket.gethostname(), "pid": record.pop("pid", os.getpid()),
           "config": config, **record}
    (path / "run.json").write_text(json.dumps(run))
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return path


def config(mlp: object, layers: int, lr: float = 1e-3) -> dict:
    spec = {"module": "gpt_model", "submodules": {"decoder": {"module": "transformer_block", "submodules": {
        "layers": {"module": "transformer_layer", "submodules": {"mlp": mlp}}}}}}
    return {"model": {"spec": spec, "config": {"num_layers": layers, "hidden_size": 64}},
            "trainer": {"lr": lr, "seed": 0}, "sources": {"model": f"conf/model/x{layers}.yaml"}}


def steps(losses: list[float], held: dict[int, float], tokens_per_s: float) -> list[dict]:
    out = []
    for i, loss in enumerate(losses, 1):
        row = {"step": i, "tokens": 1000 * i, "loss": loss, "tokens_per_s": tokens_per_s * i}
        if i in held:
            row["val_loss"] = held[i]
        out.append(row)
    return out


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "2026-01-31" / "12-00-00"
    mlp = {"module": "mlp", "submodules": {"activation": "silu"}}
    run_dir(root, "0", "completed", config(mlp, 2), steps([3.0, 2.5, 2.0], {2: 2.6, 3: 2.7}, 100.0),
            parameters=123456, flops_per_token=2.5e6)
    # A bare name and a node with only `module` are the same spec: only the swap of the module shows.
    run_dir(root, "1", "completed", config("moe_layer", 2), steps([3.1, 2.4, 1.9], {2: 2.5, 3: 2.2}, 90.0),
            parameters=654321, flops_per_token=3.0e6)
    run_dir(root, "2", "failed", config(mlp, 4), [], error="boom")
    run_dir(root, "10", "running", config(mlp, 4, lr=3e-3), steps([3.0], {}, 50.0), parameters=200000,
            flops_per_token=4e6)
    run_dir(root, "3", "running", config(mlp, 4), [], pid=2**22 + 12345)  # no such process: it stopped
    (root / "multirun.yaml").write_text("{}")
    return root


def test_table_of_a_sweep_lists_every_job_with_what_differs(sweep):
    runs, keys = compare([str(sweep)])
    assert [r.name for r in runs] == ["0", "1", "2", "3", "10"]
    assert keys == [f"{SPEC}.module", "model.config.num_layers", "trainer.lr"]
    header, rows = table(runs, keys)
    assert format_text(header, rows) == "\n".join([
        "run  status     spec.decoder.layers.mlp  config.num_layers  trainer.lr  params   FLOPs/token  tokens/s  "
        "steps  final loss  final val  best val",
        "0    completed  mlp                      2                  0.001       123.46k  2.50M        200       "
        "3      2.0000      2.7000     2.6000",
        "1    completed  moe_layer                2                  0.001       654.32k  3.00M        180       "
        "3      1.9000      2.2000     2.2000",
        "2    failed     mlp                      4                  0.001       -        -            -         "
        "-      -           -          -",
        "3    stopped    mlp                      4                  0.001       -        -            -         "
        "-      -           -          -",
        "10   running    mlp                      4                  0.003       200.00k  4.00M        50        "
        "1      3.0000      -          -",
    ])
    assert format_markdown(header, rows).splitlines()[:3] == [
        "| run | status | spec.decoder.layers.mlp | config.num_layers | trainer.lr | params | FLOPs/token | tokens/s "
        "| steps | final loss | final val | best val |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| 0 | completed | mlp | 2 | 0.001 | 123.46k | 2.50M | 200 | 3 | 2.0000 | 2.7000 | 2.6000 |",
    ]


def test_cli_writes_the_plot_and_the_markdown(sweep, tmp_path, capsys):
    out = tmp_path / "out" / "cmp.png"
    out.parent.mkdir()
    assert main([str(sweep / "0"), str(sweep / "1"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["run", "status", "spec.decoder.layers.mlp", "params", "FLOPs/token", "tokens/s",
                                  "steps", "final", "loss", "final", "val", "best", "val"]
    assert printed[-2:] == [f"table: {out.with_suffix('.md')}", f"plot: {out}"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.with_suffix(".md").read_text().count("\n") == 4


def test_not_a_run(tmp_path):
    from megaspec import SpecError

    with pytest.raises(SpecError, match=rf"^{tmp_path}: not a run directory \(no run.json\) and holds none$"):
        compare([str(tmp_path)])
