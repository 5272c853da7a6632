"""The async jobs' parsing and job table, without a broker."""

from __future__ import annotations

import orjson

from dataflows.async_jobs.jobs import JobResult, JobTable, parse_jobs
from operators.kafka.message import KafkaBatch
from state import MemoryBackend, StateStore

DAY_MS = 86_400_000


def result(job_id: str, status: str, **fields: object) -> JobResult:
    return JobResult(job_id, status, "tabular-risk", 1, 1_000, 1_001, **fields)  # type: ignore[arg-type]


def publish(table: JobTable, store: StateStore, *results: JobResult) -> list[str]:
    """What the table publishes for ``results``, in order, as status names."""
    return [out.status for r in results for _, out in table.on_item(store, r.job_id, r)]


def test_a_finished_jobs_last_record_is_final_whatever_order_its_statuses_come_in() -> None:
    table, store = JobTable(DAY_MS), StateStore(MemoryBackend())
    running, done = result("a", "running"), result("a", "done", outputs=[1])
    assert publish(table, store, running, done) == ["running", "done"]
    store2 = StateStore(MemoryBackend())
    assert publish(table, store2, done, running) == ["done", "done"]  # the notice came second: the result again


def test_a_resubmitted_id_gets_its_first_result_and_nothing_else() -> None:
    table, store = JobTable(DAY_MS), StateStore(MemoryBackend())
    first = result("a", "done", outputs=[1])
    publish(table, store, result("a", "running"), first)
    again = table.on_item(store, "a", result("a", "running"))
    assert [out for _, out in again] == [first]
    assert publish(table, store, result("a", "done", outputs=[2])) == []  # its recomputed result is dropped
    assert publish(table, store, result("b", "running"), result("b", "running")) == ["running"]


def test_submissions_parse_into_jobs_failures_and_dead_letters() -> None:
    good = orjson.dumps({"model": "tabular-risk", "inputs": [[0.0] * 8, [1] * 8]})
    values = [good, good, b"{", orjson.dumps({"model": "tabular-risk", "inputs": [[0] * 8, "x"]}), good]
    keys = [b"j1", None, b"j3", b"j4", b"x" * 300]
    n = len(values)
    batch = KafkaBatch("jobs.submit", 0, values, keys, [()] * n, list(range(n)), [5] * n)  # type: ignore[arg-type]
    parsed = parse_jobs("parse", batch, max_inputs=10, now_ms=9)
    assert [(j.job_id, len(j.inputs), j.submitted_ms, j.started_ms) for j in parsed.jobs] == [("j1", 2, 5, 9)]
    assert [(f.job_id, f.error) for f, _ in parsed.failed] == [
        ("j3", parsed.failed[0][0].error),
        ("j4", "1 of 2 inputs are invalid (inputs[1]: inputs must be a list of 8 numbers, got str)"),
    ]
    assert (parsed.failed[0][0].error or "").startswith("not JSON")
    assert [d.reason for d in parsed.dead] == [
        "a job submission must be keyed by its job id",
        "job id is 300 bytes, over 256",
    ]
