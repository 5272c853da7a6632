"""Streaming inference: the fraud dataflow against the same pipeline written with Quix Streams.

One machine, one broker, one run; the same seeded traffic (``scripts.fraud_traffic``), the
same topics (fresh ones per system and phase), the same code for every computation
(``bench.quix_fraud`` imports the dataflow's parsing, features, models and decision), one
process per system:

- throughput: the system runs, warmed up on a few payments, then the traffic (payments and
  chargebacks) is produced at once; events/s is the payments decided over the time from the
  first of their decisions to the last;
- latency: the system runs, then the traffic is produced at a fixed average rate (below both
  systems' measured limits, the same for both), each message at its event time compressed, so
  bursts stay bursts; a payment's latency is its decision's Kafka timestamp (stamped by the
  broker on append) minus its own (stamped by the producer; one machine, one clock).

Both phases check that every payment got exactly one decision and report how many decisions
knew the merchant, so a broken join cannot pass for speed. ``prequential_auc`` is the
dataflow's ROC-AUC over the outcomes of the latency run. Quix Streams pins an older
confluent-kafka than the platform, so it runs in its own environment, made on first use
under ``~/.cache/patternflow/quix-venv`` (it reuses the platform's torch and river).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import orjson
from confluent_kafka import Consumer, TopicPartition

from bench.report import parse_args, progress, write_report
from dataflows.fraud_detection import Settings
from dataflows.launch import exited, run_command
from models.quality import pr_auc, roc_auc
from operators.kafka import (
    KafkaMessage,
    TopicSpec,
    consumer_config,
    ensure_topics,
    produce,
    read_topic,
)
from patternflow import default_brokers
from scripts.fraud_traffic import Traffic, event_messages, generate, paced, table_messages, warm_up

BROKERS = default_brokers()
ROOT = Path(__file__).parent.parent
QUIX_VERSION = "3.28.1"
QUIX_ENV = Path.home() / ".cache" / "patternflow" / "quix-venv"
LABEL_WINDOW_MS = 15 * 60_000  # the traffic's chargebacks come within 10 minutes of event time
# Allowed lateness: a backlog read at full speed reorders minutes of event time (keyed steps emit
# a poll grouped by shard); paced traffic needs the dataflow's default. It also delays learning.
LATENESS_MS = {"throughput": 3_600_000, "latency": 60_000}
OFFERED_RATE = 500  # messages/s in the latency runs


WARM_UP = warm_up()


def quix_python() -> Path:
    """The Quix Streams environment's interpreter, made on first use: its own confluent-kafka,
    the platform's environment (torch, river, numpy) behind it on the path."""
    python = QUIX_ENV / "bin" / "python"
    if not python.exists():
        progress(f"making the Quix Streams {QUIX_VERSION} environment in {QUIX_ENV} (once) ...")
        subprocess.run([sys.executable, "-m", "venv", str(QUIX_ENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"quixstreams=={QUIX_VERSION}"], check=True)
        where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        site = subprocess.run([str(python), "-c", where], check=True, capture_output=True, text=True).stdout
        # Read after its own packages: a .pth file's paths go to the end of sys.path.
        (Path(site.strip()) / "zz-patternflow.pth").write_text(
            os.path.realpath(sysconfig.get_paths()["purelib"]) + "\n"
        )
    return python


def fresh_settings(system: str, phase: str) -> Settings:
    prefix = f"b{system[0]}{phase[0]}{uuid.uuid4().hex[:6]}"  # short: Quix derives long topic names
    s = Settings(
        payments_topic=f"{prefix}.payments",
        chargebacks_topic=f"{prefix}.chargebacks",
        merchants_topic=f"{prefix}.merchants",
        decisions_topic=f"{prefix}.decisions",
        outcomes_topic=f"{prefix}.outcomes",
        late_topic=f"{prefix}.late",
        label_window_ms=LABEL_WINDOW_MS,
        allowed_lateness_ms=LATENESS_MS[phase],
    )
    # Decisions are stamped by the broker as it appends them: Quix Streams stamps its output
    # with the event time, so the producer's stamp would not say when a decision was made.
    append_time = {"message.timestamp.type": "LogAppendTime"}
    ensure_topics(BROKERS, [TopicSpec(s.decisions_topic, partitions=s.partitions, config=append_time)])
    ensure_topics(BROKERS, s.topics())
    return s


def start(system: str, s: Settings, workdir: Path) -> subprocess.Popen[bytes]:
    state = workdir / f"{system}-{s.payments_topic}"
    if system == "patternflow":
        env = {f"FRAUD_{name.upper()}": str(value) for name, value in s.__dict__.items() if name != "start"}
        env |= {"FRAUD_STATE_DIR": str(state), "FRAUD_METRICS_PORT": "0"}
        cmd = run_command("dataflows.fraud_detection:build()", state.with_suffix(".recovery"), snapshot_s=5)
        return subprocess.Popen(cmd, env={**os.environ, **env}, cwd=ROOT)
    env = {
        "QUIX_BROKERS": BROKERS,
        "QUIX_GROUP": f"{s.payments_topic}.quix",
        "QUIX_STATE_DIR": str(state),
        "QUIX_PAYMENTS_TOPIC": s.payments_topic,
        "QUIX_CHARGEBACKS_TOPIC": s.chargebacks_topic,
        "QUIX_MERCHANTS_TOPIC": s.merchants_topic,
        "QUIX_DECISIONS_TOPIC": s.decisions_topic,
        "QUIX_LABEL_WINDOW_MS": str(s.label_window_ms),
        "QUIX_ALLOWED_LATENESS_MS": str(s.allowed_lateness_ms),
        "QUIX_MODEL_SHARDS": str(s.model_shards),
        "QUIX_THRESHOLD": str(s.threshold),
    }
    return subprocess.Popen([str(quix_python()), "-m", "bench.quix_fraud"], env={**os.environ, **env}, cwd=ROOT)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def decisions(s: Settings) -> dict[str, tuple[int, dict[str, Any]]]:
    """Each payment's decision with its Kafka timestamp; a payment decided twice is an error."""
    out: dict[str, tuple[int, dict[str, Any]]] = {}
    for m in read_topic(BROKERS, s.decisions_topic, timeout_s=300):
        d = orjson.loads(m.value or b"{}")
        if d["payment_id"] in out:
            raise RuntimeError(f"{s.decisions_topic}: payment {d['payment_id']} decided twice")
        out[d["payment_id"]] = (m.timestamp_ms or 0, d)
    return out


def wait_decided(s: Settings, n: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until ``n`` decisions are on the topic (counted from its offsets, to load the machine little)."""
    consumer = Consumer(consumer_config(BROKERS))
    parts = [TopicPartition(s.decisions_topic, p) for p in range(s.partitions)]
    deadline = time.monotonic() + timeout_s
    try:
        while (done := sum(consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in parts)) < n:
            if why := exited(process):
                raise RuntimeError(f"{s.payments_topic}: the system stopped: {why}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{s.payments_topic}: {done:,} of {n:,} payments decided after {timeout_s:.0f} s")
            progress(f"  {done:,}/{n:,} decided")
            time.sleep(2)
    finally:
        consumer.close()


def events(s: Settings, traffic: Traffic) -> list[tuple[int, KafkaMessage]]:
    return event_messages(traffic, payments=s.payments_topic, chargebacks=s.chargebacks_topic)


@contextmanager
def running(system: str, s: Settings, traffic: Traffic, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The system started on the merchant table and warmed up: its first payments decided."""
    produce(BROKERS, table_messages(traffic, s.merchants_topic))
    process = start(system, s, workdir)
    try:
        produce(BROKERS, [m for _, m in events(s, WARM_UP)])
        wait_decided(s, len(WARM_UP.payments), process, timeout_s=300)
        yield process
    finally:
        stop(process)


def throughput(system: str, traffic: Traffic, workdir: Path) -> dict[str, Any]:
    s = fresh_settings(system, "throughput")
    with running(system, s, traffic, workdir) as process:
        progress(f"{system}: throughput: {len(traffic.payments):,} payments produced at once ...")
        produce(BROKERS, [m for _, m in events(s, traffic)])
        wait_decided(s, len(WARM_UP.payments) + len(traffic.payments), process, timeout_s=1800)
    by_id = decisions(s)
    decided = [by_id[p["payment_id"]] for p in traffic.payments]
    times = sorted(t for t, _ in decided)
    result = {
        "events_per_s": round(len(decided) / max(0.001, (times[-1] - times[0]) / 1000)),
        "merchant_known": round(sum(d["complete"]["merchant"] for _, d in decided) / len(decided), 4),
        "settings": s,
    }
    progress(f"{system}: {result['events_per_s']:,} payments/s, merchant known for {result['merchant_known']:.1%}")
    return result


def latency(system: str, traffic: Traffic, rate: int, workdir: Path) -> dict[str, Any]:
    """Payments and chargebacks produced at ``rate`` messages/s on average, each at its event time
    compressed (``scripts.fraud_traffic.paced``: bursts included), the system already running."""
    s = fresh_settings(system, "latency")
    timed = events(s, traffic)
    with running(system, s, traffic, workdir) as process:
        progress(f"{system}: latency at {rate:,} messages/s offered for {len(timed) / rate:.0f} s ...")
        produce(BROKERS, paced(timed, len(timed) / rate))
        wait_decided(s, len(WARM_UP.payments) + len(traffic.payments), process, timeout_s=300)
    produced = {
        orjson.loads(m.value or b"{}")["payment_id"]: m.timestamp_ms or 0 for m in read_topic(BROKERS, s.payments_topic)
    }
    decided = decisions(s)
    lat = np.array([decided[p["payment_id"]][0] - produced[p["payment_id"]] for p in traffic.payments])
    result = {
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "latencies": lat,
        "settings": s,
    }
    progress(f"{system}: p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms")
    return result


def prequential_auc(s: Settings) -> tuple[float, float]:
    outcomes = [orjson.loads(m.value or b"{}") for m in read_topic(BROKERS, s.outcomes_topic)]
    labels = np.array([o["label"] for o in outcomes])
    scores = np.array([o["score"] for o in outcomes])
    return roc_auc(labels, scores), pr_auc(labels, scores)


def plot(
    ours: dict[str, Any], quix: dict[str, Any], ours_lat: dict[str, Any], quix_lat: dict[str, Any], rate: int
) -> plt.Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = ["patternflow", "Quix Streams"]
    rates = [ours["events_per_s"], quix["events_per_s"]]
    left.barh(names, rates, color=["#1f77b4", "#aaaaaa"])
    for y, value in enumerate(rates):
        left.text(value, y, f" {value:,.0f}", va="center")
    left.set_xlabel("payments decided per second (backlog)")
    left.set_title("Throughput, the same fraud pipeline")
    for name, lat, color in [(names[0], ours_lat, "#1f77b4"), (names[1], quix_lat, "#888888")]:
        x = np.sort(lat["latencies"])
        right.plot(x, np.arange(1, len(x) + 1) / len(x), label=f"{name} (p99 {lat['p99_ms']:.0f} ms)", color=color)
    right.set_xscale("log")
    right.set_xlabel("produced to decided, ms (log)")
    right.set_ylabel("share of payments")
    right.set_title(f"Decision latency at {rate:,} messages/s offered")
    right.axvline(1000, color="red", linestyle=":", linewidth=1)
    right.legend(loc="lower right")
    fig.tight_layout()
    return fig


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    n, seconds = (5_000, 8) if args.quick else (60_000, 60)
    quix_python()
    workdir = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    try:
        backlog = generate(n, drift_at=1.0)
        ours = throughput("patternflow", backlog, workdir)
        quix = throughput("quix", backlog, workdir)
        # An offered rate both keep up with: the rate aimed at, or half the slower one's limit.
        rate = min(OFFERED_RATE, (min(ours["events_per_s"], quix["events_per_s"]) // 2 // 50) * 50)
        live = generate(rate * seconds, seed=8, drift_at=1.0)
        ours_lat = latency("patternflow", live, rate, workdir)
        quix_lat = latency("quix", live, rate, workdir)
        roc, pr = prequential_auc(ours_lat["settings"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "events_per_s": ours["events_per_s"],
        "quix_events_per_s": quix["events_per_s"],
        "speedup_vs_quix": round(ours["events_per_s"] / quix["events_per_s"], 2),
        "p99_decision_ms": round(ours_lat["p99_ms"]),
        "quix_p99_decision_ms": round(quix_lat["p99_ms"]),
        "prequential_auc": round(roc, 3),
    }
    notes = [
        "The traffic (`scripts.fraud_traffic`, seeded) has no concept drift here: drift is the subject of "
        "`make demo` and `scripts/evaluate_fraud.py`; this is the pipeline's speed and steady-state quality. "
        f"Throughput: {n:,} payments (and their chargebacks) produced at once to a running, warmed-up "
        f"system; latency: {rate * seconds:,} payments and their chargebacks produced at {rate:,} "
        "messages/s. One process per system on the same 2-core machine as the broker.",
        f"Median decision latency: patternflow {ours_lat['p50_ms']:.0f} ms, Quix Streams "
        f"{quix_lat['p50_ms']:.0f} ms. Decisions that knew the merchant: patternflow "
        f"{ours['merchant_known']:.1%}, Quix Streams {quix['merchant_known']:.1%}.",
        f"Prequential quality of the dataflow's river model (the latency run's outcomes topic: payments whose "
        f"label window had closed): ROC-AUC {roc:.3f}, PR-AUC {pr:.3f}. Not from the backlog run, whose allowed "
        "lateness of an hour (needed at full speed) delays learning by as much.",
        "The Quix Streams pipeline is `bench/quix_fraud.py` (its docstring lists how it differs).",
        "",
    ]
    write_report(
        "streaming",
        "Streaming fraud detection: patternflow vs Quix Streams",
        plot(ours, quix, ours_lat, quix_lat, rate),
        notes,
        result,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
