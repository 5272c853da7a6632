"""Writing Kafka from a Bytewax dataflow.

:class:`KafkaSink` produces asynchronously: the message key decides the
partition (murmur2, as Java clients do) unless the message names one, and every
epoch's snapshot waits for all delivery reports, so an epoch completes only
once its output is acknowledged. Every failed delivery is classified
(:func:`classify`), so that nothing a message names or carries can stop the
dataflow:

- ``message``, the message's fault, a dead letter: the topic does not exist (or
  was deleted since), its name is invalid, the partition does not exist, the
  message is over the size limit, the broker rejects the record (invalid record
  or timestamp, authorisation, policy), and any rejection of a record that
  librdkafka does not mark retriable;
- ``broker``, the broker's or the network's, retried: broker down or restarting,
  leader moving, request timeouts. librdkafka retries the message until
  ``outage_limit_s`` has passed and then reports ``_MSG_TIMED_OUT``; the sink then
  asks the broker for the topic's metadata: if the broker answers, the
  destination was at fault (say, a partition without enough in-sync replicas)
  and the message is a dead letter; if it does not, the outage is past its limit
  and :class:`KafkaDeliveryError` stops the dataflow, which resumes from its last
  snapshot;
- ``producer``, the producer was torn down (the process is stopping): the epoch
  is not complete, and its messages are sent again after a restart.

A dead letter goes to the sink's ``dlq_topic`` with the value and key it had
(librdkafka's delivery reports do not return headers), ``dlq.reason``,
``dlq.step``, ``dlq.target.topic`` and ``dlq.target.partition``; a value too
large for the broker is cut to :data:`DEAD_LETTER_MAX_VALUE_BYTES`, marked by
``dlq.truncated``. Without a ``dlq_topic``, or when the dead letter cannot be
written either, the failure raises: a broker that takes no dead letter is not
well.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import bytewax.operators as op
from bytewax.dataflow import Stream, operator
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException, Producer

from operators import metrics
from operators.kafka.client import DEFAULT_OUTAGE_LIMIT_S, OUTAGE_LIMIT_ENV, producer_config, send
from operators.kafka.errors import KafkaDeliveryError, is_transient
from operators.kafka.message import KafkaMessage
from patternflow import hash_key

__all__ = ["DEAD_LETTER_MAX_VALUE_BYTES", "KafkaSink", "classify", "kafka_output"]

DEAD_LETTER_MAX_VALUE_BYTES = 64 * 1024
_PROBE_TIMEOUT_S = 5.0  # asking the broker, after a message timed out, whether it answers at all

# Failures that retrying cannot fix: the message, not the cluster, is at fault.
_MESSAGE_FAULTS = frozenset(
    {
        RdKafkaError.MSG_SIZE_TOO_LARGE,  # librdkafka's local size check reports this code too
        RdKafkaError.RECORD_LIST_TOO_LARGE,
        RdKafkaError._UNKNOWN_PARTITION,  # also what a topic deleted since reports
        RdKafkaError._UNKNOWN_TOPIC,
        RdKafkaError.UNKNOWN_TOPIC_OR_PART,
        RdKafkaError.TOPIC_EXCEPTION,
        RdKafkaError._INVALID_ARG,
        RdKafkaError.INVALID_RECORD,
        RdKafkaError.INVALID_TIMESTAMP,
        RdKafkaError.INVALID_MSG,
        RdKafkaError.INVALID_MSG_SIZE,
        RdKafkaError.TOPIC_AUTHORIZATION_FAILED,
        RdKafkaError.POLICY_VIOLATION,
    }
)
# The producer itself is going away: not the message's fault, nor the broker's.
_PRODUCER_GONE = frozenset(
    {RdKafkaError._DESTROY, RdKafkaError._PURGE_QUEUE, RdKafkaError._PURGE_INFLIGHT, RdKafkaError._FATAL}
)
_TOO_LARGE = frozenset({RdKafkaError.MSG_SIZE_TOO_LARGE, RdKafkaError.RECORD_LIST_TOO_LARGE})
Fault = Literal["message", "broker", "producer"]


def classify(err: RdKafkaError) -> Fault:
    """Whose fault a failed delivery is (see the module's docstring); every error is one of the three."""
    code = err.code()
    if code in _MESSAGE_FAULTS:
        return "message"
    if code in _PRODUCER_GONE:
        return "producer"
    if code == RdKafkaError._MSG_TIMED_OUT or is_transient(err):
        return "broker"
    return "message"


class _Failure:
    """A message librdkafka could not deliver, and why."""

    __slots__ = ("error", "key", "partition", "topic", "value")

    def __init__(self, error: RdKafkaError, topic: str, partition: int | None, key: Any, value: Any) -> None:
        self.error, self.topic, self.partition, self.key, self.value = error, topic, partition, key, value

    @property
    def fault(self) -> Fault:
        return classify(self.error)

    def describe(self) -> str:
        said = f"{self.topic}[{self.partition}] key={self.key!r:.80}: {self.error.str()}"
        if self.error.code() == RdKafkaError._MSG_TIMED_OUT:
            said += f" (the broker did not acknowledge it within the outage limit; {OUTAGE_LIMIT_ENV} sets it)"
        return said

    def dead_letter(self, step_id: str, dlq_topic: str) -> KafkaMessage:
        headers = [
            ("dlq.reason", f"undeliverable: {self.error.str()} ({self.error.name()})".encode()),
            ("dlq.step", step_id.encode()),
            ("dlq.target.topic", self.topic.encode(errors="replace")),
            ("dlq.target.partition", str(self.partition).encode()),
        ]
        value = self.value
        if self.error.code() in _TOO_LARGE and value is not None and len(value) > DEAD_LETTER_MAX_VALUE_BYTES:
            value = value[:DEAD_LETTER_MAX_VALUE_BYTES]
            headers.append(("dlq.truncated", str(len(self.value)).encode()))
        key = self.key if self.key is None or len(self.key) <= DEAD_LETTER_MAX_VALUE_BYTES else None
        return KafkaMessage(value, key=key, headers=tuple(headers), topic=dlq_topic)


class _SharedProducer:
    """One librdkafka producer per process and sink, shared by the sink's partitions."""

    _lock = threading.Lock()
    _instances: ClassVar[dict[tuple[Any, ...], _SharedProducer]] = {}

    def __init__(self, key: tuple[Any, ...], config: dict[str, Any]) -> None:
        self._key = key
        self.producer = Producer({**config, "on_delivery": self.on_delivery})
        self.failures: list[_Failure] = []
        self.users = 0

    @classmethod
    def acquire(cls, step_id: str, config: dict[str, Any]) -> _SharedProducer:
        key = (step_id, *sorted((k, str(v)) for k, v in config.items()))
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

    def on_delivery(self, err: RdKafkaError | None, msg: Any) -> None:
        if err is not None:
            self.failures.append(_Failure(err, msg.topic(), msg.partition(), msg.key(), msg.value()))


class _SinkPartition(StatefulSinkPartition[list[KafkaMessage], None]):
    def __init__(
        self, step_id: str, shared: _SharedProducer, topic: str | None, dlq_topic: str | None, timeout_s: float
    ) -> None:
        self._step_id = step_id
        self._shared = shared
        self._topic = topic
        self._dlq_topic = dlq_topic
        self._timeout_s = timeout_s
        self._produced = metrics.ITEMS.labels(step_id, "produced")
        self._dead = metrics.ERRORS.labels(step_id, "undeliverable")

    def write_batch(self, values: list[list[KafkaMessage]]) -> None:
        producer, on_refused = self._shared.producer, self._shared.on_delivery
        produced = 0
        for msgs in values:
            for msg in msgs:
                topic = msg.topic or self._topic
                if topic is None:
                    raise KafkaDeliveryError(
                        f"step {self._step_id!r}: message has no topic and the sink has no default"
                    )
                send(producer, topic, msg, on_refused)
            produced += len(msgs)
        producer.poll(0)
        self._produced.inc(produced)
        self._handle_failures()

    def _handle_failures(self) -> None:
        """Dead-letter the messages at fault; raise on any other failure."""
        if not self._shared.failures:
            return
        failed, self._shared.failures = self._shared.failures, []
        # A message the broker did not take within the outage limit is at fault if the broker answers.
        answers = any(f.fault == "broker" for f in failed) and self._broker_answers()
        at_fault = {"message", "broker"} if answers else {"message"}
        # A dead letter that fails has nowhere left to go.
        fatal = [f for f in failed if f.topic == self._dlq_topic or f.fault not in at_fault]
        if fatal:
            raise KafkaDeliveryError(
                f"step {self._step_id!r}: {len(fatal)} message(s) were not delivered, first: {fatal[0].describe()}"
            )
        if self._dlq_topic is None:
            raise KafkaDeliveryError(
                f"step {self._step_id!r}: {len(failed)} message(s) cannot be delivered and the sink has no "
                f"dead-letter topic, first: {failed[0].describe()}"
            )
        producer, on_refused = self._shared.producer, self._shared.on_delivery
        for failure in failed:
            send(producer, self._dlq_topic, failure.dead_letter(self._step_id, self._dlq_topic), on_refused)
        self._dead.inc(len(failed))

    def _broker_answers(self) -> bool:
        try:
            self._shared.producer.list_topics(timeout=_PROBE_TIMEOUT_S)
        except KafkaException:
            return False
        return True

    def snapshot(self) -> None:
        # An epoch may only complete once its output is acknowledged or dead-lettered.
        while True:
            remaining = self._shared.producer.flush(self._timeout_s)
            if remaining:
                raise KafkaDeliveryError(
                    f"step {self._step_id!r}: {remaining} message(s) still unacknowledged after {self._timeout_s} s"
                )
            if not self._shared.failures:
                return
            self._handle_failures()

    def close(self) -> None:
        self.snapshot()
        self._shared.release(self._timeout_s)


class KafkaSink(FixedPartitionedSink[list[KafkaMessage], None]):
    """Write :class:`KafkaMessage` items; use it through :func:`kafka_output`.

    Items are ``(sink partition, messages)``; :func:`kafka_output` sends every
    message of one key to the same sink partition, so they are produced in
    order. Messages that cannot be delivered through their own fault go to
    ``dlq_topic``.
    """

    def __init__(
        self,
        brokers: str,
        topic: str | None = None,
        *,
        dlq_topic: str | None = None,
        parts: int = 4,
        outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.brokers = brokers
        self.topic = topic
        self.dlq_topic = dlq_topic
        self.parts = parts
        self.outage_limit_s = outage_limit_s
        self.config = dict(config or {})

    def list_parts(self) -> list[str]:
        return [str(i) for i in range(self.parts)]

    def part_fn(self, item_key: str) -> int:
        return int(item_key)  # kafka_output routes by the partition's index

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _SinkPartition:
        config = producer_config(self.brokers, self.config, outage_limit_s=self.outage_limit_s)
        shared = _SharedProducer.acquire(step_id, config)
        # librdkafka times messages out after the outage limit; the flush waits a little longer for that report.
        return _SinkPartition(step_id, shared, self.topic, self.dlq_topic, self.outage_limit_s + 30)


@operator
def kafka_output(step_id: str, up: Stream[KafkaMessage], sink: KafkaSink) -> None:
    """Produce each message; messages with the same key go through the same sink partition, in order.

    Each batch of messages is routed as a few lists, one per sink partition:
    Bytewax's cost is then per list, not per message (a third of the sink's time
    when it routed each message).
    """
    parts = sink.parts

    def route(batch: list[KafkaMessage]) -> list[tuple[str, list[KafkaMessage]]]:
        if parts == 1:
            return [("0", batch)]
        groups: dict[int, list[KafkaMessage]] = {}
        for msg in batch:
            groups.setdefault(hash_key(msg.key) % parts if msg.key else 0, []).append(msg)
        return [(str(part), msgs) for part, msgs in groups.items()]

    op.output("produce", op.flat_map_batch("route", up, route), sink)
