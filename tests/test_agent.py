"""The agent runtime's state machine, driven input by input (no broker): caps, budgets, checks, escalation."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from clients.agents import AgentTopics
from dataflows.agent import CallInDoubt, CallJournal
from dataflows.agent.program import (
    Caps,
    HumanReplied,
    LlmCall,
    LlmReplied,
    Policy,
    TaskProgram,
    TaskSubmitted,
    ToolReplied,
    parse_input,
)
from dataflows.agent.tools import TOOLS, ToolError, calculate, tools
from dataflows.agent_tools import ToolCall, Worker
from models.chat import ChatClient, ChatReply, Prices, ToolRequest, estimate_tokens, parse_reply, price_table
from models.llm import LLMError, LLMRefused
from models.scripted_llm import ScriptedModel, serve
from operators.aio import Done
from operators.dlq import DeadLetter
from operators.kafka import KafkaMessage
from patternflow import InvalidMessage, free_port, wall_ms
from state import MemoryBackend, StateStore
from state.journal import Journal

TOPICS = AgentTopics()
PRICES = Prices(0.15, 0.60)


def policy(**changes: Any) -> Policy:
    return replace(Policy("scripted", PRICES, tools(["calculator", "fetch", "human"])), **changes)


class Runtime:
    """A shard of the runtime over an in-memory store; collects what it emits."""

    def __init__(self, p: Policy) -> None:
        self.program = TaskProgram(p, TOPICS)
        self.now: int | None = None  # the runtime's clock: wall time unless a test sets it
        self.store = StateStore(MemoryBackend(), now_ms=lambda: wall_ms() if self.now is None else self.now)
        self.calls: list[LlmCall] = []
        self.messages: list[KafkaMessage] = []
        self.dead: list[DeadLetter] = []

    def send(self, item: Any) -> None:
        for _, out in self.program.on_item(self.store, "t", item):
            if isinstance(out, LlmCall):
                self.calls.append(out)
            elif isinstance(out, DeadLetter):
                self.dead.append(out)
            else:
                self.messages.append(out)

    def on(self, topic: str) -> list[dict[str, Any]]:
        return [orjson.loads(m.value or b"") for m in self.messages if m.topic == topic]

    def submit(self, text: str = "task", task_id: str = "a", caps: Caps | None = None, tenant: str = "t") -> None:
        names = tuple(self.program.policy.tools)
        self.send(TaskSubmitted(task_id, tenant, text, names, caps or self.program.policy.caps))

    def answer(
        self,
        content: str | None = None,
        *calls: tuple[str, str],
        task_id: str = "a",
        prompt: int = 100,
        completion: int = 100,
    ) -> None:
        seq = max(c.seq for c in self.calls if c.task_id == task_id)
        requests = tuple(ToolRequest(f"m{i}", name, args) for i, (name, args) in enumerate(calls))
        reply = ChatReply(content, requests, prompt, completion)
        self.send(LlmReplied(task_id, "t", seq, reply, None, 5.0))

    def tool_result(self, call: dict[str, Any], content: str = "ok", ok: bool = True) -> None:
        self.send(ToolReplied(call["task_id"], "t", call["call_id"], ok, content, 1, 2.0))

    def result(self, task_id: str = "a") -> dict[str, Any]:
        (found,) = [r for r in self.on(TOPICS.results) if r["task_id"] == task_id]
        return found


def test_a_task_runs_tool_turns_to_its_answer_and_audits_each_event() -> None:
    rt = Runtime(policy())
    rt.submit("What is 2 + 2?")
    assert rt.calls[0].tools and rt.calls[0].messages[-1] == {"role": "user", "content": "What is 2 + 2?"}
    rt.answer(None, ("calculator", '{"expression": "2 + 2"}'))
    (call,) = rt.on(TOPICS.tool_calls)
    assert call["call_id"] == "a/1/0" and call["arguments"] == {"expression": "2 + 2"}
    rt.tool_result(call, "4")
    assert rt.calls[-1].messages[-1] == {"role": "tool", "tool_call_id": "m0", "content": "4"}
    rt.answer("It is 4.")
    result = rt.result()
    assert result["status"] == "done" and result["answer"] == "It is 4." and result["turns"] == 2
    assert result["usage"] == {"prompt_tokens": 200, "completion_tokens": 200, "cost_usd": PRICES.cost(200, 200)}
    events = [a["event"] for a in rt.on(TOPICS.audit)]
    assert events == ["task", "llm", "tool", "llm", "result"]
    llm = rt.on(TOPICS.audit)[1]
    assert llm["tools"] == ["calculator"] and llm["prompt_tokens"] == 100 and llm["latency_ms"] == 5.0


def test_duplicates_of_replies_and_results_change_nothing() -> None:
    rt = Runtime(policy())
    rt.submit()
    rt.answer(None, ("calculator", '{"expression": "1"}'))
    rt.answer(None, ("calculator", '{"expression": "2"}'))  # a second reply to the same call: dropped
    (call,) = rt.on(TOPICS.tool_calls)
    rt.tool_result(call, "1")
    rt.tool_result(call, "1")
    assert len(rt.calls) == 2
    rt.submit()  # the task again while it runs: nothing
    assert len(rt.calls) == 2


def test_calls_to_unknown_tools_bad_json_or_bad_arguments_go_back_to_the_model_unrun() -> None:
    rt = Runtime(policy())
    rt.submit()
    rt.answer(
        None,
        ("weather", '{"city": "Oslo"}'),
        ("calculator", "{expression: 1"),
        ("calculator", '{"expression": 7}'),
        ("calculator", '{"expression": "1 + 1", "extra": true}'),
    )
    assert rt.on(TOPICS.tool_calls) == []
    errors = [m["content"] for m in rt.calls[-1].messages if m["role"] == "tool"]
    assert errors[0] == "ERROR: unknown tool 'weather': the tools you have are calculator, fetch, human"
    assert errors[1].startswith("ERROR: the arguments of calculator are not valid JSON")
    assert errors[2] == "ERROR: invalid arguments for calculator: expression: 7 is not of type 'string'"
    assert "Additional properties are not allowed ('extra' was unexpected)" in errors[3]
    assert rt.calls[-1].tools == rt.calls[0].tools


def test_iterations_cap_then_one_final_answer_without_tools() -> None:
    rt = Runtime(policy(caps=Caps(max_iterations=3)))
    rt.submit()
    for n in range(3):
        rt.answer(None, ("calculator", f'{{"expression": "{n} + 1"}}'))
        rt.tool_result(rt.on(TOPICS.tool_calls)[-1], str(n + 1))
    final = rt.calls[-1]
    assert final.purpose == "final" and final.tools == [] and "max_iterations" in final.messages[-1]["content"]
    rt.answer("My best answer.")
    result = rt.result()
    assert result["status"] == "cap_exceeded" and result["reason"] == "max_iterations"
    assert result["answer"] == "My best answer." and result["turns"] == 3
    assert [p["result"] for p in result["partial"]] == ["1", "2", "3"]


def test_stop_policy_ends_with_the_partial_result_and_no_more_calls() -> None:
    rt = Runtime(policy(caps=Caps(max_iterations=1), on_cap="stop"))
    rt.submit()
    rt.answer(None, ("calculator", '{"expression": "1"}'))
    rt.tool_result(rt.on(TOPICS.tool_calls)[0], "1")
    assert len(rt.calls) == 1
    result = rt.result()
    assert result["status"] == "cap_exceeded" and result["answer"] is None and result["partial"][0]["result"] == "1"


def test_the_same_call_repeated_is_a_loop_and_its_calls_get_results_before_the_final_answer() -> None:
    rt = Runtime(policy(max_repeats=2))
    rt.submit()
    for _ in range(2):
        rt.answer(None, ("calculator", '{"expression": "2+2"}'))
        rt.tool_result(rt.on(TOPICS.tool_calls)[-1], "4")
    rt.answer(None, ("calculator", '{ "expression" : "2+2" }'))  # the same arguments, written differently
    assert len(rt.on(TOPICS.tool_calls)) == 2
    final = rt.calls[-1]
    assert final.purpose == "final"
    # Every tool call in the history has its result: chat APIs refuse a history without one.
    assert final.messages[-2]["role"] == "tool" and "loop_detected" in final.messages[-2]["content"]
    rt.answer("Four.")
    assert rt.result()["reason"] == "loop_detected"


def test_no_call_is_made_that_could_cross_the_cost_cap() -> None:
    caps = Caps(max_cost_usd=0.0005)
    rt = Runtime(policy(caps=caps, max_completion_tokens=1024, min_completion_tokens=64))
    rt.submit()
    while not rt.on(TOPICS.results):
        call = rt.calls[-1]
        spent = rt.store.get("t:a")["cost_usd"]
        worst = PRICES.cost(estimate_tokens(call.messages, call.tools or None), call.max_tokens)
        assert spent + worst <= caps.max_cost_usd + 1e-12
        prompt = estimate_tokens(call.messages, call.tools or None) * 3 // 4  # servers count fewer than we do
        if call.purpose == "final":
            rt.answer("done", prompt=prompt, completion=call.max_tokens)
        else:
            rt.answer(None, ("calculator", f'{{"expression": "{len(rt.calls)}"}}'), prompt=prompt, completion=50)
            rt.tool_result(rt.on(TOPICS.tool_calls)[-1], "x" * 300)
    result = rt.result()
    assert result["status"] == "cap_exceeded" and result["reason"] == "max_cost"
    assert result["usage"]["cost_usd"] <= caps.max_cost_usd


def test_a_tenants_daily_budget_is_shared_by_its_tasks_with_reservations() -> None:
    budget = 0.001
    rt = Runtime(policy(tenant_budgets_usd={"t": budget}, max_completion_tokens=800))
    for n in range(10):
        rt.submit(task_id=f"task{n}")
    # Each call reserves its worst case: only as many calls go out as the budget covers.
    worst = sum(PRICES.cost(estimate_tokens(c.messages, c.tools), c.max_tokens) for c in rt.calls)
    assert worst <= budget and 0 < len(rt.calls) < 10
    capped = [r for r in rt.on(TOPICS.results) if r["reason"] == "tenant_budget"]
    assert len(capped) == 10 - len(rt.calls)
    rt.answer("cheap", task_id="task0", prompt=10, completion=10)  # it cost less than reserved: the rest is free again
    rt.submit(task_id="late")
    assert rt.calls[-1].task_id == "late"


def test_older_turns_are_summarised_and_a_call_never_leaves_its_result() -> None:
    rt = Runtime(policy(context_tokens=2_400, summarize_at=0.75, keep_recent=3))
    rt.submit()
    while rt.calls[-1].purpose != "summary":
        rt.answer(None, ("calculator", f'{{"expression": "{len(rt.calls)} + 1"}}'))
        rt.tool_result(rt.on(TOPICS.tool_calls)[-1], "y" * 400)
    summary_call = rt.calls[-1]
    assert summary_call.tools == [] and summary_call.messages[0]["content"].startswith("Summarise")
    rt.answer("[summary]")
    history = rt.calls[-1].messages
    assert history[1] == {"role": "user", "content": "task"}
    assert history[2] == {"role": "user", "content": "[Summary of earlier turns, by the runtime]\n[summary]"}
    first_kept = history[3]
    assert first_kept["role"] == "assistant" and first_kept["tool_calls"], "kept turns start at a call"
    assert estimate_tokens(history, rt.calls[-1].tools) < 0.75 * 2_400
    assert rt.calls[-1].purpose == "decide"
    audit = [a for a in rt.on(TOPICS.audit) if a.get("purpose") == "summary"]
    assert audit and audit[0]["prompt_tokens"] == 100, "the summary's tokens are counted"


def test_human_question_pauses_the_task_until_the_reply() -> None:
    rt = Runtime(policy())
    rt.submit()
    rt.answer(None, ("human", '{"question": "Which region?"}'))
    (escalation,) = rt.on(TOPICS.escalations)
    assert escalation["question"] == "Which region?" and escalation["kind"] == "question"
    assert len(rt.calls) == 1 and rt.on(TOPICS.tool_calls) == []
    wrong = KafkaMessage(b"{}", key=b"a", topic=TOPICS.human_replies)
    rt.send(HumanReplied("a", "t", "nope", "eu", wrong))
    assert rt.dead and "waits for escalation 'nope'" in rt.dead[0].reason
    rt.send(HumanReplied("a", "t", escalation["escalation_id"], "eu-west", wrong))
    assert rt.calls[-1].messages[-1]["content"] == "eu-west"


def test_a_tool_needing_approval_runs_only_once_approved() -> None:
    rt = Runtime(policy(approve_tools=frozenset({"fetch"})))
    rt.submit()
    rt.answer(None, ("fetch", '{"url": "http://example.com/a"}'), ("fetch", '{"url": "http://example.com/b"}'))
    first, second = rt.on(TOPICS.escalations)
    assert first["kind"] == "approval" and "http://example.com/a" in first["question"]
    assert rt.on(TOPICS.tool_calls) == []
    msg = KafkaMessage(b"{}", key=b"a", topic=TOPICS.human_replies)
    rt.send(HumanReplied("a", "t", first["escalation_id"], "Approve", msg))
    rt.send(HumanReplied("a", "t", second["escalation_id"], "no: that host is internal", msg))
    (call,) = rt.on(TOPICS.tool_calls)
    assert call["arguments"] == {"url": "http://example.com/a"}
    rt.tool_result(call, "page")
    results = [m["content"] for m in rt.calls[-1].messages if m["role"] == "tool"]
    assert results == ["page", "ERROR: a human denied this call: no: that host is internal"]


def test_no_human_reply_within_the_timeout_tells_the_model() -> None:
    rt = Runtime(policy(human_timeout_s=60))
    rt.now = 1_000_000
    rt.submit()
    rt.answer(None, ("human", '{"question": "?"}'))
    assert rt.program.next_timer_ms(rt.store) == 1_000_000 + 60_000
    rt.now += 60_000
    for _, out in rt.program.on_timer(rt.store):
        rt.calls.append(out)
    assert rt.calls[-1].messages[-1]["content"] == "ERROR: no human replied within 60 s"


def test_wall_time_cap_by_timer_charges_the_unanswered_call() -> None:
    rt = Runtime(policy(caps=Caps(max_wall_s=30), on_cap="stop"))
    rt.now = 0
    rt.submit()
    reserved = rt.store.get("b:t:1970-01-01")["reserved"]
    rt.now = 30_000
    rt.messages += [m for _, m in rt.program.on_timer(rt.store)]
    result = rt.result()
    assert result["reason"] == "max_wall_time" and result["usage"]["cost_usd"] == pytest.approx(reserved)
    assert rt.store.get("b:t:1970-01-01") == {"spent": pytest.approx(reserved), "reserved": 0.0}
    rt.answer("late")  # the abandoned call's reply changes nothing
    assert len(rt.on(TOPICS.results)) == 1


def msg(topic: str, value: Any, key: bytes | None = b"a") -> KafkaMessage:
    raw = value if value is None or isinstance(value, bytes) else orjson.dumps(value)
    return KafkaMessage(raw, key=key, topic=topic)


TOKENS = {"prompt_tokens": "many", "completion_tokens": 1}  # a count that would have stopped the runtime


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (msg(TOPICS.tasks, {"task": "x"}, key=None), "keyed by its task id"),
        (msg(TOPICS.tasks, b"{not json"), "not JSON"),
        (msg(TOPICS.tasks, [1]), "JSON object"),
        (msg(TOPICS.tasks, {"task": ""}), "task must be a string"),
        (msg(TOPICS.tasks, {"task": "x", "tools": ["shell"]}), "unknown tools ['shell']"),
        (msg(TOPICS.tasks, {"task": "x", "caps": {"max_iterations": -1}}), "positive integer"),
        (msg(TOPICS.tasks, {"task": "x", "caps": {"max_iterations": 2.5}}), "positive integer"),
        (msg(TOPICS.tasks, {"task": "x", "caps": {"max_cost_usd": "1"}}), "positive number"),
        (msg(TOPICS.tasks, {"task": "x", "caps": {"max_spend": 1}}), "unknown caps"),
        (msg(TOPICS.tasks, {"task": "x", "tenant": 7}), "tenant must be a string"),
        (msg(TOPICS.tool_results, {"call_id": "a/1/0", "ok": "yes"}), "ok must be true or false"),
        (msg(TOPICS.llm_replies, {"seq": 1, "latency_ms": 1}), "either reply or error"),
        (
            msg(TOPICS.llm_replies, {"seq": 1, "latency_ms": 1, "reply": {"content": "x", "tool_calls": [], **TOKENS}}),
            "token counts must be integers >= 0 or null",
        ),
        (msg(TOPICS.tasks, None), "no value"),
        (msg(TOPICS.human_replies, {"escalation_id": "e"}), "reply must be a string"),
    ],
)
def test_bad_messages_are_refused_with_the_reason(message: KafkaMessage, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_input(message, TOPICS, policy())


def test_a_task_can_lower_its_caps_but_not_raise_them() -> None:
    caps = {"max_iterations": 1_000, "max_cost_usd": 0.01}
    _, task = parse_input(msg(TOPICS.tasks, {"task": "x", "caps": caps}), TOPICS, policy())
    assert isinstance(task, TaskSubmitted)
    assert task.caps == Caps(max_iterations=10, max_cost_usd=0.01)
    assert task.tools == ("calculator", "fetch", "human") and task.tenant == "default"


def test_chat_replies_branch_on_tool_calls_not_finish_reason() -> None:
    body = {
        "choices": [
            {
                "finish_reason": "stop",
                "message": {
                    "content": "",
                    "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": {"a": 1}}}],
                },
            }
        ],
        "usage": {"prompt_tokens": 7},
    }
    reply = parse_reply(orjson.dumps(body))
    assert reply.tool_calls == (ToolRequest("c1", "f", '{"a":1}'),)
    assert reply.prompt_tokens == 7 and reply.completion_tokens is None


def test_price_table_takes_extra_models_and_refuses_a_malformed_entry() -> None:
    assert price_table("local=0/0.5")["local"] == Prices(0.0, 0.5)
    with pytest.raises(ValueError, match="model=<input>/<output>"):
        price_table("local=cheap")


@pytest.mark.parametrize(
    ("expression", "value"),
    [("17 * 23 + 4", "395"), ("2 ** 10 / 4", "256"), ("sqrt(16) + abs(-1)", "5"), ("7 / 2", "3.5")],
)
def test_calculator(expression: str, value: str) -> None:
    assert calculate(expression) == value


@pytest.mark.parametrize(
    "expression", ["__import__('os').system('ls')", "9 ** 9 ** 9", "1 / 0", "open('x')", "[1] * 10**9", "a"]
)
def test_calculator_refuses_what_is_not_bounded_arithmetic(expression: str) -> None:
    with pytest.raises(ToolError):
        calculate(expression)


def test_the_chat_client_over_http_against_the_scripted_double() -> None:
    recording = {
        "scripts": [
            {"task": "calc", "turns": [{"tool_calls": [{"name": "calculator", "arguments": '{"expression": "1+1"}'}]}]},
            {"task": "broken", "turns": [{"status": 500}]},
        ]
    }
    tools_offered = [TOOLS["calculator"].spec()]

    async def ask(url: str, task: str) -> ChatReply:
        client = ChatClient(url, "scripted", timeout_s=5)
        return await client.complete([{"role": "user", "content": task}], tools_offered, 64)

    with serve(ScriptedModel(recording), free_port()) as url:
        reply = asyncio.run(ask(url, "calc"))
        assert reply.tool_calls == (ToolRequest("call_0_0", "calculator", '{"expression": "1+1"}'),)
        assert reply.finish_reason == "tool_calls" and reply.prompt_tokens and reply.completion_tokens
        with pytest.raises(LLMError, match="answered HTTP 500") as failed:
            asyncio.run(ask(url, "broken"))
        assert not isinstance(failed.value, LLMRefused), "a 5xx is worth a retry"
        with pytest.raises(LLMRefused, match="HTTP 404"):
            asyncio.run(ask(url.removesuffix("/v1") + "/nowhere", "calc"))
    with pytest.raises(LLMError, match=r"Cannot connect|ClientConnectorError"):
        asyncio.run(ask(url, "calc"))  # the server is gone


def test_a_call_in_doubt_is_charged_its_worst_case_and_asked_again_in_the_same_turn() -> None:
    rt = Runtime(policy())
    rt.submit()
    (first,) = rt.calls
    reserved = rt.store.get(f"b:t:{_today(rt)}")["reserved"]
    rt.send(LlmReplied("a", "t", first.seq, None, "lost in a restart", 0.0, in_doubt=True))
    again = rt.calls[-1]
    assert (again.seq, again.messages) == (first.seq + 1, first.messages)
    assert rt.store.get(f"b:t:{_today(rt)}")["spent"] == pytest.approx(reserved)
    rt.answer("done")
    result = rt.result()
    assert result["status"] == "done" and result["turns"] == 1
    assert result["usage"]["cost_usd"] == pytest.approx(reserved + PRICES.cost(100, 100))


def _today(rt: Runtime) -> str:
    return datetime.fromtimestamp(rt.store.now_ms() / 1000, UTC).strftime("%Y-%m-%d")


def test_the_call_journal_answers_a_call_asked_again_and_marks_one_whose_outcome_was_lost(tmp_path: Path) -> None:
    call = LlmCall("a", "t", 1, "decide", [{"role": "user", "content": "hi"}], [], 64)
    journal = CallJournal(Journal(tmp_path, 60))
    assert journal.recorded(call) is None  # to be made: started
    assert journal.recorded(call) is None  # a retry by the same process is not in doubt
    reply = ChatReply("hello", (), 3, 1)
    journal.reply(Done(call, reply, 1, 0.1), TOPICS.llm_replies)
    assert journal.recorded(call) == reply  # asked again after its reply was published: not made again

    lost = replace(call, seq=2)
    assert journal.recorded(lost) is None
    restarted = CallJournal(journal._journal)  # what a process started after a kill -9 sees
    with pytest.raises(CallInDoubt):
        restarted.recorded(lost)


def test_a_call_of_an_unsafe_tool_in_doubt_asks_a_human_and_the_model_reads_the_answer() -> None:
    rt = Runtime(policy(tools=tools(["calculator", "fetch", "human", "post"])))
    rt.submit()
    rt.answer(None, ("post", '{"url": "http://shop/orders", "payload": {"sku": "A-1"}}'))
    (call,) = rt.on(TOPICS.tool_calls)
    rt.send(ToolReplied("a", "t", call["call_id"], False, "post may have run before a restart", 0, 0.0, in_doubt=True))
    (asked,) = rt.on(TOPICS.escalations)
    assert (
        asked["kind"] == "in_doubt"
        and call["call_id"] in asked["question"]
        and "http://shop/orders" in asked["question"]
    )
    calls = len(rt.calls)
    msg = KafkaMessage(b"{}", key=b"a", topic=TOPICS.human_replies)
    rt.send(HumanReplied("a", "t", asked["escalation_id"], "it placed the order", msg))
    assert len(rt.calls) == calls + 1 and len(rt.on(TOPICS.tool_calls)) == 1  # not run again
    assert rt.calls[-1].messages[-1]["content"].endswith("a person checked: it placed the order")


def test_the_tool_workers_never_run_an_unsafe_call_again_once_it_may_have_acted(tmp_path: Path) -> None:
    effects: list[str] = []

    async def post(arguments: dict[str, Any], key: str) -> str:
        effects.append(key)
        return "HTTP 200\naccepted"

    specs = tools(["post", "fetch"])
    call = ToolCall("a/1/0", "a", "t", "post", {"url": "http://shop/orders", "payload": {}})
    journal = Journal(tmp_path, 60)
    journal.put(call.call_id, {"started": True})  # what a worker killed while posting leaves
    worker = Worker(specs, {"post": post, "fetch": post}, journal, retries=0)
    result = asyncio.run(worker(call))
    assert result["in_doubt"] is True and result["ok"] is False and effects == []
    assert asyncio.run(worker(call))["in_doubt"] is True  # and so it stays

    read = replace(call, call_id="a/1/1", tool="fetch", arguments={"url": "http://shop/"})
    journal.put(read.call_id, {"started": True})
    assert asyncio.run(worker(read))["ok"] is True and effects == ["a/1/1"]  # a read runs again

    fresh = replace(call, call_id="a/2/0")
    assert asyncio.run(worker(fresh))["ok"] is True and effects == ["a/1/1", "a/2/0"]  # the key is the call id
    assert asyncio.run(worker(fresh))["replayed"] is True and len(effects) == 2


def test_a_model_down_past_its_retries_parks_the_task_until_it_answers_again() -> None:
    rt = Runtime(policy(model_outage_s=30, model_retry_s=2))
    rt.now = 1_000_000
    rt.submit()
    (first,) = rt.calls
    down = LlmReplied("a", "t", first.seq, None, "HTTP 503", 0.0, outage=True, billed=False)
    rt.send(down)
    assert rt.store.get("t:a")["status"] == "waiting_model" and rt.on(TOPICS.results) == []
    assert rt.store.get(f"b:t:{_today(rt)}") == {"spent": 0.0, "reserved": 0.0}  # never taken: not billed
    assert rt.program.next_timer_ms(rt.store) == 1_002_000
    rt.now = 1_002_000
    rt.calls += [c for _, c in rt.program.on_timer(rt.store) if isinstance(c, LlmCall)]
    again = rt.calls[-1]
    assert (again.seq, again.messages) == (first.seq + 1, first.messages)
    rt.answer("back")
    assert rt.result()["status"] == "done" and rt.result()["turns"] == 1


def test_a_model_down_longer_than_the_outage_setting_fails_the_task() -> None:
    rt = Runtime(policy(model_outage_s=5, model_retry_s=2))
    rt.now = 0
    rt.submit()
    for _ in range(3):
        rt.send(LlmReplied("a", "t", rt.calls[-1].seq, None, "HTTP 503", 0.0, outage=True, billed=False))
        rt.now = rt.program.next_timer_ms(rt.store) or rt.now
        rt.calls += [c for _, c in rt.program.on_timer(rt.store) if isinstance(c, LlmCall)]
        if rt.on(TOPICS.results):
            break
    result = rt.result()
    assert result["status"] == "failed" and result["reason"] == "llm_error: HTTP 503"
