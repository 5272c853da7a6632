"""Kafka for patternflow, on confluent-kafka, split by concern.

- :mod:`~operators.kafka.source` and :mod:`~operators.kafka.sink`: the Bytewax
  input and output (the only modules here that import Bytewax);
- :mod:`~operators.kafka.message`: :class:`KafkaMessage`, what flows between them;
- :mod:`~operators.kafka.position`: where a source starts reading;
- :mod:`~operators.kafka.client`: librdkafka settings, producing one message,
  and the outage rule (retry transient errors, give up past a limit);
- :mod:`~operators.kafka.security`: the client-security profile (``KAFKA_SECURITY_PROTOCOL``,
  ``KAFKA_SASL_*``, ``KAFKA_SSL_*``, ``KAFKA_CLIENT_PROPERTIES``) every client's settings include;
- :mod:`~operators.kafka.admin`: topics declared in code, created and looked up;
- :mod:`~operators.kafka.errors`: the exception tree;
- :mod:`~operators.kafka.tools`: whole-topic produce and read for scripts and tests.

Clients import from this package without pulling in Bytewax; dataflows import
the source and sink from their modules.
"""

from operators.kafka.admin import TopicCache, TopicInfo, TopicSpec, ensure_topics, partition_count, wait_for_topics
from operators.kafka.client import OUTAGE_LIMIT_ENV, Outage, admin_config, consumer_config, producer_config
from operators.kafka.errors import (
    KafkaAdminError,
    KafkaDeliveryError,
    KafkaError,
    KafkaSecurityError,
    KafkaSourceError,
    KafkaUnavailable,
)
from operators.kafka.message import KafkaBatch, KafkaMessage
from operators.kafka.position import Position
from operators.kafka.tools import produce, read_topic

__all__ = [
    "OUTAGE_LIMIT_ENV",
    "KafkaAdminError",
    "KafkaBatch",
    "KafkaDeliveryError",
    "KafkaError",
    "KafkaMessage",
    "KafkaSecurityError",
    "KafkaSourceError",
    "KafkaUnavailable",
    "Outage",
    "Position",
    "TopicCache",
    "TopicInfo",
    "TopicSpec",
    "admin_config",
    "consumer_config",
    "ensure_topics",
    "partition_count",
    "produce",
    "producer_config",
    "read_topic",
    "wait_for_topics",
]
