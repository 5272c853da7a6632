"""Helpers for tests that run what users run: processes with their output in a file, the
HTTP gateway, and polling until a deadline (never fixed sleeps)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ROOT", "Logged", "gateway", "kill_seed", "wait_for"]

ROOT = Path(__file__).parent.parent.parent
SEED_ENV = "PATTERNFLOW_TEST_SEED"


def kill_seed(default: int) -> int:
    """The seed of a test's random moments (kills): ``default``, or ``$PATTERNFLOW_TEST_SEED`` to try others."""
    return int(os.environ.get(SEED_ENV) or default)


T = TypeVar("T")


def wait_for(check: Callable[[], T | None], what: str, timeout_s: float = 60, every_s: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


class Logged(subprocess.Popen[bytes]):
    """A process whose output goes to a file: a pipe nobody reads fills up and
    blocks the process (librdkafka logs every failed reconnect during an outage)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            super().__init__(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def output(self, chars: int = 3000) -> str:
        """The end of what it wrote, without librdkafka's connection noise."""
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if "|rdkafka#" not in line)[-chars:]


@contextlib.contextmanager
def gateway(prefix: str, **settings: Any) -> Iterator[str]:
    """The HTTP gateway (``clients.gateway``) in a thread, served as ``python -m clients.gateway``
    serves it; yields its base URL (``https://`` when ``settings`` name a certificate and key).

    Every topic it fronts is named ``<prefix>.<its default name>`` unless ``settings`` name it, so a
    gateway in a test never sees the topics another run (``make demo``) left on the broker.
    """
    import uvicorn

    from clients.gateway import Settings, create_app, server_options
    from patternflow import free_port

    topics = {f.name: f"{prefix}.{f.default}" for f in dataclasses.fields(Settings) if f.name.endswith("_topic")}
    s = Settings(port=free_port(), **{**topics, **settings})
    http = uvicorn.Server(uvicorn.Config(create_app(s), **server_options(s)))
    thread = threading.Thread(target=http.run)
    thread.start()
    try:
        wait_for(lambda: http.started, "the gateway to start", 30)
        yield f"{'https' if s.tls() else 'http'}://127.0.0.1:{s.port}"
    finally:
        http.should_exit = True
        thread.join(timeout=10)
