"""Dead-letter routing: failures are a stream, not a crash.

:func:`try_map` applies a decode or validation function to each Kafka message;
messages it rejects leave on the ``errs`` stream as :class:`DeadLetter` items,
which :func:`to_dlq_message` turns into a message for ``<topic>.dlq`` carrying
the original bytes and headers plus where the message came from, which step
rejected it and why. The dataflow keeps running.

A function rejects a message by raising :class:`InvalidMessage` (or
``ValueError``, ``TypeError``, ``KeyError``, which decoders raise on bad
input); anything else is a bug and stops the dataflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import bytewax.operators as op
import orjson
from bytewax.dataflow import Stream, operator

from operators import metrics
from operators.kafka import KafkaMessage

__all__ = ["DLQ_SUFFIX", "DeadLetter", "InvalidMessage", "TryOut", "decode_json", "to_dlq_message", "try_map"]

DLQ_SUFFIX = ".dlq"
X = TypeVar("X")

REJECTED = (ValueError, TypeError, KeyError)


class InvalidMessage(ValueError):
    pass


@dataclass(frozen=True)
class DeadLetter:
    message: KafkaMessage
    step_id: str
    reason: str


@dataclass(frozen=True)
class TryOut(Generic[X]):
    oks: Stream[X]
    errs: Stream[DeadLetter]


@operator
def try_map(step_id: str, up: Stream[KafkaMessage], fn: Callable[[KafkaMessage], X]) -> TryOut[X]:
    """Map each message with ``fn``; rejected messages go to ``errs`` with the reason."""
    ok_count = metrics.ITEMS.labels(step_id, "ok")
    seconds = metrics.STEP_SECONDS.labels(step_id)

    def attempt(batch: list[KafkaMessage]) -> list[X | DeadLetter]:
        start = time.perf_counter()
        out: list[X | DeadLetter] = []
        for msg in batch:
            try:
                out.append(fn(msg))
            except REJECTED as exc:
                reason = f"{type(exc).__name__}: {exc}"
                metrics.ERRORS.labels(step_id, type(exc).__name__).inc()
                out.append(DeadLetter(msg, step_id, reason))
        ok_count.inc(sum(1 for x in out if not isinstance(x, DeadLetter)))
        seconds.observe(time.perf_counter() - start)
        return out

    results = op.flat_map_batch("attempt", up, attempt)
    split = op.branch("split", results, lambda x: isinstance(x, DeadLetter))
    return TryOut(split.falses, split.trues)  # type: ignore[arg-type]


def decode_json(max_bytes: int = 1 << 20) -> Callable[[KafkaMessage], object]:
    """A decoder for :func:`try_map`: the message value as a JSON document."""

    def decode(msg: KafkaMessage) -> object:
        if msg.value is None:
            raise InvalidMessage("message has no value (tombstone)")
        if len(msg.value) > max_bytes:
            raise InvalidMessage(f"value is {len(msg.value)} bytes, over the {max_bytes} byte limit")
        return orjson.loads(msg.value)

    return decode


def to_dlq_message(dead: DeadLetter) -> KafkaMessage:
    """The dead letter as a message for ``<source topic>.dlq``."""
    src = dead.message
    headers = (
        *src.headers,
        ("dlq.reason", dead.reason.encode()),
        ("dlq.step", dead.step_id.encode()),
        ("dlq.source.topic", (src.topic or "").encode()),
        ("dlq.source.partition", str(src.partition).encode()),
        ("dlq.source.offset", str(src.offset).encode()),
    )
    return KafkaMessage(value=src.value, key=src.key, headers=headers, topic=f"{src.topic}{DLQ_SUFFIX}")
