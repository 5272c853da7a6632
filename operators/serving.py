"""Request/reply serving over Kafka: parse, micro-batch with deadlines, infer, reply.

Protocol (:mod:`operators.protocol`). A request is a Kafka message whose value is
``{"model": "<name>", "inputs": <one instance>}`` and whose headers carry
``correlation_id``, ``reply_topic``, optionally ``reply_partition`` and
``deadline_ms`` (absolute, epoch ms). Every request that names a valid place to
reply (checked against the broker's metadata before anything is produced
there) is answered there, keyed by its correlation id, with a status:

- ``ok``: ``outputs`` holds the model's output for the instance;
- ``error``: the request was malformed or violated the model's input schema
  (``error`` says how; the request is also copied to the dead-letter topic);
- ``timeout``: its deadline had passed when its batch formed, so it was not computed;
- ``rejected``: the batcher's queue was full (load shedding).

A request without a valid correlation id and reply destination cannot be
answered: it goes to the dead-letter topic only, with the reason.

Delivery is at least once: after a crash, requests read since the last snapshot
are answered again, with the same correlation id; clients keep the first reply.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import bytewax.operators as op
import orjson
from bytewax.dataflow import Stream, operator
from bytewax.operators import KeyedStream, StatefulBatchLogic

from models.registry import Model, get_spec
from operators.dlq import DeadLetter, InvalidMessage, loads_json, to_dlq_message, try_map
from operators.kafka.message import KafkaMessage
from operators.metrics import INFERENCE_SECONDS, ITEMS, ONLINE_BATCH_FILL, ONLINE_REQUESTS
from operators.protocol import ReplyRules, deadline_ms, reply_to
from operators.streams import split
from patternflow import RELAXED_BUDGET_S, wall_ms

__all__ = [
    "BatchConfig",
    "Reply",
    "Request",
    "answerable",
    "error_and_dead_letter",
    "serve_requests",
]

Status = Literal["ok", "error", "timeout", "rejected"]
SERVED_BY = f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Request:
    correlation_id: str
    reply_topic: str
    reply_partition: int | None
    deadline_ms: int | None
    model: str
    inputs: Any
    sent_ms: int  # the request message's Kafka timestamp
    read_ms: int  # when the source read it
    partition: int  # of the request topic
    source: KafkaMessage | None = None  # kept only for requests headed to the DLQ


@dataclass(frozen=True)
class Reply:
    request: Request
    status: Status
    outputs: Any = None
    error: str | None = None
    version: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int | None = None

    def to_message(self) -> KafkaMessage:
        """The reply for its reply topic; records the request's per-stage latencies."""
        r = self.request
        start = time.perf_counter()
        doc: dict[str, Any] = {"correlation_id": r.correlation_id, "status": self.status, "model": r.model}
        if self.version is not None:
            doc["version"] = self.version
        if self.status == "ok":
            doc["outputs"] = self.outputs
        if self.error is not None:
            doc["error"] = self.error
        if self.batch_size is not None:
            doc["batch_size"] = self.batch_size
        doc["served_by"] = SERVED_BY
        timings = dict(self.timings_ms)
        value = orjson.dumps({**doc, "timings_ms": timings})
        timings["serialize"] = (time.perf_counter() - start) * 1000
        timings["end_to_end"] = wall_ms() - r.sent_ms
        for stage, ms in timings.items():
            INFERENCE_SECONDS.labels(r.model, stage).observe(ms / 1000)
        ITEMS.labels("reply", self.status).inc()
        headers = (("correlation_id", r.correlation_id.encode()), ("status", self.status.encode()))
        key = r.correlation_id.encode()
        return KafkaMessage(value, key=key, headers=headers, topic=r.reply_topic, partition=r.reply_partition)


@dataclass(frozen=True)
class Batch:
    model: str
    requests: tuple[Request, ...]
    formed_ms: int


