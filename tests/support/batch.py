"""Batch jobs (``python -m dataflows.batch_inference``) as a user runs them: rows on a topic, the
job's command and environment, and what it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pyarrow.dataset as ds

from dataflows.batch_inference.files import committed_counts
from operators.kafka import KafkaMessage, TopicSpec, ensure_topics, produce
from tests.support.processes import ROOT, Logged

JOB = [sys.executable, "-m", "dataflows.batch_inference"]


def features(i: int) -> list[float]:
    return [((i * 7 + j * 3) % 11) / 5 - 1 for j in range(8)]


def fill(brokers: str, topic: str, first: int, n: int) -> None:
    ensure_topics(brokers, [TopicSpec(topic, partitions=4)])
    rows = (
        KafkaMessage(orjson.dumps({"inputs": features(i)}), key=f"c{i}".encode(), topic=topic)
        for i in range(first, first + n)
    )
    produce(brokers, rows)


def job_env(brokers: str) -> dict[str, str]:
    return {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": brokers, "BATCH_METRICS_PORT": "0"}


def run_job(brokers: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*JOB, *args], env=job_env(brokers), cwd=ROOT, capture_output=True, text=True, timeout=300)


def output_ids(directory: Path) -> list[str]:
    return ds.dataset(directory, format="parquet").to_table(columns=["id"]).column("id").to_pylist()


def committed_more(proc: Logged, commits: Path, before: int) -> Callable[[], bool]:
    return lambda: proc.poll() is not None or sum(committed_counts(commits)) > before
