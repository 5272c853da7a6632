"""Reading Kafka in a Bytewax dataflow.

Bytewax's own connector takes one start offset for every partition and stops a
bounded read when each partition first catches up, which is not deterministic
while producers write. :class:`KafkaSource` instead gives each Kafka partition
its own Bytewax partition and consumer, keeps offsets in Bytewax's recovery
snapshots, starts each partition at a :class:`Position`,
and in bounded mode resolves each partition's end (its high watermark, or an
``end`` position) once, at the first start, and stops there: the end offsets
are part of the snapshot, so a replay resumed after a crash stops where the
first run would have.

:class:`KafkaSource` emits one :class:`KafkaMessage` per record;
:class:`KafkaBatchSource` emits one :class:`KafkaBatch` per poll, the records
as columns, for dataflows that work on batches: building a KafkaMessage costs
more than reading the record, and a batch builds none unless iterated.

After each snapshot a partition commits the offset the snapshot holds to the
consumer group ``patternflow.<dataflow id>`` (unless ``config`` names a
``group.id``), so Kafka's own lag tools (``kafka-consumer-groups.sh --describe``,
Burrow, KEDA's Kafka scaler) see a dataflow's progress. The group is never read:
no consumer joins it, and where a partition starts is Bytewax's recovery alone.

A broker outage is ridden out: transient errors are retried, and only an
outage longer than ``outage_limit_s`` raises
:class:`~operators.kafka.errors.KafkaUnavailable`.
"""

from __future__ import annotations

import gc
import logging
import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as RdKafkaError

from operators import metrics
from operators.kafka.client import DEFAULT_OUTAGE_LIMIT_S, Outage, consumer_config
from operators.kafka.errors import KafkaSourceError, is_transient
from operators.kafka.message import KafkaBatch, KafkaMessage, records
from operators.kafka.position import Position

__all__ = ["GROUP_PREFIX", "KafkaBatchSource", "KafkaSource", "fixed_range"]

GROUP_PREFIX = "patternflow."  # + the dataflow's id: the consumer group a source commits its snapshots' offsets to

