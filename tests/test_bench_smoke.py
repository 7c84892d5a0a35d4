"""The benchmark tools at toy sizes: every suite runs, compares like with like, and reports sane numbers.

No timing assertions: speed is for BENCHMARKS.md, on a quiet machine.
"""

import importlib.util
import math
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"
_spec = importlib.util.spec_from_file_location("megaspec_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["megaspec_bench"] = bench  # dataclasses look their module up by name
_spec.loader.exec_module(bench)

TINY_GPT2 = bench.GPT2Sizes(layers=1, hidden=32, heads=2, vocab=97, positions=16, dropout=0.0)
TINY_LLAMA = bench.LlamaSizes(layers=1, hidden=32, heads=4, kv_heads=2, ffn=48, vocab=97, positions=16)


def assert_sane(rows: list, n_rows: int, repeats: int) -> None:
    """Every row has `repeats` positive times per side, a finite ratio, and a verdict where it has a target."""
    assert len(rows) == n_rows
    for row in rows:
        for times in (row.a, row.b) if row.b is not None else (row.a,):
            assert len(times.wall) == len(times.cpu) == repeats
            assert all(t > 0 for t in times.wall) and all(t >= 0 for t in times.cpu)
        if row.goal:
            assert math.isfinite(row.ratio) and row.ratio > 0
        assert (row.met is None) == (row.target is None)
    table = bench.table(rows)
    assert table.count("\n") == n_rows + 1  # header, rule, one line per row


def test_build_suite() -> None:
    rows = bench.bench_build(1, TINY_GPT2)
    assert_sane(rows, 3, 1)
    assert rows[0].target == 3.0 and rows[0].goal == "speedup"
    assert "(16,384 params)" in rows[0].what  # GPT-2's count at these sizes, equal on both sides


def test_meta_suite() -> None:
    rows = bench.bench_meta(2, TINY_LLAMA)
    assert_sane(rows, 3, 2)
    assert rows[0].target == 1.0


def test_train_suite_uses_the_same_model_on_both_sides() -> None:
    rows = bench.bench_train(1, batch=2, seq=8, gpt2=TINY_GPT2, llama=TINY_LLAMA)
    assert_sane(rows, 2, 1)
    assert [r.what.split()[0] for r in rows] == ["GPT-2", "Llama"]


def test_train_pair_matches_hf() -> None:
    """Same weights, same tokens: the two losses agree, and both sides get gradients."""
    ours, hf, input_ids = bench.train_pair("Llama", TINY_LLAMA, batch=2, seq=8)
    got, want = bench.train_step(ours, input_ids), bench.train_step(hf, input_ids)
    assert abs(got.item() - want.item()) < 1e-5
    assert all(p.grad is not None for p in ours.parameters())


def test_yaml_suite() -> None:
    rows = bench.bench_yaml(1, cases=[("tiny GPT-2", TINY_GPT2), ("tiny Llama", TINY_LLAMA)])
    assert_sane(rows, 4, 1)
    assert [r.target for r in rows] == [1.10, None, 1.10, None]
    assert all(r.goal == "overhead" for r in rows)


def test_row_ratio_and_verdict() -> None:
    fast, slow = bench.Times([1.0, 1.0, 5.0], [1.0] * 3), bench.Times([3.0, 4.0, 3.0], [2.0] * 3)
    row = bench.Row("x", "a", fast, "b", slow, "speedup", 3.0)
    assert row.ratio == 3.0 and row.met is True  # medians 1 and 3, not means
    assert row.cpu_ratio == 2.0
    over = bench.Row("x", "a", slow, "b", fast, "overhead", 1.10)
    assert over.ratio == 3.0 and over.met is False


def test_generate_bench_compares_like_with_like() -> None:
    """tools/bench_generate.py at toy sizes: both sides add every token, rows and rates are sane."""
    sys.path.insert(0, str(_PATH.parent))  # it imports its helpers from tools/bench.py
    spec = importlib.util.spec_from_file_location("megaspec_bench_generate", _PATH.with_name("bench_generate.py"))
    generate_bench = importlib.util.module_from_spec(spec)
    sys.modules["megaspec_bench_generate"] = generate_bench
    spec.loader.exec_module(generate_bench)
    sizes = bench.LlamaSizes(layers=1, hidden=32, heads=4, kv_heads=2, ffn=48, vocab=97, positions=64)
    case = generate_bench.make_case("tiny Llama", sizes, batch=3, prompt=8, new=6)
    rows, rates = generate_bench.bench_case(case, 1)
    assert_sane(rows, 2, 1)
    assert [r.target for r in rows] == [1.0, None]
    assert rates["equal tokens"] == 1.0  # these tiny weights leave no near-tie: the very same tokens
    assert all(math.isfinite(v) and v > 0 for v in rates.values())
    per_token = generate_bench.decode_bytes_per_token(case)
    assert per_token == 4 * bench.n_params(case.ours) + 2 * 1 * 2 * 8 * (8 + 6) * 4  # weights + [2 groups x d 8] K/V


def test_moe_bench_runs_three_models_with_one_set_of_weights() -> None:
    """tools/bench_moe.py at toy sizes: it runs, and the three models' language-model losses agree."""
    done = subprocess.run([sys.executable, str(_PATH.with_name("bench_moe.py")), "--layers", "1", "--hidden", "32",
                           "--heads", "2", "--kv-heads", "1", "--ffn", "16", "--experts", "4", "--vocab", "64",
                           "--batch", "1", "--seq", "8", "--repeats", "1", "--warmup", "0", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith(("| megaspec", "| HF"))]
    assert [r[1].strip() for r in rows] == ["megaspec grouped", "HF grouped_mm", "HF eager"]
    losses = [float(r[-2]) for r in rows]
    assert max(losses) - min(losses) < 1e-4, losses


def test_fsdp_memory_splits_the_parameters_over_the_processes() -> None:
    """tools/fsdp_memory.py under torchrun: two processes hold half the parameter bytes each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), str(_PATH.with_name("fsdp_memory.py")),
                           "model=gpt2", "model.config.num_layers=2", "model.config.hidden_size=32",
                           "model.config.num_attention_heads=4", "model.config.vocab_size=64",
                           "model.config.max_position_embeddings=32"],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    total = int(re.search(r"one process: ([\d,]+) bytes", done.stdout).group(1).replace(",", ""))
    each = [int(b.replace(",", "")) for b in re.findall(r"([\d,]+) \(\d+\.\d%\)", done.stdout)]
    assert len(each) == 2 and sum(each) == total and max(each) - min(each) <= total // 10
