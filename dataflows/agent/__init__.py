"""The agent loop as a durable dataflow: the LLM decides, the runtime checks, tools act, and it loops through Kafka.

A task on ``agent.tasks`` starts a state machine held in RocksDB-backed keyed
state (:class:`dataflows.agent.program.TaskProgram`: the conversation, the tools, the
usage). Each turn the model is asked what to do, through an OpenAI-compatible
server (``AGENT_LLM_URL``), ``AGENT_LLM_CAPACITY`` calls in flight at once; its
reply goes to ``agent.llm_replies`` and comes back as the task's next event. The
runtime checks the tool calls it asked for and publishes the valid ones on
``agent.tool_calls``; the tool workers (:mod:`dataflows.agent_tools`) answer on
``agent.tool_results``, which brings the task to its next turn, until the model
answers without tools: the result goes to ``agent.results``. Every event of a
task is appended to ``agent.audit``. Caps, budgets, escalation to humans and
the message formats: see :mod:`dataflows.agent.program`.

Because every turn is an event on Kafka and the task's state is snapshotted
with the source offsets, a kill -9 resumes each task from the snapshot, and
the runtime decides again exactly what it decided before the kill: the tasks'
shards record the order and time of every input they apply
(:func:`operators.stateful.recorded_state`), so tenants' budgets are reserved
in the same order and deadlines fall at the same turn. Each model call is
journaled (:class:`CallJournal`) before it is made and its reply before it is
published, so a call whose reply was published is answered from the journal,
never made again; a call that may have been made but whose reply was lost is
*in doubt*: charged its worst case, then asked again if the caps allow. A tool
call sent again is answered from the tool workers' journal, not run twice.

Run (with the tool workers beside it)::

    AGENT_LLM_URL=http://127.0.0.1:8000/v1 AGENT_LLM_MODEL=<model> \\
        python -m bytewax.run "dataflows.agent:build()" -r var/recovery/agent -s 1 -b 0
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from clients.agents import AgentTopics
from dataflows.agent.program import (
    Caps,
    LlmCall,
    Policy,
    TaskProgram,
    input_id,
    llm_reply_message,
    parse_input,
    topic_specs,
)
from dataflows.agent.tools import tools
from models.chat import ChatClient, ChatReply, price_table
from models.llm import LLMUnavailable, worth_retrying
from operators.aio import AsyncConfig, Done, Failed, async_map
from operators.dlq import DLQ_SUFFIX, DeadLetter, to_dlq_message, try_map
from operators.kafka import KafkaMessage
from operators.kafka.sink import kafka_output
from operators.settings import from_env, process_id
from operators.setup import Application, DataflowSettings
from operators.stateful import StateConfig, recorded_state
from operators.streams import split
from patternflow import PatternflowError
from state.journal import Journal

SCRIPTED_HINT = (
    "set AGENT_LLM_URL to an OpenAI-compatible server (vLLM, llama.cpp server, Ollama, a hosted API), "
    "or, to try the runtime without a model, run the scripted test double: "
    "python -m models.scripted_llm --port 8011, then AGENT_LLM_URL=http://127.0.0.1:8011/v1 AGENT_LLM_MODEL=scripted"
)


@dataclass(frozen=True)
class Settings(DataflowSettings):
    topic_prefix: str = "agent"
    partitions: int = 3
    llm_url: str = ""  # an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1
    llm_model: str = ""
    llm_timeout_s: float = 60.0
    llm_retries: int = 2  # more attempts on HTTP 429, 5xx, timeouts and connection errors
    llm_capacity: int = 1_000  # model calls in flight at once
    model_outage_s: float = 600.0  # a task waits this long for a model failing past its retries, then fails
    prices: str = ""  # model=<input>/<output> USD per million tokens, on top of the built-in table
    tools: tuple[str, ...] = ("calculator", "retrieve", "fetch", "human")
    max_iterations: int = Caps.max_iterations
    max_tokens: int = Caps.max_tokens
    max_cost_usd: float = Caps.max_cost_usd
    max_wall_s: float = Caps.max_wall_s
    tenant_daily_budget_usd: float = 10.0
    tenant_budgets_usd: dict[str, float] = field(default_factory=dict)  # tenant=<USD per day>, over the above
    max_completion_tokens: int = 1_024
    on_cap: str = "final_answer"  # or "stop"
    max_repeats: int = 2  # the same tool call with the same arguments, more often than this, is a loop
    context_tokens: int = 16_384  # the model's context window
    approve_tools: tuple[str, ...] = ()  # tools whose calls wait for a human's approval
    human_timeout_s: float = 3_600.0
    state_dir: Path = Path("var/state/agent")
    state_shards: int = 8
    metrics_port: int = 9107

    def __post_init__(self) -> None:
        if not self.llm_url or not self.llm_model:
            raise ValueError(f"the agent runtime needs a model: {SCRIPTED_HINT}")
        if self.llm_model not in price_table(self.prices):
            raise ValueError(
                f"no price for model {self.llm_model!r}: budgets need one. Set AGENT_PRICES="
                f'"{self.llm_model}=<input>/<output>" in USD per million tokens'
            )
        if self.on_cap not in ("final_answer", "stop"):
            raise ValueError(f"AGENT_ON_CAP must be final_answer or stop, got {self.on_cap!r}")
        unknown = set(self.approve_tools) - set(tools(self.tools))
        if unknown:
            raise ValueError(f"AGENT_APPROVE_TOOLS names {sorted(unknown)}, which AGENT_TOOLS does not")

    @property
    def topics(self) -> AgentTopics:
        return AgentTopics.prefixed(self.topic_prefix)

    def policy(self) -> Policy:
        caps = Caps(self.max_iterations, self.max_tokens, self.max_cost_usd, self.max_wall_s)
        return Policy(
            self.llm_model,
            price_table(self.prices)[self.llm_model],
            tools(self.tools),
            caps,
            self.tenant_daily_budget_usd,
            dict(self.tenant_budgets_usd),
            self.max_completion_tokens,
            on_cap=self.on_cap,  # type: ignore[arg-type]
            max_repeats=self.max_repeats,
            context_tokens=self.context_tokens,
            approve_tools=frozenset(self.approve_tools),
            human_timeout_s=self.human_timeout_s,
            model_outage_s=self.model_outage_s,
        )


def build(settings: Settings | None = None) -> Dataflow:
    s = settings or from_env(Settings, prefix="AGENT_")
    topics = s.topics
    app = Application.start(s, topic_specs(topics, s.partitions, of="agent"))
    policy = s.policy()
    key = os.environ.get("AGENT_LLM_API_KEY", "")
    model = ChatClient(s.llm_url, s.llm_model, key, s.llm_timeout_s, max_connections=s.llm_capacity)
    journal = CallJournal(Journal(s.state_dir / "llm_calls" / f"process-{process_id()}", ttl_s=2 * 86_400))

    async def decide(call: LlmCall) -> ChatReply:
        return journal.recorded(call) or await model.complete(call.messages, call.tools or None, call.max_tokens)

    flow = Dataflow("agent")
    source = app.source(topics.inputs)
    inputs = try_map("parse", op.input("inputs", flow, source), lambda m: parse_input(m, topics, policy))
    # (tenant, TaskSubmitted | LlmReplied | ToolReplied | HumanReplied)
    state = StateConfig(s.state_dir, shards=s.state_shards)
    program = partial(TaskProgram, policy, topics)
    decided = op.key_rm("unkey", recorded_state("tasks", inputs.oks, program, state, input_id))
    # LlmCall (a model call within every cap) | KafkaMessage | DeadLetter
    calls = split("calls", decided, LlmCall, object)
    config = AsyncConfig(s.llm_capacity, s.llm_timeout_s + 5, s.llm_retries, retry_if=worth_retrying)
    replies = async_map("llm", op.key_on("by_task", calls.first, lambda c: c.task_id), decide, config)
    # (task id, Done(LlmCall, ChatReply) | Failed(LlmCall))
    answered = op.map("encode", op.key_rm("unkey_replies", replies), lambda r: journal.reply(r, topics.llm_replies))
    dead = op.map("dead", op.merge("errs", inputs.errs, calls.rest), _dead_or_message)
    # KafkaMessage: model replies, tool calls, escalations, results, audit records, dead letters
    # Every turn waits on this output: no lingering for fuller batches.
    sink = app.sink(dlq_topic=topics.tasks + DLQ_SUFFIX, config={"linger.ms": 0})
    kafka_output("publish", op.merge("out", answered, dead), sink)
    return flow


class CallInDoubt(PatternflowError):
    """A model call was started before a restart and its outcome was lost: it may have been made."""


class RecordedFailure(PatternflowError):
    """A model call that failed before a restart, answered with the same error again."""

    def __init__(self, error: str, flags: dict[str, bool]) -> None:
        super().__init__(error)
        self.flags = flags


class CallJournal:
    """Each model call's fate, written through to a :class:`~state.journal.Journal` by call id
    (``<task id>/<seq>``): ``started`` before the call is made, then its reply or error before that is
    published. A call asked for again (the tasks' state resumed from a snapshot older than its
    reply) is answered from here: the published reply or error again, or :class:`CallInDoubt`
    when it was started by a process that died before its outcome was recorded."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._started: set[str] = set()  # by this process: a retry of one is not in doubt

    def recorded(self, call: LlmCall) -> ChatReply | None:
        """The reply to ``call`` if one is recorded; ``None`` when it is to be made (and now is started)."""
        call_id = f"{call.task_id}/{call.seq}"
        record = None if call_id in self._started else self._journal.get(call_id)
        if record is None:
            self._started.add(call_id)
            self._journal.put(call_id, {"started": True})
            return None
        if "reply" in record:
            return ChatReply.from_json(record["reply"])
        if "error" in record:
            raise RecordedFailure(record["error"], record.get("flags", {}))
        raise CallInDoubt("the call was started before a restart and its outcome was lost: it may have been made")

    def reply(self, result: Done[LlmCall, ChatReply] | Failed[LlmCall], topic: str) -> KafkaMessage:
        """The call's outcome for ``agent.llm_replies``, journaled first."""
        call = result.item
        call_id = f"{call.task_id}/{call.seq}"
        self._started.discard(call_id)
        if isinstance(result, Done):
            self._journal.put(call_id, {"reply": result.value.to_json()})
            return llm_reply_message(topic, call, result.value, None, result.seconds)
        exc = result.exception
        if isinstance(exc, CallInDoubt):
            return llm_reply_message(topic, call, None, str(exc), result.seconds, in_doubt=True)
        if isinstance(exc, RecordedFailure):
            return llm_reply_message(topic, call, None, str(exc), result.seconds, **exc.flags)
        # Worth waiting out: a timeout (which may have been billed) or a server that did not take it (unbilled).
        flags = {"outage": result.timed_out or worth_retrying(exc), "billed": not isinstance(exc, LLMUnavailable)}
        self._journal.put(call_id, {"error": result.error, "flags": flags})
        return llm_reply_message(topic, call, None, result.error, result.seconds, **flags)


def _dead_or_message(item: object) -> KafkaMessage:
    if isinstance(item, DeadLetter):
        return to_dlq_message(item)
    assert isinstance(item, KafkaMessage), f"the task program emitted {item!r}"
    return item
