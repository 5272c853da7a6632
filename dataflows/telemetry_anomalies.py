"""Telemetry anomaly detection: a river detector per metric series, scored before it learns.

Input, on ``TELEMETRY_INPUT_TOPIC`` (default ``telemetry.metrics``), keyed by
series (so a series stays in order on one partition)::

    {"series": "shuttle-1", "ts_ms": 1767225600000, "values": {"f1": 50, "f2": 21}, "label": 0}

``values`` maps metric names to numbers (the features the detector sees);
``label`` (optional, 0 or 1) is ground truth for evaluation only. Every event
is scored by its series' detector (min-max scaling then HalfSpaceTrees, from
river) and then learned, so each score comes from a model that had not seen the
event: a prequential evaluation. Output, keyed by series:

- ``TELEMETRY_SCORES_TOPIC`` (``telemetry.scores``): every event's
  ``{"series", "ts_ms", "score", "label"}`` (the label only when given);
- ``TELEMETRY_ANOMALIES_TOPIC`` (``telemetry.anomalies``): events scoring at or
  above ``TELEMETRY_THRESHOLD``, with their values.

Events with missing fields, wrong types, non-finite values or timestamps
before the epoch or too far in the future go to ``<input>.dlq`` with the
reason. The detectors recover exactly after a kill -9 (see
:mod:`operators.learning`); a series idle for ``TELEMETRY_SERIES_TTL_S`` is
forgotten. Run::

    python -m bytewax.run "dataflows.telemetry_anomalies:build()" -r var/recovery/telemetry -s 5 -b 0

Evaluate on a labelled stream (river's Shuttle, or any JSONL file in the format
above) with ``python -m scripts.evaluate_anomalies``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import bytewax.operators as op
import orjson
from bytewax.dataflow import Dataflow
from river import anomaly, preprocessing

from operators.dlq import DLQ_SUFFIX, decode_json, to_dlq_message, try_map
from operators.kafka import KafkaMessage, TopicSpec
from operators.kafka.sink import kafka_output
from operators.learning import Learn, ModelSpec, Score, Scored, online_model
from operators.settings import from_env
from operators.setup import Application, DataflowSettings
from patternflow import InvalidMessage, wall_ms

__all__ = ["DETECTOR", "Metric", "Settings", "build", "parse_metric"]

DAY_MS = 86_400_000
MAX_VALUES = 256


@dataclass(frozen=True)
class Settings(DataflowSettings):
    input_topic: str = "telemetry.metrics"
    scores_topic: str = "telemetry.scores"
    anomalies_topic: str = "telemetry.anomalies"
    input_partitions: int = 3
    threshold: float = (
        0.6  # chosen on Shuttle (precision 0.67, recall 0.83); tune yours with scripts.evaluate_anomalies
    )
    bounded: bool = False
    shards: int = 8
    series_ttl_s: int = 7 * 24 * 3600
    max_future_ms: int = DAY_MS
    metrics_port: int = 9104

    def topics(self) -> list[TopicSpec]:
        return [
            TopicSpec(self.input_topic, partitions=self.input_partitions),
            TopicSpec(self.input_topic + DLQ_SUFFIX, retention_ms=-1),
            TopicSpec(self.scores_topic, partitions=self.input_partitions),
            TopicSpec(self.anomalies_topic, partitions=self.input_partitions),
        ]


@dataclass(frozen=True)
class Metric:
    series: str
    ts_ms: int
    values: dict[str, float]
    label: int | None


def parse_metric(doc: object, now_ms: int, max_future_ms: int) -> Metric:
    """A :class:`Metric`, or :class:`InvalidMessage` saying what is wrong."""
    if not isinstance(doc, dict):
        raise InvalidMessage('expected a JSON object {"series", "ts_ms", "values", "label"?}')
    series, ts, values, label = doc.get("series"), doc.get("ts_ms"), doc.get("values"), doc.get("label")
    if not isinstance(series, str) or not 1 <= len(series) <= 200:
        raise InvalidMessage(f"series must be a string of 1 to 200 characters, got {series!r:.100}")
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise InvalidMessage(f"ts_ms must be an integer (epoch ms), got {ts!r:.100}")
    if not 0 <= ts <= now_ms + max_future_ms:
        raise InvalidMessage(f"ts_ms {ts} is before the epoch or more than {max_future_ms} ms in the future")
    if not isinstance(values, dict) or not 1 <= len(values) <= MAX_VALUES:
        raise InvalidMessage(f"values must be an object of 1 to {MAX_VALUES} named numbers, got {values!r:.100}")
    for name, value in values.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise InvalidMessage(f"values[{name!r}] must be a finite number, got {value!r:.100}")
    if label not in (None, 0, 1):
        raise InvalidMessage(f"label must be 0 or 1 when given, got {label!r:.100}")
    return Metric(series, ts, {str(k): float(v) for k, v in values.items()}, None if label is None else int(label))


def _detector() -> Any:
    return preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(seed=42)


DETECTOR = ModelSpec(
    make=_detector,
    score=lambda model, x: model.score_one(x),
    learn=lambda model, x, _: model.learn_one(x),
)


def _prequential(m: Metric) -> list[Score | Learn]:
    """Score the event, then learn it: its score comes from a model that had not seen it."""
    return [Score(m.values, m), Learn(m.values)]


def _outputs(s: Settings, series: str, scored: Scored[Metric]) -> list[KafkaMessage]:
    m, key = scored.item, series.encode()
    doc: dict[str, Any] = {"series": m.series, "ts_ms": m.ts_ms, "score": scored.score}
    if m.label is not None:
        doc["label"] = m.label
    out = [KafkaMessage(orjson.dumps(doc), key=key, topic=s.scores_topic)]
    if scored.score >= s.threshold:
        alert = {"series": m.series, "ts_ms": m.ts_ms, "score": scored.score, "values": m.values}
        out.append(KafkaMessage(orjson.dumps(alert), key=key, topic=s.anomalies_topic))
    return out


def build(settings: Settings | None = None) -> Dataflow:
    s = settings or from_env(Settings, prefix="TELEMETRY_")
    app = Application.start(s, s.topics())

    flow = Dataflow("telemetry_anomalies")
    events = op.input("metrics", flow, app.source([s.input_topic], bounded=s.bounded))
    # KafkaMessage
    decode = decode_json()
    parsed = try_map("parse", events, lambda msg: parse_metric(decode(msg), wall_ms(), s.max_future_ms))
    # Metric; bad events leave on parsed.errs with the reason
    by_series = op.key_on("by_series", parsed.oks, lambda m: m.series)
    commands = op.flat_map_value("prequential", by_series, _prequential)
    # (series, Score | Learn): score each event, then learn it
    scored = online_model(
        "detect", commands, DETECTOR, shards=s.shards, label_of=lambda m: m.label, ttl_ms=s.series_ttl_s * 1000
    )
    # (series, Scored[Metric])
    out = op.flat_map("encode", scored, lambda kv: _outputs(s, *kv))
    dead = op.map("dead", parsed.errs, to_dlq_message)
    # KafkaMessage: scores, anomalies, dead letters
    kafka_output("publish", op.merge("all", out, dead), app.sink(dlq_topic=s.input_topic + DLQ_SUFFIX))
    return flow
