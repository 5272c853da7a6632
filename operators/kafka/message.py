"""The Kafka record as patternflow's operators pass it around (no Bytewax here)."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["Headers", "KafkaMessage", "records"]

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


def records(msgs: list[Any], topic: str, partition: int) -> tuple[list[KafkaMessage], list[Any]]:
    """confluent-kafka messages of one partition as :class:`KafkaMessage`, and the errors among them."""
    out: list[KafkaMessage] = []
    errors: list[Any] = []
    append = out.append
    make = tuple.__new__  # skips KafkaMessage.__new__'s Python frame: this loop is a source's cost
    for msg in msgs:
        err = msg.error()
        if err is not None:
            errors.append(err)
            continue
        headers = msg.headers()
        fields = (
            msg.value(),
            msg.key(),
            tuple(headers) if headers else (),
            topic,
            partition,
            msg.offset(),
            msg.timestamp()[1],
        )
        append(make(KafkaMessage, fields))
    return out, errors
