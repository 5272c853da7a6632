"""Online inference: requests in on a Kafka topic, replies out on the topic each names.

Protocol (see ``operators/serving.py``): a request's value is
``{"model": "tabular-risk", "inputs": [0.1, ...]}``; its headers carry
``correlation_id``, ``reply_topic``, optional ``reply_partition`` and
``deadline_ms`` (epoch ms). The reply, keyed by the correlation id, is
``{"correlation_id": ..., "status": "ok" | "error" | "timeout" | "rejected", ...}``.

Requests are micro-batched per model and request partition (up to
``ONLINE_MAX_BATCH_SIZE``, at most ``ONLINE_MAX_WAIT_MS`` after the first), the
models are loaded and warmed up before the first request is read, and each
batch is one forward pass (CUDA when present). Run::

    python -m bytewax.run "dataflows.online_inference:build()" -r var/recovery/online -s 1 -b 0
"""

from __future__ import annotations

from dataclasses import dataclass

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from models.registry import load, specs
from operators.dlq import DLQ_SUFFIX
from operators.kafka import TopicSpec
from operators.kafka.sink import kafka_output
from operators.protocol import DEFAULT_REPLY_TOPICS, REPLY_TOPIC, REQUEST_TOPIC
from operators.serving import BatchConfig, serve_requests
from operators.settings import from_env
from operators.setup import Application, TorchSettings

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Settings(TorchSettings):
    request_topic: str = REQUEST_TOPIC
    request_partitions: int = 3
    reply_topic: str = REPLY_TOPIC
    reply_partitions: int = 8
    reply_topics: tuple[str, ...] = DEFAULT_REPLY_TOPICS  # where else requests may ask to be answered
    models: tuple[str, ...] = ("tabular-risk", "minilm-embeddings")
    max_batch_size: int = 32
    max_wait_ms: int = 0
    max_queue: int = 1024
    source_batch_size: int = 256
    metrics_port: int = 9101

    def __post_init__(self) -> None:
        BatchConfig(self.max_batch_size, self.max_wait_ms, self.max_queue)  # fails early, naming the bad value
        specs(self.models)  # fails early, naming an unknown model

    @property
    def dlq_topic(self) -> str:
        return self.request_topic + DLQ_SUFFIX

    def topics(self) -> list[TopicSpec]:
        return [
            TopicSpec(self.request_topic, partitions=self.request_partitions, retention_ms=HOUR_MS),
            TopicSpec(self.dlq_topic, retention_ms=-1),
            TopicSpec(self.reply_topic, partitions=self.reply_partitions, retention_ms=HOUR_MS),
        ]


def build(settings: Settings | None = None) -> Dataflow:
    s = settings or from_env(Settings, prefix="ONLINE_")
    app = Application.start(s, s.topics())
    # Loaded and warmed up once per process, before any request is read; workers share them.
    models = load(s.models)
    # A reply goes only where ONLINE_REPLY_TOPICS allows, to a topic and partition the broker has.
    rules = app.reply_rules(s.reply_topic, s.reply_topics, s.topics(), "ONLINE_REPLY_TOPICS")
    batching = BatchConfig(s.max_batch_size, s.max_wait_ms, s.max_queue)

    flow = Dataflow("online_inference")
    requests = op.input("requests", flow, app.source([s.request_topic], batch_size=s.source_batch_size))
    # KafkaMessage
    out = serve_requests("serve", requests, models, batching, rules)
    # KafkaMessage: replies on their reply topics, dead letters on <request topic>.dlq
    kafka_output("replies", out, app.sink(dlq_topic=s.dlq_topic, config={"linger.ms": 0}))
    return flow
