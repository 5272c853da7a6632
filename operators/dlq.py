"""Dead-letter routing: failures are a stream, not a crash.

:func:`try_map` applies a decode or validation function to each Kafka message;
messages it rejects leave on the ``errs`` stream as :class:`DeadLetter` items,
which :func:`to_dlq_message` turns into a message for ``<topic>.dlq`` carrying
the original bytes and headers plus where the message came from, which step
rejected it and why. The dataflow keeps running.

A function rejects a message by raising :class:`InvalidMessage` (schemas'
errors derive from it, and :func:`decode_json` turns a JSON syntax error into
one). Any other exception, ``KeyError`` and ``TypeError`` included, is a bug in
the function and stops the dataflow, rather than turning into silent
dead-letter traffic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import bytewax.operators as op
import orjson
from bytewax.dataflow import Stream, operator

from operators import metrics
from operators.kafka.message import KafkaMessage
from operators.streams import split
from patternflow import InvalidMessage

__all__ = [
    "DLQ_SUFFIX",
    "DeadLetter",
    "InvalidMessage",
    "TryOut",
    "decode_json",
    "loads_json",
    "to_dlq_message",
    "try_map",
]

DLQ_SUFFIX = ".dlq"
X = TypeVar("X")


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
            except InvalidMessage as exc:
                metrics.ERRORS.labels(step_id, type(exc).__name__).inc()
                out.append(DeadLetter(msg, step_id, f"{type(exc).__name__}: {exc}"))
        ok_count.inc(sum(1 for x in out if not isinstance(x, DeadLetter)))
        seconds.observe(time.perf_counter() - start)
        return out

    results = split("split", op.flat_map_batch("attempt", up, attempt), DeadLetter, object)
    return TryOut(cast(Stream[X], results.rest), results.first)


def loads_json(raw: bytes) -> object:
    """``raw`` as a JSON document; :class:`InvalidMessage` if it is not one."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"not JSON: {exc}") from exc


def decode_json(max_bytes: int = 1 << 20) -> Callable[[KafkaMessage], object]:
    """A decoder for :func:`try_map`: the message value as a JSON document."""

    def decode(msg: KafkaMessage) -> object:
        if msg.value is None:
            raise InvalidMessage("message has no value (tombstone)")
        if len(msg.value) > max_bytes:
            raise InvalidMessage(f"value is {len(msg.value)} bytes, over the {max_bytes} byte limit")
        return loads_json(msg.value)

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
