"""Async jobs against the real broker: submit, poll, result; failures with reasons; kill -9; HTTP."""

from __future__ import annotations

import os
import signal
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from clients.jobs import JobsClient
from dataflows.async_jobs import Settings
from dataflows.launch import run_command
from operators.kafka import KafkaMessage, ensure_topics, produce, read_topic
from tests.support.models import loaded
from tests.support.processes import Logged, gateway, wait_for

pytestmark = pytest.mark.e2e


def features(i: int) -> list[float]:
    return [((i * 7 + j * 3) % 11) / 5 - 1 for j in range(8)]


class Workers:
    """``dataflows.async_jobs`` in a ``bytewax.run`` process, on this test's own topics."""

    def __init__(self, brokers: str, topic: str, tmp: Path, **env: str) -> None:
        self.brokers, self.tmp = brokers, tmp
        self.submit_topic, self.results_topic = f"{topic}.submit", f"{topic}.results"
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": brokers,
            "JOBS_SUBMIT_TOPIC": self.submit_topic,
            "JOBS_RESULTS_TOPIC": self.results_topic,
            "JOBS_MODELS": "tabular-risk",
            "JOBS_STATE_DIR": str(tmp / "state"),
            "JOBS_METRICS_PORT": "0",
            **env,
        }
        ensure_topics(brokers, Settings(submit_topic=self.submit_topic, results_topic=self.results_topic).topics())
        self.runs = 0
        self.proc: Logged | None = None

    def start(self) -> Workers:
        self.runs += 1
        cmd = run_command("dataflows.async_jobs:build()", self.tmp / "recovery", snapshot_s=1)
        self.proc = Logged(cmd, self.env, self.tmp / f"workers-{self.runs}.log")
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def client(self) -> JobsClient:
        return JobsClient(self.brokers, submit_topic=self.submit_topic, results_topic=self.results_topic)

    def records(self) -> dict[str, list[dict[str, Any]]]:
        """Every status record on the results topic, by job id."""
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for msg in read_topic(self.brokers, self.results_topic):
            out[(msg.key or b"").decode()].append(orjson.loads(msg.value or b""))
        return out


@pytest.fixture
def workers(brokers: str, topic: str, tmp_path: Path) -> Iterator[Workers]:
    running = Workers(brokers, topic, tmp_path).start()
    yield running
    if running.proc is not None and running.proc.poll() is None:
        running.kill()


def test_submit_poll_result_and_failures_with_reasons(workers: Workers) -> None:
    model = loaded("tabular-risk")
    with workers.client() as jobs:
        good = jobs.submit("tabular-risk", [features(i) for i in range(20)])
        assert jobs.status(good)["status"] in ("pending", "running", "done")
        bad_inputs = jobs.submit("tabular-risk", [features(1), [1, 2]])
        unknown = jobs.submit("gpt-9", ["hi"])
        empty = jobs.submit("tabular-risk", [])
        result = jobs.wait(good, timeout_s=90)
        assert result["status"] == "done" and result["version"] == "1" and result["inputs"] == 20
        expected = model.predict([features(i) for i in range(20)])
        assert [o["label"] for o in result["outputs"]] == [e["label"] for e in expected]
        assert max(abs(o["risk"] - e["risk"]) for o, e in zip(result["outputs"], expected, strict=True)) < 1e-5
        assert result["submitted_ms"] <= result["started_ms"] <= result["finished_ms"]

        failed = jobs.wait(bad_inputs, timeout_s=30)
        assert failed["status"] == "failed"
        assert (
            failed["error"]
            == "1 of 2 inputs are invalid (inputs[1]: inputs must be a list of 8 numbers, got a list of 2)"
        )
        assert "unknown model 'gpt-9'" in jobs.wait(unknown, timeout_s=30)["error"]
        assert "1 to 1000 inputs, got 0" in jobs.wait(empty, timeout_s=30)["error"]
        assert jobs.status("never-submitted")["status"] == "unknown"

        # A resubmission under a finished job's id is not run again: the id is an idempotency key.
        again = jobs.submit("tabular-risk", [features(99)], job_id=good)
        later = jobs.submit("tabular-risk", [features(5)])
        jobs.wait(later, timeout_s=30)
        assert jobs.status(again)["outputs"] == result["outputs"]
    records = workers.records()[good]  # the last is what a compacted topic keeps
    assert records[-1]["status"] == "done" and all(r["outputs"] == result["outputs"] for r in records[1:])


