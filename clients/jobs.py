"""Python client for async jobs (``dataflows.async_jobs``): submit now, look the result up by id later.

    with JobsClient("127.0.0.1:9092") as jobs:
        job_id = jobs.submit("tabular-risk", [[0.2, 1.0, 0.0, 0.5, 0.0, 1.2, 0.0, 1.0]] * 500)
        jobs.status(job_id)["status"]       # pending | running | done | failed
        result = jobs.wait(job_id, timeout_s=60)
        result["outputs"]                   # one output per input, in order

A status lookup is answered from this client's view of the job table: a
background consumer reads the compacted ``jobs.results`` topic (the worker's
table, one record per status change) and the ``jobs.submit`` topic (so a job
submitted through any client reads as ``pending``) from their beginning, and
follows them. Statuses only move forward (pending, running, then done or
failed), whatever order records arrive in. An id never submitted reads as
``unknown``. A client started before the workers waits for their topics (up to
``wait_for_workers_s``, then :class:`~operators.kafka.KafkaAdminError`); the
constructor returns once the view has read both topics to where they ended
when it started, so a lookup then knows every job submitted before. The view
keeps every job's latest record, outputs included, in memory.
"""

from __future__ import annotations

import threading
import time
import uuid
from functools import partial
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from operators.kafka import Outage, consumer_config, partition_count, producer_config, wait_for_topics
from operators.protocol import JOBS_RESULTS_TOPIC, JOBS_SUBMIT_TOPIC, MAX_JOB_ID_BYTES
from patternflow.errors import PatternflowError

__all__ = ["JobSubmitError", "JobsClient"]

_RANK = {"unknown": -1, "pending": 0, "running": 1, "done": 2, "failed": 2}


class JobSubmitError(PatternflowError, RuntimeError):
    """The broker did not take a submission (it names why); nothing was enqueued."""


