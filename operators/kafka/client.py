"""librdkafka client settings, and riding out broker outages.

One place for the settings every consumer, producer and admin client of patternflow uses
(sources, sinks, topic admin, clients, the gateway, scripts, benchmarks), the client-security
profile (:mod:`operators.kafka.security`) included, and :class:`Outage`, the rule for broker
errors: a transient one (a broker restarting, a leader moving, a topic still
being created; see :func:`~operators.kafka.errors.is_transient`) is retried
with backoff, and only an outage longer than ``limit_s`` raises
:class:`~operators.kafka.errors.KafkaUnavailable`. The limit comes from
``KAFKA_OUTAGE_LIMIT_S`` (default 120 s) wherever a dataflow or client reads
its settings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException, Producer

from operators.kafka.errors import KafkaUnavailable, is_transient
from operators.kafka.message import KafkaMessage
from operators.kafka.security import security_config
from patternflow.retry import RetryPolicy

__all__ = [
    "BROKER_RETRY",
    "OUTAGE_LIMIT_ENV",
    "Outage",
    "admin_config",
    "consumer_config",
    "producer_config",
    "send",
]

OUTAGE_LIMIT_ENV = "KAFKA_OUTAGE_LIMIT_S"
DEFAULT_OUTAGE_LIMIT_S = 120.0
T = TypeVar("T")
log = logging.getLogger("patternflow.kafka")


def admin_config(brokers: str) -> dict[str, Any]:
    """The librdkafka settings of every patternflow admin client (topics, metadata)."""
    return {"bootstrap.servers": brokers, "reconnect.backoff.max.ms": 1000, **security_config()}


def consumer_config(brokers: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The librdkafka settings of every patternflow consumer; ``extra`` overrides."""
    return {
        "bootstrap.servers": brokers,
        **security_config(),
        # Offsets live in Bytewax snapshots; the group id only satisfies librdkafka.
        "group.id": "patternflow",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "fetch.wait.max.ms": 50,
        # librdkafka pauses a partition's fetches for this long once its local
        # queue is full (default 1 s): a stall of a second after each burst.
        "fetch.queue.backoff.ms": 10,
        # How far a partition reads ahead (default 100,000 messages). A source runs a
        # consumer per partition, and at that depth their fetcher threads race ahead
        # filling memory, on the cores the worker thread needs to turn records into
        # items; 20,000 is still tens of milliseconds of records at full speed.
        "queued.min.messages": 20_000,
        # An offset that retention deleted is an error to report, not a silent jump to the end.
        "auto.offset.reset": "error",
        # Reconnect quickly after a broker restart (default backoff grows to 10 s).
        "reconnect.backoff.max.ms": 1000,
        # Connect to every broker as soon as it is known. With sparse connections (the
        # default) a request caught in the switch from the bootstrap connection to the
        # learned broker waits ~50 ms for a connection slot, at every consumer's start
        # (a source starts one per partition); and during an outage the slots retry
        # every ~50 ms, ignoring the exponential reconnect backoff.
        "enable.sparse.connections": False,
        "socket.nagle.disable": True,
        **(extra or {}),
    }


def producer_config(
    brokers: str, extra: Mapping[str, Any] | None = None, *, outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S
) -> dict[str, Any]:
    """The librdkafka settings of every patternflow producer; ``extra`` overrides.

    librdkafka retries a message through broker outages by itself; it gives up
    (``_MSG_TIMED_OUT``) once ``outage_limit_s`` has passed without delivery.
    """
    return {
        "bootstrap.servers": brokers,
        **security_config(),
        "partitioner": "murmur2_random",  # the Java client's key hashing
        "linger.ms": 2,
        "socket.nagle.disable": True,
        "enable.idempotence": True,
        "message.timeout.ms": int(outage_limit_s * 1000),
        # How long a topic missing from the metadata may still be appearing (default 30 s,
        # which would hold every epoch that long for one message to a made-up topic).
        "topic.metadata.propagation.max.ms": 5000,
        # Reports for failed messages only: success needs no per-message callback.
        "delivery.report.only.error": True,
        "reconnect.backoff.max.ms": 1000,
        **(extra or {}),
    }


