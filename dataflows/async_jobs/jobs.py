"""Async jobs: submitted to a topic, run at the worker's pace, results by job id.

A submission is a Kafka message keyed by its **job id** (1 to 256 bytes of
UTF-8; the id is an idempotency key: a second submission under an id that has
a result gets that result) whose value is ``{"model": "<name>", "inputs":
[<instance>, ...]}`` (1 to ``max_inputs`` instances, each valid for the model's
schema). Every status of a job is a message on the results topic, keyed by the
job id::

    {"job_id", "status": "running" | "done" | "failed", "model", "inputs": n,
     "version", "outputs": [...] (done), "error": "..." (failed),
     "submitted_ms", "started_ms", "finished_ms"}

``running`` is sent when a worker takes the job; ``done`` or ``failed`` once.
The results of all jobs read in one poll are computed together: their inputs
are concatenated per model and run in forward passes of the model's batch
size, the economics of batch inference. A submission without a usable job id
cannot be answered: it goes to the dead-letter topic only; one with an id but a
bad body fails (the reason is in ``error``) and is also dead-lettered.

Each job's status is recorded in RocksDB-backed keyed state (:class:`JobTable`),
which alone publishes statuses. After a kill -9 the table rolls back to the last
snapshot and the submissions read since are read again: a job that had finished
is not run again (:mod:`~dataflows.async_jobs.published` finds its result on the
results topic and the table publishes that same record again), and one that had
not is run and recorded once (its ``running`` notice may appear twice). A job
id is an idempotency key: a resubmission under a finished job's id gets the
first result again (the model may run for it, but its result is dropped).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from models.registry import Model, get_spec
from operators import metrics
from operators.dlq import DeadLetter, InvalidMessage, loads_json
from operators.kafka.message import KafkaBatch, KafkaMessage
from operators.protocol import id_from_key
from operators.stateful import Expiring
from patternflow import wall_ms
from state import StateStore

__all__ = ["Job", "JobResult", "JobTable", "Parsed", "parse_jobs", "run_jobs"]

Status = Literal["running", "done", "failed"]


@dataclass(frozen=True)
class Job:
    job_id: str
    model: str
    inputs: list[Any]  # instances valid for the model's schema
    submitted_ms: int
    started_ms: int

    def result(self, status: Status, **fields: Any) -> JobResult:
        return JobResult(
            self.job_id, status, self.model, len(self.inputs), self.submitted_ms, self.started_ms, **fields
        )


@dataclass(frozen=True)
class JobResult:
    job_id: str
    status: Status
    model: str
    inputs: int
    submitted_ms: int
    started_ms: int
    finished_ms: int | None = None
    version: str | None = None
    outputs: list[Any] | None = None
    error: str | None = None

    def doc(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def to_message(self, topic: str) -> KafkaMessage:
        return KafkaMessage(orjson.dumps(self.doc()), key=self.job_id.encode(), topic=topic)


@dataclass(frozen=True)
class Parsed:
    """One poll's submissions: jobs to run, jobs failed already, jobs with a published result
    (:mod:`~dataflows.async_jobs.published`), and messages with no job id."""

    jobs: list[Job] = field(default_factory=list)
    failed: list[tuple[JobResult, DeadLetter]] = field(default_factory=list)
    published: list[JobResult] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


def parse_jobs(step_id: str, batch: KafkaBatch, max_inputs: int, now_ms: int | None = None) -> Parsed:
    now = wall_ms() if now_ms is None else now_ms
    out = Parsed()
    for msg in batch:
        try:
            job_id = id_from_key(msg.key, "job id", "a job submission")
        except InvalidMessage as exc:
            out.dead.append(DeadLetter(msg, step_id, str(exc)))
            metrics.ERRORS.labels(step_id, type(exc).__name__).inc()
            continue
        try:
            out.jobs.append(_job(job_id, msg, max_inputs, now))
        except InvalidMessage as exc:
            failed = JobResult(job_id, "failed", "", 0, msg.timestamp_ms or now, now, now, error=str(exc))
            out.failed.append((failed, DeadLetter(msg, step_id, str(exc))))
            metrics.ERRORS.labels(step_id, type(exc).__name__).inc()
    return out


def _job(job_id: str, msg: KafkaMessage, max_inputs: int, now: int) -> Job:
    doc = loads_json(msg.value or b"")
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or "model" not in doc:
        raise InvalidMessage('a job must be a JSON object {"model": ..., "inputs": [instance, ...]}')
    spec = get_spec(str(doc["model"])[:200])
    inputs = doc["inputs"]
    if not 1 <= len(inputs) <= max_inputs:
        raise InvalidMessage(f"a job takes 1 to {max_inputs} inputs, got {len(inputs)}")
    _, errors = spec.schema.column(inputs)
    if errors:
        first = ", ".join(f"inputs[{i}]: {reason}" for i, reason in list(errors.items())[:3])
        raise InvalidMessage(f"{len(errors)} of {len(inputs)} inputs are invalid ({first})")
    return Job(job_id, spec.name, inputs, msg.timestamp_ms or now, now)


def run_jobs(models: dict[str, Model], jobs: list[Job]) -> list[JobResult]:
    """Every job's result; the inputs of all jobs of a model go through its forward pass together."""
    results: list[JobResult] = []
    for name in dict.fromkeys(job.model for job in jobs):
        mine = [job for job in jobs if job.model == name]
        model, spec = models.get(name), get_spec(name)
        if model is None:
            reason = f"model {name!r} is not loaded by these workers (they run {sorted(models)})"
            results.extend(job.result("failed", finished_ms=wall_ms(), error=reason) for job in mine)
            continue
        instances = [x for job in mine for x in job.inputs]
        try:
            outputs = [
                out
                for at in range(0, len(instances), spec.batch_size)
                for out in model.predict(instances[at : at + spec.batch_size])
            ]
        except Exception as exc:  # the model's failure fails its jobs, with the reason; the worker goes on
            reason = f"model failed: {type(exc).__name__}: {exc}"
            results.extend(job.result("failed", finished_ms=wall_ms(), error=reason) for job in mine)
            continue
        done, at = wall_ms(), 0
        for job in mine:
            n = len(job.inputs)
            results.append(job.result("done", finished_ms=done, version=spec.version, outputs=outputs[at : at + n]))
            at += n
    return results


@dataclass(frozen=True)
class JobTable(Expiring[JobResult]):
    """The job table, a :class:`~operators.stateful.ShardProgram` and the only publisher of
    statuses. It takes a job's ``running`` notice and its final result, in either order:

    - ``running`` for a new job is recorded and published; for a job that is running
      (a duplicate submission) nothing; for a finished job its result is published
      again, so a resubmission gets the first result and it stays the latest record;
    - a final result is recorded and published only if the job has none yet.

    Records live ``ttl_ms``. Everything a job publishes leaves in the order it was
    decided, so the latest record of a finished job on the compacted topic is final.
    """

    ttl_ms: int

    def on_item(self, store: StateStore, key: str, value: JobResult) -> Iterable[tuple[str, JobResult]]:
        known = store.get(key)
        if value.status == "running":
            if known is None:
                store.put(key, value.doc(), ttl_ms=self.ttl_ms)
                return ((key, value),)
            return () if known["status"] == "running" else ((key, JobResult(**known)),)
        if known is not None and known["status"] != "running":
            return ()
        store.put(key, value.doc(), ttl_ms=self.ttl_ms)
        return ((key, value),)
