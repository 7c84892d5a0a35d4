"""specs/ and conf/ work from an installed (non-editable) package, away from the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import megaspec, sys
from pathlib import Path
from megaspec.paths import resource_root
assert Path(megaspec.__file__).is_relative_to(sys.argv[1]), megaspec.__file__
assert resource_root() == Path(sys.argv[1]) / "megaspec", resource_root()
model = megaspec.build_model(megaspec.compose(["model=gpt2"]), device="meta")
print(sum(p.numel() for p in model.parameters()))
"""


def test_wheel_install_ships_conf_and_specs(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=600)
    assert (site / "megaspec" / "conf" / "model" / "gpt2.yaml").is_file()
    assert (site / "megaspec" / "specs" / "llama.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "124439808"
    validate = subprocess.run([sys.executable, "-m", "megaspec", "validate", str(site / "megaspec/specs/gpt2.yaml")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert validate.returncode == 0, validate.stderr
    assert "124,439,808 parameters, meta forward ok" in validate.stdout
