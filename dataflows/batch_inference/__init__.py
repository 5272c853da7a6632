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

import fcntl
import glob
import io
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TextIO, cast

import bytewax.operators as op
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main
from prometheus_client import REGISTRY
from tqdm import tqdm

from dataflows.batch_inference.files import (
    FileOutput,
    Format,
    JsonlSource,
    ParquetSource,
    commit_files,
    committed_counts,
    write_atomically,
)
from dataflows.batch_inference.scoring import RowFields, Scored, decode, score
from models.registry import get_spec
from operators import metrics
from operators.dlq import DLQ_SUFFIX
from operators.kafka import KafkaMessage, Position, TopicSpec
from operators.kafka.errors import KafkaSourceError
from operators.kafka.sink import kafka_output
from operators.kafka.source import fixed_range
from operators.settings import SettingsError, from_args
from operators.setup import Application, TorchSettings
from patternflow import hash_key
from patternflow.errors import PatternflowError

__all__ = ["Job", "Settings", "build", "job_lock", "main"]

KAFKA_PREFIX = "kafka:"


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


class JobError(PatternflowError):
    """The job cannot run as asked (its input is missing, or its settings changed since it started)."""


@dataclass
class Job:
    """A batch job's plan and record, kept in ``<jobs dir>/<job>/manifest.json``."""

    settings: Settings
    manifest: dict[str, Any]

    @classmethod
    def open(cls, s: Settings) -> Job:
        """The job's manifest; a new job first fixes its input range and writes one."""
        path = s.directory / "manifest.json"
        if path.exists():
            manifest = orjson.loads(path.read_bytes())
            if manifest["settings"] != s.identity():
                changed = {k: (manifest["settings"].get(k), v) for k, v in s.identity().items()}
                changed = {k: v for k, v in changed.items() if v[0] != v[1]}
                raise JobError(
                    f"job {s.job!r} was started with other settings ({changed}, as (then, now)); "
                    f"rerun it as it was, or give the new job a new name"
                )
            version = get_spec(s.model).version
            if manifest["model"]["version"] != version and manifest["status"] != "succeeded":
                raise JobError(
                    f"job {s.job!r} started with {s.model} v{manifest['model']['version']} and this installation has "
                    f"v{version}: one job's output is one model version; give the new job a new name"
                )
            return cls(s, manifest)
        spec = get_spec(s.model)
        manifest = {
            "job": s.job,
            "status": "planned",
            "settings": s.identity(),
            "model": {"name": spec.name, "version": spec.version, "batch_size": s.rows_per_batch},
            "input": _plan_input(s),
            "output": _output_kind(s),
            "errors": str((s.directory / "errors").resolve()),
            "rows": {"expected": 0, "written": 0, "bad": 0},
            "runs": [],
        }
        manifest["rows"]["expected"] = manifest["input"]["rows"]
        job = cls(s, manifest)
        job.save()
        return job

    @property
    def done(self) -> bool:
        return bool(self.manifest["status"] == "succeeded")

    @property
    def output(self) -> str:
        out = self.manifest["output"]
        return f"{KAFKA_PREFIX}{out['topic']}" if out["kind"] == "kafka" else str(out["path"])

    def save(self) -> None:
        self.settings.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(
            self.settings.directory / "manifest.json", orjson.dumps(self.manifest, option=orjson.OPT_INDENT_2)
        )

    def start_run(self) -> dict[str, Any]:
        """Mark the job running; a run that never ended (killed, preempted) is recorded as interrupted."""
        interrupted = self.manifest.pop("current_run", None)
        if interrupted is not None:
            self.manifest["runs"].append({**interrupted, "status": "interrupted"})
        run = {"started_at": _now(), "pid": os.getpid()}
        self.manifest.update(status="running", current_run=run)
        self.manifest.setdefault("started_at", run["started_at"])
        self.save()
        return dict(run)

    def record_run(self, run: dict[str, Any]) -> None:
        """End the current run; one that read its input to the end succeeds only if every row is accounted for."""
        rows = self.manifest["rows"]
        rows["written"], rows["bad"] = committed_counts(Path(self.manifest["errors"]))
        counted = rows["written"] + rows["bad"]
        # A topic's offsets can hold gaps (compaction, transaction markers); a file's rows cannot.
        exact = self.manifest["input"]["kind"] != "kafka"
        if run["status"] == "succeeded" and (counted != rows["expected"] if exact else counted > rows["expected"]):
            run.update(status="failed", error=f"counted {counted:,} rows written or bad, expected {rows['expected']:,}")
        self.manifest.pop("current_run", None)
        self.manifest["runs"].append(run)
        self.manifest["status"] = run["status"]
        self.manifest["ended_at"] = run["ended_at"] if run["status"] == "succeeded" else None
        self.save()

    def dataflow(self) -> Dataflow:
        s = self.settings
        spec = get_spec(s.model)
        model = spec.load()
        fields = RowFields(s.id_field, s.input_field)
        flow = Dataflow("batch_inference")
        chunks = op.input("read", flow, self._source())
        # KafkaBatch | Lines | Table: a chunk of rows, in columns
        rows = op.map("decode", chunks, lambda chunk: decode(chunk, spec, fields))
        # Rows: ids, the model's input column, bad rows with their reasons
        scored = op.map("score", rows, lambda r: score(model, r))
        # Scored: an Arrow record batch (id + outputs) and the bad rows
        by_writer = op.key_on("by_writer", scored, lambda out: str(hash_key(out.part) % s.writers))
        out = self.manifest["output"]
        directory = Path(out["path"]) if out["kind"] == "files" else None
        errors = Path(self.manifest["errors"])
        commit_files("commit", by_writer, FileOutput(directory, errors, cast("Format", s.format), s.writers, s.job))
        # part-<writer>-<seq>.parquet|jsonl: rows committed at each snapshot
        if out["kind"] == "kafka":
            messages = op.flat_map("to_messages", scored, _to_messages)
            # KafkaMessage: one per row, keyed by the row id
            kafka_output("publish", messages, Application(s).sink(out["topic"], dlq_topic=out["topic"] + DLQ_SUFFIX))
        return flow

    def _source(self) -> Any:
        s, plan = self.settings, self.manifest["input"]
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


