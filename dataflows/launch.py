"""The command line that runs a dataflow as users run it: ``python -m bytewax.run``
with a recovery directory (created on first use). Tests, the demo and the
benchmarks start every dataflow through it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["exited", "run_command"]


def run_command(flow: str, recovery: Path, *, snapshot_s: int = 1, workers: int = 1) -> list[str]:
    """``bytewax.run`` for ``flow`` (e.g. ``"dataflows.event_counts:build()"``), snapshotting every ``snapshot_s``."""
    if not recovery.exists():
        recovery.mkdir(parents=True)
        subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), "1"], check=True)
    run = [sys.executable, "-m", "bytewax.run", flow, "-r", str(recovery)]
    return [*run, "-s", str(snapshot_s), "-b", "0", "-w", str(workers)]


def exited(process: subprocess.Popen[bytes]) -> str | None:
    """Why a dataflow process is no longer running, or ``None`` while it runs."""
    return None if process.poll() is None else f"it exited with code {process.returncode}; see its output above"
