"""Batch inference: the batch job against online serving, a hand-written job and raw torch.

One machine, one run, the same model and rows on every path:

- online: ``dataflows.online_inference`` at its best sustained rate (``bench.online``'s
  open-loop method: every request answered, p99 <= 100 ms);
- batch: ``python -m dataflows.batch_inference`` over the rows on a topic, and in a Parquet file;
- hand-written: the same job without the framework, the fair limit of its overhead:
  confluent-kafka (or pyarrow) reads, orjson and numpy decode, torch forward at the same
  batch size, pyarrow writes the same Parquet output, in one loop;
- raw torch: the forward pass alone over tensors already in memory, the physical limit.

Rates exclude interpreter start and imports and include loading the model, for the
job (its manifest's run time) and the hand-written one alike. MiniLM embeddings run
the same Parquet paths on SciFact titles. The batch size is the model's registry
setting; the sweep of forward-pass rates by batch size that chose it is in the report.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from confluent_kafka import Consumer, TopicPartition

from bench.online import max_sustained, run_patternflow
from bench.report import parse_args, progress, write_report
from models.registry import REGISTRY, Model
from models.tabular import make_data
from operators.kafka import KafkaMessage, TopicSpec, consumer_config, ensure_topics, produce
from patternflow import default_brokers
from scripts import beir

BROKERS = default_brokers()
ROOT = Path(__file__).parent.parent
PARTITIONS = 4


def tabular_rows(n: int) -> tuple[list[str], np.ndarray]:
    x, _ = make_data(n, seed=11)
    return [f"customer-{i}" for i in range(n)], x


def titles(n: int) -> list[str]:
    if beir.SCIFACT.exists():
        found = [doc["title"] for doc in beir.load().corpus.values()]
    else:  # outside the repository's workspace: sentences of the same length
        found = [f"effect {i} of treatment on outcome in a cohort of patients" for i in range(n)]
    return (found * (n // len(found) + 1))[:n]


def write_parquet(path: Path, ids: list[str], inputs: Any) -> None:
    column = inputs if isinstance(inputs, list) else pa.FixedSizeListArray.from_arrays(pa.array(inputs.reshape(-1)), 8)
    pq.write_table(pa.table({"id": ids, "inputs": column}), path, row_group_size=100_000)


def fill_topic(topic: str, ids: list[str], x: np.ndarray) -> None:
    ensure_topics(BROKERS, [TopicSpec(topic, partitions=PARTITIONS)])
    messages = (
        KafkaMessage(orjson.dumps({"inputs": row}), key=i.encode(), topic=topic)
        for i, row in zip(ids, x.tolist(), strict=True)
    )
    produce(BROKERS, messages)


def run_job(workdir: Path, name: str, source: str, model: str) -> float:
    """Rows per second of the batch job (its manifest's run time)."""
    cmd = [sys.executable, "-m", "dataflows.batch_inference", "--job", name, "--input", source, "--model", model]
    cmd += ["--jobs-dir", str(workdir / "jobs")]
    env = {**os.environ, "BATCH_METRICS_PORT": "0"}
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"batch job {name} failed:\n{done.stderr[-3000:]}")
    manifest = orjson.loads((workdir / "jobs" / name / "manifest.json").read_bytes())
    return float(manifest["rows"]["written"] / manifest["runs"][-1]["seconds"])


def timed(job: Callable[[], int]) -> float:
    start = time.perf_counter()
    rows = job()
    return rows / (time.perf_counter() - start)


