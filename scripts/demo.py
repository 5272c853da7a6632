"""`make demo`: demo traffic through the event-count dataflow on the local broker.

Produces a few minutes of click events for eight users (with malformed and late
messages mixed in), runs ``dataflows.event_counts`` on them as a bounded replay
with a recovery directory, then prints the per-minute counts, the dead letters
and the late events it wrote, and plots the counts.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import orjson

from dataflows.event_counts import LATE_SUFFIX, Settings
from operators.dlq import DLQ_SUFFIX
from operators.kafka import KafkaMessage, ensure_topics, produce, read_topic

BROKERS = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
TOPIC = "demo.events"
USERS = [f"user-{i}" for i in range(8)]


def traffic(start_ms: int, n: int = 20_000) -> list[KafkaMessage]:
    rng = random.Random(42)
    msgs = []
    for i in range(n):
        user = rng.choice(USERS)
        ts = start_ms + i * 15  # five minutes of event time
        if i % 400 == 399:
            ts -= 120_000  # two minutes late: its window has closed
        msgs.append(KafkaMessage(orjson.dumps({"key": user, "ts_ms": ts}), key=user.encode(), topic=TOPIC))
        if i % 500 == 0:
            msgs.append(KafkaMessage(b'{"key": "user-1", "ts_ms": "soon"}', topic=TOPIC))
        if i % 1000 == 0:
            msgs.append(KafkaMessage(b"not json at all", topic=TOPIC))
    return msgs


def main() -> None:
    run = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path("var/demo") / run
    settings = Settings(input_topic=TOPIC, output_topic="demo.event-counts", allowed_lateness_ms=10_000)
    ensure_topics(BROKERS, settings.topics())
    started_ms = int(time.time() * 1000)
    event_start = started_ms - started_ms % 60_000
    print(f"1/3 producing demo traffic to {TOPIC} ...", flush=True)
    sent = produce(BROKERS, traffic(event_start))
    print(f"    {sent:,} messages", flush=True)

    print("2/3 running dataflows.event_counts (bounded replay of this run's messages) ...", flush=True)
    (workdir / "recovery").mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(workdir / "recovery"), "1"], check=True)
    env = {
        **os.environ,
        "EVENT_COUNTS_INPUT_TOPIC": settings.input_topic,
        "EVENT_COUNTS_OUTPUT_TOPIC": settings.output_topic,
        "EVENT_COUNTS_ALLOWED_LATENESS_MS": str(settings.allowed_lateness_ms),
        "EVENT_COUNTS_START": f"timestamp:{started_ms}",
        "EVENT_COUNTS_BOUNDED": "true",
        "EVENT_COUNTS_STATE_DIR": str(workdir / "state"),
    }
    cmd = [sys.executable, "-m", "bytewax.run", "dataflows.event_counts:build()"]
    subprocess.run([*cmd, "-r", str(workdir / "recovery"), "-s", "5", "-b", "0"], env=env, check=True)

    print("3/3 results", flush=True)
    mine = [m for m in read_topic(BROKERS, settings.output_topic) if (m.timestamp_ms or 0) >= started_ms]
    rows = {row["id"]: row for row in (orjson.loads(m.value or b"") for m in mine)}
    minutes = sorted({row["start_ms"] for row in rows.values()})
    print(f"\n  events per user per minute ({len(rows)} windows, from {settings.output_topic}):")
    print("  " + "user".ljust(10) + "".join(time.strftime("%H:%M", time.gmtime(m / 1000)).rjust(7) for m in minutes))
    grid = {(row["key"], row["start_ms"]): row["count"] for row in rows.values()}
    for user in USERS:
        print("  " + user.ljust(10) + "".join(str(grid.get((user, m), 0)).rjust(7) for m in minutes))

    dead = [m for m in read_topic(BROKERS, TOPIC + DLQ_SUFFIX) if (m.timestamp_ms or 0) >= started_ms]
    reasons = Counter((m.header("dlq.reason") or b"").decode() for m in dead)
    print(f"\n  {len(dead)} dead letters on {TOPIC + DLQ_SUFFIX}:")
    for reason, count in reasons.most_common():
        print(f"    {count:5d}  {reason}")
    late = [m for m in read_topic(BROKERS, TOPIC + LATE_SUFFIX) if (m.timestamp_ms or 0) >= started_ms]
    print(f"\n  {len(late)} late events on {TOPIC + LATE_SUFFIX}")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    image = ax.imshow([[grid.get((u, m), 0) for m in minutes] for u in USERS], aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(USERS)), USERS)
    ax.set_xticks(range(len(minutes)), [time.strftime("%H:%M", time.gmtime(m / 1000)) for m in minutes])
    ax.set_title("Events per user per minute (dataflows.event_counts)")
    fig.colorbar(image, ax=ax, label="events")
    fig.tight_layout()
    plot = workdir / "event_counts.png"
    fig.savefig(plot, dpi=110)
    print(f"\n  plot: {plot}\n  metrics were served at http://127.0.0.1:{settings.metrics_port}/metrics while it ran")


if __name__ == "__main__":
    main()
