"""The agent loop end to end: the real broker, both dataflows run as users run them, the real HTTP
chat client against the scripted model (a test double: no LLM can run here), kill -9."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from clients.agents import AgentClient, AgentTopics
from dataflows.launch import AgentStack
from models.scripted_llm import RECORDINGS, ScriptedModel, serve
from operators.kafka import KafkaMessage, produce, read_topic
from patternflow import free_port
from tests.support.agent import Web
from tests.support.processes import ROOT, wait_for

pytestmark = pytest.mark.e2e

FORGED_REPLY = {"content": "x", "tool_calls": [], "prompt_tokens": "many", "completion_tokens": 1}


@pytest.fixture(scope="module")
def model() -> ScriptedModel:
    return ScriptedModel(orjson.loads(RECORDINGS.read_bytes()))


def stack_settings(web: str) -> dict[str, str]:
    return {
        "AGENT_TOOLS": "calculator,fetch,human",
        "AGENT_TOOLS_TOOLS": "calculator,fetch",
        "AGENT_TOOLS_FETCH_ALLOWLIST": web,
        "AGENT_TOOLS_FETCH_TIMEOUT_S": "1",
        "AGENT_MAX_ITERATIONS": "4",
        "AGENT_TENANT_BUDGETS_USD": "poor=0.0004",
    }


@pytest.fixture(scope="module")
def agents(
    brokers: str, web: str, model: ScriptedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentClient]:
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    workdir = tmp_path_factory.mktemp("agent")
    with (
        serve(model, free_port(), latency_ms=20) as url,
        AgentStack(brokers, workdir, url, prefix, **stack_settings(web)) as stack,
    ):
        stack.start()
        with AgentClient(brokers, topic_prefix=prefix) as client:
            yield client
        stack.check()


def audit(brokers: str, topics: AgentTopics, task_id: str) -> list[dict[str, Any]]:
    return [orjson.loads(m.value or b"") for m in read_topic(brokers, topics.audit) if m.key == task_id.encode()]


def test_a_task_loops_through_kafka_to_its_answer_with_an_audit_trail(agents: AgentClient, brokers: str) -> None:
    task_id = agents.submit("What is 17 * 23 + 4?", tenant="acme")
    result = agents.wait(task_id)
    assert result["status"] == "done" and result["answer"] == "17 * 23 + 4 = 395."
    assert result["turns"] == 2 and result["tool_calls"] == 1 and result["usage"]["cost_usd"] > 0
    trail = wait_for(
        lambda: (a := audit(brokers, agents.topics, task_id)) and a[-1]["event"] == "result" and a, "audit"
    )
    assert [a["event"] for a in trail] == ["task", "llm", "tool", "llm", "result"]
    llm, tool = trail[1], trail[2]
    assert (
        llm["tools"] == ["calculator"] and llm["prompt_tokens"] > 0 and llm["cost_usd"] > 0 and llm["latency_ms"] >= 20
    )
    assert (
        tool["tool"] == "calculator" and tool["arguments"] == {"expression": "17 * 23 + 4"} and tool["result"] == "395"
    )
    assert sum(a.get("cost_usd", 0) for a in trail[:-1]) == pytest.approx(result["usage"]["cost_usd"])


def test_runaway_tasks_are_capped(agents: AgentClient) -> None:
    counting = agents.submit("Keep counting")
    looping = agents.submit("Check the same thing again")
    counted = agents.wait(counting)
    assert counted["status"] == "cap_exceeded" and counted["reason"] == "max_iterations"
    assert counted["turns"] == 4 and counted["tool_calls"] == 4
    assert counted["answer"].startswith("Stopped early (max_iterations)"), "one final answer without tools"
    looped = agents.wait(looping)
    assert looped["status"] == "cap_exceeded" and looped["reason"] == "loop_detected" and looped["tool_calls"] == 2


def test_a_hallucinated_tool_and_bad_arguments_go_back_to_the_model(agents: AgentClient, brokers: str) -> None:
    task_id = agents.submit("What is the weather in Oslo, plus two?")
    result = agents.wait(task_id)
    assert result["status"] == "done" and result["answer"] == "I have no weather tool; 7 + 2 = 9."
    trail = audit(brokers, agents.topics, task_id)
    refused = [a["result"] for a in trail if a["event"] == "tool" and a.get("executed") is False]
    assert refused[0].startswith("unknown tool 'weather': the tools you have are calculator, fetch, human")
    assert refused[1].startswith("the arguments of calculator are not valid JSON")
    assert refused[2] == "invalid arguments for calculator: expression: 7 is not of type 'string'"
    assert result["tool_calls"] == 1, "only the valid call ran"


def test_a_tool_timeout_is_told_to_the_model(agents: AgentClient, web: str) -> None:
    result = agents.wait(agents.submit(f"Fetch http://{web}/slow"), timeout_s=30)
    assert result["status"] == "done" and result["answer"] == "The page says: ERROR: fetch: timed out after 1 s"


def test_a_fetch_outside_the_allowlist_is_refused(agents: AgentClient) -> None:
    result = agents.wait(agents.submit("Fetch http://169.254.169.254/latest/meta-data/"))
    assert "is not on the fetch allowlist" in result["answer"]


def test_escalation_to_a_human_and_back(agents: AgentClient) -> None:
    task_id = agents.submit("Which region should we deploy to?")
    escalation = agents.wait_escalation(task_id)
    assert escalation["question"] == "Which region should we deploy to: eu-west or us-east?"
    time.sleep(0.5)
    assert task_id not in agents.results, "the task waits for the human"
    agents.reply(escalation, "eu-west")
    assert agents.wait(task_id)["answer"] == "Deploying to eu-west, as the operator said."


def test_a_tenants_budget_and_a_tasks_cost_cap_stop_spending(agents: AgentClient) -> None:
    poor = [agents.submit("Keep counting", tenant="poor", caps={"max_iterations": 10}) for _ in range(3)]
    results = [agents.wait(task_id) for task_id in poor]
    assert all(r["status"] == "cap_exceeded" for r in results)
    assert "tenant_budget" in {r["reason"] for r in results}
    assert sum(r["usage"]["cost_usd"] for r in results) <= 0.0004
    cheap = agents.wait(agents.submit("Keep counting", caps={"max_cost_usd": 0.00015}))
    assert cheap["reason"] == "max_cost" and cheap["usage"]["cost_usd"] <= 0.00015


def test_text_from_a_tool_cannot_add_tools_or_lift_caps(
    agents: AgentClient, brokers: str, web: str, model: ScriptedModel
) -> None:
    task = f"Summarise the page at http://{web}/injection"
    task_id = agents.submit(task)
    result = agents.wait(task_id)
    assert result["status"] == "cap_exceeded" and result["reason"] == "max_iterations" and result["turns"] == 4
    trail = audit(brokers, agents.topics, task_id)
    shell = [a for a in trail if a["event"] == "tool" and a["tool"] == "shell"]
    assert shell and shell[0]["executed"] is False and shell[0]["result"].startswith("unknown tool 'shell'")
    ran = {
        m.value and orjson.loads(m.value)["tool"]
        for m in read_topic(brokers, agents.topics.tool_calls)
        if m.key == task_id.encode()
    }
    assert ran == {"fetch", "calculator"}
    offered = [r["tools"] for r in model.requests if r["task"] == task and r["tools"]]
    assert offered and all(t == ["calculator", "fetch", "human"] for t in offered)


def test_malformed_messages_go_to_dead_letters_and_the_runtime_goes_on(agents: AgentClient, brokers: str) -> None:
    topics = agents.topics
    bad = [
        KafkaMessage(b'{"task": "x"}', key=None, topic=topics.tasks),
        KafkaMessage(b"\xff\xfe not json", key=b"bad1", topic=topics.tasks),
        KafkaMessage(orjson.dumps({"task": "x", "tools": ["shell"]}), key=b"bad2", topic=topics.tasks),
        KafkaMessage(orjson.dumps({"task": "x", "caps": {"max_iterations": "lots"}}), key=b"bad3", topic=topics.tasks),
        KafkaMessage(orjson.dumps({"escalation_id": "nope", "reply": "hi"}), key=b"ghost", topic=topics.human_replies),
        KafkaMessage(orjson.dumps({"call_id": 5}), key=b"ghost", topic=topics.tool_results),
        KafkaMessage(
            orjson.dumps({"seq": 1, "latency_ms": 1, "reply": FORGED_REPLY}), key=b"g", topic=topics.llm_replies
        ),
    ]
    produce(brokers, bad)
    assert agents.wait(agents.submit("What is 17 * 23 + 4?"))["status"] == "done"

    def reasons(topic: str, n: int) -> list[str]:
        def enough() -> list[KafkaMessage] | None:
            letters = read_topic(brokers, topic + ".dlq")
            return letters if len(letters) >= n else None

        letters = wait_for(enough, f"{n} dead letters on {topic}.dlq")
        return [(m.header("dlq.reason") or b"").decode() for m in letters]

    tasks = reasons(topics.tasks, 4)
    assert any("keyed by its task id" in r for r in tasks) and any("unknown tools ['shell']" in r for r in tasks)
    assert any("not JSON" in r for r in tasks)
    assert any("caps.max_iterations must be a positive integer" in r for r in tasks)
    (human,) = reasons(topics.human_replies, 1)
    assert human == "no task 'ghost' of tenant 'default' waits for escalation 'nope'"
    (llm,) = reasons(topics.llm_replies, 1)
    assert "token counts must be integers >= 0 or null" in llm
    (tool,) = reasons(topics.tool_results, 1)
    assert tool == "InvalidMessage: ok must be true or false"


def test_a_long_task_is_summarised_as_it_nears_the_context_window(brokers: str, tmp_path: Path) -> None:
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    model = ScriptedModel(orjson.loads(RECORDINGS.read_bytes()))
    settings = {"AGENT_TOOLS": "calculator", "AGENT_TOOLS_TOOLS": "calculator", "AGENT_CONTEXT_TOKENS": "1000"}
    with serve(model, free_port()) as url, AgentStack(brokers, tmp_path, url, prefix, **settings) as stack:
        stack.start()
        with AgentClient(brokers, topic_prefix=prefix) as agents:
            task_id = agents.submit("Add up the numbers one to eight")
            result = agents.wait(task_id)
        stack.check()
    assert result["status"] == "done" and result["answer"] == "The sum of one to eight is 36."
    trail = audit(brokers, AgentTopics.prefixed(prefix), task_id)
    summaries = [e for e in trail if e.get("action") == "summary"]
    assert summaries and all(e["prompt_tokens"] > 0 for e in summaries), "summaries are charged"
    assert result["usage"]["prompt_tokens"] == sum(e.get("prompt_tokens", 0) for e in trail)


def test_kill_9_mid_task_resumes_without_running_finished_tool_calls_again(
    brokers: str, web: str, tmp_path: Path
) -> None:
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    model = ScriptedModel(orjson.loads(RECORDINGS.read_bytes()))
    path = f"/kill-{prefix}"
    with (
        serve(model, free_port(), latency_ms=400) as url,
        AgentStack(brokers, tmp_path, url, prefix, **stack_settings(web)) as stack,
    ):
        stack.start()
        with AgentClient(brokers, topic_prefix=prefix) as agents:
            task_id = agents.submit(f"Read the three pages at http://{web}{path}")
            wait_for(lambda: Web.hits[f"{path}/2"] == 1, "the second page fetched", timeout_s=60)
            time.sleep(0.15)  # its result journaled and published; the model is thinking about turn 3
            stack.kill()
            stack.start()
            result = agents.wait(task_id, timeout_s=90)
    assert result["status"] == "done" and result["answer"] == f"Read all three; the last says: HTTP 200\npage {path}/3"
    assert [Web.hits[f"{path}/{n}"] for n in (1, 2, 3)] == [1, 1, 1]


def test_the_docs_example_works(agents: AgentClient, brokers: str) -> None:
    page = (ROOT / "docs" / "agent.md").read_text()
    block = page.split("## Using it", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    prefix = agents.topics.tasks.removesuffix(".tasks")
    code = block.replace('AgentClient("127.0.0.1:9092")', f'AgentClient("{brokers}", topic_prefix="{prefix}")')
    assert code != block
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.startswith("done 17 * 23 + 4 = 395. {'prompt_tokens': ")
    assert second == "Deploying to eu-west, as the operator said."


def test_tasks_wait_out_a_model_outage_and_finish_when_it_answers_again(brokers: str, web: str, tmp_path: Path) -> None:
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    port = free_port()  # nothing listens there yet: the model is down
    with AgentStack(brokers, tmp_path, f"http://127.0.0.1:{port}/v1", prefix, **stack_settings(web)) as stack:
        stack.start()
        with AgentClient(brokers, topic_prefix=prefix) as agents:
            task_ids = [agents.submit(f"What is 17 * 23 + 4? #{n}") for n in range(3)]

            def waiting() -> float:
                scraped = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5).read()
                (line,) = [x for x in scraped.decode().splitlines() if x.startswith("patternflow_agent_waiting_model ")]
                return float(line.split()[1])

            wait_for(lambda: waiting() == 3, "3 tasks waiting for the model", timeout_s=60)
            assert not any(t in agents.results for t in task_ids)
            with serve(ScriptedModel(orjson.loads(RECORDINGS.read_bytes())), port):
                results = [agents.wait(t, timeout_s=60) for t in task_ids]
                wait_for(lambda: waiting() == 0, "no task waiting", timeout_s=10)
        stack.check()
    assert [r["status"] for r in results] == ["done"] * 3
    assert all(r["usage"]["cost_usd"] > 0 for r in results)
    trail = audit(brokers, AgentTopics.prefixed(prefix), task_ids[0])
    outages = [e for e in trail if e.get("action") == "outage"]
    assert outages and all(e["cost_usd"] == 0 for e in outages), "a call the server never took is not billed"