def in_fresh_process(job: Callable[..., int], *args: Any) -> float:
    """Rows/s of ``job(*args)`` in a new interpreter, model loading (and its imports) included, as
    the batch job pays them."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return float(pool.submit(_timed_call, job, *args).result())


def _timed_call(job: Callable[..., int], *args: Any) -> float:
    return timed(lambda: job(*args))


class OutputTable:
    """The hand-written jobs' output: ids and the model's output columns, one Parquet file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer: pq.ParquetWriter | None = None

    def write(self, ids: list[str], outputs: dict[str, np.ndarray]) -> None:
        columns = [pa.array(ids, pa.string())]
        for values in outputs.values():
            flat = pa.array(values.reshape(-1))
            columns.append(flat if values.ndim == 1 else pa.FixedSizeListArray.from_arrays(flat, values.shape[1]))
        batch = pa.RecordBatch.from_arrays(columns, names=["id", *outputs])
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._path, batch.schema)
        self._writer.write_batch(batch)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def handwritten_topic(topic: str, n: int, model_name: str, out: Path) -> int:
    spec = REGISTRY[model_name]
    model = spec.load()
    consumer = Consumer(consumer_config(BROKERS, {}))
    ends = {}
    for p in range(PARTITIONS):
        _, ends[p] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    table, left, rows = OutputTable(out), {p for p, end in ends.items() if end}, 0
    while left:
        msgs: list[Any] = consumer.consume(spec.batch_size, 1.0)
        ids, inputs = [], []
        for msg in msgs:
            if msg.error() is not None:
                continue
            ids.append(msg.key().decode())
            inputs.append(orjson.loads(msg.value())["inputs"])
            if msg.offset() + 1 >= ends[msg.partition()]:
                left.discard(msg.partition())
        if ids:
            table.write(ids, model.forward(np.asarray(inputs, dtype=np.float32)))
            rows += len(ids)
    table.close()
    consumer.close()
    assert rows == n, f"read {rows} rows, expected {n}"
    return rows


def handwritten_parquet(path: Path, model_name: str, out: Path) -> int:
    spec = REGISTRY[model_name]
    model = spec.load()
    table, rows = OutputTable(out), 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=spec.batch_size, columns=["id", "inputs"]):
        inputs = batch.column("inputs")
        if spec.name == "tabular-risk":
            column: Any = inputs.flatten().to_numpy().astype(np.float32).reshape(-1, 8)
        else:
            column = inputs.to_pylist()
        table.write(batch.column("id").to_pylist(), model.forward(column))
        rows += batch.num_rows
    table.close()
    return rows


def raw_forward(model: Model, column: Any, batch_size: int, repeats: int = 3) -> float:
    """Rows/s of the forward pass alone over a column already in memory (best of ``repeats``)."""
    n = len(column)

    def run() -> int:
        for at in range(0, n, batch_size):
            model.forward(column[at : at + batch_size])
        return n

    return max(timed(run) for _ in range(repeats))


def sweep(model: Model, column: Any, sizes: list[int], repeats: int = 3) -> dict[int, float]:
    return {size: raw_forward(model, column, size, repeats) for size in sizes}


def plot(rates: dict[str, float], cost: dict[str, float]) -> plt.Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(rates)
    left.barh(
        names, [rates[k] for k in names], color=["#d62728" if k.startswith("online") else "#1f77b4" for k in names]
    )
    left.set_xscale("log")
    left.set_xlabel("rows/s (log scale)")
    left.set_title("tabular-risk, one machine, one run")
    for y, k in enumerate(names):
        left.text(rates[k], y, f" {rates[k]:,.0f}", va="center")
    right.bar(list(cost), list(cost.values()), color=["#d62728", "#1f77b4", "#1f77b4"])
    right.set_ylabel("machine-seconds per 1M rows")
    right.set_title("cost of scoring 1M rows")
    for x, v in enumerate(cost.values()):
        right.text(x, v, f"{v:,.1f} s", ha="center", va="bottom")
    fig.tight_layout()
    return fig


