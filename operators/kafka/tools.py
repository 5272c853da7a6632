"""Producing and reading whole topics outside a dataflow: for scripts, demos,
tests and benchmarks (no Bytewax here)."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from operators.kafka.client import DEFAULT_OUTAGE_LIMIT_S, Outage, consumer_config, producer_config, send
from operators.kafka.errors import KafkaDeliveryError, KafkaSourceError
from operators.kafka.message import KafkaBatch, KafkaMessage, records

__all__ = ["produce", "read_batches", "read_topic"]


def produce(brokers: str, messages: Iterable[KafkaMessage], *, timeout_s: float = 60.0) -> int:
    """Produce ``messages`` (each naming its topic); return the count.

    Raises :class:`KafkaDeliveryError` unless every message is acknowledged.
    """
    failed: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            failed.append(f"{msg.topic()}: {err}")

    producer = Producer({**producer_config(brokers, outage_limit_s=timeout_s), "on_delivery": on_delivery})
    count = 0
    for msg in messages:
        if msg.topic is None:
            raise ValueError(f"produce() needs each message's topic; message {count} has none")
        send(producer, msg.topic, msg, on_delivery)
        count += 1
    remaining = producer.flush(timeout_s + 10)
    if failed or remaining:
        raise KafkaDeliveryError(f"{len(failed)} failed, {remaining} unacknowledged; first: {failed[:1]}")
    return count


def read_topic(
    brokers: str, topic: str, *, timeout_s: float = 60.0, outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S
) -> list[KafkaMessage]:
    """Every message of ``topic`` up to its current end, partition by partition."""
    batches = read_batches(brokers, topic, timeout_s=timeout_s, outage_limit_s=outage_limit_s)
    return [msg for batch in batches for msg in batch]


def read_batches(
    brokers: str,
    topic: str,
    *,
    since_ms: int | None = None,
    timeout_s: float = 60.0,
    outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S,
) -> Iterator[KafkaBatch]:
    """The messages of ``topic`` from its beginning (or the first written at or after
    ``since_ms``) up to its end when each partition is reached, batch by batch."""
    consumer = Consumer(consumer_config(brokers))
    outage = Outage(f"reading {topic} at {brokers}", outage_limit_s)
    try:
        meta = outage.call(lambda: consumer.list_topics(topic, timeout=5)).topics.get(topic)
        if meta is None or meta.error is not None:
            raise KafkaSourceError(f"topic {topic!r} does not exist at {brokers}")
        deadline = time.monotonic() + timeout_s
        for partition in sorted(meta.partitions):
            tp = TopicPartition(topic, partition)
            low, high = outage.call(lambda tp=tp: consumer.get_watermark_offsets(tp, timeout=5))  # type: ignore[misc]
            if since_ms is not None:
                query = [TopicPartition(topic, partition, since_ms)]
                (found,) = outage.call(lambda q=query: consumer.offsets_for_times(q, timeout=5))  # type: ignore[misc]
                low = high if found.offset < 0 else max(low, found.offset)  # < 0: nothing that recent
            consumer.assign([TopicPartition(topic, partition, low)])
            next_offset = low
            while next_offset < high:
                if time.monotonic() > deadline:
                    raise KafkaSourceError(f"reading {topic} took over {timeout_s} s")
                batch, _ = records(consumer.consume(1000, 0.1), topic, partition)  # errors: retried by polling again
                if batch:
                    yield batch if batch.offsets[-1] < high else batch[: bisect_left(batch.offsets, high)]
                # transaction markers take offsets but are never returned
                (pos,) = consumer.position([tp])
                next_offset = max(next_offset, pos.offset if pos.offset >= 0 else next_offset)
    finally:
        consumer.close()
