"""The online-inference dataflow end to end: real broker, the dataflow run as users run it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from confluent_kafka.admin import AdminClient

from clients.inference import InferenceClient, InferenceTimeout
from dataflows.online_inference import Settings
from operators.kafka import KafkaMessage, TopicSpec, admin_config, ensure_topics, produce, read_topic
from tests.support.models import loaded
from tests.support.online import Load, Server, has_replies, inputs, raw_request, replies_by_id
from tests.support.processes import ROOT, gateway, wait_for

pytestmark = pytest.mark.e2e


def test_concurrent_requests_are_batched_and_answered_as_the_model_would(server: Server) -> None:
    model = loaded("tabular-risk")
    with server.client() as client:
        sent = [(i, *client.submit("tabular-risk", inputs(i), timeout_s=10)) for i in range(300)]
        replies = {i: future.result(timeout=15) for i, _, future in sent}
    expected = model.predict([inputs(i) for i in range(300)])
    for i, reply in replies.items():
        assert reply["status"] == "ok", reply
        assert reply["outputs"]["label"] == expected[i]["label"]
        assert abs(reply["outputs"]["risk"] - expected[i]["risk"]) < 1e-5
    assert max(r["batch_size"] for r in replies.values()) > 1, "300 requests at once should share batches"


def test_bad_requests_get_error_replies_and_dead_letters(server: Server, brokers: str) -> None:
    topic = f"{server.topic}.requests"
    bad = {
        "bad-json": b"{not json",
        "bad-schema": b'{"model": "tabular-risk", "inputs": [1, 2]}',
        "bad-model": b'{"model": "gpt-9", "inputs": [1]}',
    }
    with server.client() as client:
        msgs = [raw_request(topic, v, correlation_id=k, reply_topic=client.reply_topic) for k, v in bad.items()]
        msgs.append(raw_request(topic, b'{"model": "tabular-risk", "inputs": []}'))  # nowhere to reply
        produce(brokers, msgs)
        replies = wait_for(lambda: has_replies(brokers, server.topic, bad), "the error replies")
    for cid in bad:
        (reply,) = replies[cid]
        assert reply["status"] == "error", reply
    assert "not JSON" in replies["bad-json"][0]["error"]
    assert "list of 8 numbers" in replies["bad-schema"][0]["error"]
    assert "unknown model 'gpt-9'" in replies["bad-model"][0]["error"]
    dead = read_topic(brokers, f"{topic}.dlq")
    reasons = {(m.header("correlation_id") or b"").decode(): (m.header("dlq.reason") or b"").decode() for m in dead}
    assert set(reasons) == {*bad, ""}
    assert "nowhere to reply" in reasons[""]


def test_no_reply_destination_can_stop_the_server(server: Server, brokers: str) -> None:
    requests = f"{server.topic}.requests"
    value = orjson.dumps({"model": "tabular-risk", "inputs": inputs(4)})
    # Topics a request must not write to: another dataflow's input, a table (even one named like replies).
    documents, table, payments = (
        f"{server.topic}.documents",
        f"{server.topic}.table.replies",
        f"{server.topic}.payments",
    )
    ensure_topics(
        brokers,
        [
            TopicSpec(documents, cleanup_policy="compact"),
            TopicSpec(table, cleanup_policy="compact"),
            TopicSpec(payments),
        ],
    )
    with server.client() as client:
        mine = client.reply_topic
        attacks: dict[str, tuple[dict[str, str | bytes], str]] = {
            "no-such-partition": ({"reply_topic": mine, "reply_partition": "8"}, "reply_partition 8 does not exist"),
            "huge-partition": ({"reply_topic": mine, "reply_partition": "9" * 30}, "must be a non-negative integer"),
            "negative-partition": ({"reply_topic": mine, "reply_partition": "-1"}, "must be a non-negative integer"),
            "no-such-topic": ({"reply_topic": f"{server.topic}.nowhere.replies"}, "does not exist"),
            "documents-topic": ({"reply_topic": documents, "correlation_id": "doc-00"}, "not allowed by ONLINE_REPLY"),
            "compacted-topic": ({"reply_topic": table, "correlation_id": "doc-00"}, "is compacted"),
            "input-topic": ({"reply_topic": payments}, "not allowed by ONLINE_REPLY_TOPICS"),
            "other-dlq": ({"reply_topic": f"{server.topic}.other.dlq"}, "is a dead-letter topic"),
            "invalid-topic": ({"reply_topic": "no spaces!"}, "not a valid Kafka topic name"),
            "long-topic": ({"reply_topic": "t" * 300}, "not a valid Kafka topic name"),
            "request-topic": ({"reply_topic": requests}, "one of the server's own topics"),
            "dlq-topic": ({"reply_topic": f"{requests}.dlq"}, "one of the server's own topics"),
            "binary-topic": ({"reply_topic": b"\xff\xfe"}, "is not UTF-8"),
            "huge-correlation-id": ({"reply_topic": mine, "correlation_id": "c" * 100_000}, "over 256 bytes"),
            "binary-correlation-id": ({"reply_topic": mine, "correlation_id": b"\x80"}, "is not UTF-8"),
        }
        msgs = []
        for name, (headers, _) in attacks.items():
            msgs.append(raw_request(requests, value, **{"correlation_id": name, **headers, "attack": name}))
        produce(brokers, msgs)
        # The server keeps serving: a request sent after the attacks is answered.
        assert client.predict("tabular-risk", inputs(5), timeout_s=30)["status"] == "ok"

    def dead_letters() -> dict[str, KafkaMessage] | None:
        dead = {(m.header("attack") or b"").decode(): m for m in read_topic(brokers, f"{requests}.dlq")}
        return dead if set(attacks) <= set(dead) else None

    dead = wait_for(dead_letters, "a dead letter for every attack")
    for name, (_, reason) in attacks.items():
        assert reason in (dead[name].header("dlq.reason") or b"").decode(), name
    assert all(proc.poll() is None for proc in server.procs)
    assert not any(
        m.header("attack") for m in read_topic(brokers, requests) if m.header("status")
    )  # no replies looped in
    assert read_topic(brokers, documents) == read_topic(brokers, table) == read_topic(brokers, payments) == []


def test_a_reply_topic_deleted_after_one_reply_gets_dead_letters_and_the_server_goes_on(
    server: Server, brokers: str
) -> None:
    requests, gone = f"{server.topic}.requests", f"{server.topic}.gone.replies"
    ensure_topics(brokers, [TopicSpec(gone, partitions=2)])
    value = orjson.dumps({"model": "tabular-risk", "inputs": inputs(6)})
    produce(brokers, [raw_request(requests, value, correlation_id="before", reply_topic=gone)])
    wait_for(lambda: read_topic(brokers, gone), "the reply before the deletion")
    admin = AdminClient(admin_config(brokers))
    for future in admin.delete_topics([gone], operation_timeout=10).values():
        future.result(timeout=10)
    produce(brokers, [raw_request(requests, value, correlation_id="after", reply_topic=gone, reply_partition="1")])

    def dead_letter() -> bool:
        # The request (header) if parsing found the topic gone; the reply (its key) if the broker refused it.
        return any(b"after" in (m.key, m.header("correlation_id")) for m in read_topic(brokers, f"{requests}.dlq"))

    wait_for(dead_letter, "the dead letter of the reply to the deleted topic")
    with server.client() as client:
        assert client.predict("tabular-risk", inputs(7), timeout_s=30)["status"] == "ok"
    assert all(proc.poll() is None for proc in server.procs)


def test_a_request_past_its_deadline_is_answered_timeout(server: Server, brokers: str) -> None:
    topic = f"{server.topic}.requests"
    past = str(int(time.time() * 1000) - 1_000)
    value = orjson.dumps({"model": "tabular-risk", "inputs": inputs(1)})
    with server.client() as client:
        produce(
            brokers,
            [raw_request(topic, value, correlation_id="late", reply_topic=client.reply_topic, deadline_ms=past)],
        )
    (reply,) = wait_for(lambda: has_replies(brokers, server.topic, ["late"]), "the timeout reply")["late"]
    assert reply["status"] == "timeout"


def test_a_client_times_out_by_its_own_clock_when_no_server_answers(brokers: str, topic: str) -> None:
    ensure_topics(brokers, Settings(request_topic=f"{topic}.requests", reply_topic=f"{topic}.replies").topics())
    with InferenceClient(brokers, request_topic=f"{topic}.requests", reply_topic=f"{topic}.replies") as client:
        start = time.monotonic()
        with pytest.raises(InferenceTimeout):
            client.predict("tabular-risk", inputs(0), timeout_s=0.5)
        assert time.monotonic() - start < 1.5


def test_overload_sheds_with_rejected_replies_and_answers_everything(brokers: str, topic: str, tmp_path: Path) -> None:
    srv = Server(
        brokers, topic, tmp_path, ONLINE_MAX_QUEUE="16", ONLINE_MAX_BATCH_SIZE="8", ONLINE_SOURCE_BATCH_SIZE="1000"
    ).start()
    try:
        with srv.client(timeout_s=30) as client:
            srv.wait_ready(client)
            value = orjson.dumps({"model": "tabular-risk", "inputs": inputs(2)})
            burst = [
                raw_request(f"{topic}.requests", value, correlation_id=f"b{i}", reply_topic=client.reply_topic)
                for i in range(2_000)
            ]
            produce(brokers, burst)
            ids = [f"b{i}" for i in range(2_000)]
            replies = wait_for(lambda: has_replies(brokers, topic, ids), "2,000 replies", every_s=0.5)
    finally:
        srv.stop()
    statuses = Counter(replies[f"b{i}"][0]["status"] for i in range(2_000))
    assert statuses["rejected"] > 0 and statuses["ok"] > 0, statuses
    assert set(statuses) <= {"ok", "rejected"}


def test_two_processes_share_the_requests(brokers: str, topic: str, tmp_path: Path) -> None:
    srv = Server(brokers, topic, tmp_path, processes=2).start()
    try:
        with srv.client(timeout_s=10) as client:
            srv.wait_ready(client)
            futures = [client.submit("tabular-risk", inputs(i), timeout_s=10)[1] for i in range(300)]
            replies = [f.result(timeout=20) for f in futures]
    finally:
        srv.stop()
    assert all(r["status"] == "ok" for r in replies)
    assert len({r["served_by"] for r in replies}) == 2, Counter(r["served_by"] for r in replies)


def test_kill_9_under_load_every_request_is_answered_after_restart(brokers: str, topic: str, tmp_path: Path) -> None:
    srv = Server(brokers, topic, tmp_path).start()
    with srv.client(timeout_s=60) as client:
        srv.wait_ready(client)
        with Load(client, timeout_s=60) as load:
            wait_for(lambda: load.answered() >= 100, "replies before the kill")
            srv.kill()
            load.wait_for_more(100, "requests sent while the server is down")
        futures = load.futures
        answered_before = load.answered()
        srv.start()
        results = {cid: f.result(timeout=90) for cid, f in futures.items()}
        srv.stop()
    assert 0 < answered_before < len(futures)
    assert Counter(r["status"] for r in results.values()) == {"ok": len(futures)}
    on_topic = replies_by_id(brokers, topic)
    assert all(cid in on_topic for cid in futures)
    # At least once: a request read after the last snapshot may be answered twice,
    # alike (the risk may differ in the last float digits: it shared another batch).
    for cid in futures:
        first, *again = on_topic[cid]
        for other in again:
            assert other["status"] == first["status"]
            assert other["outputs"]["label"] == first["outputs"]["label"]
            assert abs(other["outputs"]["risk"] - first["outputs"]["risk"]) < 1e-5


def test_http_gateway_maps_replies_to_status_codes(server: Server) -> None:
    import httpx

    with (
        gateway(
            server.topic,
            kafka_bootstrap_servers=server.brokers,
            request_topic=f"{server.topic}.requests",
            reply_topic=f"{server.topic}.replies",
            timeout_ms=5_000,
        ) as base,
        httpx.Client(base_url=base, timeout=10) as web,
    ):
        assert web.get("/healthz").status_code == 200
        ok = web.post("/v1/models/tabular-risk:predict", json={"inputs": inputs(3)})
        assert ok.status_code == 200 and ok.json()["outputs"]["label"] in (0, 1)
        schema = web.post("/v1/models/tabular-risk:predict", json={"inputs": [1, 2]})
        assert schema.status_code == 400 and "list of 8 numbers" in schema.json()["error"]
        unknown = web.post("/v1/models/gpt-9:predict", json={"inputs": "hi"})
        assert unknown.status_code == 400
        body = web.post("/v1/models/tabular-risk:predict", content=b"{oops")
        assert body.status_code == 400
        hurried = web.post("/v1/models/tabular-risk:predict", json={"inputs": inputs(3), "timeout_ms": 1})
        assert hurried.status_code == 504
        # Without the RAG dataflow's topics, its route says what to start.
        rag = web.post("/v1/models/rag:predict", json={"inputs": {"query": "x"}})
        assert rag.status_code == 503 and "dataflows.rag" in rag.json()["error"]


def test_the_docs_plain_kafka_client_example_works(server: Server) -> None:
    page = (ROOT / "docs" / "online.md").read_text()
    block = page.split("**With any Kafka client**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = (
        block.replace('"inference.requests"', f'"{server.topic}.requests"')
        .replace('TopicPartition("inference.replies", 0)', f'TopicPartition("{server.topic}.replies", 0)')
        .replace('"127.0.0.1:9092"', f'"{server.brokers}"')
    )
    assert code != block, "the example names the default topics"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok {'risk': ")


def test_latency_breakdown_is_exported_per_stage(server: Server) -> None:
    import urllib.request

    with server.client() as client:
        for i in range(20):
            assert client.predict("tabular-risk", inputs(i))["status"] == "ok"
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    for stage in ("queue", "batch_wait", "compute", "serialize", "end_to_end"):
        line = next(
            (
                x
                for x in text.splitlines()
                if x.startswith("patternflow_inference_seconds_count")
                and f'stage="{stage}"' in x
                and 'model="tabular-risk"' in x
            ),
            "",
        )
        assert line and float(line.rsplit(" ", 1)[1]) >= 20, (stage, line)
