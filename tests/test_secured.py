"""The secured tier: a broker that takes only SASL_SSL (SCRAM-SHA-512 over TLS) and refuses what no
ACL allows, with the ACL matrix of ``deploy/kafka/acls.yaml`` applied; clients and a dataflow
connect through the client-security profile, each as its own principal, and no password reaches
what they write."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from clients.agents import AgentClient, AgentTopics
from clients.jobs import JobsClient
from dataflows.agent.program import topic_specs
from dataflows.async_jobs import Settings as JobsSettings
from dataflows.event_counts import Settings
from dataflows.fraud_detection import Settings as FraudSettings
from dataflows.launch import AgentStack, run_command
from dataflows.telemetry_anomalies import Settings as TelemetrySettings
from models.quality import roc_auc
from models.scripted_llm import RECORDINGS, ScriptedModel, serve
from operators.failures import FAILURES_TOPIC, FAILURES_TOPIC_ENV, FailureBoard
from operators.kafka import (
    KafkaAdminError,
    KafkaDeliveryError,
    KafkaMessage,
    KafkaSecurityError,
    KafkaSourceError,
    TopicSpec,
    ensure_topics,
    partition_count,
    produce,
    read_topic,
)
from patternflow import free_port
from scripts.evaluate_anomalies import shuttle
from tests.support.batch import JOB, fill, job_env, output_ids
from tests.support.event_counts import events, expected_counts, run_to_end, start_dataflow
from tests.support.fraud import Fraud, topics_of
from tests.support.online import Server, inputs, raw_request
from tests.support.processes import ROOT, Logged, wait_for
from tests.support.rag import DOCS, Rag, ask, doc_message, top
from tests.support.secured import CANARY, SecuredBroker, Tenant, as_user, deployed
from tests.support.telemetry import Telemetry


def no_canary_in(root: Path, *texts: str) -> None:
    """Nothing under ``root`` (logs, recovery snapshots, state) nor any of ``texts`` holds a password."""
    written = [p for p in root.rglob("*") if p.is_file()]
    assert written and not [p for p in written if CANARY.encode() in p.read_bytes()]
    assert not [text for text in texts if CANARY in text]


def scrape(port: int) -> str:
    """A running dataflow's metrics, as Prometheus sees them."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert "patternflow_dataflow_info" in text  # its settings, as labels: where a password would show
    return text


