"""Models and the serving operators without a broker: registry conformance,
micro-batched against per-item inference, the batcher's rules, request parsing."""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import numpy as np
import orjson
import pytest

from models.registry import REGISTRY, Model, ModelSpec
from models.schema import InvalidInput
from operators.dlq import InvalidMessage
from operators.kafka import KafkaMessage, TopicInfo
from operators.protocol import DEFAULT_REPLY_TOPICS, ReplyRules
from operators.serving import Batch, BatchConfig, Reply, Request, _Batcher, infer, parse_request
from tests.support.models import loaded

SAMPLES: dict[str, list[Any]] = {
    "tabular-risk": [[0.1 * i - 0.5 * (j % 3) for j in range(8)] for i in range(20)],
    "minilm-embeddings": [f"transaction {i} flagged for review by rule {i % 4}" for i in range(20)],
}


@pytest.fixture(scope="module", params=sorted(REGISTRY))
def model_of(request: pytest.FixtureRequest) -> tuple[ModelSpec, Model]:
    return REGISTRY[request.param], loaded(request.param)


def close(a: object, b: object, tol: float = 1e-4) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), abs_tol=tol)  # type: ignore[arg-type]
    return a == b


def test_every_model_validates_its_example_and_answers_one_output_per_input(model_of: tuple[ModelSpec, Model]) -> None:
    spec, model = model_of
    assert spec.schema.validate(spec.example) == spec.example
    batch = [spec.schema.validate(x) for x in SAMPLES[spec.name]]
    before = copy.deepcopy(batch)
    outputs = model.predict(batch)
    assert len(outputs) == len(batch)
    assert batch == before, "predict must not change its inputs"
    assert close(model.predict(batch), outputs, 0.0), "the same batch twice gives the same outputs"
    orjson.dumps(outputs)  # replies are JSON


