"""The Kafka record as patternflow's operators pass it around (no Bytewax here)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from typing import Any, NamedTuple, cast, overload

from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import Message

__all__ = ["Headers", "KafkaBatch", "KafkaMessage", "records"]

Headers = tuple[tuple[str, bytes | None], ...]


class KafkaMessage(NamedTuple):
    """A Kafka record, as read by ``KafkaSource`` or to be written by ``KafkaSink``.

    On output, ``topic`` defaults to the sink's topic, ``partition`` to the
    one the key hashes to and ``timestamp_ms`` to the time of sending; ``offset``
    is ignored. (A named tuple: immutable and
    several times cheaper to build than a frozen dataclass, on the hot path.)
    """

    value: bytes | None
    key: bytes | None = None
    headers: Headers = ()
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    timestamp_ms: int | None = None

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name``, or ``None``."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found


# Builds a KafkaMessage from a tuple of its fields without KafkaMessage.__new__'s
# Python frame: on the hot path of a source.
_make = tuple.__new__
_second = itemgetter(1)


@dataclass(frozen=True, slots=True)
class KafkaBatch(Sequence[KafkaMessage]):
    """Records read together from one partition, in offset order, as columns.

    ``values[i]``, ``keys[i]``, ``headers[i]``, ``offsets[i]`` and
    ``timestamps_ms[i]`` belong to one record. Taking the columns costs nothing
    per record; indexing or iterating gives :class:`KafkaMessage` objects,
    built on demand.
    """

    topic: str
    partition: int
    values: list[bytes | None]
    keys: list[bytes | None]
    headers: list[Headers]
    offsets: list[int]
    timestamps_ms: list[int]

    def __len__(self) -> int:
        return len(self.offsets)

    @overload
    def __getitem__(self, index: int) -> KafkaMessage: ...

    @overload
    def __getitem__(self, index: slice) -> KafkaBatch: ...

    def __getitem__(self, index: int | slice) -> KafkaMessage | KafkaBatch:
        if isinstance(index, slice):
            return KafkaBatch(
                self.topic,
                self.partition,
                self.values[index],
                self.keys[index],
                self.headers[index],
                self.offsets[index],
                self.timestamps_ms[index],
            )
        fields = (
            self.values[index],
            self.keys[index],
            self.headers[index],
            self.topic,
            self.partition,
            self.offsets[index],
            self.timestamps_ms[index],
        )
        return _make(KafkaMessage, fields)

    def __iter__(self) -> Iterator[KafkaMessage]:
        fields = zip(
            self.values,
            self.keys,
            self.headers,
            repeat(self.topic),
            repeat(self.partition),
            self.offsets,
            self.timestamps_ms,
        )
        return map(_make, repeat(KafkaMessage), fields)


def records(msgs: list[Message], topic: str, partition: int) -> tuple[KafkaBatch, list[RdKafkaError]]:
    """confluent-kafka messages of one partition as a :class:`KafkaBatch`, and the errors among them."""
    errors = list(filter(None, map(Message.error, msgs)))
    if errors:
        msgs = [m for m in msgs if m.error() is None]
    # A column per field: nothing is allocated per record beyond its fields.
    headers: list[Any] = list(map(Message.headers, msgs))  # consumed: a list of pairs, or None
    batch = KafkaBatch(
        topic,
        partition,
        list(map(Message.value, msgs)),
        list(map(Message.key, msgs)),
        [tuple(h) if h else () for h in headers] if any(headers) else [()] * len(msgs),
        cast("list[int]", list(map(Message.offset, msgs))),  # a consumed record has an offset
        list(map(_second, map(Message.timestamp, msgs))),
    )
    return batch, errors
