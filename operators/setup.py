"""One set-up for every dataflow, the way ``quixstreams.Application`` owns its Kafka settings.

A dataflow's ``Settings`` subclasses :class:`DataflowSettings` (:class:`TorchSettings` when it
runs torch models), names its default metrics port and adds only what is its own. Its
``build()`` starts with :meth:`Application.start`, which sets the process up, and then makes
its Kafka sources and sinks through the application, which holds the broker, the outage limit
and the start position they all share::

    s = settings or from_env(Settings, prefix="EVENT_COUNTS_")
    app = Application.start(s, s.topics())
    msgs = op.input("in", flow, app.source([s.input_topic], bounded=s.bounded))
    ...
    kafka_output("out", messages, app.sink(dlq_topic=s.dlq_topic))

The settings every dataflow has:

- ``KAFKA_BOOTSTRAP_SERVERS`` and ``KAFKA_OUTAGE_LIMIT_S``: the same variables whatever the
  dataflow (the broker, and how long an outage of it is ridden out);
- ``<PREFIX>START``: where a first run starts reading its inputs (a resumed run reads on
  from its snapshot);
- ``<PREFIX>METRICS_PORT``: the Prometheus endpoint, plus ``BYTEWAX_PROCESS_ID`` in a
  cluster; 0 serves none;
- ``<PREFIX>TORCH_THREADS`` (:class:`TorchSettings` only): torch's threads per process.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from operators import metrics
from operators.kafka import Position, TopicCache, TopicSpec, ensure_topics, partition_count
from operators.kafka.sink import KafkaSink
from operators.kafka.source import KafkaBatchSource, KafkaSource
from operators.protocol import ReplyRules
from operators.settings import brokers_field, outage_limit_field

__all__ = ["Application", "DataflowSettings", "TorchSettings"]

Positions = Position | Mapping[int, Position]


@dataclass(frozen=True)
class DataflowSettings:
    """What every dataflow is set up with; a dataflow's ``Settings`` subclasses it."""

    kafka_bootstrap_servers: str = brokers_field()
    kafka_outage_limit_s: float = outage_limit_field()
    start: Position = Position.earliest()  # noqa: RUF009  (where a first run starts reading)
    metrics_port: int = 0  # each dataflow names its own (deploy/prometheus.yml scrapes it there)


@dataclass(frozen=True)
class TorchSettings(DataflowSettings):
    """A dataflow that runs torch models: how many threads torch has (0: torch's default, a thread per core)."""

    torch_threads: int = 1


class Application:
    """A dataflow's broker, outage limit and start position, and the sources and sinks made with them."""

    def __init__(self, settings: DataflowSettings) -> None:
        self.settings = settings
        self.brokers = settings.kafka_bootstrap_servers
        self.outage_limit_s = settings.kafka_outage_limit_s

    @classmethod
    def start(cls, settings: DataflowSettings, topics: Iterable[TopicSpec] = ()) -> Application:
        """Set the process up for the dataflow: create its ``topics`` that do not exist yet, give
        torch its threads, and serve the metrics endpoint, which publishes ``settings`` as the
        labels of ``patternflow_dataflow_info``."""
        app = cls(settings)
        app.ensure_topics(topics)
        if isinstance(settings, TorchSettings) and settings.torch_threads:
            import torch  # here: a dataflow without torch models does not pay for importing it

            torch.set_num_threads(settings.torch_threads)
        metrics.serve(settings.metrics_port, settings)
        return app

    def ensure_topics(self, topics: Iterable[TopicSpec]) -> None:
        """Create the ``topics`` that do not exist yet; existing ones are left as they are."""
        specs = list(topics)
        if specs:
            ensure_topics(self.brokers, specs, outage_limit_s=self.outage_limit_s)

    def partition_count(self, topic: str) -> int:
        return partition_count(self.brokers, topic, outage_limit_s=self.outage_limit_s)

    def reply_rules(
        self, reply_topic: str, allowed: Iterable[str], own: Iterable[TopicSpec], setting: str
    ) -> ReplyRules:
        """The rule a server that replies where each request asks checks destinations by: its
        ``reply_topic`` and the ``allowed`` names and patterns (the ``setting`` variable's), never
        one of its ``own`` topics, with topics looked up on the broker (:class:`TopicCache`)."""
        own_names = frozenset(spec.name for spec in own) - {reply_topic}
        return ReplyRules(TopicCache(self.brokers).describe, (reply_topic, *allowed), own_names, setting)

    def source(
        self,
        topics: Sequence[str],
        *,
        start: Positions | None = None,
        end: Positions | None = None,
        bounded: bool = False,
        batch_size: int = 1000,
    ) -> KafkaSource:
        """A message per record of ``topics``, from ``start`` (the settings' start position by default)."""
        return KafkaSource(self.brokers, topics, **self._reading(start, end, bounded, batch_size))

    def batch_source(
        self,
        topics: Sequence[str],
        *,
        start: Positions | None = None,
        end: Positions | None = None,
        bounded: bool = False,
        batch_size: int = 1000,
    ) -> KafkaBatchSource:
        """As :meth:`source`, an item per poll of a partition (:class:`~operators.kafka.KafkaBatch`)."""
        return KafkaBatchSource(self.brokers, topics, **self._reading(start, end, bounded, batch_size))

    def _reading(
        self, start: Positions | None, end: Positions | None, bounded: bool, batch_size: int
    ) -> dict[str, Any]:
        return {
            "start": self.settings.start if start is None else start,
            "end": end,
            "bounded": bounded,
            "batch_size": batch_size,
            "outage_limit_s": self.outage_limit_s,
        }

    def sink(self, topic: str | None = None, *, dlq_topic: str, config: Mapping[str, Any] | None = None) -> KafkaSink:
        """Messages to their own topics (or ``topic``); what the broker refuses as the message's fault
        goes to ``dlq_topic``. ``config`` adds librdkafka producer settings."""
        return KafkaSink(self.brokers, topic, dlq_topic=dlq_topic, outage_limit_s=self.outage_limit_s, config=config)