def main() -> None:
    args = parse_args(__doc__)
    n = 200_000 if args.quick else 1_000_000
    n_text = 256 if args.quick else 2_000
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # First, while this process is small: a large heap slows the load generator's event loop.
        progress("online serving, open loop")
        online_rates = [1000, 2000, 3000, 4000] if args.quick else [500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000]
        online_rows = asyncio.run(run_patternflow(online_rates, 2.0 if args.quick else 6.0, work))

        ids, x = tabular_rows(n)
        topic = f"bench-batch-{uuid.uuid4().hex[:6]}"
        progress(f"writing {n:,} rows to topic {topic} and to a Parquet file")
        fill_topic(topic, ids, x)
        write_parquet(work / "rows.parquet", ids, x)
        text = titles(n_text)
        write_parquet(work / "titles.parquet", [f"doc-{i}" for i in range(n_text)], text)

        progress("hand-written jobs")
        rates: dict[str, float] = {"online (best sustained)": max_sustained(online_rows)}
        rates["hand-written (topic)"] = in_fresh_process(
            handwritten_topic, topic, n, "tabular-risk", work / "hw.parquet"
        )
        rates["hand-written (Parquet)"] = in_fresh_process(
            handwritten_parquet, work / "rows.parquet", "tabular-risk", work / "hw2.parquet"
        )
        minilm_hand = in_fresh_process(
            handwritten_parquet, work / "titles.parquet", "minilm-embeddings", work / "hw3.parquet"
        )
        progress("batch jobs")
        rates["batch job (topic)"] = run_job(work, "topic", f"kafka:{topic}", "tabular-risk")
        rates["batch job (Parquet)"] = run_job(work, "parquet", str(work / "rows.parquet"), "tabular-risk")
        minilm_batch = run_job(work, "titles", str(work / "titles.parquet"), "minilm-embeddings")

        progress("forward pass alone, by batch size")
        tabular = REGISTRY["tabular-risk"].load()
        minilm = REGISTRY["minilm-embeddings"].load()
        tabular_sweep = sweep(tabular, x, [256, 1024, 4096, 16384])
        minilm_sweep = sweep(minilm, text[:128], [16, 32, 64, 128], repeats=1)
        rates["raw torch"] = raw_forward(tabular, x, REGISTRY["tabular-risk"].batch_size)
        minilm_raw = raw_forward(minilm, text, REGISTRY["minilm-embeddings"].batch_size, repeats=1)

    online = rates["online (best sustained)"]
    result = {
        "batch_rows_per_s": round(rates["batch job (topic)"]),
        "batch_parquet_rows_per_s": round(rates["batch job (Parquet)"]),
        "online_rows_per_s": round(online),
        "handwritten_rows_per_s": round(rates["hand-written (topic)"]),
        "handwritten_parquet_rows_per_s": round(rates["hand-written (Parquet)"]),
        "raw_torch_rows_per_s": round(rates["raw torch"]),
        "batch_vs_online": round(rates["batch job (topic)"] / online, 1) if online else None,
        "batch_vs_handwritten": round(rates["batch job (topic)"] / rates["hand-written (topic)"], 2),
        "parquet_vs_handwritten": round(rates["batch job (Parquet)"] / rates["hand-written (Parquet)"], 2),
        "minilm_batch_parquet_rows_per_s": round(minilm_batch, 1),
        "minilm_handwritten_parquet_rows_per_s": round(minilm_hand, 1),
        "minilm_raw_torch_rows_per_s": round(minilm_raw, 1),
        "minilm_parquet_vs_handwritten": round(minilm_batch / minilm_hand, 2),
    }
    cost = {
        "online": 1e6 / online if online else 0.0,
        "batch job (topic)": 1e6 / rates["batch job (topic)"],
        "batch job (Parquet)": 1e6 / rates["batch job (Parquet)"],
    }
    tables = [
        "| model | batch size | forward rows/s |",
        "| --- | --- | --- |",
        *(f"| tabular-risk | {size} | {rate:,.0f} |" for size, rate in tabular_sweep.items()),
        *(f"| minilm-embeddings | {size} | {rate:,.0f} |" for size, rate in minilm_sweep.items()),
        "",
        "| online offered/s | achieved/s | p50 ms | p99 ms | failed |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {r['rate']:.0f} | {r['achieved_rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['failed']:.0f} |"
            for r in online_rows
        ),
        "",
    ]
    notes = [
        f"{n:,} tabular rows ({PARTITIONS} partitions), {n_text:,} SciFact titles for MiniLM; "
        f"batch jobs with their defaults (2 workers, the registry's batch sizes); torch threads "
        f"{torch.get_num_threads()}; device {'cuda' if torch.cuda.is_available() else 'cpu'}.",
        "",
    ]
    write_report(
        "batch",
        "Batch inference: the batch job vs online serving, a hand-written job and raw torch",
        plot(rates, cost),
        notes,
        result,
        quick=args.quick,
        tables=tuple(tables),
    )


if __name__ == "__main__":
    main()