def test_a_malformed_submission_is_dead_lettered_and_affects_nothing_else(workers: Workers) -> None:
    topic = workers.submit_topic
    produce(
        workers.brokers,
        [
            KafkaMessage(orjson.dumps({"model": "tabular-risk", "inputs": [features(1)]}), topic=topic),  # no job id
            KafkaMessage(b"{not json", key=b"broken-1", topic=topic),
            KafkaMessage(
                orjson.dumps({"model": "tabular-risk", "inputs": [features(1)]}), key=b"\xff\xfe", topic=topic
            ),
        ],
    )
    with workers.client() as jobs:
        fine = jobs.submit("tabular-risk", [features(2)])
        assert jobs.wait(fine, timeout_s=90)["status"] == "done"
        broken = jobs.wait("broken-1", timeout_s=30)
        assert broken["status"] == "failed" and broken["error"].startswith("not JSON")
    dead = wait_for(
        lambda: (
            read_topic(workers.brokers, f"{topic}.dlq")
            if len(read_topic(workers.brokers, f"{topic}.dlq")) >= 3
            else None
        ),
        "3 dead letters",
        30,
    )
    reasons = sorted(dict(m.headers)["dlq.reason"] or b"" for m in dead)
    assert reasons == [
        b"a job submission must be keyed by its job id",
        b"job id (the message key) is not UTF-8",
        reasons[2],
    ]
    assert reasons[2].startswith(b"not JSON")


def test_kill_9_mid_backlog_every_job_completes_once(brokers: str, topic: str, tmp_path: Path) -> None:
    workers = Workers(brokers, topic, tmp_path, JOBS_JOBS_PER_POLL="1")
    # A backlog before the workers start, so the kill finds jobs done and jobs waiting.
    ids = [f"job-{i}" for i in range(1_000)]
    value = orjson.dumps({"model": "tabular-risk", "inputs": [features(k) for k in range(200)]})
    produce(brokers, [KafkaMessage(value, key=i.encode(), topic=workers.submit_topic) for i in ids])
    workers.start()
    try:
        with workers.client() as jobs:
            wait_for(lambda: sum(jobs.status(i)["status"] == "done" for i in ids) >= 20, "some jobs done", 90)
            workers.kill()
            in_flight = [i for i in ids if jobs.status(i)["status"] != "done"]
            assert in_flight, "the kill came after the backlog was done: give it more work"
            workers.start()
            results = {i: jobs.wait(i, timeout_s=120) for i in ids}
        assert all(r["status"] == "done" and len(r["outputs"]) == 200 for r in results.values())
        # Run and recorded once: after a job's result the topic repeats, if anything, that same record (a
        # replay after the kill), never a new ``running`` or another result.
        after_done = {}
        for job_id, records in workers.records().items():
            first = next(at for at, r in enumerate(records) if r["status"] == "done")
            if any(r != records[first] for r in records[first:]):
                after_done[job_id] = [r["status"] for r in records]
        assert not after_done, (
            f"{len(after_done)} jobs ran again after their result, e.g. {list(after_done.items())[:3]}"
        )
    finally:
        if workers.proc is not None and workers.proc.poll() is None:
            workers.kill()


def test_http_gateway_submits_and_looks_up_jobs(workers: Workers, topic: str) -> None:
    import httpx

    from dataflows.online_inference import Settings as OnlineSettings

    online = OnlineSettings(request_topic=f"{topic}.requests", reply_topic=f"{topic}.replies")
    ensure_topics(workers.brokers, online.topics())  # the gateway also fronts online inference
    with (
        gateway(
            topic,
            kafka_bootstrap_servers=workers.brokers,
            request_topic=online.request_topic,
            reply_topic=online.reply_topic,
            jobs_submit_topic=workers.submit_topic,
            jobs_results_topic=workers.results_topic,
        ) as base,
        httpx.Client(base_url=base, timeout=10) as web,
    ):
        wait_for(lambda: web.get("/v1/jobs/x").status_code != 503, "the gateway's job client", 30)
        posted = web.post("/v1/jobs", json={"model": "tabular-risk", "inputs": [features(1), features(2)]})
        assert posted.status_code == 202 and posted.json()["status"] == "pending"
        job_id = posted.json()["job_id"]
        done = wait_for(lambda: (r := web.get(f"/v1/jobs/{job_id}").json())["status"] == "done" and r, "done", 90)
        assert len(done["outputs"]) == 2
        assert web.get("/v1/jobs/no-such-job").status_code == 404
        assert web.post("/v1/jobs", content=b"{oops").status_code == 400
        assert web.post("/v1/jobs", json={"model": "tabular-risk", "inputs": "x"}).status_code == 400
        long_id = web.post("/v1/jobs", json={"model": "tabular-risk", "inputs": [features(1)], "job_id": "j" * 300})
        assert long_id.status_code == 400 and "1 to 256 bytes" in long_id.json()["error"]
        failed_id = web.post("/v1/jobs", json={"model": "tabular-risk", "inputs": [[1]]}).json()["job_id"]
        failed = wait_for(
            lambda: (r := web.get(f"/v1/jobs/{failed_id}").json())["status"] == "failed" and r, "failed", 30
        )
        assert "inputs[0]" in failed["error"]
