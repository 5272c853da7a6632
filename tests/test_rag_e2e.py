"""The RAG dataflow end to end: real broker, MiniLM, the dataflow run as users run it, kill -9."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from clients.agents import AgentClient
from dataflows.launch import AgentStack
from dataflows.online_inference import Settings as OnlineSettings
from models.scripted_llm import RECORDINGS, ScriptedModel, serve
from operators.kafka import KafkaMessage, ensure_topics, read_topic
from operators.protocol import request_headers
from patternflow import free_port
from tests.support.processes import gateway, wait_for
from tests.support.rag import DOCS, Rag, ask, assert_same_hits, dead_letters, doc_message, top

pytestmark = pytest.mark.e2e


def test_index_answers_updates_deletes_and_survives_kill_9(rag: Rag) -> None:
    s = rag.s
    with rag.client() as client:
        rag.wait_ready(client)
        rag.produce(*(doc_message(s.documents_topic, d, *fields) for d, fields in DOCS.items()))
        wait_for(lambda: rag.embedded() >= len(DOCS), "documents embedded")

        out = ask(client, "Does aspirin reduce heart attacks?", k=3, filters={"lang": ["en", "de"]})
        assert top(out)[0] == "aspirin" and "inject" not in top(out)
        sentence = out["answer"]["sentences"][0]
        (cite,) = sentence["citations"]
        assert cite["doc_id"] == "aspirin" and DOCS["aspirin"][1][cite["start"] : cite["end"]] == sentence["text"]
        # The document that gives orders is data: the filters, the form and the answer stay the query's.
        assert out["filters"] == {"lang": ["en", "de"]} and "PWNED" not in orjson.dumps(out).decode()
        assert top(ask(client, "memory in adolescents", k=2, filters={"lang": "de"})) == ["sleep"]

        # Unchanged: not embedded again. Changed: its old text is gone. Deleted: gone.
        before = rag.embedded()
        rag.produce(
            doc_message(s.documents_topic, "vitd", *DOCS["vitd"]),
            doc_message(s.documents_topic, "aspirin", "Aspirin trial", "Statins lower cholesterol levels.", "en"),
            KafkaMessage(None, key=b"sleep", topic=s.documents_topic),
        )
        wait_for(lambda: rag.embedded() >= before + 2, "the change and the deletion through the embedding step")
        assert rag.embedded() == before + 2  # vitd was not re-embedded
        out = ask(client, "Does aspirin reduce heart attacks?", k=4, answer=False)
        assert "sleep" not in top(out) and "answer" not in out
        assert top(ask(client, "statins cholesterol", k=1, retriever="bm25"))[0] == "aspirin"
        assert "aspirin" not in top(ask(client, "second heart attack daily", k=4, retriever="bm25"))
        expected = {q: ask(client, q, k=4, answer=False)["hits"] for q in ("aspirin", "bone fractures", "memory")}

        assert rag.proc is not None
        rag.proc.send_signal(signal.SIGKILL)
        rag.proc.wait()
        rag.start()
        rag.wait_ready(client)
        # The index after recovery is the one before it, deletion and replacement included.
        assert_same_hits({q: ask(client, q, k=4, answer=False)["hits"] for q in expected}, expected)


def test_bad_documents_and_queries_get_reasons_and_the_dataflow_goes_on(rag: Rag, brokers: str, topic: str) -> None:
    s = rag.s
    with rag.client() as client:
        rag.wait_ready(client)
        # (A document without a key never gets in: the compacted topic refuses it.)
        bad_docs = [
            KafkaMessage(b"{not json", key=b"d1", topic=s.documents_topic),
            KafkaMessage(b'{"txt": "typo"}', key=b"d2", topic=s.documents_topic),
            KafkaMessage(b'{"text": "x", "metadata": {"a": {"nested": 1}}}', key=b"d3", topic=s.documents_topic),
            KafkaMessage(b'{"text": "x"}', key=b"\xff\xfe", topic=s.documents_topic),
            KafkaMessage(orjson.dumps({"text": "word " * 25_000}), key=b"d4", topic=s.documents_topic),
        ]
        q, answers = s.queries_topic, s.answers_topic

        def query(value: bytes, headers: list[tuple[str, Any]]) -> KafkaMessage:
            return KafkaMessage(value, headers=tuple(headers), topic=q)

        ok = b'{"model": "rag", "inputs": {"query": "x"}}'
        bad_queries = [
            query(b"{not json", request_headers("c1", answers)),
            query(b'{"model": "rag", "inputs": {"query": "x", "k": 0}}', request_headers("c2", answers)),
            query(ok, request_headers("c3", "no.such.answers")),
            # The attack on the index: a reply keyed like a document, into the compacted documents topic.
            query(ok, request_headers("doc-00", s.documents_topic)),
            query(ok, request_headers("c5", "payments")),
            query(ok, [("correlation_id", b"c4"), ("reply_topic", answers.encode()), ("reply_partition", b"x")]),
        ]
        rag.produce(*bad_docs, *bad_queries, doc_message(s.documents_topic, "vitd", *DOCS["vitd"]))
        docs_dlq = dead_letters(brokers, s.documents_topic, len(bad_docs))
        reasons = [(m.header("dlq.reason") or b"").decode() for m in docs_dlq]
        assert any("not JSON" in r for r in reasons)
        assert any("unknown field" in r for r in reasons) and any("metadata" in r for r in reasons)
        assert any("UTF-8" in r for r in reasons) and any("over the 100,000 limit" in r for r in reasons)
        queries_dlq = dead_letters(brokers, q, len(bad_queries))
        reasons = [(m.header("dlq.reason") or b"").decode() for m in queries_dlq]
        assert any("does not exist" in r for r in reasons) and any("reply_partition" in r for r in reasons)
        assert any(f"{s.documents_topic!r} is one of the server's own topics" in r for r in reasons)
        assert any("'payments' is not allowed by RAG_REPLY_TOPICS" in r for r in reasons)
        assert b"doc-00" not in {m.key for m in read_topic(brokers, s.documents_topic)}
        errors = {
            m.key: orjson.loads(m.value or b"") for m in read_topic(brokers, s.answers_topic) if m.key in (b"c1", b"c2")
        }
        assert "not JSON" in errors[b"c1"]["error"] and "k must be" in errors[b"c2"]["error"]
        # Still serving, and the good document after the bad ones is in.
        wait_for(lambda: top(ask(client, "vitamin D bone", k=1, answer=False)) == ["vitd"], "the good document")

    # The HTTP gateway serves RAG queries over the same protocol.
    online = OnlineSettings(request_topic=f"{topic}.requests", reply_topic=f"{topic}.replies")
    ensure_topics(brokers, online.topics())
    with (
        gateway(
            topic,
            kafka_bootstrap_servers=brokers,
            request_topic=online.request_topic,
            reply_topic=online.reply_topic,
            rag_queries_topic=s.queries_topic,
            rag_answers_topic=s.answers_topic,
            timeout_ms=30_000,
        ) as base,
        httpx.Client(base_url=base, timeout=60) as web,
    ):
        body = {"inputs": {"query": "vitamin D and bones", "k": 1}}

        def answered() -> dict[str, Any] | None:
            response = web.post("/v1/models/rag:predict", json=body)
            return response.json() if response.status_code == 200 else None

        outputs = wait_for(answered, "the gateway's RAG route")["outputs"]
        assert outputs["hits"][0]["doc_id"] == "vitd" and outputs["answer"]["found"]
        bad = web.post("/v1/models/rag:predict", json={"inputs": {"query": "x", "k": 0}})
        assert bad.status_code == 400 and "k must be" in bad.json()["error"]


def test_an_agent_retrieves_from_the_rag_dataflow(rag: Rag, brokers: str, tmp_path: Path) -> None:
    s = rag.s
    with rag.client() as client:
        rag.wait_ready(client)
    rag.produce(*(doc_message(s.documents_topic, d, *fields) for d, fields in DOCS.items()))
    wait_for(lambda: rag.embedded() >= len(DOCS), "documents embedded")
    model = ScriptedModel(orjson.loads(RECORDINGS.read_bytes()))
    settings = {
        "AGENT_TOOLS": "retrieve",
        "AGENT_TOOLS_TOOLS": "retrieve",
        "AGENT_TOOLS_RAG_QUERIES_TOPIC": s.queries_topic,
        "AGENT_TOOLS_RAG_ANSWERS_TOPIC": s.answers_topic,
    }
    prefix = f"{s.documents_topic}-agent"
    with serve(model, free_port()) as url, AgentStack(brokers, tmp_path / "agent", url, prefix, **settings) as stack:
        stack.start()
        with AgentClient(brokers, topic_prefix=prefix) as agents:
            result = agents.wait(agents.submit("What do the documents say about aspirin?"), timeout_s=90)
        stack.check()
    assert result["status"] == "done" and result["tool_calls"] == 1
    assert result["answer"].startswith("From the documents: Aspirin lowers the risk of a second heart attack")
    assert "[aspirin] Aspirin trial" in result["answer"]