def _transient(exc: BaseException) -> bool:
    # librdkafka's exception carries its KafkaError, with the code, as its one argument.
    return isinstance(exc, KafkaException) and is_transient(exc.args[0])


# No attempt limit: the outage clock (Outage.failed) decides when to give up, across calls.
BROKER_RETRY = RetryPolicy(
    retry_on=_transient, initial_interval_s=0.05, max_interval_s=2.0, max_attempts=None, jitter=False
)


@dataclass
class Outage:
    """Tracks how long the broker has been failing, for code that must not block.

    Call :meth:`failed` on each transient error (it raises once the outage is
    older than ``limit_s``) and :meth:`ok` on each success. :meth:`call` retries
    a blocking call by :data:`BROKER_RETRY` until it succeeds or the limit passes.
    """

    what: str
    limit_s: float = DEFAULT_OUTAGE_LIMIT_S
    _since: float | None = field(default=None, init=False, repr=False)

    def ok(self) -> None:
        if self._since is not None:
            log.warning("%s: the broker answers again after %.1f s", self.what, time.monotonic() - self._since)
            self._since = None

    def failed(self, error: object) -> None:
        now = time.monotonic()
        if self._since is None:
            self._since = now
            log.warning("%s: broker unavailable (%s); retrying for up to %.0f s", self.what, error, self.limit_s)
        elif now - self._since > self.limit_s:
            raise KafkaUnavailable(
                f"{self.what}: the broker has been unavailable for over {self.limit_s:.0f} s (last error: {error}). "
                f"Check that it runs (make kafka-up) and is reachable; {OUTAGE_LIMIT_ENV} sets how long to wait."
            )

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried by :data:`BROKER_RETRY` while it raises a transient broker error,
        until the outage (which may have begun before this call) is older than ``limit_s``."""
        # BROKER_RETRY retries only librdkafka's exception, whose one argument is its KafkaError.
        result = BROKER_RETRY.call(fn, on_retry=lambda exc: self.failed(exc.args[0]))
        self.ok()
        return result


DeliveryCallback = Callable[[RdKafkaError | None, Any], None]
_UNASSIGNED = -1  # librdkafka's RD_KAFKA_PARTITION_UA: let the partitioner choose


def send(producer: Producer, topic: str, msg: KafkaMessage, on_refused: DeliveryCallback) -> None:
    """Produce one message, waiting for room when the local queue is full.

    Delivery reports go to the callback the producer was made with (its
    ``on_delivery`` setting: one per producer, as registering one per message
    costs more than the rest of a send). A message librdkafka refuses at once
    (unknown partition, too large, bad argument) is reported to ``on_refused``
    the same way, as a failed delivery.
    """
    # librdkafka's defaults stand for "not given": the partitioner picks the
    # partition, the time of sending is the timestamp.
    partition = _UNASSIGNED if msg.partition is None else msg.partition
    timestamp = msg.timestamp_ms or 0
    while True:
        try:
            if msg.headers:
                producer.produce(topic, msg.value, msg.key, partition, timestamp=timestamp, headers=list(msg.headers))
            else:
                producer.produce(topic, msg.value, msg.key, partition, timestamp=timestamp)
            return
        except BufferError:
            producer.poll(0.05)
        except KafkaException as exc:
            on_refused(exc.args[0], _Refused(topic, msg))
            return
        except (TypeError, ValueError) as exc:  # e.g. a partition number out of int32 range
            on_refused(RdKafkaError(RdKafkaError._INVALID_ARG, str(exc)), _Refused(topic, msg))
            return


class _Refused:
    """Stands in for the librdkafka message of a delivery report, for a message refused at once."""

    def __init__(self, topic: str, msg: KafkaMessage) -> None:
        self._topic, self._msg = topic, msg

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int | None:
        return self._msg.partition

    def key(self) -> bytes | None:
        return self._msg.key

    def value(self) -> bytes | None:
        return self._msg.value
