"""Our Kafka source and sink against raw confluent-kafka on the same topic and message size.

Each side runs inside a real Bytewax dataflow (``run_main``) and is compared with
a plain confluent-kafka loop with the same producer settings, in the same run.
"""

from __future__ import annotations

import os
import time
import uuid

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from confluent_kafka import Consumer, Producer, TopicPartition

from bench.report import parse_args, progress, write_report
from operators.kafka import KafkaMessage, KafkaSink, KafkaSource, TopicSpec, ensure_topics, kafka_output

BROKERS = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
PRODUCER = {"bootstrap.servers": BROKERS, "partitioner": "murmur2_random", "linger.ms": 2, "enable.idempotence": True}


def messages(topic: str, n: int, size: int) -> list[KafkaMessage]:
    payload = b"x" * size
    return [KafkaMessage(payload, key=str(i % 1024).encode(), topic=topic) for i in range(n)]


def warm_up(topic: str) -> None:
    """The first idempotent producer waits for the broker's coordinator; keep that out of the timings."""
    producer = Producer(PRODUCER)
    producer.produce(topic, b"warm-up")
    assert producer.flush(60) == 0


def raw_produce(msgs: list[KafkaMessage]) -> float:
    producer = Producer(PRODUCER)
    start = time.perf_counter()
    for msg in msgs:
        while True:
            try:
                producer.produce(msg.topic, msg.value, key=msg.key)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0
    return len(msgs) / (time.perf_counter() - start)


def sink_produce(msgs: list[KafkaMessage]) -> float:
    flow = Dataflow("bench_sink")
    kafka_output("out", op.input("in", flow, TestingSource(msgs, batch_size=1000)), KafkaSink(BROKERS, parts=1))
    start = time.perf_counter()
    run_main(flow)
    return len(msgs) / (time.perf_counter() - start)


def raw_consume(topic: str, partitions: int, n: int) -> float:
    consumer = Consumer({"bootstrap.servers": BROKERS, "group.id": "bench", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    start, seen = time.perf_counter(), 0
    while seen < n:
        # A consumer reads the payload; the source does that and builds a message per record.
        seen += sum(1 for m in consumer.consume(1000, 1.0) if not m.error() and m.value() is not None)
    rate = n / (time.perf_counter() - start)
    consumer.close()
    return rate


def source_consume(topic: str, n: int) -> float:
    flow = Dataflow("bench_source")
    seen: list[int] = []
    msgs = op.input("in", flow, KafkaSource(BROKERS, [topic], bounded=True))
    counts = op.flat_map_batch("count", msgs, lambda batch: [("all", len(batch))])
    op.output("total", op.reduce_final("sum", counts, lambda a, b: a + b), TestingSink(seen))
    start = time.perf_counter()
    run_main(flow)
    rate = n / (time.perf_counter() - start)
    assert seen == [("all", n)], seen
    return rate


def main() -> None:
    args = parse_args(__doc__)
    n, size, partitions = (100_000 if args.quick else 500_000), 256, 3
    raw_topic, ours_topic = f"bench-raw-{uuid.uuid4().hex[:6]}", f"bench-ours-{uuid.uuid4().hex[:6]}"
    ensure_topics(BROKERS, [TopicSpec(t, partitions=partitions, retention_ms=3_600_000) for t in (raw_topic, ours_topic, f"{raw_topic}-warm")])
    progress(f"{n:,} messages of {size} bytes, {partitions} partitions, broker {BROKERS}")
    warm_up(f"{raw_topic}-warm")
    # Alternate the two sides so drift on a shared machine hits both.
    raw_p = raw_produce(messages(raw_topic, n, size))
    progress(f"raw produce: {raw_p:,.0f} msg/s")
    sink_p = sink_produce(messages(ours_topic, n, size))
    progress(f"KafkaSink:   {sink_p:,.0f} msg/s")
    raw_c = raw_consume(raw_topic, partitions, n)
    progress(f"raw consume: {raw_c:,.0f} msg/s")
    source_c = source_consume(ours_topic, n)
    progress(f"KafkaSource: {source_c:,.0f} msg/s")
    result = {
        "source_msgs_per_s": round(source_c),
        "raw_consume_msgs_per_s": round(raw_c),
        "sink_msgs_per_s": round(sink_p),
        "raw_produce_msgs_per_s": round(raw_p),
        "source_vs_raw": round(source_c / raw_c, 2),
        "sink_vs_raw": round(sink_p / raw_p, 2),
        "messages": n,
        "message_bytes": size,
    }
    write_report(
        "kafka_io",
        "Kafka I/O: patternflow vs raw confluent-kafka",
        {"KafkaSource": source_c, "raw consume": raw_c, "KafkaSink": sink_p, "raw produce": raw_p},
        "messages per second",
        [
            f"{n:,} messages of {size} bytes over {partitions} partitions; one Bytewax worker.",
            "Ours runs inside a Bytewax dataflow (run_main); raw is a plain confluent-kafka loop "
            "with the same producer settings (linger.ms=2, idempotence, murmur2 partitioner).",
            "Command: `python -m bench.kafka_io" + (" --quick`" if args.quick else "`"),
        ],
        result,
    )


if __name__ == "__main__":
    main()