def _plan_input(s: Settings) -> dict[str, Any]:
    if s.input.startswith(KAFKA_PREFIX):
        topic = s.input.removeprefix(KAFKA_PREFIX)
        try:
            ranges = fixed_range(
                s.kafka_bootstrap_servers, topic, s.start, s.end, outage_limit_s=s.kafka_outage_limit_s
            )
        except KafkaSourceError as exc:  # no such topic
            raise JobError(str(exc)) from exc
        return {
            "kind": "kafka",
            "topic": topic,
            "start": str(s.start),
            "end": str(s.end),
            "ranges": {str(p): list(r) for p, r in sorted(ranges.items())},
            "rows": sum(end - first for first, end in ranges.values()),
        }
    paths = sorted(Path(p).resolve() for p in glob.glob(s.input))
    if not paths:
        raise JobError(f"no files match {s.input!r}; give kafka:<topic>, a file, or a glob such as 'data/*.parquet'")
    kinds = {p.suffix for p in paths}
    if len(kinds) > 1 or not kinds <= {".parquet", ".jsonl"}:
        raise JobError(f"{s.input!r} matches {sorted(kinds)} files; a job reads .parquet or .jsonl files, one kind")
    kind = kinds.pop().lstrip(".")
    files = [{"path": str(p), "rows": _count_rows(p, kind, s)} for p in paths]
    return {"kind": kind, "files": files, "rows": sum(f["rows"] for f in files)}


def _count_rows(path: Path, kind: str, s: Settings) -> int:
    if kind == "parquet":
        try:
            meta = pq.ParquetFile(path).metadata
        except (OSError, pa.ArrowException) as exc:
            raise JobError(f"{path} is not a readable Parquet file: {exc}") from exc
        columns = meta.schema.to_arrow_schema().names
        missing = {s.id_field, s.input_field} - set(columns)
        if missing:
            raise JobError(
                f"{path} has no column {sorted(missing)} (it has {columns}); "
                "name them with --id-field and --input-field"
            )
        return int(meta.num_rows)
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _output_kind(s: Settings) -> dict[str, Any]:
    if s.output.startswith(KAFKA_PREFIX):
        topic = s.output.removeprefix(KAFKA_PREFIX)
        Application(s).ensure_topics([TopicSpec(topic, partitions=8), TopicSpec(topic + DLQ_SUFFIX, retention_ms=-1)])
        return {"kind": "kafka", "topic": topic}
    path = Path(s.output) if s.output else s.directory / "output"
    if path.exists() and any(path.iterdir()):
        # A job owns its output directory: resuming, it deletes its own uncommitted files by name.
        raise JobError(f"output directory {path} is not empty: give each job a directory of its own")
    return {"kind": "files", "path": str(path.resolve()), "format": s.format}


def _to_messages(scored: Scored) -> list[KafkaMessage]:
    if scored.table is None:
        return []
    return [KafkaMessage(orjson.dumps(row), key=str(row["id"]).encode()) for row in scored.table.to_pylist()]


def build(settings: Settings | None = None) -> Dataflow:
    """The job's dataflow (``python -m bytewax.run "dataflows.batch_inference:build()"``); the
    command line (:func:`main`) adds the progress bar, the manifest's run record and exit codes."""
    s = settings or from_args(Settings, "BATCH_", [])
    return Job.open(s).dataflow()


