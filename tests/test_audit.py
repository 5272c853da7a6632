"""``patternflow audit`` against running dataflows: an agent runtime with caps that bound nothing is
found out (exit code 1, with the evidence); one with the default caps is clean (exit code 0)."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
import pytest

from advisor.audit import DEFAULT_TARGETS, Scrape, audit, scrape, targets
from dataflows.launch import AgentStack
from models.scripted_llm import RECORDINGS, ScriptedModel, serve
from patternflow import free_port
from tests.support.commands import default_port, patternflow
from tests.support.processes import wait_for

DATAFLOWS = [
    "agent",
    "agent_tools",
    "async_jobs",
    "batch_inference",
    "event_counts",
    "fraud_detection",
    "online_inference",
    "rag",
    "telemetry_anomalies",
]


@pytest.mark.parametrize("name", DATAFLOWS)
def test_the_default_targets_cover_every_dataflows_default_metrics_port(name: str) -> None:
    assert f"127.0.0.1:{default_port(name)}" in targets(DEFAULT_TARGETS)


def test_tasks_ending_at_caps_are_evidence() -> None:
    settings = {"max_iterations": "10", "max_cost_usd": "0.1", "max_wall_s": "300", "tenant_daily_budget_usd": "10"}
    samples = [
        ("patternflow_agent_tasks_total", {"status": "done", "reason": ""}, 10.0),
        ("patternflow_agent_tasks_total", {"status": "cap_exceeded", "reason": "max_iterations"}, 15.0),
    ]
    (finding,) = audit([Scrape("h:1", "agent", settings, samples)])
    assert finding.evidence == [
        "15 of 25 finished tasks ended at a cap (max_iterations): the caps are doing the loop's work"
    ]
    assert audit([Scrape("h:1", "agent", settings, samples[:1])]) == []


@pytest.mark.e2e
def test_an_agent_runtime_without_real_caps_is_found_and_one_with_caps_is_clean(brokers: str, tmp_path: Path) -> None:
    model = ScriptedModel(orjson.loads(RECORDINGS.read_bytes()))
    unbounded = {"AGENT_MAX_ITERATIONS": "100000", "AGENT_MAX_COST_USD": "1000"}
    with serve(model, free_port()) as url:
        for settings, expected in ((unbounded, 1), ({}, 0)):
            prefix = f"t-{uuid.uuid4().hex[:10]}"
            with AgentStack(brokers, tmp_path / prefix, url, prefix, **settings) as stack:
                stack.start("agent")
                target = f"127.0.0.1:{stack.metrics_port}"

                def answers(target: str = target) -> Scrape | None:
                    return scrape(target)

                wait_for(answers, "the runtime's metrics endpoint", timeout_s=60)
                out = patternflow("audit", "--targets", target, "--json")
            assert out.returncode == expected, out.stdout + out.stderr
            findings = orjson.loads(out.stdout)["findings"]
            if expected:
                (finding,) = findings
                assert finding["antipattern"] == "agent loops without caps" and finding["dataflow"] == "agent"
                assert finding["evidence"][0].startswith("AGENT_MAX_ITERATIONS=100000: over 50 iterations per task")
                assert any(e.startswith("AGENT_MAX_COST_USD=1000.0") for e in finding["evidence"])
            else:
                assert findings == []


def test_audit_says_when_nothing_answers() -> None:
    out = patternflow("audit", "--targets", f"127.0.0.1:{free_port()}")
    assert out.returncode == 2 and "no dataflow answered" in out.stderr


def online(samples: list[tuple[str, dict[str, str], float]]) -> list[Scrape]:
    return [Scrape("h:1", "online_inference", {"max_batch_size": "32"}, samples)]


def requests(client: str, budget: str, n: float) -> tuple[str, dict[str, str], float]:
    return ("patternflow_online_requests_total", {"model": "m", "client": client, "budget": budget}, n)


def test_one_client_sending_most_requests_with_relaxed_deadlines_is_batch_shaped_work() -> None:
    fill = [("patternflow_online_batch_fill_sum", {"model": "m"}, 5.0), ("patternflow_online_batch_fill_count", {}, 20)]
    (finding,) = audit(online([requests("r:1", "relaxed", 950), requests("r:1", "tight", 50), *fill]))
    assert (
        finding.evidence[0]
        == "client r:1 sent 1000 of 1000 requests (100%), 95% of them with no deadline or more than 1 s to it"
    )
    assert finding.evidence[1] == "20 batches filled 25% of ONLINE_MAX_BATCH_SIZE=32 on average"
    # Too few requests, a client among many, or callers that cannot wait: online serving is right.
    assert audit(online([requests("r:1", "relaxed", 499)])) == []
    assert audit(online([requests("r:1", "relaxed", 400), requests("r:2", "tight", 600)])) == []
    assert audit(online([requests("r:1", "relaxed", 850), requests("r:1", "tight", 150)])) == []


def test_a_streaming_dataflow_is_clean_with_a_recovery_directory_and_found_without_one() -> None:
    keys = [("patternflow_state_keys", {"step": "s", "shard": "0"}, 12.0)]
    (finding,) = audit([Scrape("h:1", "fraud_detection", {"bytewax_recovery": ""}, keys)])
    assert finding.antipattern == "streaming without state" and "12 keys now" in finding.evidence[0]
    assert audit([Scrape("h:1", "fraud_detection", {"bytewax_recovery": "var/recovery/fraud"}, keys)]) == []
    assert audit([Scrape("h:1", "online_inference", {"bytewax_recovery": ""}, [])]) == [], "not a streaming dataflow"


def test_a_rag_dataflow_is_clean_once_an_eval_run_of_its_index_is_exported() -> None:
    index = [("patternflow_rag_index_info", {"version": "v1"}, 1.0)]
    (finding,) = audit([Scrape("h:1", "rag", {}, index)])
    assert "(v1)" in finding.evidence[0]
    evaluated = [*index, ("patternflow_rag_eval", {"split": "test", "metric": "ndcg@10"}, 0.7)]
    assert audit([Scrape("h:1", "rag", {}, evaluated)]) == []
    # Still loading its models: the info metric is served before it is labelled.
    (loading,) = audit([Scrape("h:1", "rag", {}, [("patternflow_rag_index_info", {}, 1.0)])])
    assert "(not published yet)" in loading.evidence[0]


def test_the_recovery_directory_is_read_from_bytewax_runs_arguments_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from operators.metrics import recovery_directory

    monkeypatch.delenv("BYTEWAX_RECOVERY_DIRECTORY", raising=False)
    assert recovery_directory(["bytewax.run", "f:build()", "-r", "var/r", "-s", "1"]) == "var/r"
    assert recovery_directory(["bytewax.run", "f:build()", "--recovery-directory=var/r"]) == "var/r"
    assert recovery_directory(["bytewax.run", "f:build()"]) == ""
    monkeypatch.setenv("BYTEWAX_RECOVERY_DIRECTORY", "var/e")
    assert recovery_directory(["bytewax.run", "f:build()"]) == "var/e"


def test_an_endpoint_that_is_not_a_prometheus_one_is_not_a_dataflow() -> None:
    import http.server
    import threading

    class Garbage(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>{{{ not metrics \\x00")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert scrape(f"127.0.0.1:{server.server_port}") is None
    finally:
        server.shutdown()