@dataclass(frozen=True)
class BatchConfig:
    """Micro-batching: a batch forms at ``max_batch_size`` requests or ``max_wait_ms``
    after its first one, whichever comes first. With ``max_wait_ms=0`` a batch is
    what the source read together: under load the source reads more per poll, so
    batches grow with the load and an idle server adds no wait (the default: it
    gave the lowest p50 at every load measured, see the README). At most
    ``max_queue`` requests are taken per model, source partition and poll; more
    are rejected at once."""

    max_batch_size: int = 32
    max_wait_ms: int = 0
    max_queue: int = 1024
    now_ms: Callable[[], int] = wall_ms

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= self.max_queue:
            raise ValueError(f"need 1 <= max_batch_size <= max_queue, got {self.max_batch_size}, {self.max_queue}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


def answerable(msg: KafkaMessage, rules: ReplyRules, now_ms: Callable[[], int] = wall_ms, model: str = "") -> Request:
    """The request ``msg`` is, before its value is read: where to reply, and when it was sent and read.

    Raises :class:`InvalidMessage` when the request names no valid place to reply.
    """
    to = reply_to(msg, rules)
    return Request(
        correlation_id=to.correlation_id,
        reply_topic=to.topic,
        reply_partition=to.partition,
        deadline_ms=None,
        model=model,
        inputs=None,
        sent_ms=msg.timestamp_ms or now_ms(),
        read_ms=now_ms(),
        partition=msg.partition or 0,
    )


def parse_request(msg: KafkaMessage, rules: ReplyRules, now_ms: Callable[[], int] = wall_ms) -> Request | Reply:
    """A :class:`Request`, or an ``error`` :class:`Reply` (still carrying the message, for the DLQ).

    Raises :class:`InvalidMessage` when the request names no valid place to reply.
    """
    request = answerable(msg, rules, now_ms)
    model = ""
    try:
        deadline = deadline_ms(msg)
        doc = loads_json(msg.value or b"")
        if not isinstance(doc, dict) or "model" not in doc or "inputs" not in doc:
            raise InvalidMessage('request value must be a JSON object {"model": ..., "inputs": ...}')
        model = str(doc["model"])[:200]
        spec = get_spec(model)
        request = replace(request, model=spec.name, inputs=spec.schema.validate(doc["inputs"]), deadline_ms=deadline)
    except InvalidMessage as exc:  # bad JSON or deadline, unknown model, schema violation
        return Reply(replace(request, model=model, source=msg), "error", error=f"{type(exc).__name__}: {exc}")
    _count(request)
    return request


def _count(r: Request) -> None:
    """Who asks, and how long they can wait: the audit's evidence of batch-shaped work sent online."""
    client = f"{r.reply_topic}:{'*' if r.reply_partition is None else r.reply_partition}"
    tight = r.deadline_ms is not None and r.deadline_ms - r.sent_ms <= RELAXED_BUDGET_S * 1000
    ONLINE_REQUESTS.labels(r.model, client, "tight" if tight else "relaxed").inc()


class _Batcher(StatefulBatchLogic[Request, Batch | Reply, tuple[Request, ...]]):
    """Requests of one model from one source partition, waiting for their batch."""

    def __init__(self, config: BatchConfig, pending: tuple[Request, ...] = ()) -> None:
        self._config = config
        self._pending = list(pending)

    def _form(self) -> list[Batch | Reply]:
        now = self._config.now_ms()
        expired = [r for r in self._pending if r.deadline_ms is not None and r.deadline_ms <= now]
        live = tuple(r for r in self._pending if r.deadline_ms is None or r.deadline_ms > now)
        self._pending = []
        out: list[Batch | Reply] = [Reply(r, "timeout", error="deadline passed before compute") for r in expired]
        if live:
            out.append(Batch(live[0].model, live, now))
            ONLINE_BATCH_FILL.labels(live[0].model).observe(len(live) / self._config.max_batch_size)
        return out

    def on_batch(self, values: list[Request]) -> tuple[list[Batch | Reply], bool]:
        out: list[Batch | Reply] = []
        queued = len(self._pending)
        for request in values:
            if queued >= self._config.max_queue:
                out.append(Reply(request, "rejected", error=f"queue full ({self._config.max_queue} waiting)"))
                continue
            queued += 1
            self._pending.append(request)
            if len(self._pending) >= self._config.max_batch_size:
                out.extend(self._form())
        if self._config.max_wait_ms == 0 and self._pending:
            out.extend(self._form())
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[Batch | Reply], bool]:
        return self._form(), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[Batch | Reply], bool]:
        return self._form(), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if not self._pending:
            return None
        return datetime.fromtimestamp((self._pending[0].read_ms + self._config.max_wait_ms) / 1000, tz=UTC)

    def snapshot(self) -> tuple[Request, ...]:
        # Requests read before the snapshot are not read again after a crash: keep them.
        return tuple(self._pending)