def test_micro_batched_outputs_equal_per_item_outputs(model_of: tuple[ModelSpec, Model]) -> None:
    spec, model = model_of
    batch = [spec.schema.validate(x) for x in SAMPLES[spec.name]]
    one_by_one = [model.predict([x])[0] for x in batch]
    assert close(model.predict(batch), one_by_one)


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("tabular-risk", [1, 2], "list of 8 numbers, got a list of 2"),
        ("tabular-risk", [1.0] * 7 + [float("nan")], "finite numbers"),
        ("tabular-risk", "eight", "got str"),
        ("minilm-embeddings", "", "non-empty string"),
        ("minilm-embeddings", "x" * 2_001, "at most 2000 characters"),
    ],
)
def test_schemas_say_what_they_expected(name: str, bad: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        REGISTRY[name].schema.validate(bad)


def request(i: int, deadline_ms: int | None = None, read_ms: int = 1_000) -> Request:
    return Request(f"c{i}", "replies", None, deadline_ms, "tabular-risk", [0.0] * 8, 900, read_ms, 0)


def test_a_batch_forms_at_max_batch_size() -> None:
    batcher = _Batcher(BatchConfig(max_batch_size=4, max_wait_ms=50, max_queue=100, now_ms=lambda: 1_000))
    out, _ = batcher.on_batch([request(i) for i in range(10)])
    assert [len(b.requests) for b in out if isinstance(b, Batch)] == [4, 4]
    assert batcher.notify_at() is not None  # two wait for more, or for max_wait_ms
    rest, _ = batcher.on_notify()
    assert [len(b.requests) for b in rest if isinstance(b, Batch)] == [2]
    assert batcher.notify_at() is None


def test_with_no_wait_a_batch_is_what_arrived_together() -> None:
    batcher = _Batcher(BatchConfig(max_batch_size=8, max_wait_ms=0, max_queue=100, now_ms=lambda: 1_000))
    out, _ = batcher.on_batch([request(i) for i in range(11)])
    assert [len(b.requests) for b in out if isinstance(b, Batch)] == [8, 3]


def test_expired_requests_are_answered_timeout_without_compute() -> None:
    batcher = _Batcher(BatchConfig(max_batch_size=8, max_wait_ms=0, max_queue=100, now_ms=lambda: 1_000))
    out, _ = batcher.on_batch([request(0, deadline_ms=999), request(1, deadline_ms=1_001), request(2)])
    timeouts = [r.request.correlation_id for r in out if isinstance(r, Reply) and r.status == "timeout"]
    (batch,) = [b for b in out if isinstance(b, Batch)]
    assert timeouts == ["c0"]
    assert [r.correlation_id for r in batch.requests] == ["c1", "c2"]


def test_beyond_its_queue_the_batcher_rejects_at_once() -> None:
    batcher = _Batcher(BatchConfig(max_batch_size=4, max_wait_ms=0, max_queue=6, now_ms=lambda: 1_000))
    out, _ = batcher.on_batch([request(i) for i in range(10)])
    rejected = [r.request.correlation_id for r in out if isinstance(r, Reply) and r.status == "rejected"]
    assert rejected == ["c6", "c7", "c8", "c9"]
    assert sum(len(b.requests) for b in out if isinstance(b, Batch)) == 6


def test_waiting_requests_survive_a_snapshot() -> None:
    config = BatchConfig(max_batch_size=8, max_wait_ms=50, max_queue=100, now_ms=lambda: 1_000)
    batcher = _Batcher(config)
    batcher.on_batch([request(1), request(2)])
    resumed = _Batcher(config, batcher.snapshot())
    out, _ = resumed.on_notify()
    (batch,) = out
    assert isinstance(batch, Batch) and [r.correlation_id for r in batch.requests] == ["c1", "c2"]


def test_a_failing_model_answers_its_batch_with_errors() -> None:
    class Broken:
        def forward(self, column: object) -> dict[str, np.ndarray]:
            raise RuntimeError("CUDA out of memory")

        def predict(self, batch: list[object]) -> list[object]:
            return list(self.forward(batch)["risk"])

    replies = infer({"tabular-risk": Broken()}, Batch("tabular-risk", (request(1), request(2)), 1_000))
    assert [(r.status, r.error) for r in replies] == [("error", "model failed: RuntimeError: CUDA out of memory")] * 2


TOPICS = {
    "r": TopicInfo(4, compacted=False),
    "other.replies": TopicInfo(1, compacted=False),
    "docs.answers": TopicInfo(2, compacted=True),
    "payments": TopicInfo(3, compacted=False),
    "requests": TopicInfo(3, compacted=False),
    "peer.requests.dlq": TopicInfo(1, compacted=False),
}
OWN = frozenset({"requests", "requests.dlq"})
RULES = ReplyRules(TOPICS.get, ("r", *DEFAULT_REPLY_TOPICS), OWN, "TEST_REPLY_TOPICS")


def message(value: bytes | None, *headers: tuple[str, bytes | None]) -> KafkaMessage:
    return KafkaMessage(value, headers=headers, topic="requests", partition=2, offset=7, timestamp_ms=900)


def reply_headers(**overrides: bytes | None) -> tuple[tuple[str, bytes | None], ...]:
    headers: dict[str, bytes | None] = {"correlation_id": b"c", "reply_topic": b"r", **overrides}
    return tuple(headers.items())


GOOD = b'{"model": "tabular-risk", "inputs": [1,2,3,4,5,6,7,8]}'


def test_parse_request() -> None:
    good = message(GOOD, *reply_headers(reply_partition=b"3", deadline_ms=b"5000"))
    parsed = parse_request(good, RULES, lambda: 1_000)
    assert isinstance(parsed, Request)
    assert (parsed.inputs, parsed.partition, parsed.sent_ms, parsed.read_ms) == (
        [1.0, 2, 3, 4, 5, 6, 7, 8],
        2,
        900,
        1_000,
    )
    assert (parsed.reply_topic, parsed.reply_partition, parsed.deadline_ms) == ("r", 3, 5_000)
    for value, reason in [
        (b"{nope", "not JSON"),
        (b'{"model": "gpt-9", "inputs": 1}', "unknown model 'gpt-9'"),
        (b'{"model": "tabular-risk", "inputs": [1]}', "list of 8 numbers"),
        (b'{"inputs": [1]}', '{"model": ..., "inputs": ...}'),
        (None, "not JSON"),
    ]:
        reply = parse_request(message(value, *reply_headers()), RULES)
        assert isinstance(reply, Reply) and reply.status == "error" and reason in (reply.error or "")
        assert reply.request.source is not None  # kept for the dead-letter copy


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ((("reply_topic", b"r"),), "lacks the correlation_id header"),
        ((("correlation_id", b"c"),), "lacks the reply_topic header"),
        (reply_headers(correlation_id=b""), "lacks the correlation_id header"),
        (reply_headers(correlation_id=None), "lacks the correlation_id header"),
        (reply_headers(correlation_id=b"\xff\xfe"), "'correlation_id' is not UTF-8"),
        (reply_headers(correlation_id=b"x" * 257), "over 256 bytes"),
        (reply_headers(reply_topic=b"missing.replies"), "'missing.replies' does not exist"),
        (reply_headers(reply_topic=b"payments"), "'payments' is not allowed by TEST_REPLY_TOPICS"),
        (reply_headers(reply_topic=b"docs.answers"), "'docs.answers' is compacted"),
        (reply_headers(reply_topic=b"peer.requests.dlq"), "is a dead-letter topic"),
        (reply_headers(reply_topic=b"bad topic!"), "not a valid Kafka topic name"),
        (reply_headers(reply_topic=b".."), "not a valid Kafka topic name"),
        (reply_headers(reply_topic=b"t" * 250), "not a valid Kafka topic name"),
        (reply_headers(reply_topic=b"\xc3\x28"), "'reply_topic' is not UTF-8"),
        (reply_headers(reply_topic=b"requests"), "one of the server's own topics"),
        (reply_headers(reply_topic=b"requests.dlq"), "one of the server's own topics"),
        (reply_headers(reply_partition=b"4"), "reply_partition 4 does not exist: 'r' has 4 partition(s)"),
        (reply_headers(reply_topic=b"other.replies", reply_partition=b"1"), "'other.replies' has 1 partition(s)"),
        (reply_headers(reply_partition=b"-1"), "'reply_partition' must be a non-negative integer"),
        (reply_headers(reply_partition=b"1_0"), "'reply_partition' must be a non-negative integer"),
        (reply_headers(reply_partition=b" 1"), "'reply_partition' must be a non-negative integer"),
        (reply_headers(reply_partition=b"9" * 40), "'reply_partition' must be a non-negative integer"),
        (reply_headers(reply_partition=b"\xd9\xa3"), "'reply_partition' must be a non-negative integer"),
        (reply_headers(reply_partition=b""), "'reply_partition' must be a non-negative integer"),
    ],
)
def test_a_request_that_cannot_be_answered_where_it_asks_is_a_dead_letter_only(
    headers: tuple[tuple[str, bytes | None], ...], reason: str
) -> None:
    with pytest.raises(InvalidMessage, match=re.escape(reason)):
        parse_request(message(GOOD, *headers), RULES)


