"""The command line that runs a dataflow as users run it: ``python -m bytewax.run``
with a recovery directory (created on first use). Tests, the demo and the
benchmarks start every dataflow through it; :class:`AgentStack` starts the agent
runtime with its tool workers. The container image runs a dataflow with it::

    python -m dataflows.launch event_counts     # recovery in var/recovery/event_counts
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from patternflow import free_port

__all__ = ["LONG_RUNNING", "AgentStack", "exited", "main", "run_command"]

ROOT = Path(__file__).resolve().parent.parent
# The dataflows that run until stopped (dataflows.batch_inference runs one job and exits).
LONG_RUNNING = (
    "event_counts",
    "online_inference",
    "async_jobs",
    "telemetry_anomalies",
    "fraud_detection",
    "rag",
    "agent",
    "agent_tools",
)


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


class AgentStack:
    """``dataflows.agent`` and ``dataflows.agent_tools`` on topics ``<prefix>.*``, with their
    recovery, state and journal under ``workdir``; ``settings`` are extra environment variables."""

    def __init__(self, brokers: str, workdir: Path, llm_url: str, prefix: str = "agent", **settings: str) -> None:
        self.workdir = workdir
        self.metrics_port = free_port()
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": brokers,
            "AGENT_LLM_URL": llm_url,
            "AGENT_LLM_MODEL": "scripted",
            "AGENT_TOPIC_PREFIX": prefix,
            "AGENT_TOOLS_TOPIC_PREFIX": prefix,
            "AGENT_STATE_DIR": str(workdir / "agent-state"),
            "AGENT_TOOLS_JOURNAL_DIR": str(workdir / "tools-journal"),
            "AGENT_METRICS_PORT": str(self.metrics_port),
            "AGENT_TOOLS_METRICS_PORT": str(free_port()),
            **settings,
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, *flows: str) -> AgentStack:
        """Start ``flows`` (``"agent"``, ``"agent_tools"``; both by default); logs in ``<workdir>/<flow>.log``."""
        for flow in flows or ("agent", "agent_tools"):
            cmd = run_command(f"dataflows.{flow}:build()", self.workdir / f"{flow}-recovery")
            with (self.workdir / f"{flow}.log").open("ab") as log:
                self.procs[flow] = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill(self, *flows: str) -> None:
        """kill -9 ``flows`` (every dataflow of the stack by default)."""
        for flow, proc in self.procs.items():
            if proc.poll() is None and (not flows or flow in flows):
                proc.send_signal(signal.SIGKILL)
                proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def check(self) -> None:
        """Raise if a dataflow of the stack has exited, with the end of its log."""
        for flow, proc in self.procs.items():
            why = exited(proc)
            if why:
                log = (self.workdir / f"{flow}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"dataflows.{flow} is not running: {why}\n{log}")

    def __enter__(self) -> AgentStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dataflows.launch", description="Run a dataflow with recovery; settings from the environment."
    )
    parser.add_argument("dataflow", choices=LONG_RUNNING)
    parser.add_argument("--recovery", type=Path, help="the recovery directory (var/recovery/DATAFLOW)")
    parser.add_argument("--snapshot-s", type=int, default=5, help="seconds between snapshots (5)")
    parser.add_argument("--workers", type=int, default=1, help="worker threads (1)")
    args = parser.parse_args(argv)
    recovery = args.recovery or Path("var/recovery") / args.dataflow
    cmd = run_command(f"dataflows.{args.dataflow}:build()", recovery, snapshot_s=args.snapshot_s, workers=args.workers)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
