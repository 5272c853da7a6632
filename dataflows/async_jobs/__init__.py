"""Async jobs: submit to ``jobs.submit``, workers run them at their own pace, results by job id.

Protocol: see :mod:`dataflows.async_jobs.jobs`. A submission is keyed by its job id, its
value ``{"model": "tabular-risk", "inputs": [[...], ...]}``; every status goes
to ``jobs.results`` (compacted) keyed by the job id. Clients and the HTTP
gateway (``POST /v1/jobs``, ``GET /v1/jobs/{id}``) use
:class:`clients.jobs.JobsClient`. Run::

    python -m bytewax.run "dataflows.async_jobs:build()" -r var/recovery/async_jobs -s 5 -b 0
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from dataflows.async_jobs.jobs import JobTable, parse_jobs, run_jobs
from dataflows.async_jobs.published import PublishedResults
from models.registry import load, specs
from operators.dlq import DLQ_SUFFIX, to_dlq_message
from operators.kafka import TopicSpec
from operators.kafka.sink import kafka_output
from operators.protocol import JOBS_RESULTS_TOPIC, JOBS_SUBMIT_TOPIC
from operators.settings import from_env
from operators.setup import Application, TorchSettings
from operators.stateful import StateConfig, keyed_state

DAY_MS = 24 * 3_600_000


@dataclass(frozen=True)
class Settings(TorchSettings):
    submit_topic: str = JOBS_SUBMIT_TOPIC
    results_topic: str = JOBS_RESULTS_TOPIC
    partitions: int = 3
    models: tuple[str, ...] = ("tabular-risk", "minilm-embeddings")
    max_inputs: int = 1_000  # per job
    jobs_per_poll: int = 64  # submissions read (and batched together) per poll of a partition
    result_ttl_s: int = 7 * 24 * 3600  # how long a job id is remembered (a resubmission after is run again)
    max_clock_skew_s: int = 300  # between submitters and workers: how far back a restart looks for results
    state_dir: Path = Path("var/state/async_jobs")
    state_shards: int = 8
    metrics_port: int = 9103

    def __post_init__(self) -> None:
        specs(self.models)  # fails early, naming an unknown model
        if not 1 <= self.max_inputs <= 10_000:
            raise ValueError(f"JOBS_MAX_INPUTS must be 1 to 10000, got {self.max_inputs}")

    @property
    def max_message_bytes(self) -> int:
        """A result can hold ``max_inputs`` embeddings: up to ~8 KB each as JSON."""
        return max(1 << 20, self.max_inputs * 8_192)

    def topics(self) -> list[TopicSpec]:
        big = {"max.message.bytes": str(self.max_message_bytes)}
        return [
            TopicSpec(self.submit_topic, partitions=self.partitions, retention_ms=DAY_MS, config=big),
            TopicSpec(self.submit_topic + DLQ_SUFFIX, retention_ms=-1, config=big),
            TopicSpec(self.results_topic, partitions=self.partitions, cleanup_policy="compact", config=big),
        ]


def build(settings: Settings | None = None) -> Dataflow:
    s = settings or from_env(Settings, prefix="JOBS_")
    app = Application.start(s, s.topics())
    models = load(s.models)

    flow = Dataflow("async_jobs")
    polls = op.input("submissions", flow, app.batch_source([s.submit_topic], batch_size=s.jobs_per_poll))
    # KafkaBatch: the submissions one poll of a partition read
    published = PublishedResults(
        app.brokers, s.results_topic, max_clock_skew_ms=s.max_clock_skew_s * 1000, outage_limit_s=app.outage_limit_s
    )
    parsed = op.map("parse", polls, lambda batch: published.split(parse_jobs("async_jobs.parse", batch, s.max_inputs)))
    # Parsed: jobs to run, jobs failed already (with their dead letters), jobs finished before a restart
    # (their published results), messages with no job id
    taken = op.flat_map("take", parsed, lambda p: [job.result("running") for job in p.jobs])
    finished = op.flat_map(
        "run", parsed, lambda p: run_jobs(models, p.jobs) + [failed for failed, _ in p.failed] + p.published
    )
    # JobResult: running notices, and results (done or failed), one of each per job
    statuses = op.key_on("by_job", op.merge("statuses", taken, finished), lambda result: result.job_id)
    state = StateConfig(s.state_dir, shards=s.state_shards)
    recorded = op.key_rm("unkey", keyed_state("record", statuses, lambda: JobTable(s.result_ttl_s * 1000), state))
    # JobResult: what the job table decided to publish, in order
    results = op.map("encode", recorded, lambda r: r.to_message(s.results_topic))
    dead = op.flat_map("dead", parsed, lambda p: [to_dlq_message(d) for d in [*p.dead, *(d for _, d in p.failed)]])
    # KafkaMessage: statuses on the results topic, dead letters on <submit topic>.dlq
    sink = app.sink(
        dlq_topic=s.submit_topic + DLQ_SUFFIX,
        config={"message.max.bytes": str(s.max_message_bytes)},  # a result of max_inputs embeddings
    )
    kafka_output("publish", op.merge("out", results, dead), sink)
    return flow
