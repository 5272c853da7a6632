"""The results the workers published before this process started: a finished job never runs again.

After a kill -9 the dataflow resumes from its last snapshot: the job table rolls
back to it and the submissions read since are read again. A job among them may
have finished before the kill, its result on the results topic. Running it again
would publish a new ``running`` after its ``done`` and a second result that can
differ in the last digits (batched with other jobs). So before a job submitted
before this process started runs, :class:`PublishedResults` looks its id up on the
results topic; a final record found there goes to the job table in place of
running the job, and the table records it and publishes that same record again.

The lookup reads the results topic once, from the earliest submission time it is
asked about (less ``max_clock_skew_ms``: submitters' and workers' clocks differ)
to its end, keeping only where each final record is; a record is fetched when its
job comes. A job submitted more than the skew before a clock that is off by more
than the skew is run again, as it was before this lookup.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

import orjson
from confluent_kafka import Consumer, Message, TopicPartition

from dataflows.async_jobs.jobs import JobResult, Parsed
from operators.kafka import Outage, consumer_config
from operators.kafka.tools import read_batches
from patternflow import wall_ms

__all__ = ["PublishedResults"]


class PublishedResults:
    """Final results on ``results_topic`` of jobs submitted before this process started (shared by its workers)."""

    def __init__(
        self,
        brokers: str,
        results_topic: str,
        *,
        max_clock_skew_ms: int,
        outage_limit_s: float,
        now_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self._brokers, self._topic = brokers, results_topic
        self._skew_ms, self._outage_limit_s = max_clock_skew_ms, outage_limit_s
        self._started_ms = now_ms()
        self._read_since_ms: int | None = None  # nothing read yet
        self._where: dict[str, tuple[int, int]] = {}  # job id -> (partition, offset) of its latest final record
        self._lock = threading.Lock()

    def split(self, parsed: Parsed) -> Parsed:
        """``parsed`` with the jobs that already have a published result moved to ``published``."""
        earlier = [job for job in parsed.jobs if job.submitted_ms <= self._started_ms + self._skew_ms]
        if not earlier:
            return parsed
        with self._lock:
            since_ms = min(job.submitted_ms for job in earlier) - self._skew_ms
            if self._read_since_ms is None or since_ms < self._read_since_ms:
                self._read(since_ms)
            found = {job.job_id: self._where[job.job_id] for job in earlier if job.job_id in self._where}
            if not found:
                return parsed
            published = self._fetch(found)
        jobs = [job for job in parsed.jobs if job.job_id not in published]
        return replace(parsed, jobs=jobs, published=[*parsed.published, *published.values()])

    def _read(self, since_ms: int) -> None:
        for batch in read_batches(
            self._brokers, self._topic, since_ms=since_ms, timeout_s=600, outage_limit_s=self._outage_limit_s
        ):
            for key, value, offset in zip(batch.keys, batch.values, batch.offsets, strict=True):
                if key and _final(value) is not None:
                    self._where[key.decode(errors="replace")] = (batch.partition, offset)
        self._read_since_ms = since_ms

    def _fetch(self, where: dict[str, tuple[int, int]]) -> dict[str, JobResult]:
        consumer = Consumer(consumer_config(self._brokers))
        outage = Outage(f"reading published job results from {self._topic}", self._outage_limit_s)
        out: dict[str, JobResult] = {}
        try:
            for job_id, (partition, offset) in where.items():
                consumer.assign([TopicPartition(self._topic, partition, offset)])
                got: list[Message] = []
                while not got:
                    for msg in outage.call(lambda: consumer.consume(1, 5)):
                        if msg.error() is None:
                            got.append(msg)
                        else:
                            outage.failed(msg.error())
                # compacted away since (a later record under its key): the job runs again
                if got[0].offset() == offset and (result := _final(got[0].value())) is not None:
                    out[job_id] = result
        finally:
            consumer.close()
        return out


def _final(value: bytes | None) -> JobResult | None:
    """The final result a record of the results topic holds, if it holds one."""
    try:
        doc = orjson.loads(value or b"")
        return JobResult(**doc) if doc.get("status") in ("done", "failed") else None
    except (orjson.JSONDecodeError, AttributeError, TypeError):  # not written by the workers
        return None
