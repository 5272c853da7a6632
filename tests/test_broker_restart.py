"""The dataflows ride out a broker restart under load, on a broker of the tests' own
(its own ports and empty storage), stopped and started as `make kafka-down` / `kafka-up` do."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from clients.agents import AgentClient
from dataflows.launch import AgentStack
from models.scripted_llm import RECORDINGS, ScriptedModel, serve
from operators.kafka import read_topic
from patternflow import free_port
from tests.support.batch import JOB, committed_more, fill, job_env, output_ids
from tests.support.event_counts import counts_by_id, events, expected_counts, prepare, run_to_end, start_dataflow
from tests.support.fraud import Fraud, under
from tests.support.kafka import Broker
from tests.support.online import Load, Server
from tests.support.processes import Logged, wait_for
from tests.support.rag import DOCS, Rag, doc_message, top

pytestmark = pytest.mark.outage

OUTAGE_S = 8  # the broker stays down this long, under load


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = Broker(free_port(block=2), tmp_path_factory.mktemp("kafka"))
    broker.start()
    yield broker
    broker.stop()


def restart(broker: Broker) -> None:
    broker.stop()
    time.sleep(OUTAGE_S)  # the outage itself, not a wait for something to happen
    broker.start()


def test_online_inference_answers_every_request_sent_before_during_and_after_a_restart(
    broker: Broker, tmp_path: Path
) -> None:
    srv = Server(broker.address, "restart", tmp_path).start()
    try:
        with srv.client(timeout_s=120) as client:
            srv.wait_ready(client)
            with Load(client, timeout_s=120) as load:
                wait_for(lambda: load.answered() > 50, "replies before the restart")
                restart(broker)
                load.wait_for_more(100, "requests after the restart")
            results = [f.result(timeout=120) for f in load.futures.values()]
        assert all(proc.poll() is None for proc in srv.procs), "the server died"
    finally:
        srv.stop()
    assert {r["status"] for r in results} == {"ok"}


def test_event_counts_stay_exact_through_a_restart(broker: Broker, tmp_path: Path) -> None:
    topic = "restart-events"
    msgs = events(topic, 300_000, step_ms=2)
    prepare(broker.address, topic, msgs)
    proc = start_dataflow(topic, tmp_path, broker.address)
    wait_for(lambda: proc.poll() is not None or counts_by_id(broker.address, topic)[1] > 0, "the first counts")
    assert proc.poll() is None, "the dataflow finished before the restart; give it more input"
    restart(broker)
    run_to_end(proc)
    by_id, _ = counts_by_id(broker.address, topic)
    assert by_id == expected_counts(msgs)


def test_an_outage_past_the_limit_stops_a_dataflow_loudly_and_a_rerun_resumes_it(
    broker: Broker, tmp_path: Path
) -> None:
    topic = "outage-events"
    msgs = events(topic, 300_000, step_ms=2)
    prepare(broker.address, topic, msgs)
    short_limit = {"KAFKA_OUTAGE_LIMIT_S": "5"}
    proc = start_dataflow(topic, tmp_path, broker.address, extra=short_limit)
    wait_for(lambda: proc.poll() is not None or counts_by_id(broker.address, topic)[1] > 0, "the first counts")
    assert proc.poll() is None, "the dataflow finished before the outage; give it more input"
    broker.stop()
    try:
        assert proc.wait(timeout=90) != 0
    finally:
        broker.start()
    assert "KAFKA_OUTAGE_LIMIT_S" in proc.output(), proc.output()
    run_to_end(start_dataflow(topic, tmp_path, broker.address, extra=short_limit))
    by_id, _ = counts_by_id(broker.address, topic)
    assert by_id == expected_counts(msgs)


def test_a_batch_job_rides_out_a_restart_and_writes_every_row_once(broker: Broker, tmp_path: Path) -> None:
    topic, n = "restart-customers", 200_000
    fill(broker.address, topic, 0, n)
    args = ["--job", "restart", "--input", f"kafka:{topic}", "--jobs-dir", str(tmp_path), "--batch-size", "100"]
    proc = Logged([*JOB, *args, "--snapshot-interval-s", "0.2"], job_env(broker.address), tmp_path / "job.log")
    commits = tmp_path / "restart" / "errors"
    wait_for(committed_more(proc, commits, 0), "rows committed before the restart", 120)
    assert proc.poll() is None, "the job finished before the restart; give it more input"
    restart(broker)
    assert proc.wait(timeout=300) == 0, proc.output()
    ids = output_ids(tmp_path / "restart" / "output")
    assert len(ids) == n and set(ids) == {f"c{i}" for i in range(n)}


def test_fraud_detection_decides_every_payment_and_labels_every_chargeback_through_a_restart(
    broker: Broker, tmp_path: Path
) -> None:
    fraud = Fraud(broker.address, under("restart-fraud"), tmp_path)
    traffic = fraud.feed(60_000)
    run = fraud.start("run")
    decisions = fraud.topics["decisions"]
    wait_for(lambda: run.poll() is not None or read_topic(broker.address, decisions), "the first decisions")
    assert run.poll() is None, "the dataflow finished before the restart; give it more payments"
    restart(broker)
    assert run.wait(timeout=600) == 0, run.output()
    assert set(fraud.decisions()) == {p["payment_id"] for p in traffic.payments}
    outcomes = [orjson.loads(m.value or b"") for m in read_topic(broker.address, fraud.topics["outcomes"])]
    assert {o["payment_id"] for o in outcomes if o["label"]} == {c["payment_id"] for c in traffic.chargebacks}


def test_rag_answers_queries_sent_during_a_restart_and_indexes_documents_after_it(
    broker: Broker, tmp_path: Path
) -> None:
    rag = Rag(broker.address, "restart-rag", tmp_path).start()
    topic = rag.s.documents_topic
    try:
        with rag.client() as client:
            rag.wait_ready(client)
            rag.produce(doc_message(topic, "aspirin", *DOCS["aspirin"]))
            wait_for(lambda: rag.embedded() >= 1, "the first document indexed")
            broker.stop()
            during = [client.submit("rag", {"query": "aspirin heart", "k": 1}, timeout_s=120)[1] for _ in range(5)]
            time.sleep(OUTAGE_S)
            broker.start()
            rag.produce(doc_message(topic, "vitd", *DOCS["vitd"]))
            answers = [future.result(timeout=120) for future in during]
            assert all(a["status"] == "ok" and top(a["outputs"]) == ["aspirin"] for a in answers), answers
            wait_for(
                lambda: top(client.predict("rag", {"query": "vitamin D bone", "k": 1})["outputs"]) == ["vitd"],
                "the document produced after the restart",
            )
        assert rag.proc is not None and rag.proc.poll() is None, "the dataflow died"
    finally:
        if rag.proc is not None:
            rag.proc.kill()


def test_agent_tasks_finish_through_a_restart_in_the_middle_of_their_turns(broker: Broker, tmp_path: Path) -> None:
    model = ScriptedModel(orjson.loads(RECORDINGS.read_bytes()))
    task = "Add up the numbers one to eight"  # eight turns with a tool call each
    with (
        serve(model, free_port(), latency_ms=200) as url,
        AgentStack(broker.address, tmp_path, url, "restart") as stack,
    ):
        stack.start()
        with AgentClient(broker.address, topic_prefix="restart") as agents:
            before = [agents.submit(task) for _ in range(3)]
            wait_for(lambda: len(model.requests) >= 3, "the tasks' first turns")
            broker.stop()
            during = [agents.submit(task, flush=False) for _ in range(2)]
            time.sleep(OUTAGE_S)
            broker.start()
            agents.flush()
            results = [agents.wait(task_id, timeout_s=120) for task_id in before + during]
        stack.check()
    assert all(r["status"] == "done" and r["answer"] == "The sum of one to eight is 36." for r in results), results
    assert all(r["tool_calls"] == 7 for r in results)
