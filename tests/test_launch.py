"""The launcher's command line, without a broker (its runs are in ``tests/test_cluster_e2e.py``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.processes import ROOT


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--process-id", "0"], "--process-id and --addresses go together"),
        (["--addresses", "a:1;b:1"], "--process-id and --addresses go together"),
        (["--processes", "2", "--process-id", "0", "--addresses", "a:1;b:1"], "one launcher per process"),
        (["--processes", "0"], "must be at least 1"),
    ],
)
def test_a_command_line_that_cannot_run_a_cluster_exits_2_saying_why(args: list[str], says: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dataflows.launch", "event_counts", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 2 and says in out.stderr, out.stderr
