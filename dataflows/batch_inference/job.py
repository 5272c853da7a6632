"""A batch job's plan and record: its input range fixed at the first start, its manifest
(``<jobs dir>/<job>/manifest.json``) and its runs."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from dataflows.batch_inference.files import (
    committed_counts,
    write_atomically,
)
from models.registry import get_spec
from operators.dlq import DLQ_SUFFIX
from operators.kafka import TopicSpec
from operators.kafka.errors import KafkaSourceError
from operators.kafka.source import fixed_range
from operators.setup import Application
from patternflow.errors import PatternflowError

if TYPE_CHECKING:
    from dataflows.batch_inference import Settings

__all__ = ["KAFKA_PREFIX", "Job", "JobError", "now_iso"]

KAFKA_PREFIX = "kafka:"


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
        run = {"started_at": now_iso(), "pid": os.getpid()}
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


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
