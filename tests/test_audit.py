"""``patternflow audit`` against running dataflows: an agent runtime with caps that bound nothing is
found out (exit code 1, with the evidence); one with the default caps is clean (exit code 0)."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
import pytest
from conftest import wait_for
from test_advisor import patternflow
from test_deploy import default_port

from advisor.audit import DEFAULT_TARGETS, Scrape, audit, scrape, targets
from common import free_port
from dataflows.launch import AgentStack
from models.scripted_llm import RECORDINGS, ScriptedModel, serve

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
