"""Kafka input and output for Bytewax, on confluent-kafka.

Bytewax's own connector takes one start offset for every partition, stops a
bounded read when each partition first catches up (not deterministic while
producers write), ignores the message partition and registers no delivery
callback. This module fixes those gaps:

- :class:`KafkaSource`: one consumer per topic partition, offsets kept in
  Bytewax snapshots (no consumer group), a start :class:`Position` per
  partition (earliest, latest, offset, timestamp) and a bounded mode that reads
  each partition's high watermark once at start and stops there, so a replay
  reads the same messages however fast producers write. The end offsets are
  part of the snapshot: a resumed replay stops where the first run would have.
- :class:`KafkaSink`: messages are produced asynchronously; the message key
  decides the partition (murmur2, as Java clients do) unless the message names
  one; every epoch's snapshot waits for all delivery reports, and a failed
  delivery raises :class:`KafkaDeliveryError` (the dataflow stops and resumes
  from its last snapshot), so accepted input is never silently dropped.
- :func:`ensure_topics`: topics declared in code (:class:`TopicSpec`) and
  created idempotently.

Exceptions::

    KafkaError
     ├── KafkaSourceError     the broker refused a read (unknown topic, auth, ...)
     ├── KafkaDeliveryError   a produced message was not acknowledged
     └── KafkaAdminError      a topic could not be created
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal, NamedTuple

import bytewax.operators as op
from bytewax.dataflow import Stream, operator
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka import KafkaError as _RdKafkaError
from confluent_kafka.admin import AdminClient, NewTopic

from operators import metrics

__all__ = [
    "KafkaAdminError",
    "KafkaDeliveryError",
    "KafkaError",
    "KafkaMessage",
    "KafkaSink",
    "KafkaSource",
    "KafkaSourceError",
    "Position",
    "TopicSpec",
    "consumer_config",
    "ensure_topics",
    "kafka_output",
    "partition_count",
    "producer_config",
]

Headers = tuple[tuple[str, bytes], ...]
_LAG_INTERVAL_S = 5.0  # how often a tailing source asks the broker for the end offset


class KafkaError(Exception):
    pass


class KafkaSourceError(KafkaError):
    pass


class KafkaDeliveryError(KafkaError):
    pass


class KafkaAdminError(KafkaError):
    pass


class KafkaMessage(NamedTuple):
    """A Kafka record, as read by :class:`KafkaSource` or to be written by :class:`KafkaSink`.

    On output, ``topic`` defaults to the sink's topic and ``partition`` to the
    one the key hashes to; ``offset`` is ignored. (A named tuple: immutable and
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


@dataclass(frozen=True)
class Position:
    """Where a partition starts: ``earliest``, ``latest``, an ``offset`` or a ``timestamp`` (epoch ms)."""

    kind: Literal["earliest", "latest", "offset", "timestamp"]
    value: int = 0

    @classmethod
    def earliest(cls) -> Position:
        return cls("earliest")

    @classmethod
    def latest(cls) -> Position:
        return cls("latest")

    @classmethod
    def offset(cls, offset: int) -> Position:
        return cls("offset", offset)

    @classmethod
    def timestamp(cls, epoch_ms: int) -> Position:
        return cls("timestamp", epoch_ms)

    @classmethod
    def parse(cls, text: str) -> Position:
        """``earliest`` | ``latest`` | ``offset:<n>`` | ``timestamp:<epoch ms>``."""
        kind, _, value = text.partition(":")
        if kind in ("earliest", "latest") and not value:
            return cls(kind)  # type: ignore[arg-type]
        if kind in ("offset", "timestamp") and value.isdigit():
            return cls(kind, int(value))  # type: ignore[arg-type]
        raise ValueError(f"expected earliest, latest, offset:<n> or timestamp:<epoch ms>, got {text!r}")


@dataclass(frozen=True)
class _PartState:
    next_offset: int
    end_offset: int | None  # exclusive; None while tailing


def consumer_config(brokers: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The librdkafka settings of :class:`KafkaSource`'s consumers; ``extra`` overrides."""
    return {
        "bootstrap.servers": brokers,
        # Offsets live in Bytewax snapshots; the group id only satisfies librdkafka.
        "group.id": "patternflow",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "fetch.wait.max.ms": 50,
        # librdkafka pauses a partition's fetches for this long once its local
        # queue is full (default 1 s): a stall of a second after each burst.
        "fetch.queue.backoff.ms": 10,
        **(extra or {}),
    }


def producer_config(brokers: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The librdkafka settings of :class:`KafkaSink`'s producers; ``extra`` overrides."""
    return {
        "bootstrap.servers": brokers,
        "partitioner": "murmur2_random",  # the Java client's key hashing
        "linger.ms": 2,
        "enable.idempotence": True,
        # Reports for failed messages only: success needs no per-message callback.
        "delivery.report.only.error": True,
        **(extra or {}),
    }


class _SourcePartition(StatefulSourcePartition[KafkaMessage, _PartState]):
    def __init__(
        self,
        step_id: str,
        consumer: Consumer,
        topic: str,
        partition: int,
        state: _PartState,
        batch_size: int,
    ) -> None:
        self._step_id = step_id
        self._consumer = consumer
        self._topic = topic
        self._partition = partition
        self._next = state.next_offset
        self._end = state.end_offset
        self._batch_size = batch_size
        self._lag = metrics.CONSUMER_LAG.labels(step_id, topic, str(partition))
        self._lag_checked = 0.0

    def next_batch(self) -> list[KafkaMessage]:
        if self._end is not None and self._next >= self._end:
            self._report_lag()
            raise StopIteration()
        # Never block: a worker runs its operators on one thread, and a blocking poll
        # here would hold up every item downstream. With nothing to read, Bytewax
        # calls again after 1 ms.
        msgs = self._consumer.consume(self._batch_size, 0)
        if not msgs:
            if self._end is not None:
                # Transaction markers take offsets but are never returned:
                # the consumer's position still moves past them.
                (tp,) = self._consumer.position([TopicPartition(self._topic, self._partition)])
                self._next = max(self._next, tp.offset)
            self._report_lag()
            return []
        topic, partition = self._topic, self._partition
        batch: list[KafkaMessage] = []
        append = batch.append
        make = tuple.__new__  # skips KafkaMessage.__new__'s Python frame: this loop is the source's cost
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == _RdKafkaError._PARTITION_EOF:
                    continue
                raise KafkaSourceError(f"step {self._step_id!r}: reading {topic}[{partition}] failed: {err}")
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
        if batch:
            self._next = batch[-1].offset + 1  # type: ignore[operator]
        if self._end is not None and self._next > self._end:
            # The last fetch ran past the end fixed at start.
            self._next = self._end
            batch = [m for m in batch if m.offset < self._end]  # type: ignore[operator]
        self._report_lag()
        return batch

    def _report_lag(self) -> None:
        if self._end is not None:  # bounded: the end is known, no broker call needed
            self._lag.set(self._end - self._next)
            return
        now = time.monotonic()
        if now - self._lag_checked < _LAG_INTERVAL_S:
            return
        self._lag_checked = now
        tp = TopicPartition(self._topic, self._partition)
        _, high = self._consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
        self._lag.set(max(0, high - self._next))

    def snapshot(self) -> _PartState:
        return _PartState(self._next, self._end)

    def close(self) -> None:
        self._consumer.close()


class KafkaSource(FixedPartitionedSource[KafkaMessage, _PartState]):
    """Read ``topics``, one Bytewax partition per Kafka partition.

    ``start`` is one :class:`Position` for all partitions or a mapping from
    partition number to position (others start at earliest). With
    ``bounded=True`` each partition stops at the high watermark it had when the
    dataflow first started it.
    """

    def __init__(
        self,
        brokers: str,
        topics: Sequence[str],
        *,
        start: Position | Mapping[int, Position] = Position.earliest(),  # noqa: B008
        bounded: bool = False,
        batch_size: int = 1000,
        timeout_s: float = 10.0,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.brokers = brokers
        self.topics = list(topics)
        self.start = start
        self.bounded = bounded
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.config = dict(config or {})

    def list_parts(self) -> list[str]:
        # A consumer, not an AdminClient: the config holds consumer properties.
        consumer = Consumer(consumer_config(self.brokers, self.config))
        try:
            topics = _list_topics(consumer, self.brokers, self.timeout_s, KafkaSourceError)
        finally:
            consumer.close()
        parts: list[str] = []
        for topic in self.topics:
            tmeta = topics.get(topic)
            if tmeta is None or tmeta.error is not None:
                raise KafkaSourceError(
                    f"topic {topic!r} does not exist at {self.brokers}; create it first "
                    "(see operators.kafka.ensure_topics)"
                )
            parts.extend(f"{p}-{topic}" for p in tmeta.partitions)
        return parts

    def _position(self, partition: int) -> Position:
        if isinstance(self.start, Position):
            return self.start
        return self.start.get(partition, Position.earliest())

    def _resolve(self, consumer: Consumer, topic: str, partition: int, low: int, high: int) -> int:
        pos = self._position(partition)
        if pos.kind == "earliest":
            return int(low)
        if pos.kind == "latest":
            return int(high)
        if pos.kind == "offset":
            return min(max(pos.value, low), high)
        (found,) = consumer.offsets_for_times([TopicPartition(topic, partition, pos.value)], timeout=self.timeout_s)
        return int(high) if found.offset in (OFFSET_END, -1) else int(found.offset)

    def build_part(self, step_id: str, for_part: str, resume_state: _PartState | None) -> _SourcePartition:
        part, topic = for_part.split("-", 1)
        partition = int(part)
        consumer = Consumer(consumer_config(self.brokers, self.config))
        try:
            state = resume_state
            if state is None:
                tp = TopicPartition(topic, partition)
                low, high = consumer.get_watermark_offsets(tp, timeout=self.timeout_s)
                state = _PartState(self._resolve(consumer, topic, partition, low, high), high if self.bounded else None)
        except KafkaException as exc:
            consumer.close()
            raise KafkaSourceError(f"step {step_id!r}: cannot position {topic}[{partition}]: {exc}") from exc
        consumer.assign([TopicPartition(topic, partition, state.next_offset)])
        return _SourcePartition(step_id, consumer, topic, partition, state, self.batch_size)


def _list_topics(
    client: AdminClient | Consumer, brokers: str, timeout_s: float, error: type[KafkaError]
) -> dict[str, Any]:
    try:
        return dict(client.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        raise error(f"cannot reach Kafka at {brokers}: {exc}. Is the broker up (make kafka-up)?") from exc


def _send(producer: Producer, topic: str, msg: KafkaMessage, on_delivery: Callable[[Any, Any], None]) -> None:
    """Produce one message, waiting for room when the local queue is full."""
    kwargs: dict[str, Any] = {"key": msg.key, "on_delivery": on_delivery}
    if msg.headers:
        kwargs["headers"] = list(msg.headers)
    if msg.partition is not None:
        kwargs["partition"] = msg.partition
    while True:
        try:
            producer.produce(topic, msg.value, **kwargs)
            return
        except BufferError:
            producer.poll(0.05)


class _SharedProducer:
    """One librdkafka producer per process and configuration, shared by sink partitions."""

    _lock = threading.Lock()
    _instances: ClassVar[dict[tuple[tuple[str, str], ...], _SharedProducer]] = {}

    def __init__(self, key: tuple[tuple[str, str], ...], config: dict[str, Any]) -> None:
        self._key = key
        self.producer = Producer(config)
        self.errors: list[str] = []
        self.users = 0

    @classmethod
    def acquire(cls, config: dict[str, Any]) -> _SharedProducer:
        key = tuple(sorted((k, str(v)) for k, v in config.items()))
        with cls._lock:
            shared = cls._instances.get(key)
            if shared is None:
                shared = cls._instances[key] = cls(key, config)
            shared.users += 1
            return shared

    def release(self, timeout_s: float) -> None:
        with self._lock:
            self.users -= 1
            if self.users == 0:
                self.producer.flush(timeout_s)
                del self._instances[self._key]

    def on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(f"{msg.topic()}[{msg.partition()}] key={msg.key()!r}: {err}")


class _SinkPartition(StatefulSinkPartition[KafkaMessage, None]):
    def __init__(self, step_id: str, shared: _SharedProducer, topic: str | None, timeout_s: float) -> None:
        self._step_id = step_id
        self._shared = shared
        self._topic = topic
        self._timeout_s = timeout_s
        self._produced = metrics.ITEMS.labels(step_id, "produced")

    def write_batch(self, values: list[KafkaMessage]) -> None:
        producer = self._shared.producer
        for msg in values:
            topic = msg.topic or self._topic
            if topic is None:
                raise KafkaDeliveryError(f"step {self._step_id!r}: message has no topic and the sink has no default")
            _send(producer, topic, msg, self._shared.on_delivery)
        producer.poll(0)
        self._produced.inc(len(values))
        self._raise_failed()

    def _raise_failed(self) -> None:
        if self._shared.errors:
            failed, self._shared.errors = self._shared.errors, []
            raise KafkaDeliveryError(
                f"step {self._step_id!r}: {len(failed)} message(s) were not delivered, first: {failed[0]}"
            )

    def snapshot(self) -> None:
        # An epoch may only complete once its output is acknowledged.
        remaining = self._shared.producer.flush(self._timeout_s)
        if remaining:
            raise KafkaDeliveryError(
                f"step {self._step_id!r}: {remaining} message(s) still unacknowledged after {self._timeout_s} s"
            )
        self._raise_failed()

    def close(self) -> None:
        self.snapshot()
        self._shared.release(self._timeout_s)


class KafkaSink(FixedPartitionedSink[KafkaMessage, None]):
    """Write :class:`KafkaMessage` items; use it through :func:`kafka_output`.

    Items are ``(routing key, message)``: Bytewax routes each routing key to one
    sink partition, so the messages of one key are produced in order.
    """

    def __init__(
        self,
        brokers: str,
        topic: str | None = None,
        *,
        parts: int = 4,
        timeout_s: float = 30.0,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.brokers = brokers
        self.topic = topic
        self.parts = parts
        self.timeout_s = timeout_s
        self.config = dict(config or {})

    def list_parts(self) -> list[str]:
        return [str(i) for i in range(self.parts)]

    def part_fn(self, item_key: str) -> int:
        return hash_key(item_key)

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _SinkPartition:
        shared = _SharedProducer.acquire(producer_config(self.brokers, self.config))
        return _SinkPartition(step_id, shared, self.topic, self.timeout_s)


@operator
def kafka_output(step_id: str, up: Stream[KafkaMessage], sink: KafkaSink) -> None:
    """Produce each message; messages with the same key go through the same producer in order."""
    keyed = op.key_on("route", up, lambda msg: msg.key.hex() if msg.key else "")
    op.output("produce", keyed, sink)


def hash_key(key: str) -> int:
    """A hash of a routing key that is the same in every process (``hash()`` is salted)."""
    return zlib.crc32(key.encode())


@dataclass(frozen=True)
class TopicSpec:
    """A topic as the code declares it; ``retention_ms=-1`` keeps messages forever."""

    name: str
    partitions: int = 1
    cleanup_policy: Literal["delete", "compact", "compact,delete"] = "delete"
    retention_ms: int = 7 * 24 * 3600 * 1000
    config: Mapping[str, str] = field(default_factory=dict)

    def new_topic(self) -> NewTopic:
        config = {"cleanup.policy": self.cleanup_policy, "retention.ms": str(self.retention_ms), **self.config}
        return NewTopic(self.name, num_partitions=self.partitions, replication_factor=1, config=config)


def partition_count(brokers: str, topic: str, *, timeout_s: float = 30.0) -> int:
    """How many partitions ``topic`` has."""
    topics = _list_topics(AdminClient({"bootstrap.servers": brokers}), brokers, timeout_s, KafkaAdminError)
    if topic not in topics:
        raise KafkaAdminError(f"topic {topic!r} does not exist at {brokers}")
    return len(topics[topic].partitions)


def ensure_topics(brokers: str, specs: Iterable[TopicSpec], *, timeout_s: float = 30.0) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are."""
    admin = AdminClient({"bootstrap.servers": brokers})
    existing = _list_topics(admin, brokers, timeout_s, KafkaAdminError)
    wanted = [spec.new_topic() for spec in specs if spec.name not in existing]
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != _RdKafkaError.TOPIC_ALREADY_EXISTS:
                raise KafkaAdminError(f"cannot create topic {name!r}: {exc}") from exc
    deadline = datetime.now(UTC) + timedelta(seconds=timeout_s)
    names = {t.topic for t in wanted}
    while datetime.now(UTC) < deadline:
        topics = admin.list_topics(timeout=timeout_s).topics
        if all(n in topics and not topics[n].error and topics[n].partitions for n in names):
            return
        time.sleep(0.1)
    raise KafkaAdminError(f"topics {sorted(names)} were created but are not visible after {timeout_s} s")


def produce(brokers: str, messages: Iterable[KafkaMessage], *, timeout_s: float = 30.0) -> int:
    """Produce ``messages`` (each naming its topic) outside a dataflow; return the count.

    For scripts, demos and tests: raises :class:`KafkaDeliveryError` unless every
    message is acknowledged.
    """
    producer = Producer(producer_config(brokers))
    failed: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            failed.append(f"{msg.topic()}: {err}")

    count = 0
    for msg in messages:
        if msg.topic is None:
            raise ValueError(f"produce() needs each message's topic; message {count} has none")
        _send(producer, msg.topic, msg, on_delivery)
        count += 1
    remaining = producer.flush(timeout_s)
    if failed or remaining:
        raise KafkaDeliveryError(f"{len(failed)} failed, {remaining} unacknowledged; first: {failed[:1]}")
    return count


def read_topic(brokers: str, topic: str, *, timeout_s: float = 30.0) -> list[KafkaMessage]:
    """Every message of ``topic`` up to its current end, partition by partition."""
    source = KafkaSource(brokers, [topic], bounded=True, timeout_s=timeout_s)
    out: list[KafkaMessage] = []
    deadline = time.monotonic() + timeout_s
    for part in source.list_parts():
        partition = source.build_part("read_topic", part, None)
        try:
            while True:
                if time.monotonic() > deadline:
                    raise KafkaSourceError(f"reading {topic} took over {timeout_s} s")
                out.extend(partition.next_batch())
        except StopIteration:
            pass
        finally:
            partition.close()
    return out