def test_a_wrong_password_fails_fast_naming_the_settings(
    secured: SecuredBroker, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_user(monkeypatch, secured.env(f"{tenant.users}client", password=f"{CANARY}-wrong"))
    start = time.monotonic()
    with pytest.raises(KafkaSecurityError, match="KAFKA_SASL_PASSWORD") as caught:
        partition_count(secured.address, f"{tenant.topics}agent.tasks", outage_limit_s=120)
    assert time.monotonic() - start < 30, "an authentication failure must not wait out the outage limit"
    assert CANARY not in str(caught.value)


def test_an_untrusted_broker_certificate_fails_fast_naming_the_ca_setting(
    secured: SecuredBroker, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    system_cas = "/etc/ssl/certs/ca-certificates.crt"  # they did not sign the test broker's certificate
    as_user(monkeypatch, secured.env(f"{tenant.users}client") | {"KAFKA_SSL_CA_LOCATION": system_cas})
    start = time.monotonic()
    with pytest.raises(KafkaSecurityError, match="KAFKA_SSL_CA_LOCATION"):
        partition_count(secured.address, f"{tenant.topics}agent.tasks", outage_limit_s=120)
    assert time.monotonic() - start < 30


def test_the_broker_refuses_what_the_acl_matrix_does_not_allow(
    secured: SecuredBroker, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = AgentTopics.prefixed(f"{tenant.topics}agent")
    as_user(monkeypatch, secured.admin_env())
    ensure_topics(secured.address, topic_specs(agent))  # made beforehand: no principal may create topics

    def message(topic: str) -> list[KafkaMessage]:
        return [KafkaMessage(b"{}", key=b"t1", topic=topic)]

    as_user(monkeypatch, secured.env(f"{tenant.users}client"))
    produce(secured.address, message(agent.tasks))
    for forged in (agent.tool_results, agent.human_replies):  # no forged tool results or approvals
        with pytest.raises(KafkaDeliveryError, match="TOPIC_AUTHORIZATION_FAILED"):
            produce(secured.address, message(forged), timeout_s=20)
    with pytest.raises(KafkaSourceError):  # nor reading the runtime's inputs
        read_topic(secured.address, agent.tasks, timeout_s=20)
    with pytest.raises(KafkaAdminError, match=r"may not create topics .* have an administrator create it"):
        ensure_topics(secured.address, [TopicSpec(f"{tenant.topics}not-granted")])  # the refusal says what to do
    as_user(monkeypatch, secured.env(f"{tenant.users}reviewer"))
    produce(secured.address, message(agent.human_replies))


def test_a_dataflow_runs_as_its_own_principal_and_no_password_reaches_its_output(
    secured: SecuredBroker, tenant: Tenant, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    topic, counts = f"{tenant.topics}events", f"{tenant.topics}event-counts"
    as_user(monkeypatch, secured.admin_env())
    settings = Settings(input_topic=topic, output_topic=counts, input_partitions=2)
    ensure_topics(secured.address, settings.topics())  # made beforehand: the dataflow may not create topics
    msgs = events(topic, 2_000)
    produce(secured.address, msgs)

    env = {**os.environ, **secured.env(f"{tenant.users}event_counts")}
    with monkeypatch.context() as m:
        m.setattr(os, "environ", env)  # start_dataflow hands os.environ to the process
        run_to_end(start_dataflow(topic, tmp_path, secured.address, extra={"EVENT_COUNTS_OUTPUT_TOPIC": counts}))
    rows = [orjson.loads(m.value or b"") for m in read_topic(secured.address, counts)]
    assert {row["id"]: row["count"] for row in rows} == expected_counts(msgs)
    no_canary_in(tmp_path)


def test_a_dataflow_runs_as_a_cluster_of_its_principal_telling_its_failures_on_the_matrix_topic(
    secured: SecuredBroker, tenant: Tenant, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    topic, counts = f"{tenant.topics}events", f"{tenant.topics}event-counts"
    failures = f"{tenant.topics}{FAILURES_TOPIC}"
    as_user(monkeypatch, secured.admin_env())
    ensure_topics(secured.address, Settings(input_topic=topic, output_topic=counts, input_partitions=2).topics())
    FailureBoard(secured.address, "", topic=failures).ensure()  # made beforehand, as the dataflows' topics
    msgs = events(topic, 2_000)
    produce(secured.address, msgs)

    env = {**os.environ, **secured.env(f"{tenant.users}event_counts"), FAILURES_TOPIC_ENV: failures}
    extra = {"EVENT_COUNTS_OUTPUT_TOPIC": counts}
    with monkeypatch.context() as m:
        m.setattr(os, "environ", env)  # start_dataflow hands os.environ to the launcher
        run_to_end(start_dataflow(topic, tmp_path, secured.address, extra=extra, processes=2))
    rows = [orjson.loads(m.value or b"") for m in read_topic(secured.address, counts)]
    assert {row["id"]: row["count"] for row in rows} == expected_counts(msgs)
    no_canary_in(tmp_path)


def test_the_online_server_serves_clients_as_principals_and_keeps_replies_within_its_rule(
    secured: SecuredBroker, tenant: Tenant, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base = f"{tenant.topics}inference"
    documents = TopicSpec(f"{tenant.topics}rag.documents", cleanup_policy="compact")
    as_user(monkeypatch, secured.admin_env())
    ensure_topics(secured.address, [documents])
    port = free_port()
    principal = secured.env(f"{tenant.users}online_inference") | {"ONLINE_METRICS_PORT": str(port)}
    server = Server(secured.address, base, tmp_path, 1, **principal)
    server.start()
    try:
        as_user(monkeypatch, secured.env(f"{tenant.users}client"))
        with server.client() as client:
            server.wait_ready(client)
            assert client.predict("tabular-risk", inputs(1), timeout_s=30)["status"] == "ok"
            value = orjson.dumps({"model": "tabular-risk", "inputs": inputs(2)})
            attack = raw_request(f"{base}.requests", value, correlation_id="doc-00", reply_topic=documents.name)
            produce(secured.address, [attack])
            assert client.predict("tabular-risk", inputs(3), timeout_s=30)["status"] == "ok"
        scraped = scrape(port)
        assert CANARY not in scraped and CANARY not in server.procs[0].log.read_text(errors="replace")
    finally:
        server.stop()
    as_user(monkeypatch, secured.admin_env())
    (dead,) = wait_for(lambda: read_topic(secured.address, f"{base}.requests.dlq"), "the attack's dead letter")
    assert "not allowed by ONLINE_REPLY_TOPICS" in (dead.header("dlq.reason") or b"").decode()
    assert read_topic(secured.address, documents.name) == []


def test_a_batch_job_runs_as_its_own_principal_and_its_manifest_holds_no_password(
    secured: SecuredBroker, tenant: Tenant, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    customers = f"{tenant.topics}customers"
    as_user(monkeypatch, secured.admin_env())
    fill(secured.address, customers, 0, 500)
    env = {**job_env(secured.address), **secured.env(f"{tenant.users}batch_inference")}
    command = [*JOB, "--job", "nightly", "--input", f"kafka:{customers}", "--jobs-dir", str(tmp_path)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(output_ids(tmp_path / "nightly" / "output")) == sorted(f"c{i}" for i in range(500))
    no_canary_in(tmp_path, done.stdout, done.stderr)  # the manifest included


def test_rag_runs_as_its_own_principal_and_no_query_can_reply_into_its_documents(
    secured: SecuredBroker, tenant: Tenant, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    as_user(monkeypatch, secured.admin_env())
    rag = Rag(secured.address, f"{tenant.topics}rag", tmp_path, **secured.env(f"{tenant.users}rag"))
    s = rag.s
    rag.start()
    try:
        as_user(monkeypatch, secured.env(f"{tenant.users}client"))
        with rag.client() as client:
            rag.wait_ready(client)
            rag.produce(doc_message(s.documents_topic, "vitd", *DOCS["vitd"]))
            wait_for(lambda: top(ask(client, "vitamin D bone", k=1, answer=False)) == ["vitd"], "the document")
            query = b'{"model": "rag", "inputs": {"query": "x"}}'
            rag.produce(raw_request(s.queries_topic, query, correlation_id="doc-00", reply_topic=s.documents_topic))
            assert top(ask(client, "vitamin D bone", k=1, answer=False)) == ["vitd"]  # still serving
    finally:
        assert rag.proc is not None
        rag.proc.kill()
        log = rag.proc.log.read_text(errors="replace")
    assert CANARY not in log
    as_user(monkeypatch, secured.admin_env())
    (dead,) = wait_for(lambda: read_topic(secured.address, f"{s.queries_topic}.dlq"), "the attack's dead letter")
    assert "one of the server's own topics" in (dead.header("dlq.reason") or b"").decode()
    assert [m.key for m in read_topic(secured.address, s.documents_topic)] == [b"vitd"]


def test_the_agent_loop_runs_as_two_principals_and_a_client_gets_answers(
    secured: SecuredBroker, tenant: Tenant, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    prefix = f"{tenant.topics}agent"
    as_user(monkeypatch, secured.admin_env())
    ensure_topics(secured.address, topic_specs(AgentTopics.prefixed(prefix)))  # made beforehand
    model = ScriptedModel(orjson.loads(RECORDINGS.read_bytes()))
    with (
        serve(model, free_port()) as url,
        AgentStack(
            secured.address, tmp_path, url, prefix, AGENT_TOOLS="calculator", AGENT_TOOLS_TOOLS="calculator"
        ) as stack,
    ):
        stack.start("agent", env=secured.env(f"{tenant.users}agent"))
        stack.start("agent_tools", env=secured.env(f"{tenant.users}agent_tools"))
        as_user(monkeypatch, secured.env(f"{tenant.users}client"))
        with AgentClient(secured.address, topic_prefix=prefix) as agents:
            result = agents.wait(agents.submit("What is 17 * 23 + 4?"), timeout_s=120)
        stack.check()
    assert result["status"] == "done" and result["answer"] == "17 * 23 + 4 = 395."
    no_canary_in(tmp_path)  # logs, recovery, state, journals


def test_async_jobs_run_as_their_own_principal_and_a_client_gets_its_results(
    secured: SecuredBroker, tenant: Tenant, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    submit, results = f"{tenant.topics}jobs.submit", f"{tenant.topics}jobs.results"
    as_user(monkeypatch, secured.admin_env())
    ensure_topics(secured.address, JobsSettings(submit_topic=submit, results_topic=results).topics())
    env = {**os.environ, **secured.env(f"{tenant.users}async_jobs")}
    env |= {"JOBS_SUBMIT_TOPIC": submit, "JOBS_RESULTS_TOPIC": results, "JOBS_MODELS": "tabular-risk"}
    env |= {"JOBS_STATE_DIR": str(tmp_path / "state"), "JOBS_METRICS_PORT": "0"}
    as_user(monkeypatch, secured.env(f"{tenant.users}client"))
    with JobsClient(secured.address, submit_topic=submit, results_topic=results) as jobs:
        waiting = jobs.submit("tabular-risk", [[0.1] * 8])  # before the workers start: they look for its result
    workers = Logged(run_command("dataflows.async_jobs:build()", tmp_path / "recovery"), env, tmp_path / "jobs.log")
    try:
        with JobsClient(secured.address, submit_topic=submit, results_topic=results) as jobs:
            done = jobs.wait(jobs.submit("tabular-risk", [[0.5] * 8, [-0.5] * 8]), timeout_s=120)
            assert jobs.wait(waiting, timeout_s=60)["status"] == "done"
        assert workers.poll() is None, workers.output()
    finally:
        workers.kill()
        workers.wait()
    assert done["status"] == "done" and len(done["outputs"]) == 2
    no_canary_in(tmp_path)


def test_telemetry_anomalies_run_as_their_own_principal_on_the_matrix_topics_and_score_every_event(
    secured: SecuredBroker, tenant: Tenant, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    as_user(monkeypatch, secured.admin_env())  # the admin makes the topics and plays the metrics' producers
    port = free_port()
    principal = secured.env(f"{tenant.users}telemetry_anomalies")
    s = deployed(TelemetrySettings, tenant.topics)
    telemetry = Telemetry(
        secured.address, s, tmp_path, **principal, TELEMETRY_BOUNDED="false", TELEMETRY_METRICS_PORT=str(port)
    )
    events = list(shuttle(3_000))
    telemetry.feed([*events, {"series": "shuttle", "ts_ms": "soon", "values": {}}])  # and a dead letter
    run = telemetry.start()
    try:

        def scored() -> dict[tuple[str, int], float] | None:
            assert run.poll() is None, run.output()
            got = telemetry.scores()
            return got if len(got) == len(events) else None

        scores = wait_for(scored, "a score for every event", 180, every_s=1)
        metrics = scrape(port)
    finally:
        run.kill()
        run.wait()
    labels = [e["label"] for e in events]
    assert roc_auc(np.array(labels), np.array([scores[("shuttle", int(str(e["ts_ms"])))] for e in events])) > 0.8
    flagged = {ts for (_, ts), score in scores.items() if score >= s.threshold}
    assert flagged and {a["ts_ms"] for a in telemetry.anomalies()} == flagged
    (dead,) = read_topic(secured.address, f"{s.input_topic}.dlq")
    assert b"ts_ms must be an integer" in (dead.header("dlq.reason") or b"")
    no_canary_in(tmp_path, metrics)


def test_fraud_detection_runs_as_its_own_principal_on_the_matrix_topics_and_decides_every_payment(
    secured: SecuredBroker, tenant: Tenant, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    as_user(monkeypatch, secured.admin_env())  # the admin makes the topics and plays the payments' producers
    port = free_port()
    principal = secured.env(f"{tenant.users}fraud_detection") | {"FRAUD_METRICS_PORT": str(port)}
    topics = topics_of(deployed(FraudSettings, tenant.topics))  # payments, merchants, payments.decisions, ...
    fraud = Fraud(secured.address, topics, tmp_path, **principal, FRAUD_BOUNDED="false")
    traffic = fraud.feed(2_000, (KafkaMessage(b"{not json", topic=topics["payments"]),))
    run = fraud.start("secured")
    try:

        def decided() -> dict[str, dict[str, object]] | None:
            assert run.poll() is None, run.output()
            got = fraud.decisions()
            return got if len(got) == len(traffic.payments) else None

        decisions = wait_for(decided, "a decision for every payment", 240, every_s=1)
        outcomes = wait_for(lambda: read_topic(secured.address, topics["outcomes"]), "the first labelled outcomes")
        metrics = scrape(port)
    finally:
        run.kill()
        run.wait()
    assert set(decisions) == {p["payment_id"] for p in traffic.payments}
    assert {d["decision"] for d in decisions.values()} <= {"block", "allow"}
    assert {orjson.loads(m.value or b"")["payment_id"] for m in outcomes} <= set(decisions)
    (dead,) = read_topic(secured.address, f"{topics['payments']}.dlq")
    assert dead.header("dlq.reason")
    no_canary_in(tmp_path, metrics)
