"""Batch inference: score a bounded input once, resumably, every row exactly once in the output.

A job reads a Kafka topic between two positions, or Parquet or JSONL files,
scores the rows with a registry model in large batches, and writes Parquet or
JSONL files (or a topic). Its range is fixed when it first starts and kept in
its manifest, so however often it is killed and rerun it reads the same rows.
Run it as an orchestrator would (cron, Airflow, a Kubernetes Job)::

    python -m dataflows.batch_inference --job scores-2026-11-28 --input kafka:customers \\
        --model tabular-risk --output var/scores/2026-11-28

Exit 0 when the job has succeeded (also when it had already: a rerun is a
no-op that says so), 1 when it failed (the message says why; rerun the same
command to resume from its last snapshot), 2 for bad settings. Everything the
job keeps is under ``<jobs dir>/<job>/``::

    manifest.json   input range, model and version, row counts, runs, status
    recovery/       Bytewax snapshots: where to resume
    errors/         bad rows ({"id", "source", "reason"} per line), and commit counts
    output/         the output files, unless --output names another place

Input rows: a JSON object per Kafka record or JSONL line, with the model's
input in ``inputs`` and the row id in ``id`` (the record key, or where the row
was read, when absent); Parquet files with ``id`` and ``inputs`` columns
(``--id-field`` and ``--input-field`` rename them). Output rows: ``id`` and the
model's output columns (``risk`` and ``label``; ``embedding``). Files are
committed atomically per snapshot and writer shard (see
:mod:`dataflows.batch_inference.files`); a topic gets one message per row keyed by its id:
a resumed job may write a row twice, so readers keep one message per key (or
compact the topic).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import bytewax.operators as op
import orjson
from bytewax.dataflow import Dataflow

from dataflows.batch_inference.files import (
    FileOutput,
    Format,
    JsonlSource,
    ParquetSource,
    commit_files,
)
from dataflows.batch_inference.job import Job
from dataflows.batch_inference.scoring import RowFields, Scored, decode, score
from models.registry import get_spec
from operators.dlq import DLQ_SUFFIX
from operators.kafka import KafkaMessage, Position
from operators.kafka.sink import kafka_output
from operators.settings import from_args
from operators.setup import Application, TorchSettings
from patternflow import hash_key

__all__ = ["Settings", "build", "job_dataflow"]


@dataclass(frozen=True)
class Settings(TorchSettings):
    job: str = ""
    input: str = ""  # kafka:<topic>, or a path or glob of .parquet or .jsonl files
    # A topic's range, from start to end, is fixed at the first start.
    end: Position = Position.latest()  # noqa: RUF009
    model: str = "tabular-risk"
    output: str = ""  # a directory (default <jobs dir>/<job>/output), or kafka:<topic>
    format: str = "parquet"  # of output files: parquet or jsonl
    id_field: str = "id"
    input_field: str = "inputs"
    batch_size: int = 0  # rows per forward pass; 0: the model's measured size
    workers: int = 2
    writers: int = 8
    snapshot_interval_s: float = 10.0
    torch_threads: int = 0  # 0: torch's default
    jobs_dir: Path = Path("var/batch")
    metrics_port: int = 9102
    # At its end, a job serves its metrics until they are scraped twice more (at most this long), so
    # Prometheus has its last counts; a job nobody scrapes exits at once.
    metrics_linger_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.job or "/" in self.job or self.job.startswith("."):
            raise ValueError(f"BATCH_JOB (--job) must name the job, e.g. scores-2026-11-28; got {self.job!r}")
        if not self.input:
            raise ValueError("BATCH_INPUT (--input) must be kafka:<topic> or a path or glob of .parquet/.jsonl files")
        if self.format not in ("parquet", "jsonl"):
            raise ValueError(f"BATCH_FORMAT (--format) must be parquet or jsonl, got {self.format!r}")
        if self.workers < 1 or self.writers < 1 or self.batch_size < 0:
            raise ValueError("BATCH_WORKERS and BATCH_WRITERS must be >= 1, BATCH_BATCH_SIZE >= 0")
        get_spec(self.model)

    @property
    def directory(self) -> Path:
        return self.jobs_dir / self.job

    @property
    def rows_per_batch(self) -> int:
        return self.batch_size or get_spec(self.model).batch_size

    def identity(self) -> dict[str, Any]:
        """What makes a job the same job: a rerun must not change it."""
        # batch_size and writers too: a resumed job reads on from batch boundaries, and finds
        # each writer's files by its number.
        keys = [
            "input",
            "start",
            "end",
            "model",
            "output",
            "format",
            "id_field",
            "input_field",
            "batch_size",
            "writers",
        ]
        return {key: str(getattr(self, key)) for key in keys}


def build(settings: Settings | None = None) -> Dataflow:
    """The job's dataflow (``python -m bytewax.run "dataflows.batch_inference:build()"``); the
    command line (:mod:`dataflows.batch_inference.command`) adds the progress bar, the manifest's run
    record and exit codes."""
    s = settings or from_args(Settings, "BATCH_", [])
    return job_dataflow(Job.open(s))


def job_dataflow(job: Job) -> Dataflow:
    """The job's dataflow: its planned input scored in batches, written once per row."""
    s = job.settings
    spec = get_spec(s.model)
    model = spec.load()
    fields = RowFields(s.id_field, s.input_field)
    flow = Dataflow("batch_inference")
    chunks = op.input("read", flow, _source(job))
    # KafkaBatch | Lines | Table: a chunk of rows, in columns
    rows = op.map("decode", chunks, lambda chunk: decode(chunk, spec, fields))
    # Rows: ids, the model's input column, bad rows with their reasons
    scored = op.map("score", rows, lambda r: score(model, r))
    # Scored: an Arrow record batch (id + outputs) and the bad rows
    by_writer = op.key_on("by_writer", scored, lambda out: str(hash_key(out.part) % s.writers))
    out = job.manifest["output"]
    directory = Path(out["path"]) if out["kind"] == "files" else None
    errors = Path(job.manifest["errors"])
    commit_files("commit", by_writer, FileOutput(directory, errors, cast("Format", s.format), s.writers, s.job))
    # part-<writer>-<seq>.parquet|jsonl: rows committed at each snapshot
    if out["kind"] == "kafka":
        messages = op.flat_map("to_messages", scored, _to_messages)
        # KafkaMessage: one per row, keyed by the row id
        kafka_output("publish", messages, Application(s).sink(out["topic"], dlq_topic=out["topic"] + DLQ_SUFFIX))
    return flow


def _source(job: Job) -> Any:
    s, plan = job.settings, job.manifest["input"]
    if plan["kind"] == "kafka":
        ranges = {int(p): r for p, r in plan["ranges"].items()}
        return Application(s).batch_source(
            [plan["topic"]],
            start={p: Position.offset(first) for p, (first, _) in ranges.items()},
            end={p: Position.offset(end) for p, (_, end) in ranges.items()},
            batch_size=s.rows_per_batch,
        )
    paths = [Path(f["path"]) for f in plan["files"]]
    if plan["kind"] == "parquet":
        return ParquetSource(paths, [s.id_field, s.input_field], s.rows_per_batch)
    return JsonlSource(paths, s.rows_per_batch)


def _to_messages(scored: Scored) -> list[KafkaMessage]:
    if scored.table is None:
        return []
    return [KafkaMessage(orjson.dumps(row), key=str(row["id"]).encode()) for row in scored.table.to_pylist()]
