"""``patternflow advise``: each pattern's example, the antipatterns as warnings, the command line."""

from __future__ import annotations

import dataclasses
from importlib import import_module
from pathlib import Path
from typing import Any

import orjson
import pytest

from advisor.advise import UseCase, UseCaseError, advise
from tests.support.commands import patternflow
from tests.support.processes import ROOT

EXAMPLES = ROOT / "advisor" / "examples"
PREFIX = {
    "dataflows.online_inference": "ONLINE_",
    "dataflows.async_jobs": "JOBS_",
    "dataflows.agent": "AGENT_",
    "dataflows.rag": "RAG_",
    "dataflows.fraud_detection": "FRAUD_",
    "dataflows.telemetry_anomalies": "TELEMETRY_",
}


@pytest.mark.parametrize(
    ("example", "pattern", "dataflow"),
    [
        ("checkout-risk", "online inference", "dataflows.online_inference"),
        ("nightly-churn", "batch inference", "dataflows.batch_inference"),
        ("report-embeddings", "async jobs", "dataflows.async_jobs"),
        ("card-fraud", "streaming inference", "dataflows.fraud_detection"),
        ("support-answers", "RAG", "dataflows.rag"),
        ("ops-agent", "agent loop", "dataflows.agent"),
    ],
)
def test_each_example_gets_its_pattern_and_no_warning(example: str, pattern: str, dataflow: str) -> None:
    import yaml

    advice = advise(UseCase.from_doc(yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())))
    assert (advice.pattern, advice.dataflow) == (pattern, dataflow)
    assert advice.reasons and advice.warnings == []


def case(**fields: Any) -> UseCase:
    return UseCase.from_doc({"name": "x", **fields})


@pytest.mark.parametrize(
    ("use_case", "pattern", "warning"),
    [
        (
            case(arrives="on_request", latency_budget_ms=200, rows_per_request=5_000),
            "online inference",
            "online serving for batch-shaped work: 5000 rows per request",
        ),
        (
            case(arrives="continuously", needs_history=True, keeps_state=False),
            "streaming inference",
            "streaming without state: the features need history",
        ),
        (case(arrives="on_request", needs_retrieval=True), "RAG", "RAG without retrieval eval: declare eval_set"),
        (
            case(arrives="on_request", needs_tools=True, max_iterations=5),
            "agent loop",
            "agent loops without caps: declare max_cost_usd",
        ),
        (case(arrives="on_request", latency_budget_ms=2), "online inference", "call the model in-process"),
        (
            case(arrives="on_request", needs_retrieval=True, eval_set="q", latency_budget_ms=300),
            "RAG",
            'ask with "answer": false',
        ),
        (case(arrives="continuously", freshness_s=86_400), "streaming inference", "a scheduled batch job is cheaper"),
        (case(arrives="on_schedule", latency_budget_ms=100), "batch inference", "this is online inference"),
    ],
)
def test_mismatches_are_warned_about(use_case: UseCase, pattern: str, warning: str) -> None:
    advice = advise(use_case)
    assert advice.pattern == pattern
    assert any(warning in w for w in advice.warnings), advice.warnings


def test_work_no_one_waits_for_is_never_served_online() -> None:
    assert advise(case(arrives="on_request", can_wait=True)).pattern == "async jobs"
    assert advise(case(arrives="on_request", latency_budget_ms=120_000)).pattern == "async jobs"
    assert advise(case(arrives="on_request", can_wait=True, rows_per_request=50_000)).pattern == "batch inference"


@pytest.mark.parametrize("example", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_advised_settings_are_real_settings_of_the_dataflow(example: str) -> None:
    import yaml

    advice = advise(UseCase.from_doc(yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())))
    if not advice.settings:
        return
    settings = import_module(advice.dataflow).Settings
    names = {PREFIX[advice.dataflow] + f.name.upper() for f in dataclasses.fields(settings)}
    assert set(advice.settings) <= names, set(advice.settings) - names


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({"name": "x"}, "'arrives' is required"),
        ({"name": "x", "arrives": "sometimes"}, "arrives must be one of on_request, on_schedule, continuously"),
        ({"name": "x", "arrives": "on_request", "latency": 5}, "unknown fields ['latency']"),
        ({"name": "x", "arrives": "on_request", "latency_budget_ms": "fast"}, "latency_budget_ms must be a number"),
        ({"name": "x", "arrives": "on_request", "rows_per_request": 0}, "rows_per_request must be an integer >= 1"),
        ({"name": "x", "arrives": "on_request", "needs_tools": "yes"}, "needs_tools must be true or false"),
        (["a", "list"], "a YAML mapping"),
    ],
)
def test_an_invalid_use_case_says_what_is_wrong(doc: Any, reason: str) -> None:
    with pytest.raises(UseCaseError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        UseCase.from_doc(doc)


def test_the_console_script_advises_in_text_and_json(tmp_path: Path) -> None:
    out = patternflow("advise", str(EXAMPLES / "ops-agent.yaml"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("on-call assistant: agent loop\n")
    assert "python -m dataflows.launch agent --snapshot-s 1" in out.stdout and "AGENT_MAX_ITERATIONS=8" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\narrives: on_request\nneeds_tools: true\n")
    out = patternflow("advise", "--json", str(bad))
    advice = orjson.loads(out.stdout)
    assert advice["pattern"] == "agent loop" and advice["warnings"][0].startswith("agent loops without caps")


def test_the_console_script_refuses_bad_input_with_exit_code_2(tmp_path: Path) -> None:
    missing = patternflow("advise", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    out = patternflow("advise", str(broken))
    assert out.returncode == 2 and "is not a valid use case" in out.stderr


def test_the_docs_show_what_the_command_prints() -> None:
    section = (ROOT / "docs" / "advisor.md").read_text().split("## Pattern advisor", 1)[1]
    shown = section.split("```")[3].removeprefix("\n")  # the block after the command's
    out = patternflow("advise", "advisor/examples/ops-agent.yaml")
    assert out.stdout == shown
