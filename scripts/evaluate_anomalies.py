"""Evaluate ``dataflows.telemetry_anomalies`` on a labelled stream, through the dataflow.

    python -m scripts.evaluate_anomalies                          # river's Shuttle (ODDS): 49,097 events, 7% anomalies
    python -m scripts.evaluate_anomalies --input my-metrics.jsonl # any stream in the documented format, with labels

The events go to fresh topics on the broker (``KAFKA_BOOTSTRAP_SERVERS``), the
dataflow reads them as a bounded replay, and its scores are read back: each
was computed before the detector learned the event, so the ROC-AUC and PR-AUC
printed are prequential. Writes a ROC curve to ``var/eval/<name>.png`` and
prints one JSON line last.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import orjson

from dataflows.launch import run_command
from dataflows.telemetry_anomalies import Settings
from models.quality import pr_auc, roc_auc
from operators.kafka import KafkaMessage, ensure_topics, produce, read_topic
from patternflow import default_brokers

__all__ = ["evaluate", "shuttle"]


def shuttle(limit: int | None) -> Iterator[dict[str, object]]:
    from river import datasets

    start = 1_767_225_600_000
    for i, (x, y) in enumerate(datasets.Shuttle().take(limit) if limit else datasets.Shuttle()):
        yield {"series": "shuttle", "ts_ms": start + i * 1_000, "values": x, "label": int(y)}


def jsonl(path: Path, limit: int | None) -> Iterator[dict[str, object]]:
    with path.open("rb") as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                return
            if line.strip():
                yield orjson.loads(line)


def replay_env(brokers: str, settings: Settings) -> dict[str, str]:
    """The environment of a bounded run of the dataflow on ``settings``' topics, without a metrics server."""
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": brokers,
        "TELEMETRY_INPUT_TOPIC": settings.input_topic,
        "TELEMETRY_SCORES_TOPIC": settings.scores_topic,
        "TELEMETRY_ANOMALIES_TOPIC": settings.anomalies_topic,
        "TELEMETRY_BOUNDED": "true",
        "TELEMETRY_METRICS_PORT": "0",
    }


def evaluate(events: list[dict[str, object]], name: str, brokers: str, workdir: Path) -> dict[str, float | None]:
    prefix = f"eval-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        input_topic=f"{prefix}.metrics", scores_topic=f"{prefix}.scores", anomalies_topic=f"{prefix}.anomalies"
    )
    ensure_topics(brokers, settings.topics())
    produce(
        brokers,
        (KafkaMessage(orjson.dumps(e), key=str(e["series"]).encode(), topic=settings.input_topic) for e in events),
    )
    env = replay_env(brokers, settings)
    start = time.perf_counter()
    subprocess.run(
        run_command("dataflows.telemetry_anomalies:build()", workdir / "recovery", snapshot_s=5), env=env, check=True
    )
    seconds = time.perf_counter() - start
    scored = {}
    for msg in read_topic(brokers, settings.scores_topic):
        doc = orjson.loads(msg.value or b"")
        if "label" in doc:
            scored[(doc["series"], doc["ts_ms"])] = (doc["label"], doc["score"])  # a replayed duplicate is the same
    labels = np.array([label for label, _ in scored.values()])
    scores = np.array([score for _, score in scored.values()])
    dead = len(read_topic(brokers, settings.input_topic + ".dlq"))
    result = {
        "events": len(events),
        "scored": len(scored),
        "anomalies": int(labels.sum()),
        "dead_letters": dead,
        "roc_auc": round(roc_auc(labels, scores), 4),
        "pr_auc": round(pr_auc(labels, scores), 4),
        "threshold": settings.threshold,
        "precision_at_threshold": round(float(labels[scores >= settings.threshold].mean()), 4)
        if (scores >= settings.threshold).any()
        else None,
        "recall_at_threshold": round(float((scores[labels == 1] >= settings.threshold).mean()), 4),
        "seconds": round(seconds, 1),
    }
    _plot(labels, scores, name, result, workdir)
    return result


def _plot(labels: np.ndarray, scores: np.ndarray, name: str, result: dict[str, float | None], workdir: Path) -> None:
    order = np.argsort(-scores, kind="mergesort")
    hits = labels[order] == 1
    tpr = np.concatenate([[0], np.cumsum(hits) / hits.sum()])
    fpr = np.concatenate([[0], np.cumsum(~hits) / (~hits).sum()])
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"HalfSpaceTrees, ROC-AUC {result['roc_auc']:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="#999999", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"Prequential ROC: {name}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path("var/eval")
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=110)
    print(f"ROC curve: {out / f'{name}.png'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, help="a JSONL file of labelled events (default: river's Shuttle)")
    parser.add_argument("--limit", type=int, help="at most this many events")
    args = parser.parse_args()
    events = list(jsonl(args.input, args.limit) if args.input else shuttle(args.limit))
    name = args.input.stem if args.input else "shuttle"
    print(f"evaluating dataflows.telemetry_anomalies on {len(events):,} events from {name} ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = evaluate(events, name, default_brokers(), Path(tmp))
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()
