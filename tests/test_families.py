"""Every shipped model family: listed in the README with its published parameter count, which a meta build
reproduces; `megaspec build model=NAME` and `megaspec validate` work for each."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import TINY

from megaspec import build_model, compose
from megaspec.build import meta_forward
from megaspec.build_report import build_and_report
from megaspec.validate import validate_file

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
    spec_file, published = FAMILIES[name]
    cfg = compose([f"model={name}"])
    assert Path(cfg.sources.spec).name == Path(spec_file).name
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == published
    meta_forward(model, seq=4)  # the whole graph's shapes, at the published size, allocating nothing


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_build_command_reports_the_published_size(name: str) -> None:
    """What `megaspec build model=NAME` prints, in-process (one real command runs below)."""
    lines: list[str] = []
    result = build_and_report(compose([f"model={name}", "build.device=meta", "build.seq_len=8"]), out=lines.append)
    assert result["parameters"] == FAMILIES[name][1]
    assert f"total parameters: {FAMILIES[name][1]:,}" in lines


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_validate_each_family_spec_with_its_sizes(name: str) -> None:
    spec_file, published = FAMILIES[name]
    problems, summary = validate_file(ROOT / spec_file, name)
    assert problems == [] and summary.startswith(f"{published:,} parameters, meta forward ok")


def test_validate_and_build_commands(tmp_path: Path) -> None:
    specs = sorted({spec for spec, _ in FAMILIES.values()})
    validated = subprocess.run([sys.executable, "-m", "megaspec", "validate", *specs], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    assert validated.returncode == 0, validated.stderr
    assert [line.split(":")[0] for line in validated.stdout.splitlines()] == specs
    built = subprocess.run([sys.executable, "-m", "megaspec", "build", *TINY["gemma3"], "build.seq_len=16"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert "forward pass on random tokens [1, 16] -> logits (1, 16, 64)" in built.stdout
