"""``dataflows.online_inference`` as processes, a load generator, raw requests and the replies on
the topic; the module-scoped ``server`` fixture."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import orjson
import pytest

from clients.inference import InferenceClient
from dataflows.launch import run_command
from dataflows.online_inference import Settings
from operators.kafka import KafkaMessage, ensure_topics, read_topic
from patternflow import free_port
from tests.support.processes import Logged, wait_for


class Server:
    """The dataflow in one or more `bytewax.run` processes, sharing a recovery directory."""

    def __init__(self, brokers: str, topic: str, tmp: Path, processes: int = 1, **env: str) -> None:
        self.brokers, self.topic, self.processes = brokers, topic, processes
        self.recovery = tmp / "recovery"
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": brokers,
            "ONLINE_REQUEST_TOPIC": f"{topic}.requests",
            "ONLINE_REPLY_TOPIC": f"{topic}.replies",
            "ONLINE_MODELS": "tabular-risk",
            "ONLINE_METRICS_PORT": "0",
            **env,
        }
        self.tmp = tmp
        self.procs: list[Logged] = []
        self.metrics_port = int(self.env["ONLINE_METRICS_PORT"])
        ensure_topics(brokers, Settings(request_topic=f"{topic}.requests", reply_topic=f"{topic}.replies").topics())

    def start(self) -> Server:
        cmd = run_command("dataflows.online_inference:build()", self.recovery)
        if self.processes > 1:
            ports = [free_port() for _ in range(self.processes)]
            addresses = ";".join(f"127.0.0.1:{p}" for p in ports)
            for i in range(self.processes):
                full = [*cmd, "-i", str(i), "-a", addresses]
                self.procs.append(Logged(full, self.env, self.tmp / f"server-{i}.log"))
        else:
            self.procs.append(Logged(cmd, self.env, self.tmp / "server.log"))
        return self

    def client(self, timeout_s: float = 5.0) -> InferenceClient:
        return InferenceClient(
            self.brokers,
            request_topic=f"{self.topic}.requests",
            reply_topic=f"{self.topic}.replies",
            timeout_s=timeout_s,
        )

    def wait_ready(self, client: InferenceClient) -> None:
        def exited() -> str | None:
            dead = [proc for proc in self.procs if proc.poll() is not None]
            return dead[0].output() if dead else None

        assert client.wait_until_serving("tabular-risk", [0.0] * 8, timeout_s=90, give_up=exited)["status"] == "ok"

    def kill(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        self.procs = []

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(timeout=30)
        self.procs = []


class Load:
    """Requests sent from a thread every few milliseconds while in the ``with`` block."""

    def __init__(self, client: InferenceClient, *, timeout_s: float, every_s: float = 0.005) -> None:
        self.client, self.timeout_s, self.every_s = client, timeout_s, every_s
        self.futures: dict[str, Future[dict[str, Any]]] = {}
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send)

    def _send(self) -> None:
        i = 0
        while not self._stop.is_set():
            cid, future = self.client.submit("tabular-risk", inputs(i), timeout_s=self.timeout_s)
            self.futures[cid] = future
            i += 1
            time.sleep(self.every_s)

    def answered(self) -> int:
        return sum(f.done() for f in list(self.futures.values()))

    def wait_for_more(self, n: int, what: str) -> None:
        """Until ``n`` more requests have been sent."""
        sent = len(self.futures)
        wait_for(lambda: len(self.futures) >= sent + n, what)

    def __enter__(self) -> Load:
        self._sender.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sender.join()


def raw_request(topic: str, value: bytes | None, **headers: str | bytes) -> KafkaMessage:
    hs = tuple((k, v if isinstance(v, bytes) else v.encode()) for k, v in headers.items())
    return KafkaMessage(value, headers=hs, topic=topic)


def has_replies(brokers: str, topic: str, ids: Iterable[str]) -> dict[str, list[dict[str, Any]]] | None:
    """Replies by correlation id once every one of ``ids`` has one."""
    replies = replies_by_id(brokers, topic)
    return replies if all(cid in replies for cid in ids) else None


def replies_by_id(brokers: str, topic: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for msg in read_topic(brokers, f"{topic}.replies"):
        doc = orjson.loads(msg.value or b"")
        out.setdefault(doc["correlation_id"], []).append(doc)
    return out


@pytest.fixture(scope="module")
def server(brokers: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    import uuid

    metrics_port = str(free_port())
    topic = f"online-{uuid.uuid4().hex[:8]}"
    srv = Server(brokers, topic, tmp_path_factory.mktemp("online"), ONLINE_METRICS_PORT=metrics_port).start()
    with srv.client() as client:
        srv.wait_ready(client)
    yield srv
    srv.stop()


def inputs(i: int) -> list[float]:
    return [((i * 7 + j * 3) % 11) / 5 - 1 for j in range(8)]
