"""Batch jobs run as an orchestrator runs them, against the real broker: kill -9, rerun, exactly once."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from dataflows.batch_inference import Settings
from dataflows.batch_inference.command import job_lock
from dataflows.batch_inference.files import committed_counts
from dataflows.batch_inference.job import Job
from operators.kafka import KafkaMessage, produce, read_topic
from patternflow import default_brokers
from tests.support.batch import JOB, committed_more, features, fill, job_env, output_ids, run_job
from tests.support.processes import Logged, kill_seed, wait_for

pytestmark = pytest.mark.e2e


def test_a_job_killed_at_random_moments_writes_every_row_exactly_once(brokers: str, topic: str, tmp_path: Path) -> None:
    n = 120_000
    fill(brokers, topic, 0, n)
    produce(brokers, [KafkaMessage(b"{broken", key=b"bad-1", topic=topic)])
    args = ["--job", "kills", "--input", f"kafka:{topic}", "--jobs-dir", str(tmp_path), "--batch-size", "100"]
    args += ["--snapshot-interval-s", "0.1", "--workers", "2", "--writers", "4"]
    commits = tmp_path / "kills" / "errors"
    rng = random.Random(kill_seed(7))
    for attempt in range(3):
        proc = Logged([*JOB, *args], job_env(brokers), tmp_path / f"run-{attempt}.log")
        before = sum(committed_counts(commits)) if commits.exists() else 0
        # Killed once it has committed more rows, at a random moment after that.
        wait_for(committed_more(proc, commits, before), "rows committed", 120)
        time.sleep(rng.uniform(0, 0.8))
        if proc.poll() is not None:
            pytest.fail(f"the job ended before the kill (make it longer):\n{proc.output()}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = run_job(brokers, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "succeeded" in done.stdout

    ids = output_ids(tmp_path / "kills" / "output")
    assert len(ids) == n and set(ids) == {f"c{i}" for i in range(n)}
    manifest = orjson.loads((tmp_path / "kills" / "manifest.json").read_bytes())
    assert [run["status"] for run in manifest["runs"]] == ["interrupted"] * 3 + ["succeeded"]
    assert manifest["rows"] == {"expected": n + 1, "written": n, "bad": 1}
    assert manifest["model"] == {"name": "tabular-risk", "version": "1", "batch_size": 100}
    (bad,) = [orjson.loads(line) for f in commits.glob("part-*") for line in f.read_bytes().splitlines()]
    assert bad["id"] == "bad-1" and bad["reason"].startswith("not JSON")

    again = run_job(brokers, *args)
    assert again.returncode == 0 and "already succeeded" in again.stdout and "nothing to do" in again.stdout


def test_the_range_is_fixed_when_the_job_first_starts(brokers: str, topic: str, tmp_path: Path) -> None:
    fill(brokers, topic, 0, 1_000)
    settings = Settings(job="fixed", input=f"kafka:{topic}", jobs_dir=tmp_path, kafka_bootstrap_servers=brokers)
    planned = Job.open(settings).manifest["input"]  # as the first run does, before it reads
    assert planned["rows"] == 1_000 and sum(end for _, end in planned["ranges"].values()) == 1_000
    fill(brokers, topic, 1_000, 500)  # written while the job runs: not part of it
    done = run_job(brokers, "--job", "fixed", "--input", f"kafka:{topic}", "--jobs-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(output_ids(tmp_path / "fixed" / "output")) == sorted(f"c{i}" for i in range(1_000))


def test_a_topic_output_keyed_by_row_id_reads_back_every_row(brokers: str, topic: str, tmp_path: Path) -> None:
    fill(brokers, topic, 0, 2_000)
    out = f"{topic}-scores"
    done = run_job(
        brokers,
        "--job",
        "to-topic",
        "--input",
        f"kafka:{topic}",
        "--output",
        f"kafka:{out}",
        "--jobs-dir",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {m.key: orjson.loads(m.value or b"") for m in read_topic(brokers, out)}
    assert set(rows) == {f"c{i}".encode() for i in range(2_000)}
    assert set(rows[b"c5"]) == {"id", "risk", "label"} and 0 <= rows[b"c5"]["risk"] <= 1


def test_parquet_in_jsonl_out_with_bad_rows_reported(tmp_path: Path) -> None:
    brokers = default_brokers()  # a file job needs no broker
    inputs = [features(i) for i in range(1_000)]
    inputs[10] = [1.0, 2.0]
    ids: list[str | None] = [f"r{i}" for i in range(1_000)]
    ids[20] = None
    pq.write_table(pa.table({"id": ids, "inputs": inputs}), tmp_path / "in.parquet", row_group_size=300)
    args = ["--job", "pq", "--input", str(tmp_path / "*.parquet"), "--format", "jsonl", "--jobs-dir", str(tmp_path)]
    done = run_job(brokers, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "998 rows written" in done.stdout and "2 bad rows" in done.stdout
    out = [
        orjson.loads(line)
        for f in (tmp_path / "pq" / "output").glob("part-*.jsonl")
        for line in f.read_bytes().splitlines()
    ]
    assert sorted(row["id"] for row in out) == sorted(f"r{i}" for i in range(1_000) if i not in (10, 20))
    bad = {
        row["source"]: row
        for f in (tmp_path / "pq" / "errors").glob("part-*")
        for row in map(orjson.loads, f.read_bytes().splitlines())
    }
    assert bad["in.parquet#10"]["reason"] == "inputs must be a list of 8 numbers, got a list of 2"
    assert bad["in.parquet#20"]["reason"] == "the 'id' column is null"

    changed = run_job(brokers, *args[:-4], "--format", "parquet", "--jobs-dir", str(tmp_path))
    assert changed.returncode == 2 and "was started with other settings" in changed.stderr
    missing = run_job(
        brokers, "--job", "none", "--input", str(tmp_path / "nothing-*.parquet"), "--jobs-dir", str(tmp_path)
    )
    assert missing.returncode == 2 and "no files match" in missing.stderr


def test_a_job_refuses_what_it_cannot_do_whole(brokers: str, topic: str, tmp_path: Path) -> None:
    missing = run_job(brokers, "--job", "m", "--input", f"kafka:{topic}-missing", "--jobs-dir", str(tmp_path))
    assert missing.returncode == 2 and "does not exist" in missing.stderr

    pq.write_table(pa.table({"key": ["a"], "x": [features(0)]}), tmp_path / "odd.parquet")
    columns = run_job(brokers, "--job", "c", "--input", str(tmp_path / "odd.parquet"), "--jobs-dir", str(tmp_path))
    assert columns.returncode == 2 and "name them with --id-field and --input-field" in columns.stderr

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "other.parquet").write_bytes(b"")
    renamed = ["--input", str(tmp_path / "odd.parquet"), "--id-field", "key", "--input-field", "x"]
    used = run_job(brokers, "--job", "u", *renamed, "--output", str(tmp_path / "used"), "--jobs-dir", str(tmp_path))
    assert used.returncode == 2 and "is not empty" in used.stderr

    fill(brokers, topic, 0, 2_000)
    args = ["--job", "deleted", "--input", f"kafka:{topic}", "--jobs-dir", str(tmp_path)]
    Job.open(Settings(job="deleted", input=f"kafka:{topic}", jobs_dir=tmp_path, kafka_bootstrap_servers=brokers))
    admin = AdminClient({"bootstrap.servers": brokers})
    for future in admin.delete_records([TopicPartition(topic, 0, 100)]).values():
        future.result(timeout=30)  # retention, as it were, between planning and reading
    deleted = run_job(brokers, *args)
    assert deleted.returncode == 1 and "no longer holds offset 0" in deleted.stderr

    held = job_lock(tmp_path / "busy")  # a run in another process, as far as the job can tell
    assert held is not None
    busy = run_job(brokers, "--job", "busy", "--input", f"kafka:{topic}", "--jobs-dir", str(tmp_path))
    assert busy.returncode == 1 and "running in another process" in busy.stderr
    held.close()
