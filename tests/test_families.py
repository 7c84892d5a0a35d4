"""Every shipped model family: listed in the README with its published parameter count, which a meta build
reproduces; `megaspec build model=NAME` and `megaspec validate` work for each."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import TINY

from megaspec import compose
from megaspec.build_report import build_and_report

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| `(\w+)` \| `(specs/\w+\.yaml)` \| [^|]+ \| ([\d,]+) \|$")


def readme_families() -> dict[str, tuple[str, int]]:
    """The README's family table: model name -> (spec file, published parameter count)."""
    rows = [ROW.match(line) for line in (ROOT / "README.md").read_text().splitlines()]
    return {m[1]: (m[2], int(m[3].replace(",", ""))) for m in rows if m}


FAMILIES = readme_families()


def test_the_readme_lists_every_shipped_model() -> None:
    assert set(FAMILIES) == {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")}
    assert set(FAMILIES) <= set(TINY)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_published_parameter_count_by_a_meta_build(name: str) -> None:
    """What `megaspec build model=NAME` does, in-process: a meta build at the published size, its count,
    and its FLOPs, counted on a meta-device forward of the whole graph (one real command runs below)."""
    spec_file, published = FAMILIES[name]
    cfg = compose([f"model={name}", "build.device=meta", "build.seq_len=8"])
    assert Path(cfg.sources.spec).name == Path(spec_file).name
    lines: list[str] = []
    result = build_and_report(cfg, out=lines.append)
    assert result["parameters"] == published and result["flops_per_token"] > 0
    assert f"total parameters: {published:,}" in lines


def test_validate_and_build_commands(tmp_path: Path) -> None:
    """`megaspec validate` on every family's spec (sizes from the first model using it); `megaspec build`."""
    first_user = {}  # spec file -> the count of the first model (by name) that uses it
    for name in sorted(FAMILIES, reverse=True):
        first_user[FAMILIES[name][0]] = FAMILIES[name][1]
    specs = sorted(first_user)
    validated = subprocess.run([sys.executable, "-m", "megaspec", "validate", *specs], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    assert validated.returncode == 0, validated.stderr
    assert [line.split(" (")[0] for line in validated.stdout.splitlines()] == [f"{s}: ok" for s in specs]
    for line, spec in zip(validated.stdout.splitlines(), specs):
        assert line.startswith(f"{spec}: ok ({first_user[spec]:,} parameters, meta forward ok"), line
    built = subprocess.run([sys.executable, "-m", "megaspec", "build", *TINY["gemma3"], "build.seq_len=16"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert "forward pass on random tokens [1, 16] -> logits (1, 16, 64)" in built.stdout
