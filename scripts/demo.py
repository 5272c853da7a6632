"""`make demo`: each pattern's dataflow on demo traffic, on the local broker.

1. Streaming: a few minutes of click events for eight users (with malformed and
   late messages mixed in) through ``dataflows.event_counts`` as a bounded replay
   with a recovery directory; prints the per-minute counts, the dead letters and
   the late events, and plots the counts.
2. Online inference: ``dataflows.online_inference`` serving the tabular risk
   model and MiniLM embeddings; a few requests through the Python client, a
   burst of concurrent ones (batch sizes, latency), and a malformed one.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import orjson

from clients.inference import InferenceClient
from common import default_brokers
from dataflows.event_counts import Settings
from dataflows.launch import exited, run_command
from dataflows.online_inference import Settings as OnlineSettings
from operators.kafka import KafkaMessage, ensure_topics, produce, read_topic

BROKERS = default_brokers()
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
    workdir = Path("var/demo") / time.strftime("%Y%m%d-%H%M%S")
    event_counts_demo(workdir)
    online_demo(workdir)


def event_counts_demo(workdir: Path) -> None:
    print("== streaming: dataflows.event_counts", flush=True)
    settings = Settings(input_topic=TOPIC, output_topic="demo.event-counts", allowed_lateness_ms=10_000)
    ensure_topics(BROKERS, settings.topics())
    started_ms = int(time.time() * 1000)
    event_start = started_ms - started_ms % 60_000
    print(f"1/3 producing demo traffic to {TOPIC} ...", flush=True)
    sent = produce(BROKERS, traffic(event_start))
    print(f"    {sent:,} messages", flush=True)

    print("2/3 running dataflows.event_counts (bounded replay of this run's messages) ...", flush=True)
    env = {
        **os.environ,
        "EVENT_COUNTS_INPUT_TOPIC": settings.input_topic,
        "EVENT_COUNTS_OUTPUT_TOPIC": settings.output_topic,
        "EVENT_COUNTS_ALLOWED_LATENESS_MS": str(settings.allowed_lateness_ms),
        "EVENT_COUNTS_START": f"timestamp:{started_ms}",
        "EVENT_COUNTS_BOUNDED": "true",
        "EVENT_COUNTS_STATE_DIR": str(workdir / "state"),
    }
    cmd = run_command("dataflows.event_counts:build()", workdir / "recovery", snapshot_s=5)
    subprocess.run(cmd, env=env, check=True)

    print("3/3 results", flush=True)
    mine = [m for m in read_topic(BROKERS, settings.output_topic) if (m.timestamp_ms or 0) >= started_ms]
    rows = {row["id"]: row for row in (orjson.loads(m.value or b"") for m in mine)}
    if not rows:
        raise SystemExit(f"demo failed: the dataflow wrote no counts to {settings.output_topic}")
    minutes = sorted({row["start_ms"] for row in rows.values()})
    print(f"\n  events per user per minute ({len(rows)} windows, from {settings.output_topic}):")
    print("  " + "user".ljust(10) + "".join(time.strftime("%H:%M", time.gmtime(m / 1000)).rjust(7) for m in minutes))
    grid = {(row["key"], row["start_ms"]): row["count"] for row in rows.values()}
    for user in USERS:
        print("  " + user.ljust(10) + "".join(str(grid.get((user, m), 0)).rjust(7) for m in minutes))

    dead = [m for m in read_topic(BROKERS, settings.dlq_topic) if (m.timestamp_ms or 0) >= started_ms]
    reasons = Counter((m.header("dlq.reason") or b"").decode() for m in dead)
    print(f"\n  {len(dead)} dead letters on {settings.dlq_topic}:")
    for reason, count in reasons.most_common():
        print(f"    {count:5d}  {reason}")
    late = [m for m in read_topic(BROKERS, settings.late_topic) if (m.timestamp_ms or 0) >= started_ms]
    print(f"\n  {len(late)} late events on {settings.late_topic}")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    image = ax.imshow([[grid.get((u, m), 0) for m in minutes] for u in USERS], aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(USERS)), USERS)
    ax.set_xticks(range(len(minutes)), [time.strftime("%H:%M", time.gmtime(m / 1000)) for m in minutes])
    ax.set_title("Events per user per minute (dataflows.event_counts)")
    fig.colorbar(image, ax=ax, label="events")
    fig.tight_layout()
    plot = workdir / "event_counts.png"
    fig.savefig(plot, dpi=110)
    print(f"\n  plot: {plot}\n  metrics were served at http://127.0.0.1:{settings.metrics_port}/metrics while it ran\n")


def online_demo(workdir: Path) -> None:
    print("== online inference: dataflows.online_inference", flush=True)
    settings = OnlineSettings()
    cmd = run_command("dataflows.online_inference:build()", workdir / "online-recovery", snapshot_s=5)
    print("1/3 starting the server (loads and warms up both models) ...", flush=True)
    server = subprocess.Popen(cmd, env={**os.environ, "ONLINE_START": "latest"})
    try:
        # The server creates its topics at start: the client waits for them.
        with InferenceClient(BROKERS, timeout_s=2, wait_for_server_s=300) as client:
            client.wait_until_serving("tabular-risk", [0.0] * 8, timeout_s=300, give_up=lambda: exited(server))
            print("2/3 requests through the Python client:", flush=True)
            for row in ([2.5, 3.0, 1.5, 1.2, 1.0, -1.0, 1.0, 0.0], [-0.5, 0.2, -1.0, -0.3, -0.2, 1.5, 0.0, 1.0]):
                reply = client.predict("tabular-risk", row)
                print(f"    tabular-risk {row} -> {reply['outputs']}")
            texts = [
                "card used abroad twice within an hour",
                "two foreign card payments in one hour",
                "weekly grocery shopping",
            ]
            vectors = [client.predict("minilm-embeddings", t)["outputs"] for t in texts]
            for text, vector in zip(texts[1:], vectors[1:], strict=True):
                cosine = sum(a * b for a, b in zip(vectors[0], vector, strict=True))
                print(f"    minilm-embeddings: cos({texts[0]!r}, {text!r}) = {cosine:.2f}  ({len(vector)} dims)")
            bad = client.predict("tabular-risk", [1, 2, 3])
            print(f"    a malformed request -> {bad['status']}: {bad['error']}")

            print("3/3 a burst of 2,000 concurrent requests:", flush=True)
            start = time.perf_counter()
            futures = [
                client.submit("tabular-risk", [((i * 7 + j) % 11) / 5 - 1 for j in range(8)])[1] for i in range(2_000)
            ]
            replies = [f.result(timeout=30) for f in futures]
            elapsed = time.perf_counter() - start
            statuses = Counter(r["status"] for r in replies)
            sizes = Counter(r.get("batch_size", 0) for r in replies)
            print(f"    {dict(statuses)} in {elapsed:.2f} s ({len(replies) / elapsed:,.0f} requests/s)")
            print(f"    batch sizes: mean {sum(k * v for k, v in sizes.items()) / len(replies):.1f}, max {max(sizes)}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"    dead letters go to {settings.dlq_topic}")
    print(f"    metrics were served at http://127.0.0.1:{settings.metrics_port}/metrics while it ran")


if __name__ == "__main__":
    main()
