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
import torch
from bytewax.dataflow import Dataflow

from models.registry import load, specs
from operators import metrics
from operators.dlq import DLQ_SUFFIX
from operators.kafka import Position, TopicCache, TopicSpec, ensure_topics
from operators.kafka.sink import KafkaSink, kafka_output
from operators.kafka.source import KafkaSource
from operators.protocol import REPLY_TOPIC, REQUEST_TOPIC
from operators.serving import BatchConfig, ReplyRules, serve_requests
from operators.settings import brokers_field, from_env, outage_limit_field

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap_servers: str = brokers_field()
    kafka_outage_limit_s: float = outage_limit_field()
    request_topic: str = REQUEST_TOPIC
    request_partitions: int = 3
    reply_topic: str = REPLY_TOPIC
    reply_partitions: int = 8
    models: str = "tabular-risk,minilm-embeddings"
    max_batch_size: int = 32
    max_wait_ms: int = 0
    max_queue: int = 1024
    source_batch_size: int = 256
    start: Position = Position.earliest()  # noqa: RUF009
    torch_threads: int = 1
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
    brokers, outage_limit_s = s.kafka_bootstrap_servers, s.kafka_outage_limit_s
    ensure_topics(brokers, s.topics(), outage_limit_s=outage_limit_s)
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    # Loaded and warmed up once per process, before any request is read; workers share them.
    models = load(s.models)
    metrics.serve(s.metrics_port, s)
    # A reply goes only to a topic and partition the broker has, and never to the server's own topics.
    rules = ReplyRules(TopicCache(brokers).partitions, frozenset({s.request_topic, s.dlq_topic}))
    batching = BatchConfig(s.max_batch_size, s.max_wait_ms, s.max_queue)

    flow = Dataflow("online_inference")
    source = KafkaSource(
        brokers, [s.request_topic], start=s.start, batch_size=s.source_batch_size, outage_limit_s=outage_limit_s
    )
    requests = op.input("requests", flow, source)
    # KafkaMessage
    out = serve_requests("serve", requests, models, batching, rules)
    # KafkaMessage: replies on their reply topics, dead letters on <request topic>.dlq
    sink = KafkaSink(brokers, dlq_topic=s.dlq_topic, outage_limit_s=outage_limit_s, config={"linger.ms": 0})
    kafka_output("replies", out, sink)
    return flow