@pytest.mark.parametrize("deadline", [b"soon", b"-5", b"1e9", b"9" * 40, b""])
def test_a_bad_deadline_gets_an_error_reply(deadline: bytes) -> None:
    reply = parse_request(message(GOOD, *reply_headers(deadline_ms=deadline)), RULES)
    assert isinstance(reply, Reply) and reply.status == "error"
    assert "'deadline_ms' must be a non-negative integer" in (reply.error or "")


def test_the_last_of_repeated_headers_counts() -> None:
    parsed = parse_request(message(GOOD, *reply_headers(), ("reply_topic", b"other.replies")), RULES)
    assert isinstance(parsed, Request) and parsed.reply_topic == "other.replies"


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("requests", "one of the server's own topics"),
        ("requests.dlq", "one of the server's own topics"),
        ("peer.requests.dlq", "is a dead-letter topic"),
        ("docs.answers", "is compacted"),
    ],
)
def test_a_rule_that_allows_every_topic_still_refuses_the_servers_own_dead_letters_and_tables(
    topic: str, reason: str
) -> None:
    anything = ReplyRules(TOPICS.get, ("*",), OWN, "TEST_REPLY_TOPICS")
    assert anything.check("payments") == 3
    with pytest.raises(InvalidMessage, match=reason):
        anything.check(topic)
