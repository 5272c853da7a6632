"""The agent runtime and its tool workers, run as users run them, for tests, the demo and the benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from common import free_port
from dataflows.launch import exited, run_command

__all__ = ["AgentStack"]

ROOT = Path(__file__).resolve().parent.parent


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

    def kill(self) -> None:
        """kill -9 every dataflow of the stack."""
        for proc in self.procs.values():
            if proc.poll() is None:
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