def infer(models: dict[str, Model], batch: Batch, now_ms: Callable[[], int] = wall_ms) -> list[Reply]:
    """One batched forward pass; a failure answers every request of the batch with the reason."""
    spec, model = get_spec(batch.model), models.get(batch.model)
    if model is None:
        reason = f"model {batch.model!r} is not loaded by this server (it serves {sorted(models)})"
        return [Reply(r, "error", error=reason) for r in batch.requests]
    start = time.perf_counter()
    try:
        outputs = model.predict([r.inputs for r in batch.requests])
    except Exception as exc:
        return [Reply(r, "error", error=f"model failed: {type(exc).__name__}: {exc}") for r in batch.requests]
    compute_ms = (time.perf_counter() - start) * 1000
    return [
        Reply(
            r,
            "ok",
            outputs=out,
            version=spec.version,
            timings_ms={
                "queue": r.read_ms - r.sent_ms,
                "batch_wait": batch.formed_ms - r.read_ms,
                "compute": compute_ms,
            },
            batch_size=len(batch.requests),
        )
        for r, out in zip(batch.requests, outputs, strict=True)
    ]


@operator
def serve_requests(
    step_id: str, up: Stream[KafkaMessage], models: dict[str, Model], config: BatchConfig, rules: ReplyRules
) -> Stream[KafkaMessage]:
    """Requests in; replies and dead letters out, each message naming its topic."""
    parsed = try_map("parse", up, lambda msg: parse_request(msg, rules, config.now_ms))
    # oks: Request | Reply (error, carrying its message); errs: DeadLetter (nowhere to reply)
    valid = split("valid", parsed.oks, Request, Reply)
    parse_step = f"{step_id}.parse"
    invalid = op.flat_map("answer_invalid", valid.rest, lambda reply: error_and_dead_letter(parse_step, reply))
    # KafkaMessage: the error reply, and the request for the DLQ
    keyed = op.key_on("by_model", valid.first, lambda r: f"{r.model}:{r.partition}")
    # (model:partition, Request): a queue per model and source partition, so partitions spread over workers
    formed: KeyedStream[Batch | Reply] = op.stateful_batch(
        "batch", keyed, lambda pending: _Batcher(config, pending or ())
    )
    # (key, Batch | Reply): a batch to compute, or a timeout / rejected reply
    batches = split("is_batch", op.key_rm("unkey", formed), Batch, Reply)
    computed = op.flat_map("infer", batches.first, lambda batch: infer(models, batch))
    replies = op.map("encode", op.merge("replies", computed, batches.rest), Reply.to_message)
    # KafkaMessage on each request's reply topic
    dead = op.map("dead", parsed.errs, to_dlq_message)
    return op.merge("out", replies, invalid, dead)


def error_and_dead_letter(parse_step: str, reply: Reply) -> list[KafkaMessage]:
    """The error reply to a request that failed parsing, and the request as a dead letter."""
    source = reply.request.source
    assert source is not None, "an error reply from parsing carries its message"
    return [reply.to_message(), to_dlq_message(DeadLetter(source, parse_step, reply.error or ""))]
