"""The agent loop exact under kill -9: the runtime and the tool workers killed at random moments while
30 tasks run (sequential and parallel fetches, runaways, a tenant whose budget runs out), against
the scripted model (a test double: no LLM runs here) behind a counter of the calls made to it.

What must hold, read from the topics as any user would: one result per task; no record of the
audit or the results rewritten (every copy of a record is the same); results agree with the audit;
every call the model received is accounted for by one published reply, or by a call marked in
doubt (charged its worst case); every tenant's recorded spend covers the calls made for it and
stays within its budget. ``PATTERNFLOW_TEST_SEED`` draws the kills from other seeds."""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from clients.agents import AgentClient, AgentTopics, ledger
from dataflows.launch import AgentStack
from models.chat import price_table
from models.scripted_llm import RECORDINGS, ScriptedModel, serve
from operators.kafka import read_topic
from patternflow import free_port
from tests.support.agent import Web
from tests.support.processes import kill_seed, wait_for

pytestmark = pytest.mark.e2e

POOR_BUDGET_USD = 0.0004
PRICES = price_table("")["scripted"]


@dataclass(frozen=True)
class Made:
    task: str
    body: str  # a digest of the conversation asked about
    cost_usd: float


class CountingModel(ScriptedModel):
    """The scripted model, recording every call it answers."""

    def __init__(self) -> None:
        super().__init__(orjson.loads(RECORDINGS.read_bytes()))
        self.made: list[Made] = []
        self._lock = threading.Lock()

    def reply(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        status, doc = super().reply(body)
        task = next((m["content"] for m in body["messages"] if m["role"] == "user"), "")
        usage = doc.get("usage") or {"prompt_tokens": 0, "completion_tokens": 0}
        cost = PRICES.cost(usage["prompt_tokens"], usage["completion_tokens"])
        digest = hashlib.sha256(orjson.dumps(body["messages"])).hexdigest()
        with self._lock:
            self.made.append(Made(task, digest, cost))
        return status, doc


def workload(web: str, run: str) -> list[tuple[str, str]]:
    """(task, tenant): 30 tasks."""
    tasks = [(f"Read the three pages at http://{web}/{run}/seq{n}", "default") for n in range(8)]
    tasks += [(f"Read two pages at once at http://{web}/{run}/par{n}", "default") for n in range(6)]
    tasks += [(f"Keep counting #{run}-{n}", "default") for n in range(4)]
    tasks += [(f"What is 17 * 23 + 4? #{run}-poor{n}", "poor") for n in range(6)]
    tasks += [(f"What is 17 * 23 + 4? #{run}-{n}", "default") for n in range(2)]
    tasks += [(f"Post the order at http://{web}/{run}/shop{n}", "default") for n in range(4)]
    return tasks


def settle(agents: AgentClient, task_ids: list[str], timeout_s: float = 180) -> dict[str, dict[str, Any]]:
    """Each task's result, answering as a person would for a post in doubt (it had acted)."""
    deadline = time.monotonic() + timeout_s
    while not all(t in agents.results for t in task_ids):
        for escalation in list(agents.escalations.values()):
            if escalation["kind"] == "in_doubt":
                agents.reply(escalation, "the order was placed once")
        assert time.monotonic() < deadline, f"{sum(t not in agents.results for t in task_ids)} tasks without a result"
        time.sleep(0.1)
    return {t: agents.results[t] for t in task_ids}


def by_task(brokers: str, topic: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for message in read_topic(brokers, topic):
        found[(message.key or b"").decode()].append(orjson.loads(message.value or b""))
    return found


def record_key(event: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(event.get(name) for name in ("event", "turn", "purpose", "seq", "call_id", "escalation_id"))


@pytest.mark.parametrize("seed", [kill_seed(1), kill_seed(1) + 1])
def test_kill_9_at_random_moments_changes_no_history_and_no_spend(
    brokers: str, web: str, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    model = CountingModel()
    settings = {
        "AGENT_TOOLS": "calculator,fetch,post",
        "AGENT_TOOLS_TOOLS": "calculator,fetch,post",
        "AGENT_TOOLS_FETCH_ALLOWLIST": web,
        "AGENT_TOOLS_POST_ALLOWLIST": web,
        "AGENT_MAX_ITERATIONS": "4",
        "AGENT_TENANT_BUDGETS_USD": f"poor={POOR_BUDGET_USD}",
    }
    with (
        serve(model, free_port(), latency_ms=150) as url,
        AgentStack(brokers, tmp_path, url, prefix, **settings) as stack,
    ):
        stack.start()
        with AgentClient(brokers, topic_prefix=prefix) as agents:
            texts = {
                agents.submit(text, tenant=tenant, flush=False): (text, tenant)
                for text, tenant in workload(web, prefix)
            }
            agents.flush()
            first_kill_ms = None
            for _ in range(3):  # each after 5 to 20 more model calls, at a random moment in the next one
                calls = len(model.made) + rng.randint(5, 20)
                wait_for(lambda: len(model.made) >= calls, "model calls", timeout_s=60)  # noqa: B023
                time.sleep(rng.uniform(0, 0.2))
                first_kill_ms = first_kill_ms or time.time() * 1000
                flows = rng.choice([("agent",), ("agent_tools",), ("agent", "agent_tools")])
                stack.kill(*flows)
                stack.start(*flows)
            results = settle(agents, list(texts))
            time.sleep(1)  # duplicates of the last records, if any, are published
        stack.check()
    assert first_kill_ms is not None and sum(r["finished_ms"] > first_kill_ms for r in results.values()) >= 10

    topics = AgentTopics.prefixed(prefix)
    published = by_task(brokers, topics.results)
    audits = by_task(brokers, topics.audit)
    replies = by_task(brokers, topics.llm_replies)
    spent: dict[str, float] = defaultdict(float)
    made_cost: dict[str, float] = defaultdict(float)
    for task_id, (text, tenant) in texts.items():
        copies = {orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in published[task_id]}
        assert len(copies) == 1, f"{text}: {len(copies)} different results"
        result = results[task_id]
        records: dict[tuple[Any, ...], dict[str, Any]] = {}
        for event in audits[task_id]:
            first = records.setdefault(record_key(event), event)
            assert first == event, f"{text}: an audit record was rewritten: {first} then {event}"
        charged = [e for e in records.values() if e["event"] in ("llm", "cap") and "cost_usd" in e]
        assert result["usage"]["cost_usd"] == pytest.approx(sum(e["cost_usd"] for e in charged), abs=1e-8)
        assert result["usage"]["prompt_tokens"] == sum(e.get("prompt_tokens", 0) for e in charged)
        assert result["turns"] == max((e["turn"] for e in records.values()), default=0)

        outcomes = {r["seq"]: r for r in replies[task_id]}  # a call's outcome, published once or more
        answered = sum("reply" in r or not r.get("in_doubt") for r in outcomes.values())
        in_doubt = sum(bool(r.get("in_doubt")) for r in outcomes.values())
        made = [m for m in model.made if m.task == text]
        assert answered <= len(made) <= answered + in_doubt, (
            f"{text}: {len(made)} calls made for {answered} published outcomes and {in_doubt} in doubt: "
            "a call whose outcome was published was made again"
        )
        spent[tenant] += result["usage"]["cost_usd"]
        made_cost[tenant] += sum(m.cost_usd for m in made)

    assert {results[t]["status"] for t, (text, _) in texts.items() if text.startswith("Keep counting")} == {
        "cap_exceeded"
    }
    poor = [results[t] for t, (_, tenant) in texts.items() if tenant == "poor"]
    assert any(r["reason"] == "tenant_budget" for r in poor), "the poor tenant's budget ran out"
    for tenant in spent:
        assert made_cost[tenant] <= spent[tenant] + 1e-8, f"{tenant}: calls made cost more than was recorded"
    assert spent["poor"] <= POOR_BUDGET_USD + 1e-9
    rebuilt: dict[str, float] = defaultdict(float)
    for (tenant, _), usd in ledger(brokers, prefix).items():
        rebuilt[tenant] += usd
    assert rebuilt == pytest.approx(spent, abs=1e-7), "the ledger rebuilt from the audit is what the results say"
    posted = [t for t, (text, _) in texts.items() if text.startswith("Post the order")]
    assert {results[t]["status"] for t in posted} == {"done"}
    effects = {key: n for key, n in Web.posts.items() if key.split("/")[0] in posted}
    assert set(effects.values()) <= {1}, f"a post acted twice: {effects}"