X = TypeVar("X")
log = logging.getLogger("patternflow.kafka")
_PROBE_INTERVAL_S = 5.0  # how often a partition updates its lag and checks that the broker answers


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic GC off meanwhile, unless it is off already (the application's
    choice, or another worker thread's pause).

    A poll allocates up to two tracked objects per record (librdkafka's message,
    and our KafkaMessage in per-record mode), all alive until it returns: under
    the default thresholds a collection would run every 350 records or so, find
    no garbage, and promote them all towards the full collections, which walk
    every object of the process. librdkafka's messages are freed before the GC
    resumes, so only ours count towards its next run.
    """
    pause = gc.isenabled()
    if pause:
        gc.disable()
    try:
        yield
    finally:
        if pause:
            gc.enable()


@dataclass(frozen=True)
class _PartState:
    next_offset: int
    end_offset: int | None  # exclusive; None while tailing


class _Partition(StatefulSourcePartition[Any, _PartState]):
    def __init__(
        self,
        step_id: str,
        consumer: Consumer,
        topic: str,
        partition: int,
        state: _PartState,
        *,
        batch_size: int,
        batched: bool,
        outage: Outage,
    ) -> None:
        self._step_id = step_id
        self._consumer = consumer
        self._tp = TopicPartition(topic, partition)
        self._topic = topic
        self._partition = partition
        self._next = state.next_offset
        self._end = state.end_offset
        self._batch_size = batch_size
        self._batched = batched
        self._outage = outage
        self._lag = metrics.CONSUMER_LAG.labels(step_id, topic, str(partition))
        if self._end is not None:
            self._lag.set(max(0, self._end - self._next))
        # The first probe waits an interval, rather than hold up the first poll
        # of every partition for a round trip to the broker.
        self._probed = time.monotonic()
        self._read_since_probe = False
        self._committed = -1

    def next_batch(self) -> list[Any]:
        if self._end is not None and self._next >= self._end:
            self._lag.set(0)
            raise StopIteration()
        with _gc_paused():
            batch = self._poll()
            self._probe(read=bool(batch))
            if not batch:
                return []
            return [batch] if self._batched else list(batch)

    def _poll(self) -> KafkaBatch | None:
        # Never block: a worker runs its operators on one thread, and a blocking poll
        # here would hold up every item downstream. With nothing to read, Bytewax
        # calls again after 1 ms.
        msgs = self._consumer.consume(self._batch_size, 0)
        batch = self._records(msgs) if msgs else None
        if batch:
            self._next = batch.offsets[-1] + 1
            if self._end is not None and self._next > self._end:
                # The last fetch ran past the end fixed at start.
                self._next = self._end
                batch = batch[: bisect_left(batch.offsets, self._end)]
        elif self._end is not None:
            # Transaction markers take offsets but are never returned:
            # the consumer's position still moves past them.
            (tp,) = self._consumer.position([self._tp])
            self._next = max(self._next, tp.offset)
        return batch

    def _records(self, msgs: list[Any]) -> KafkaBatch:
        batch, errors = records(msgs, self._topic, self._partition)
        for err in errors:
            self._on_error(err)
        return batch

    def _on_error(self, err: RdKafkaError) -> None:
        if err.code() == RdKafkaError._PARTITION_EOF:
            return
        where = f"step {self._step_id!r}: reading {self._topic}[{self._partition}]"
        if is_transient(err):
            self._outage.failed(err)
            return
        if err.code() == RdKafkaError._AUTO_OFFSET_RESET:
            raise KafkaSourceError(
                f"{where} at offset {self._next} failed: the offset no longer exists (retention deleted it?): {err}"
            )
        raise KafkaSourceError(f"{where} failed: {err}")

    def _probe(self, *, read: bool) -> None:
        """Every few seconds: the end offset for the lag metric, and whether the broker still answers.

        Records read since the last probe answer both without a round trip,
        which would stall the worker: the broker is up, and their fetch
        responses carried the end offset (librdkafka caches it).
        """
        self._read_since_probe |= read
        now = time.monotonic()
        if now - self._probed < _PROBE_INTERVAL_S:
            return
        self._probed = now
        fresh = self._read_since_probe
        self._read_since_probe = False
        try:
            _, high = self._consumer.get_watermark_offsets(self._tp, timeout=0.5, cached=fresh)
        except KafkaException as exc:
            if not is_transient(exc.args[0]):
                raise KafkaSourceError(f"step {self._step_id!r}: {self._topic}[{self._partition}]: {exc}") from exc
            self._outage.failed(exc.args[0])
            return
        self._outage.ok()
        end = high if self._end is None else self._end
        self._lag.set(max(0, end - self._next))

    def snapshot(self) -> _PartState:
        if self._next != self._committed:
            # For Kafka's lag tools only (kafka-consumer-groups.sh, Burrow, KEDA): a start never reads it back.
            self._commit([TopicPartition(self._topic, self._partition, self._next)])
            self._committed = self._next
        return _PartState(self._next, self._end)

    def _commit(self, offsets: list[TopicPartition]) -> None:
        try:
            self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:  # the local queue is full, or the broker is away: the next snapshot commits
            log.debug("step %r: committing %s failed: %s", self._step_id, offsets, exc)

    def close(self) -> None:
        self._consumer.close()


class _KafkaInput(FixedPartitionedSource[X, _PartState], Generic[X]):
    _batched: ClassVar[bool]

    def __init__(
        self,
        brokers: str,
        topics: Sequence[str],
        *,
        start: Position | Mapping[int, Position] = Position.earliest(),  # noqa: B008
        bounded: bool = False,
        end: Position | Mapping[int, Position] | None = None,
        batch_size: int = 1000,
        outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.brokers = brokers
        self.topics = list(topics)
        self.start = start
        self.end = end
        self.bounded = bounded or end is not None
        self.batch_size = batch_size
        self.outage_limit_s = outage_limit_s
        self.config = dict(config or {})

    def _outage(self, what: str) -> Outage:
        return Outage(what, self.outage_limit_s)

    def list_parts(self) -> list[str]:
        # A consumer, not an AdminClient: the config holds consumer properties.
        consumer = Consumer(consumer_config(self.brokers, self.config))
        try:
            outage = self._outage(f"listing partitions of {self.topics} at {self.brokers}")
            topics = outage.call(lambda: consumer.list_topics(timeout=5)).topics
        finally:
            consumer.close()
        parts: list[str] = []
        for topic in self.topics:
            tmeta = topics.get(topic)
            if tmeta is None or tmeta.error is not None:
                raise KafkaSourceError(
                    f"topic {topic!r} does not exist at {self.brokers}; create it first "
                    "(see operators.kafka.admin.ensure_topics)"
                )
            parts.extend(f"{p}-{topic}" for p in tmeta.partitions)
        return parts

    def _first_state(self, consumer: Consumer, tp: TopicPartition, outage: Outage) -> _PartState:
        start_at = _for_partition(self.start, tp.partition, Position.earliest())
        if not self.bounded:
            (start,) = _offsets(consumer, tp, [start_at], outage)
            return _PartState(start, None)
        # A partition an end mapping does not name (created after a job fixed its range) is not read.
        end_at = _for_partition(
            self.end, tp.partition, start_at if isinstance(self.end, Mapping) else Position.latest()
        )
        start, end = _offsets(consumer, tp, [start_at, end_at], outage)
        if isinstance(self.end, Mapping) and start_at.kind == "offset" and start > start_at.value:
            # A range fixed in advance whose first records are gone: reading on would lose them silently.
            raise KafkaSourceError(
                f"{tp.topic}[{tp.partition}] no longer holds offset {start_at.value} (retention deleted up to "
                f"{start}): the fixed range cannot be read whole"
            )
        return _PartState(start, max(start, end))

    def build_part(self, step_id: str, for_part: str, resume_state: _PartState | None) -> _Partition:
        part, topic = for_part.split("-", 1)
        tp = TopicPartition(topic, int(part))
        group = {"group.id": f"{GROUP_PREFIX}{step_id.split('.', 1)[0]}"}  # the dataflow's id
        consumer = Consumer(consumer_config(self.brokers, {**group, **self.config}))
        outage = self._outage(f"step {step_id!r}: {topic}[{part}] at {self.brokers}")
        try:
            state = resume_state or self._first_state(consumer, tp, outage)
        except KafkaException as exc:
            consumer.close()
            raise KafkaSourceError(f"step {step_id!r}: cannot position {topic}[{part}]: {exc}") from exc
        consumer.assign([TopicPartition(topic, tp.partition, state.next_offset)])
        return _Partition(
            step_id,
            consumer,
            topic,
            tp.partition,
            state,
            batch_size=self.batch_size,
            batched=self._batched,
            outage=outage,
        )


def _offsets(consumer: Consumer, tp: TopicPartition, positions: Sequence[Position], outage: Outage) -> list[int]:
    """The offset each position names in partition ``tp`` now (clamped to what the partition holds)."""
    low, high = outage.call(lambda: consumer.get_watermark_offsets(tp, timeout=5))

    def offset(pos: Position) -> int:
        if pos.kind == "earliest":
            return int(low)
        if pos.kind == "latest":
            return int(high)
        if pos.kind == "offset":
            return int(min(max(pos.value, low), high))
        query = [TopicPartition(tp.topic, tp.partition, pos.value)]
        (found,) = outage.call(lambda: consumer.offsets_for_times(query, timeout=5))
        return int(high if found.offset in (OFFSET_END, -1) else found.offset)

    return [offset(pos) for pos in positions]


def fixed_range(
    brokers: str,
    topic: str,
    start: Position,
    end: Position,
    *,
    outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S,
    config: Mapping[str, Any] | None = None,
) -> dict[int, tuple[int, int]]:
    """``{partition: (first offset, end offset)}`` that ``start`` and ``end`` name in ``topic`` now.

    A job that must read the same records however often it is resumed fixes
    its range with this once and hands the offsets to the source.
    """
    source = KafkaSource(brokers, [topic], outage_limit_s=outage_limit_s, config=config)
    consumer = Consumer(consumer_config(brokers, source.config))
    try:
        outage = Outage(f"reading the offsets of {topic} at {brokers}", outage_limit_s)
        ranges = {}
        for part in source.list_parts():
            tp = TopicPartition(topic, int(part.split("-", 1)[0]))
            first, last = _offsets(consumer, tp, [start, end], outage)
            ranges[tp.partition] = (first, max(first, last))
        return ranges
    finally:
        consumer.close()


def _for_partition(pos: Position | Mapping[int, Position] | None, partition: int, default: Position) -> Position:
    if isinstance(pos, Position):
        return pos
    return default if pos is None else pos.get(partition, default)


class KafkaSource(_KafkaInput[KafkaMessage]):
    """Read ``topics``, one Bytewax partition per Kafka partition, one item per record.

    ``start`` is one :class:`Position` for all partitions or a mapping from
    partition number to position (others start at earliest). With
    ``bounded=True`` each partition stops at the high watermark it had when the
    dataflow first started it; with ``end`` (a position, or positions by
    partition: partitions it does not name are not read) at the offset that
    position had then: a timestamp ends before the first record at or after it.
    Positions by partition for ``end`` fix the range in advance: a start offset
    that retention has deleted raises :class:`~operators.kafka.errors.KafkaSourceError`.
    """

    _batched = False


class KafkaBatchSource(_KafkaInput[KafkaBatch]):
    """As :class:`KafkaSource`, but one item per poll of a partition: a :class:`KafkaBatch`,
    the records read together in offset order, as columns (or KafkaMessages, iterated)."""

    _batched = True
