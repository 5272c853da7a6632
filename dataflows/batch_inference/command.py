"""The batch job's command line (``python -m dataflows.batch_inference``): one job run to its
end, with a progress bar, its runs recorded in the manifest, and exit codes for orchestrators."""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, TextIO

from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main
from prometheus_client import REGISTRY
from tqdm import tqdm

from dataflows import batch_inference
from dataflows.batch_inference import Settings, job_dataflow
from dataflows.batch_inference.files import (
    committed_counts,
)
from dataflows.batch_inference.job import Job, JobError, now_iso
from operators import metrics
from operators.settings import SettingsError, from_args
from operators.setup import Application

__all__ = ["Progress", "job_lock", "main"]


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
        s = from_args(Settings, "BATCH_", argv, description=batch_inference.__doc__.split("\n\n")[0])
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
    try:
        return _run(job, run, recovery, committed)
    finally:
        metrics.linger(s.metrics_linger_s)


def _run(job: Job, run: dict[str, Any], recovery: Path, committed: int) -> int:
    """The job's dataflow to its end, the run recorded in the manifest; the exit code."""
    s = job.settings
    start = time.monotonic()
    try:
        with Progress(s.job, job.manifest["rows"]["expected"], lambda: committed + _counted(s.job)):
            cli_main(
                job_dataflow(job),
                workers_per_process=s.workers,
                epoch_interval=timedelta(seconds=s.snapshot_interval_s),
                recovery_config=RecoveryConfig(str(recovery), backup_interval=timedelta(0)),
            )
    except Exception as exc:  # the job's failure, reported and recorded; a rerun resumes
        traceback.print_exc()
        reason = _root_cause(exc)
        job.record_run({**run, "ended_at": now_iso(), "status": "failed", "error": reason})
        print(f"job {s.job!r} failed: {reason}\nrerun the same command to resume", file=sys.stderr)
        return 1
    seconds = time.monotonic() - start
    job.record_run({**run, "ended_at": now_iso(), "status": "succeeded", "seconds": round(seconds, 3)})
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
