"""The Kafka exception tree, and which broker errors are worth waiting out.

Under :class:`~patternflow.errors.PatternflowError`::

    KafkaError
     ├── KafkaSourceError       the broker refused a read (unknown topic, auth, ...)
     ├── KafkaDeliveryError     a produced message was neither acknowledged nor dead-lettered
     ├── KafkaAdminError        a topic could not be created or described
     ├── KafkaSecurityError     the client-security settings cannot work, or the broker refused them
     └── KafkaUnavailable       the broker stayed unreachable past the outage limit

librdkafka's own ``KafkaException`` is translated where it enters our code.
"""

from __future__ import annotations

from confluent_kafka import KafkaError as RdKafkaError

from patternflow.errors import PatternflowError

__all__ = [
    "KafkaAdminError",
    "KafkaDeliveryError",
    "KafkaError",
    "KafkaSecurityError",
    "KafkaSourceError",
    "KafkaUnavailable",
    "is_transient",
]


class KafkaError(PatternflowError):
    """Base of every Kafka error patternflow raises; never raised itself."""


class KafkaSourceError(KafkaError):
    """The broker refused a read for a reason waiting will not fix."""


class KafkaDeliveryError(KafkaError):
    """A produced message was neither acknowledged nor turned into a dead letter."""


class KafkaAdminError(KafkaError):
    """A topic could not be created, found or described."""


class KafkaSecurityError(KafkaError):
    """The client-security settings cannot work, or the broker refused the credentials or certificate."""


class KafkaUnavailable(KafkaError):
    """The broker (or a partition's leader) stayed unreachable for longer than the outage limit."""


# Errors a broker restart, a leader election or a topic still being created
# produce: they pass once the cluster settles.
_TRANSIENT = frozenset(
    {
        RdKafkaError._TRANSPORT,
        RdKafkaError._ALL_BROKERS_DOWN,
        RdKafkaError._TIMED_OUT,
        RdKafkaError._RESOLVE,
        RdKafkaError._WAIT_COORD,
        RdKafkaError._UNKNOWN_PARTITION,
        RdKafkaError._UNKNOWN_TOPIC,
        RdKafkaError._NOENT,
        RdKafkaError.LEADER_NOT_AVAILABLE,
        RdKafkaError.NOT_LEADER_FOR_PARTITION,
        RdKafkaError.UNKNOWN_TOPIC_OR_PART,
        RdKafkaError.REQUEST_TIMED_OUT,
        RdKafkaError.NETWORK_EXCEPTION,
        RdKafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        RdKafkaError.COORDINATOR_NOT_AVAILABLE,
        RdKafkaError.NOT_COORDINATOR,
        RdKafkaError.BROKER_NOT_AVAILABLE,
        RdKafkaError.REPLICA_NOT_AVAILABLE,
        RdKafkaError.NOT_ENOUGH_REPLICAS,
        RdKafkaError.KAFKA_STORAGE_ERROR,
        RdKafkaError.FENCED_LEADER_EPOCH,
        RdKafkaError.UNKNOWN_LEADER_EPOCH,
        RdKafkaError.OFFSET_NOT_AVAILABLE,
    }
)


def is_transient(err: RdKafkaError) -> bool:
    """Whether ``err`` is one a broker restart or leader change causes, worth retrying."""
    return err.code() in _TRANSIENT or bool(err.retriable())
