"""Keyed event counts in tumbling event-time windows, with state in RocksDB.

Input, on ``EVENT_COUNTS_INPUT_TOPIC`` (default ``events``)::

    {"key": "user-42", "ts_ms": 1767225600000}

Output, on ``EVENT_COUNTS_OUTPUT_TOPIC`` (default ``event-counts``), keyed by the
window id so that a compacted topic keeps one row per window, and a duplicate
after recovery is the same row::

    {"id": "user-42@1767225600000", "key": "user-42", "start_ms": ..., "end_ms": ..., "count": 3}

Events for windows that have already closed go to ``<input>.late``; messages
that are not such JSON go to ``<input>.dlq`` with the reason.

Run (see README for the settings)::

    python -m bytewax.run "dataflows.event_counts:build()" -r var/recovery/event_counts -s 5
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bytewax.operators as op
import orjson
from bytewax.dataflow import Dataflow

from operators.dlq import DLQ_SUFFIX, InvalidMessage, decode_json, to_dlq_message, try_map
from operators.kafka import KafkaMessage, TopicSpec
from operators.kafka.sink import kafka_output
from operators.settings import from_env
from operators.setup import Application, DataflowSettings
from operators.stateful import StateConfig
from operators.windowing import EventClock, Late, TumblingWindower, WindowResult, window
from patternflow import LATEST_MS

LATE_SUFFIX = ".late"


@dataclass(frozen=True)
class Settings(DataflowSettings):
    input_topic: str = "events"
    output_topic: str = "event-counts"
    input_partitions: int = 3
    window_ms: int = 60_000
    allowed_lateness_ms: int = 5_000
    bounded: bool = False
    state_dir: Path = Path("var/state/event_counts")
    state_shards: int = 8
    state_max_pending_writes: int = 100_000
    max_message_bytes: int = 1 << 20
    metrics_port: int = 9100

    def __post_init__(self) -> None:
        if self.window_ms <= 0:
            raise ValueError(f"EVENT_COUNTS_WINDOW_MS must be > 0, got {self.window_ms}")
        if self.allowed_lateness_ms < 0:
            raise ValueError(f"EVENT_COUNTS_ALLOWED_LATENESS_MS must be >= 0, got {self.allowed_lateness_ms}")

    @property
    def dlq_topic(self) -> str:
        return self.input_topic + DLQ_SUFFIX

    @property
    def late_topic(self) -> str:
        return self.input_topic + LATE_SUFFIX

    def topics(self) -> list[TopicSpec]:
        return [
            TopicSpec(self.input_topic, partitions=self.input_partitions),
            TopicSpec(self.dlq_topic, retention_ms=-1),
            TopicSpec(self.late_topic),
            TopicSpec(self.output_topic, partitions=self.input_partitions, cleanup_policy="compact"),
        ]


@dataclass(frozen=True)
class Event:
    key: str
    ts_ms: int
    partition: int  # of the input topic: the windows' watermark is the slowest partition's


def parse_event(max_bytes: int) -> Callable[[KafkaMessage], Event]:
    decode = decode_json(max_bytes)

    def parse(msg: KafkaMessage) -> Event:
        doc = decode(msg)
        if not isinstance(doc, dict):
            raise InvalidMessage(f"expected a JSON object, got {type(doc).__name__}")
        key, ts_ms = doc.get("key"), doc.get("ts_ms")
        if not isinstance(key, str) or not key:
            raise InvalidMessage(f"'key' must be a non-empty string, got {key!r}")
        if not isinstance(ts_ms, int) or isinstance(ts_ms, bool) or not 0 <= ts_ms <= LATEST_MS:
            raise InvalidMessage(f"'ts_ms' must be a non-negative integer (epoch ms) before year 10000, got {ts_ms!r}")
        return Event(key, ts_ms, msg.partition or 0)

    return parse


def count_message(topic: str, result: WindowResult[int]) -> KafkaMessage:
    doc = {
        "id": result.id,
        "key": result.key,
        "start_ms": result.start_ms,
        "end_ms": result.end_ms,
        "count": result.value,
    }
    return KafkaMessage(orjson.dumps(doc), key=result.id.encode(), topic=topic)


def late_message(topic: str, late: Late[Event]) -> KafkaMessage:
    event = late.value
    return KafkaMessage(orjson.dumps({"key": event.key, "ts_ms": event.ts_ms}), key=event.key.encode(), topic=topic)


def build(settings: Settings | None = None) -> Dataflow:
    s = settings or from_env(Settings, prefix="EVENT_COUNTS_")
    app = Application.start(s, s.topics())
    # The watermark waits for every input partition: an event in order within its partition is never late.
    clock: EventClock[Event] = EventClock(
        lambda e: e.ts_ms,
        allowed_lateness_ms=s.allowed_lateness_ms,
        stream_of=lambda e: str(e.partition),
        streams=app.partition_count(s.input_topic),
    )
    state = StateConfig(s.state_dir, shards=s.state_shards, max_pending_writes=s.state_max_pending_writes)

    flow = Dataflow("event_counts")
    msgs = op.input("in", flow, app.source([s.input_topic], bounded=s.bounded))
    # KafkaMessage
    events = try_map("parse", msgs, parse_event(s.max_message_bytes))
    # oks: Event; errs: DeadLetter
    keyed = op.key_on("by_key", events.oks, lambda e: e.key)
    # (key, Event)
    windows = window(
        "count", keyed, clock, TumblingWindower(s.window_ms), init=lambda: 0, fold=lambda n, _: n + 1, state=state
    )
    # down: WindowResult[int]; late: Late[Event]
    counts = op.map("encode", windows.down, lambda result: count_message(s.output_topic, result))
    late = op.map("encode_late", windows.late, lambda item: late_message(s.late_topic, item))
    dead = op.map("encode_dlq", events.errs, to_dlq_message)
    # KafkaMessage, each with its topic
    kafka_output("out", op.merge("all", counts, late, dead), app.sink(dlq_topic=s.dlq_topic))
    return flow
