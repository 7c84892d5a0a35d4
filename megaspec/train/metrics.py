"""What a training run reports: a progress bar, a JSON-lines metrics file, MFU and a loss-curve PNG."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

# Dense (no sparsity) peak matmul FLOP/s from the vendors' data sheets, by device-name substring
# and dtype. MFU is conventionally quoted against these rather than a measured peak.
DATASHEET_PEAKS = {
    "H200": {torch.bfloat16: 989e12, torch.float32: 67e12},
    "H100": {torch.bfloat16: 989e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float32: 19.5e12},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                         budget_s: float = 0.25) -> float:
    """Best FLOP/s of an n x n matmul on `device`, timed for about `budget_s` seconds."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # the first call pays for allocation and kernel selection
    _sync(device)
    best, reps, began = float("inf"), 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - began < budget_s:
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
        reps += 1
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s of one device for `dtype` matmuls, and where the number came from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in DATASHEET_PEAKS.items():
            if key in name and dtype in peaks:
                return peaks[dtype], f"{name} data sheet"
        return measure_matmul_flops(device, dtype, n=4096), f"measured {dtype} matmul on {name}"
    # On a CPU there is no data sheet to trust: the fp32 GEMM speed measured now is the peak.
    return measure_matmul_flops(device, torch.float32), "measured fp32 matmul on the CPU"


class MetricsFile:
    """Appends one JSON object per logged step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Write one record and flush, so a crashed run keeps its history."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        """Close the file."""
        self.file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def si(value: float, digits: int = 1) -> str:
    """12345.0 -> '12.3k': SI prefixes up to T, a sign only for negatives."""
    sign, value = ("-" if value < 0 else ""), abs(value)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{sign}{value / scale:.{digits}f}{unit}"
    return f"{sign}{value:.0f}"


class ProgressBar:
    """A tqdm-like bar on stderr: redrawn in place on a terminal, one line per update in a log."""

    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None, width: int = 20) -> None:
        self.total, self.start, self.width = total, start, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.began = time.perf_counter()
        self.val_loss: float | None = None

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None,
               val_loss: float | None = None) -> None:
        """Show progress after `step` steps are done (with the latest held-out loss, once there is one)."""
        if val_loss is not None:
            self.val_loss = val_loss
        frac = step / max(self.total, 1)
        filled = int(frac * self.width)
        elapsed = time.perf_counter() - self.began
        done = step - self.start
        remaining = elapsed / done * (self.total - step) if done else 0.0
        mfu_text = f" mfu {100 * mfu:.2f}%" if mfu is not None else ""
        val_text = f" val {self.val_loss:.4f}" if self.val_loss is not None else ""
        line = (f"train {100 * frac:3.0f}%|{'#' * filled}{' ' * (self.width - filled)}| {step}/{self.total} "
                f"[{_duration(elapsed)}<{_duration(remaining)}] loss {loss:.4f}{val_text} lr {lr:.2e} "
                f"tok/s {si(tokens_per_s)}{mfu_text}")
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files only, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_loss(records: list[dict[str, Any]], path: Path, title: str = "loss") -> bool:
    """Draw training loss, and held-out loss where evaluated, against step into a PNG; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in records], marker="." if len(steps) < 50 else None, label="training")
    held = [r for r in records if r.get("val_loss") is not None]
    if held:
        ax.plot([r["step"] for r in held], [r["val_loss"] for r in held], marker="o", label="held-out")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
