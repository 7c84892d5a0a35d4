"""`run.json`: what a run is (its config, size and cost) and where it stands (running, completed, failed).

Written by the lead process at the start of a run and rewritten atomically as it
goes, so `megaspec compare` can list runs that are still going or that failed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"


class RunRecord:
    """The run.json of one run (a no-op on processes other than the lead)."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = run_dir / RUN_FILE
        self.enabled = enabled
        self.data: dict[str, Any] = {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                     "host": socket.gethostname(), "pid": os.getpid()}
        self._write()

    def update(self, **fields: Any) -> None:
        """Add or change fields."""
        self.data.update(fields)
        self._write()

    def finish(self) -> None:
        """The run ended normally."""
        self.update(status="completed", ended=time.strftime("%Y-%m-%dT%H:%M:%S"))

    def fail(self, exc: BaseException) -> None:
        """The run ended with `exc` (interrupted, for Ctrl-C)."""
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        self.update(status=status, error=f"{exc}".strip() or type(exc).__name__,
                    ended=time.strftime("%Y-%m-%dT%H:%M:%S"))

    def _write(self) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{RUN_FILE}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's run.json, or None."""
    file = run_dir / RUN_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def status_of(run: dict[str, Any] | None) -> str:
    """completed | failed | interrupted | running | stopped (a 'running' run whose process is gone)."""
    if run is None:
        return "failed"
    status = str(run.get("status", "failed"))
    if status == "running" and run.get("host") == socket.gethostname() and isinstance(run.get("pid"), int):
        try:
            os.kill(run["pid"], 0)
        except ProcessLookupError:
            return "stopped"
        except PermissionError:
            pass
    return status
