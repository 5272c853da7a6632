"""KafkaSource and KafkaSink against the real broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka.admin import AdminClient

from operators.kafka import (
    KafkaBatch,
    KafkaDeliveryError,
    KafkaMessage,
    KafkaSourceError,
    Position,
    TopicCache,
    TopicInfo,
    TopicSpec,
    ensure_topics,
    partition_count,
    produce,
    read_topic,
)
from operators.kafka.sink import KafkaSink, _Failure, classify, kafka_output
from operators.kafka.source import KafkaBatchSource, KafkaSource
from tests.support.processes import wait_for


def read_with(source: KafkaSource) -> list[KafkaMessage]:
    flow = Dataflow("read")
    out: list[KafkaMessage] = []
    op.output("out", op.input("in", flow, source), TestingSink(out))
    run_main(flow)
    return out


def fill(brokers: str, topic: str, n: int, partitions: int = 2) -> None:
    ensure_topics(brokers, [TopicSpec(topic, partitions=partitions)])
    produce(brokers, (KafkaMessage(str(i).encode(), key=f"k{i % 5}".encode(), topic=topic) for i in range(n)))


def test_start_positions_per_partition(brokers: str, topic: str) -> None:
    fill(brokers, topic, 100, partitions=1)

    def values(start: Position | dict[int, Position]) -> list[int]:
        return [int(m.value or b"") for m in read_with(KafkaSource(brokers, [topic], start=start, bounded=True))]

    assert values(Position.earliest()) == list(range(100))
    assert values(Position.latest()) == []
    assert values(Position.offset(90)) == list(range(90, 100))
    assert values({0: Position.offset(95)}) == list(range(95, 100))


def test_a_timestamp_start_finds_the_first_message_at_or_after_it_mid_topic(brokers: str, topic: str) -> None:
    ensure_topics(brokers, [TopicSpec(topic, partitions=2)])
    base = 1_767_225_600_000
    produce(
        brokers,
        [KafkaMessage(str(i).encode(), topic=topic, partition=i % 2, timestamp_ms=base + 10 * i) for i in range(100)],
    )
    got = read_with(KafkaSource(brokers, [topic], start=Position.timestamp(base + 505), bounded=True))
    assert sorted(int(m.value or b"") for m in got) == list(range(51, 100))
    assert all(m.timestamp_ms == base + 10 * int(m.value or b"") for m in got)
    assert read_with(KafkaSource(brokers, [topic], start=Position.timestamp(base + 10_000), bounded=True)) == []


def test_the_batch_source_reads_what_the_record_source_reads_as_columns(brokers: str, topic: str) -> None:
    ensure_topics(brokers, [TopicSpec(topic, partitions=3)])
    headers = (("h", b"1"),)
    produce(
        brokers,
        [
            KafkaMessage(str(i).encode(), key=f"k{i % 7}".encode(), headers=headers if i % 2 else (), topic=topic)
            for i in range(3_000)
        ],
    )
    one_by_one = read_with(KafkaSource(brokers, [topic], bounded=True, batch_size=100))
    flow = Dataflow("read_batches")
    batches: list[KafkaBatch] = []
    op.output(
        "out",
        op.input("in", flow, KafkaBatchSource(brokers, [topic], bounded=True, batch_size=100)),
        TestingSink(batches),
    )
    run_main(flow)
    assert all(isinstance(b, KafkaBatch) and 0 < len(b) <= 100 for b in batches)
    assert sorted(m for b in batches for m in b) == sorted(one_by_one)
    assert len(one_by_one) == 3_000
    for batch in batches:  # columns line up with the messages, in offset order within a partition
        assert batch.offsets == sorted(batch.offsets)
        assert [m.value for m in batch] == batch.values and [m.headers for m in batch] == batch.headers
        assert list(batch[1:3]) == [batch[1], batch[2]]


def test_bounded_read_stops_at_the_end_fixed_at_start_while_producers_write(brokers: str, topic: str) -> None:
    fill(brokers, topic, 1_000, partitions=1)
    stop = threading.Event()

    def keep_writing() -> None:
        while not stop.is_set():
            produce(brokers, [KafkaMessage(b"late", topic=topic)])

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        wait_for(lambda: len(read_topic(brokers, topic)) > 1_000, "the writer's first messages")
        source = KafkaSource(brokers, [topic], bounded=True)
        part = source.build_part("test", source.list_parts()[0], None)
        end = part.snapshot().end_offset
        got: list[KafkaMessage] = []
        with pytest.raises(StopIteration):
            while True:
                got.extend(part.next_batch())
                time.sleep(0.01)  # let the writer get ahead
        part.close()
    finally:
        stop.set()
        writer.join()
    assert end is not None and end >= 1_000
    assert [m.offset for m in got] == list(range(end))


def test_resumed_bounded_read_keeps_its_original_end(brokers: str, topic: str) -> None:
    fill(brokers, topic, 50, partitions=1)
    source = KafkaSource(brokers, [topic], bounded=True, batch_size=10)
    part = source.build_part("test", source.list_parts()[0], None)
    first: list[KafkaMessage] = []
    while len(first) < 20:
        first.extend(part.next_batch())
    state = part.snapshot()
    part.close()
    fill(brokers, topic, 50, partitions=1)  # written after the first run started
    resumed = source.build_part("test", source.list_parts()[0], state)
    rest = []
    with pytest.raises(StopIteration):
        while True:
            rest.extend(resumed.next_batch())
    resumed.close()
    assert [m.offset for m in first + rest] == list(range(50))


def test_sink_keeps_headers_and_partitions_by_key_like_java_clients(brokers: str, topic: str) -> None:
    ensure_topics(brokers, [TopicSpec(topic, partitions=4)])
    msgs = [
        KafkaMessage(f"v{i}".encode(), key=f"key-{i % 7}".encode(), headers=(("h", str(i).encode()),), topic=topic)
        for i in range(200)
    ]
    flow = Dataflow("write")
    kafka_output("out", op.input("in", flow, TestingSource(msgs)), KafkaSink(brokers))
    run_main(flow)
    got = read_topic(brokers, topic)
    assert sorted(m.value or b"" for m in got) == sorted(m.value or b"" for m in msgs)
    partitions_of_key: dict[bytes, set[int]] = {}
    for m in got:
        partitions_of_key.setdefault(m.key, set()).add(m.partition)  # type: ignore[arg-type]
        assert m.header("h") == m.value[1:]  # type: ignore[index]
    assert all(len(p) == 1 for p in partitions_of_key.values())
    # murmur2, as the Java client: "key-0" goes to partition 1 of 4 there too.
    assert partitions_of_key[b"key-0"] == {murmur2_partition(b"key-0", 4)}
    # per key, order is kept
    for key in partitions_of_key:
        assert [m.value for m in got if m.key == key] == [m.value for m in msgs if m.key == key]


def murmur2_partition(key: bytes, partitions: int) -> int:
    """Kafka's Java DefaultPartitioner: murmur2(key) & 0x7fffffff % partitions."""
    m, r, seed = 0x5BD1E995, 24, 0x9747B28C
    length = len(key)
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(key[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = key[length - length % 4 :]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


def delivery_error(flow: Dataflow) -> KafkaDeliveryError:
    with pytest.raises(Exception) as info:
        run_main(flow)
    causes = []
    exc: BaseException | None = info.value
    while exc is not None:
        causes.append(exc)
        exc = exc.__cause__
    (delivery,) = [c for c in causes if isinstance(c, KafkaDeliveryError)]
    return delivery


def test_messages_at_fault_become_dead_letters_and_the_rest_is_delivered(brokers: str, topic: str) -> None:
    small = f"{topic}-small"
    ensure_topics(brokers, [TopicSpec(topic, partitions=2), TopicSpec(small, config={"max.message.bytes": "1000"})])
    bad = {
        b"no-partition": KafkaMessage(b"x", key=b"no-partition", topic=topic, partition=7),
        b"no-topic": KafkaMessage(b"x", key=b"no-topic", topic=f"{topic}-missing"),  # topics are not auto-created
        b"bad-name": KafkaMessage(b"x", key=b"bad-name", topic="no spaces allowed!"),
        b"over-topic-limit": KafkaMessage(b"x" * 5_000, key=b"over-topic-limit", topic=small),
        b"over-client-limit": KafkaMessage(b"x" * 2_000_000, key=b"over-client-limit", topic=topic),
        b"negative": KafkaMessage(b"x", key=b"negative", topic=topic, partition=-5),
    }
    good = [KafkaMessage(str(i).encode(), key=f"k{i}".encode(), topic=topic) for i in range(100)]
    flow = Dataflow("dead_letters")
    sink = KafkaSink(brokers, dlq_topic=f"{topic}.dlq")
    ensure_topics(brokers, [TopicSpec(f"{topic}.dlq")])
    kafka_output("out", op.input("in", flow, TestingSource([*good[:50], *bad.values(), *good[50:]])), sink)
    run_main(flow)
    assert sorted(m.value or b"" for m in read_topic(brokers, topic)) == sorted(m.value or b"" for m in good)
    dead = {m.key or b"": m for m in read_topic(brokers, f"{topic}.dlq")}
    assert set(dead) == set(bad)
    reasons = {key: (m.header("dlq.reason") or b"").decode() for key, m in dead.items()}
    assert "Unknown partition" in reasons[b"no-partition"]
    assert "UNKNOWN_TOPIC" in reasons[b"no-topic"]
    assert "TOPIC_EXCEPTION" in reasons[b"bad-name"]
    assert "MSG_SIZE_TOO_LARGE" in reasons[b"over-topic-limit"]
    assert "MSG_SIZE_TOO_LARGE" in reasons[b"over-client-limit"]
    for key, msg in dead.items():
        assert msg.header("dlq.target.topic") == (bad[key].topic or "").encode()
        assert msg.header("dlq.step") == b"dead_letters.out.produce"
    assert dead[b"over-client-limit"].header("dlq.truncated") == b"2000000"
    assert dead[b"over-topic-limit"].value == b"x" * 5_000


def test_a_message_at_fault_stops_a_sink_without_a_dead_letter_topic(brokers: str, topic: str) -> None:
    flow = Dataflow("undeliverable")
    msgs = [KafkaMessage(b"x", topic=f"{topic}-missing")]
    kafka_output("out", op.input("in", flow, TestingSource(msgs)), KafkaSink(brokers))
    assert "the sink has no dead-letter topic" in str(delivery_error(flow))


def test_a_broker_unreachable_past_the_outage_limit_stops_the_dataflow(topic: str) -> None:
    flow = Dataflow("unreachable")
    msgs = [KafkaMessage(b"x", topic=topic)]
    sink = KafkaSink("127.0.0.1:1", dlq_topic=f"{topic}.dlq", outage_limit_s=2)
    kafka_output("out", op.input("in", flow, TestingSource(msgs)), sink)
    assert "timed out" in str(delivery_error(flow))


def test_reading_a_missing_topic_says_what_to_do(brokers: str, topic: str) -> None:
    with pytest.raises(KafkaSourceError, match="does not exist"):
        KafkaSource(brokers, [f"{topic}-missing"]).list_parts()


def test_metrics_endpoint_counts_items_errors_and_lag(brokers: str, topic: str) -> None:
    import socket
    import urllib.request

    from operators import metrics
    from operators.dlq import decode_json, try_map

    ensure_topics(brokers, [TopicSpec(topic)])
    produce(brokers, [KafkaMessage(b'{"ok": 1}' if i % 4 else b"{bad", topic=topic) for i in range(40)])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics.serve(port)
    flow = Dataflow("metered")
    msgs = op.input("in", flow, KafkaSource(brokers, [topic], bounded=True))
    out = try_map(f"decode_{topic}", msgs, decode_json())
    op.output("oks", out.oks, TestingSink([]))
    op.output("errs", out.errs, TestingSink([]))
    run_main(flow)

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    step = f"metered.decode_{topic}"
    assert f'patternflow_items_total{{outcome="ok",step="{step}"}} 30.0' in text
    assert f'patternflow_errors_total{{error="InvalidMessage",step="{step}"}} 10.0' in text
    assert f'patternflow_step_seconds_count{{step="{step}"}}' in text
    assert f'patternflow_consumer_lag_messages{{partition="0",step="metered.in",topic="{topic}"}} 0.0' in text


def test_a_topic_declared_twice_is_created_once_or_refused_when_the_specs_differ(brokers: str, topic: str) -> None:
    # One create request naming a topic twice crashed the process inside librdkafka.
    ensure_topics(brokers, [TopicSpec(topic, partitions=2), TopicSpec(topic, partitions=2)])
    assert partition_count(brokers, topic) == 2
    with pytest.raises(ValueError, match="declared twice"):
        ensure_topics(brokers, [TopicSpec(topic + "-x", partitions=2), TopicSpec(topic + "-x", partitions=3)])


def test_the_topic_cache_tells_partitions_and_compaction_and_learns_new_topics(brokers: str, topic: str) -> None:
    ensure_topics(brokers, [TopicSpec(f"{topic}.table", partitions=2, cleanup_policy="compact")])
    cache = TopicCache(brokers, min_miss_refresh_s=0)
    assert cache.describe(f"{topic}.table") == TopicInfo(2, compacted=True)
    assert cache.describe(f"{topic}.log") is None
    ensure_topics(brokers, [TopicSpec(f"{topic}.log", partitions=3)])
    assert cache.describe(f"{topic}.log") == TopicInfo(3, compacted=False)
    assert cache.partitions(f"{topic}.table") == 2


def test_every_produce_error_is_the_messages_the_brokers_or_the_producers() -> None:
    codes = [v for k, v in vars(RdKafkaError).items() if k.isupper() or (k.startswith("_") and isinstance(v, int))]
    faults = {code: classify(RdKafkaError(code)) for code in codes if isinstance(code, int)}
    assert len(faults) > 150 and set(faults.values()) == {"message", "broker", "producer"}
    assert faults[RdKafkaError._UNKNOWN_PARTITION] == faults[RdKafkaError.TOPIC_AUTHORIZATION_FAILED] == "message"
    assert faults[RdKafkaError.CLUSTER_AUTHORIZATION_FAILED] == "message"  # not retriable: no waiting it out
    assert faults[RdKafkaError._MSG_TIMED_OUT] == faults[RdKafkaError.NOT_ENOUGH_REPLICAS] == "broker"
    assert faults[RdKafkaError._DESTROY] == "producer"


def deleting(
    brokers: str, doomed: str, before: list[KafkaMessage], after: list[KafkaMessage]
) -> Iterator[KafkaMessage]:
    """``before``, then ``doomed`` deleted, then ``after``: a source for a sink that wrote to a topic once."""
    yield from before
    time.sleep(0.5)  # the first messages are out and the producer knows the topic
    admin = AdminClient({"bootstrap.servers": brokers})
    for future in admin.delete_topics([doomed], operation_timeout=10).values():
        future.result(timeout=10)
    yield from after


def test_a_topic_deleted_after_it_was_written_once_takes_dead_letters_and_the_flow_goes_on(
    brokers: str, topic: str
) -> None:
    replies, other = f"{topic}.replies", f"{topic}.other"
    ensure_topics(brokers, [TopicSpec(replies, partitions=4), TopicSpec(other), TopicSpec(f"{topic}.dlq")])
    first = [KafkaMessage(b"1", key=f"k{i}".encode(), topic=replies) for i in range(10)]
    second = [KafkaMessage(b"2", key=f"k{i}".encode(), topic=replies, partition=i % 4) for i in range(10)]
    last = [KafkaMessage(b"3", key=f"k{i}".encode(), topic=other) for i in range(10)]
    flow = Dataflow("deleted_reply_topic")
    source = TestingSource(deleting(brokers, replies, first, [*second, *last]))
    kafka_output("out", op.input("in", flow, source), KafkaSink(brokers, dlq_topic=f"{topic}.dlq", outage_limit_s=20))
    run_main(flow, epoch_interval=timedelta(milliseconds=50))
    assert len(read_topic(brokers, other)) == 10
    dead = read_topic(brokers, f"{topic}.dlq")
    assert sorted(m.value or b"" for m in dead) == [b"2"] * 10
    assert all(m.header("dlq.target.topic") == replies.encode() for m in dead)


def test_a_message_timed_out_while_the_broker_answers_is_a_dead_letter_and_with_it_down_it_stops(
    brokers: str, topic: str
) -> None:
    # A destination that never takes a record while the broker answers (a partition without its
    # in-sync replicas) cannot be made on one broker: its timeout report is written in by hand.
    ensure_topics(brokers, [TopicSpec(f"{topic}.dlq")])
    timed_out = RdKafkaError(RdKafkaError._MSG_TIMED_OUT)
    sink = KafkaSink(brokers, dlq_topic=f"{topic}.dlq", outage_limit_s=3)
    part = sink.build_part("stuck", "0", None)
    part._shared.failures.append(_Failure(timed_out, f"{topic}.replies", 0, b"k", b"stuck"))
    part.close()
    (dead,) = read_topic(brokers, f"{topic}.dlq")
    assert dead.value == b"stuck" and b"_MSG_TIMED_OUT" in (dead.header("dlq.reason") or b"")

    down = KafkaSink("127.0.0.1:1", dlq_topic=f"{topic}.dlq", outage_limit_s=3).build_part("down", "0", None)
    down._shared.failures.append(_Failure(timed_out, f"{topic}.replies", 0, b"k", b"lost"))
    with pytest.raises(KafkaDeliveryError, match="within the outage limit"):
        down.snapshot()
    down._shared.release(timeout_s=0)
