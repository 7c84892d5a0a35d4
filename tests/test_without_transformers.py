"""The core works without transformers installed (it is only the `hf` extra)."""

from __future__ import annotations

import subprocess
import sys

BLOCKED = """
import sys
sys.modules["transformers"] = None  # any `import transformers` now raises ImportError
import megaspec
model = megaspec.build_model(megaspec.compose(["model=gpt2", "model.config.num_layers=1"]), device="meta")
print(sum(p.numel() for p in model.parameters()))
try:
    from megaspec.interop.hf import from_hf
    from_hf("nowhere")
except megaspec.SpecError as exc:
    print("interop:", exc)
"""


def test_core_builds_and_interop_explains_without_transformers(tmp_path):
    run = subprocess.run([sys.executable, "-c", BLOCKED], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == str(50257 * 768 + 1024 * 768 + 7_087_872 + 2 * 768)
    assert lines[1].startswith("interop: ") and "transformers" in lines[1]