class Progress:
    """Rows done of the job's total, with rate and ETA (a tqdm bar): redrawn on a terminal, a line
    every 10 s in a log. ``done`` is polled: the rows are counted by the dataflow's workers."""

    def __init__(self, job: str, total: int, done: Callable[[], int], out: TextIO = sys.stderr) -> None:
        self._done = done
        tty = out.isatty()
        self._interval_s = 0.5 if tty else 10.0
        # smoothing=0: the rate is the average since this run started, as an ETA for a long job needs.
        self._bar = tqdm(
            total=total,
            initial=done(),
            desc=f"[{job}]",
            unit=" rows",
            file=out if tty else _LogLines(out),
            mininterval=0,
            smoothing=0,
            dynamic_ncols=tty,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._bar.n = self._done()
        self._bar.close()  # draws the last count

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._draw()

    def _draw(self) -> None:
        self._bar.update(self._done() - self._bar.n)


class _LogLines(io.TextIOBase):
    """tqdm redraws its line in place (``\\r``); in a log each drawing is a line of its own."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def write(self, text: str) -> int:
        line = text.strip("\r\n ")
        if line:
            self._out.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self._out.flush()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def job_lock(directory: Path) -> IO[bytes] | None:
    """The job's lock, held while this process lives; ``None`` if another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = (directory / ".lock").open("ab")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def main(argv: list[str] | None = None) -> int:
    try:
        s = from_args(Settings, "BATCH_", argv, description=__doc__.split("\n\n")[0])
    except SettingsError as exc:
        print(f"batch job: {exc}", file=sys.stderr)
        return 2
    lock = job_lock(s.directory)
    if lock is None:
        print(f"job {s.job!r} is running in another process (it holds {s.directory / '.lock'})", file=sys.stderr)
        return 1
    try:
        job = Job.open(s)
    except JobError as exc:
        print(f"batch job: {exc}", file=sys.stderr)
        return 2
    rows = job.manifest["rows"]
    if job.done:
        print(
            f"job {s.job!r} already succeeded at {job.manifest['ended_at']}: {rows['written']:,} rows written to "
            f"{job.output}, {rows['bad']:,} bad rows in {job.manifest['errors']}; nothing to do"
        )
        return 0
    Application.start(s)
    metrics.BATCH_EXPECTED.labels(s.job).set(rows["expected"])
    recovery = s.directory / "recovery"
    if not recovery.exists():  # made aside and renamed into place: a kill leaves none or a whole one
        fresh = s.directory / ".recovery.tmp"
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        init_db_dir(fresh, 1)
        os.replace(fresh, recovery)
    committed = sum(committed_counts(Path(job.manifest["errors"])))
    resumed = f", resuming after {committed:,} committed rows" if job.manifest["status"] != "planned" else ""
    print(
        f"job {s.job!r}: {rows['expected']:,} rows from {s.input} with {s.model} to {job.output}{resumed}", flush=True
    )
    run = job.start_run()
    start = time.monotonic()
    try:
        with Progress(s.job, rows["expected"], lambda: committed + _counted(s.job)):
            cli_main(
                job.dataflow(),
                workers_per_process=s.workers,
                epoch_interval=timedelta(seconds=s.snapshot_interval_s),
                recovery_config=RecoveryConfig(str(recovery), backup_interval=timedelta(0)),
            )
    except Exception as exc:  # the job's failure, reported and recorded; a rerun resumes
        traceback.print_exc()
        reason = _root_cause(exc)
        job.record_run({**run, "ended_at": _now(), "status": "failed", "error": reason})
        print(f"job {s.job!r} failed: {reason}\nrerun the same command to resume", file=sys.stderr)
        return 1
    seconds = time.monotonic() - start
    job.record_run({**run, "ended_at": _now(), "status": "succeeded", "seconds": round(seconds, 3)})
    rows = job.manifest["rows"]
    if not job.done:
        print(f"job {s.job!r} failed: {job.manifest['runs'][-1]['error']}", file=sys.stderr)
        return 1
    print(
        f"job {s.job!r} succeeded in {seconds:.1f} s: {rows['written']:,} rows written to {job.output}, "
        f"{rows['bad']:,} bad rows in {job.manifest['errors']}"
    )
    return 0


def _root_cause(exc: BaseException) -> str:
    """Bytewax wraps a step's exception in its own; the innermost one says what went wrong."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


def _counted(job: str) -> int:
    """Rows this process has written (committed or not yet), from the job's metrics."""
    samples = (
        REGISTRY.get_sample_value("patternflow_batch_rows_total", {"job": job, "outcome": o}) for o in ("ok", "bad")
    )
    return int(sum(value or 0 for value in samples))