class JobsClient:
    def __init__(
        self,
        brokers: str,
        *,
        submit_topic: str = JOBS_SUBMIT_TOPIC,
        results_topic: str = JOBS_RESULTS_TOPIC,
        wait_for_workers_s: float = 120.0,
        submit_timeout_s: float = 30.0,
    ) -> None:
        self.submit_topic = submit_topic
        self.results_topic = results_topic
        self.submit_timeout_s = submit_timeout_s
        topics = [submit_topic, results_topic]
        wait_for_topics(brokers, topics, timeout_s=wait_for_workers_s, who="dataflows.async_jobs")
        # A job's result can be large (embeddings): the client takes what the topics allow.
        self._producer = Producer(producer_config(brokers, {"linger.ms": 5, "message.max.bytes": 64 << 20}))
        self._consumer = Consumer(consumer_config(brokers, {"fetch.wait.max.ms": 50}))
        parts = [TopicPartition(topic, p) for topic in topics for p in range(partition_count(brokers, topic))]
        # Where the topics end now: the constructor returns once the view has read that far.
        outage = Outage(f"reading where {topics} end at {brokers}")  # a just-created topic may have no leader yet
        ends = {tp: outage.call(partial(self._consumer.get_watermark_offsets, tp, timeout=10)) for tp in parts}
        self._behind = [TopicPartition(tp.topic, tp.partition, high) for tp, (low, high) in ends.items() if high > low]
        self._consumer.assign([TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in parts])
        self._jobs: dict[str, dict[str, Any]] = {}
        self._changed = threading.Condition()
        self._caught_up = threading.Event()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._follow, name="job-table", daemon=True)
        self._reader.start()
        if not self._caught_up.wait(wait_for_workers_s):
            self.close()
            behind = [f"{tp.topic}[{tp.partition}]" for tp in self._behind]
            raise TimeoutError(f"could not read {behind} to their end within {wait_for_workers_s} s")

    def submit(self, model: str, inputs: list[Any], *, job_id: str | None = None) -> str:
        """Enqueue a job (an id is made up unless given: an id is an idempotency key) and return its id
        once the broker has it; :class:`JobSubmitError` if it does not take it, ``ValueError`` for an
        id the workers would refuse."""
        job_id = uuid.uuid4().hex if job_id is None else job_id
        if not 1 <= len(job_id.encode()) <= MAX_JOB_ID_BYTES:
            raise ValueError(f"a job id is 1 to {MAX_JOB_ID_BYTES} bytes of UTF-8, got {len(job_id.encode())}")
        value = orjson.dumps({"model": model, "inputs": inputs}, option=orjson.OPT_SERIALIZE_NUMPY)
        failure: list[KafkaError] = []

        def delivered(err: KafkaError | None, _: object) -> None:
            if err is not None:
                failure.append(err)

        try:
            self._producer.produce(self.submit_topic, value, key=job_id.encode(), on_delivery=delivered)
        except (BufferError, KafkaException) as exc:  # the local queue is full, or the message too large
            raise JobSubmitError(f"job {job_id} was not submitted: {exc}") from exc
        if self._producer.flush(self.submit_timeout_s) or failure:
            why = failure[0].str() if failure else f"not acknowledged within {self.submit_timeout_s} s"
            raise JobSubmitError(f"job {job_id} was not submitted: {why}")
        self._update({"job_id": job_id, "status": "pending"})
        return job_id

    def status(self, job_id: str) -> dict[str, Any]:
        """The job's latest record: ``status`` is pending, running, done (with ``outputs``),
        failed (with ``error``), or unknown."""
        with self._changed:
            return dict(self._jobs.get(job_id) or {"job_id": job_id, "status": "unknown"})

    def wait(self, job_id: str, *, timeout_s: float = 60.0) -> dict[str, Any]:
        """The job's record once it is done or failed; :class:`TimeoutError` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while (found := self._jobs.get(job_id, {})).get("status") not in ("done", "failed"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} is {found.get('status', 'unknown')} after {timeout_s} s")
                self._changed.wait(left)
            return dict(found)

    def _update(self, record: dict[str, Any]) -> None:
        with self._changed:
            known = self._jobs.get(record["job_id"])
            if known is None or _RANK[record["status"]] > _RANK[known["status"]]:
                self._jobs[record["job_id"]] = record
                self._changed.notify_all()

    def _follow(self) -> None:
        while not self._closed.is_set():
            try:
                msgs = self._consumer.consume(500, 0.1)
            except KafkaException:  # closed under us
                return
            for msg in msgs:
                key, value, error = msg.key(), msg.value(), msg.error()
                if error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                    self._without(msg.topic() or "")
                if error is not None or not key:
                    continue
                if msg.topic() == self.submit_topic:
                    self._update({"job_id": key.decode(errors="replace"), "status": "pending"})
                elif value is not None:
                    try:
                        record = orjson.loads(value)
                    except orjson.JSONDecodeError:
                        continue  # not written by the workers
                    if isinstance(record, dict) and record.get("status") in _RANK and "job_id" in record:
                        self._update(record)
            # Only once the records read so far are applied: a lookup after the constructor returns sees them.
            if self._behind:
                now = self._consumer.position(self._behind)
                self._behind = [end for end, at in zip(self._behind, now, strict=True) if at.offset < end.offset]
            if not self._behind:
                self._caught_up.set()

    def _without(self, topic: str) -> None:
        """Stop reading ``topic``, which this client's principal may not read (on a secured cluster a
        client may not read the workers' input): a job then reads as pending once this client submits
        it, or once the workers have taken it."""
        if topic == self.submit_topic and any(tp.topic == topic for tp in self._consumer.assignment()):
            self._consumer.incremental_unassign([tp for tp in self._consumer.assignment() if tp.topic == topic])
            self._behind = [tp for tp in self._behind if tp.topic != topic]

    def close(self) -> None:
        self._closed.set()
        self._reader.join(timeout=5)
        self._consumer.close()
        self._producer.flush(5)

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
