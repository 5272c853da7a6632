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

from dataclasses import dataclass, field

import bytewax.operators as op
import torch
from bytewax.dataflow import Dataflow

from models.registry import get_spec
from operators import metrics
from operators.dlq import DLQ_SUFFIX
from operators.kafka import KafkaSink, KafkaSource, Position, TopicSpec, ensure_topics, kafka_output
from operators.serving import BatchConfig, serve_requests
from operators.settings import from_env

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap_servers: str = field(default="127.0.0.1:9092", metadata={"env": "KAFKA_BOOTSTRAP_SERVERS"})
    request_topic: str = "inference.requests"
    request_partitions: int = 3
    reply_topic: str = "inference.replies"
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
        for name in self.model_names:
            get_spec(name)

    @property
    def model_names(self) -> list[str]:
        return [name.strip() for name in self.models.split(",") if name.strip()]

    def topics(self) -> list[TopicSpec]:
        return [
            TopicSpec(self.request_topic, partitions=self.request_partitions, retention_ms=HOUR_MS),
            TopicSpec(self.request_topic + DLQ_SUFFIX, retention_ms=-1),
            TopicSpec(self.reply_topic, partitions=self.reply_partitions, retention_ms=HOUR_MS),
        ]


def build(settings: Settings | None = None) -> Dataflow:
    s = settings or from_env(Settings, prefix="ONLINE_")
    ensure_topics(s.kafka_bootstrap_servers, s.topics())
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    # Loaded and warmed up once per process, before any request is read; workers share them.
    models = {name: get_spec(name).load() for name in s.model_names}
    metrics.serve(s.metrics_port)

    flow = Dataflow("online_inference")
    source = KafkaSource(s.kafka_bootstrap_servers, [s.request_topic], start=s.start, batch_size=s.source_batch_size)
    requests = op.input("requests", flow, source)
    # KafkaMessage
    out = serve_requests("serve", requests, models, BatchConfig(s.max_batch_size, s.max_wait_ms, s.max_queue))
    # KafkaMessage: replies on their reply topics, dead letters on <request topic>.dlq
    kafka_output("replies", out, KafkaSink(s.kafka_bootstrap_servers, config={"linger.ms": 0}))
    return flow
