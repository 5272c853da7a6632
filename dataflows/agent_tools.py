"""The agent's tool workers: tool calls in, results out, many at a time, each call run once.

Reads the calls the agent runtime (:mod:`dataflows.agent`) validated on
``agent.tool_calls``, runs them on an asyncio loop (``AGENT_TOOLS_CAPACITY`` at a
time, each tool under its own timeout, transient failures retried with
backoff) and answers on ``agent.tool_results``. Formats: see
:mod:`dataflows.agent.program`. A call's failure (a bad argument, an exception, a
timeout) is a result with ``ok: false`` and the reason, for the model to read;
only a message that is not a tool call goes to ``agent.tool_calls.dlq``.

Each call id is an idempotency key: a finished call is journaled
(:class:`state.journal.Journal`) before its result is published, so a call
read again (a replay after a kill -9 here, or the runtime sending it again
after its own) gets the journaled result and is not run again; duplicates in
flight together share one run. A call in flight at a kill is run again if its
tool's ``side_effects`` are ``none`` or ``idempotent`` (with the same key); a
call of an ``unsafe`` tool is journaled as started before it runs, and one
found started by a process that died is *in doubt*: not run again, answered
``ok: false, in_doubt: true``, and the runtime asks a human. The executors get
no more power than their tool needs: no shell, HTTP only to
``AGENT_TOOLS_FETCH_ALLOWLIST`` and ``AGENT_TOOLS_POST_ALLOWLIST``. Run::

    python -m bytewax.run "dataflows.agent_tools:build()" -r var/recovery/agent_tools -s 1 -b 0
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import bytewax.operators as op
import orjson
from bytewax.dataflow import Dataflow

from clients.agents import AgentTopics
from clients.inference import AsyncInferenceClient
from dataflows.agent.program import json_object, task_id_of, text_field, topic_specs
from dataflows.agent.tools import (
    HUMAN,
    Executor,
    Tool,
    ToolError,
    TransientToolError,
    fetcher,
    poster,
    retriever,
    run_calculator,
    tools,
)
from operators.aio import AsyncConfig, Done, Failed, async_map, attempts
from operators.dlq import DLQ_SUFFIX, to_dlq_message, try_map
from operators.kafka import KafkaError, KafkaMessage
from operators.kafka.sink import kafka_output
from operators.protocol import RAG_ANSWERS_TOPIC, RAG_MODEL, RAG_QUERIES_TOPIC
from operators.settings import from_env, process_id
from operators.setup import Application, DataflowSettings
from state.journal import Journal

DAY_S = 86_400


@dataclass(frozen=True)
class Settings(DataflowSettings):
    topic_prefix: str = "agent"
    tools: tuple[str, ...] = ("calculator", "retrieve", "fetch")  # the runtime's, less human (the runtime asks)
    capacity: int = 1_000  # calls in flight at once
    retries: int = 2  # more attempts for a transient failure
    fetch_allowlist: tuple[str, ...] = ()  # hosts (or host:port) fetch may reach; empty: none
    fetch_max_bytes: int = 100_000
    fetch_timeout_s: float = 10.0
    post_allowlist: tuple[str, ...] = ()  # hosts (or host:port) post may send to; empty: none
    rag_queries_topic: str = RAG_QUERIES_TOPIC  # where retrieve sends its queries (dataflows.rag's)
    rag_answers_topic: str = RAG_ANSWERS_TOPIC
    journal_dir: Path = Path("var/state/agent_tools")
    journal_ttl_s: int = 7 * DAY_S
    metrics_port: int = 9108

    @property
    def topics(self) -> AgentTopics:
        return AgentTopics.prefixed(self.topic_prefix)


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    task_id: str
    tenant: str
    tool: str
    arguments: Any


def parse_call(msg: KafkaMessage) -> ToolCall:
    doc = json_object(msg)
    return ToolCall(
        text_field(doc, "call_id", 600),
        task_id_of(msg.key),
        text_field(doc, "tenant", 64),
        text_field(doc, "tool", 64),
        doc.get("arguments"),
    )


def executors(s: Settings) -> dict[str, Executor]:
    """An executor per tool in ``s.tools``."""
    available = tools(s.tools)
    if HUMAN in available:
        raise ValueError("AGENT_TOOLS_TOOLS names human: the runtime, not a worker, asks humans")
    made: dict[str, Executor] = {}
    for name in available:
        if name == "calculator":
            made[name] = run_calculator
        elif name == "fetch":
            made[name] = fetcher(frozenset(s.fetch_allowlist), s.fetch_max_bytes, s.fetch_timeout_s)
        elif name == "post":
            made[name] = poster(frozenset(s.post_allowlist))
        elif name == "retrieve":
            made[name] = retriever(_rag(s.kafka_bootstrap_servers, s.rag_queries_topic, s.rag_answers_topic))
    return made


def _rag(brokers: str, queries_topic: str, answers_topic: str) -> Any:
    """Queries to the RAG dataflow, through a client made on first use (the RAG dataflow may start later)."""
    clients: list[AsyncInferenceClient] = []
    first = asyncio.Lock()

    async def predict(inputs: dict[str, Any]) -> dict[str, Any]:
        async with first:
            if not clients:
                try:
                    client = await asyncio.to_thread(
                        AsyncInferenceClient,
                        brokers,
                        request_topic=queries_topic,
                        reply_topic=answers_topic,
                        timeout_s=5.0,
                        wait_for_server_s=1.0,
                    )
                except KafkaError as exc:
                    raise TransientToolError(f"the RAG dataflow is not running: {exc}") from exc
                clients.append(client)
        return await clients[0].predict(RAG_MODEL, inputs)

    return predict


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, TransientToolError)


class Worker:
    """Runs calls once each: journaled results are answered from the journal, duplicates in flight share a run.
    Each tool runs under its own timeout; transient failures are retried ``retries`` times with backoff."""

    def __init__(self, specs: dict[str, Tool], run: dict[str, Executor], journal: Journal, retries: int) -> None:
        self._specs = specs
        self._run = run
        self._journal = journal
        self._config = AsyncConfig(retries=retries, retry_if=_transient)
        self._running: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def __call__(self, call: ToolCall) -> dict[str, Any]:
        done = self._journal.get(call.call_id)
        if done is not None and not done.get("started"):
            return {**done, "replayed": True}
        if call.call_id in self._running:
            return await asyncio.shield(self._running[call.call_id])
        spec = self._specs.get(call.tool)
        unsafe = spec is not None and spec.side_effects == "unsafe"
        if done is not None and unsafe:  # started by a process that died: it may have acted
            why = f"{call.tool} may have run before a restart, and whether it acted is unknown: not run again"
            result = {**_result(call, False, why, 0, 0.0), "in_doubt": True}
            self._journal.put(call.call_id, result)
            return result
        future = self._running[call.call_id] = asyncio.get_running_loop().create_future()
        try:
            if unsafe:
                self._journal.put(call.call_id, {"started": True})
            result = await self._execute(call)
            self._journal.put(call.call_id, result)
            future.set_result(result)
            return result
        finally:
            del self._running[call.call_id]

    async def _execute(self, call: ToolCall) -> dict[str, Any]:
        run, spec = self._run.get(call.tool), self._specs.get(call.tool)
        if run is None or spec is None:
            return _result(call, False, f"these tool workers have no tool {call.tool!r}", 0, 0.0)
        problem = spec.invalid(call.arguments)
        if problem is not None:
            return _result(call, False, f"invalid arguments for {call.tool}: {problem}", 0, 0.0)
        outcome = await attempts(
            lambda c: run(c.arguments, c.call_id), call, replace(self._config, timeout_s=spec.timeout_s)
        )
        if isinstance(outcome, Done):
            return _result(call, True, outcome.value, outcome.attempts, outcome.seconds)
        # A ToolError's message is for the model as it is; any other exception is named.
        error = str(outcome.exception) if isinstance(outcome.exception, ToolError) else outcome.error
        return _result(call, False, f"{call.tool}: {error}", outcome.attempts, outcome.seconds)


def _result(call: ToolCall, ok: bool, content: str, attempts: int, seconds: float) -> dict[str, Any]:
    return {
        "call_id": call.call_id,
        "task_id": call.task_id,
        "tenant": call.tenant,
        "tool": call.tool,
        "ok": ok,
        "content": content,
        "attempts": attempts,
        "latency_ms": round(seconds * 1000, 3),
    }


def build(settings: Settings | None = None) -> Dataflow:
    s = settings or from_env(Settings, prefix="AGENT_TOOLS_")
    topics = s.topics
    app = Application.start(s, topic_specs(topics, of="agent_tools"))
    specs = tools(s.tools)
    if "fetch" in specs:
        specs["fetch"] = replace(specs["fetch"], timeout_s=s.fetch_timeout_s)
    journal = Journal(s.journal_dir / f"process-{process_id()}", s.journal_ttl_s)
    worker = Worker(specs, executors(s), journal, s.retries)

    flow = Dataflow("agent_tools")
    calls = try_map("parse", op.input("calls", flow, app.source([topics.tool_calls])), parse_call)
    # ToolCall
    slowest = max((t.timeout_s for t in specs.values()), default=1.0)
    config = AsyncConfig(capacity=s.capacity, timeout_s=(slowest + 1) * (s.retries + 1) + 5, retries=0)
    results = async_map("run", op.key_on("by_call", calls.oks, lambda c: c.call_id), worker, config)
    # (call id, Done(ToolCall, result document) | Failed(ToolCall))
    answered = op.map("encode", op.key_rm("unkey", results), lambda r: _message(r, topics.tool_results))
    dead = op.map("dead", calls.errs, to_dlq_message)
    # KafkaMessage: results on agent.tool_results, dead letters on agent.tool_calls.dlq
    # Every turn waits on this output: no lingering for fuller batches.
    sink = app.sink(dlq_topic=topics.tool_calls + DLQ_SUFFIX, config={"linger.ms": 0})
    kafka_output("publish", op.merge("out", answered, dead), sink)
    return flow


def _message(result: Done[ToolCall, dict[str, Any]] | Failed[ToolCall], topic: str) -> KafkaMessage:
    if isinstance(result, Done):
        doc = result.value
    else:  # past even the outer timeout (a tool that ignores its own): the model is told all the same
        call = result.item
        doc = {"call_id": call.call_id, "task_id": call.task_id, "tenant": call.tenant, "tool": call.tool}
        doc.update(ok=False, content=f"{call.tool} failed: {result.error}", attempts=result.attempts)
        doc["latency_ms"] = round(result.seconds * 1000, 3)
    return KafkaMessage(orjson.dumps(doc), key=doc["task_id"].encode(), topic=topic)
