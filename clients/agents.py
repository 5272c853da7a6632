"""Python client for the agent runtime (``dataflows.agent``): submit tasks, answer escalations, get results.

    with AgentClient("127.0.0.1:9092") as agents:
        task_id = agents.submit("What is 17 * 23 + 4?", tenant="acme", caps={"max_iterations": 4})
        result = agents.wait(task_id, timeout_s=60)
        result["status"], result["answer"]      # done | cap_exceeded | failed, the model's answer

        escalation = agents.wait_escalation(task_id)   # a task that asked a human
        agents.reply(escalation, "eu-west")

A background consumer follows ``agent.results`` and ``agent.escalations`` from
their beginning. A client started before the runtime waits for its topics (up
to ``wait_for_runtime_s``). :func:`ledger` rebuilds what each tenant spent from
``agent.audit``. Message formats: see :mod:`dataflows.agent.program`.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, fields
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from operators.kafka import consumer_config, partition_count, producer_config, read_topic, wait_for_topics

__all__ = ["AgentClient", "AgentTopics", "ledger"]


def ledger(brokers: str, topic_prefix: str = "agent") -> dict[tuple[str, str], float]:
    """What each tenant spent on the model, by ``(tenant, UTC day)``, rebuilt from the audit: every
    charge is one record (an ``llm`` or ``cap`` event with its call's ``seq``), however often a
    restart published it."""
    charges: dict[tuple[str, int], tuple[str, str, float]] = {}
    for message in read_topic(brokers, AgentTopics.prefixed(topic_prefix).audit):
        event = orjson.loads(message.value or b"{}")
        if event.get("event") in ("llm", "cap") and "cost_usd" in event and "seq" in event:
            day = time.strftime("%Y-%m-%d", time.gmtime(event["ts_ms"] / 1000))
            charges[event["task_id"], event["seq"]] = (event["tenant"], day, event["cost_usd"])
    spent: dict[tuple[str, str], float] = {}
    for tenant, day, usd in charges.values():
        spent[tenant, day] = spent.get((tenant, day), 0.0) + usd
    return spent


@dataclass(frozen=True)
class AgentTopics:
    """The agent runtime's topics (formats: :mod:`dataflows.agent.program`)."""

    tasks: str = "agent.tasks"
    tool_calls: str = "agent.tool_calls"
    tool_results: str = "agent.tool_results"
    llm_replies: str = "agent.llm_replies"
    human_replies: str = "agent.human_replies"
    escalations: str = "agent.escalations"
    results: str = "agent.results"
    audit: str = "agent.audit"

    @classmethod
    def prefixed(cls, prefix: str) -> AgentTopics:
        """The topics named ``<prefix>.tasks`` and so on."""
        return cls(*(f"{prefix}.{f.name}" for f in fields(cls)))

    @property
    def inputs(self) -> list[str]:
        return [self.tasks, self.tool_results, self.llm_replies, self.human_replies]


class AgentClient:
    def __init__(self, brokers: str, *, topic_prefix: str = "agent", wait_for_runtime_s: float = 120.0) -> None:
        self.topics = AgentTopics.prefixed(topic_prefix)
        followed = [self.topics.results, self.topics.escalations]
        wait_for_topics(brokers, [self.topics.tasks, *followed], timeout_s=wait_for_runtime_s, who="dataflows.agent")
        self._producer = Producer(producer_config(brokers, {"linger.ms": 0}))
        self._consumer = Consumer(consumer_config(brokers, {"fetch.wait.max.ms": 10}))
        parts = [TopicPartition(t, p, OFFSET_BEGINNING) for t in followed for p in range(partition_count(brokers, t))]
        self._consumer.assign(parts)
        self.results: dict[str, dict[str, Any]] = {}
        self.received_at: dict[str, float] = {}  # task id -> time.perf_counter() when its result arrived
        self.escalations: dict[str, dict[str, Any]] = {}  # by escalation id
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._follow, name="agent-results", daemon=True)
        self._reader.start()

    def submit(
        self,
        task: str,
        *,
        task_id: str | None = None,
        tenant: str = "default",
        tools: list[str] | None = None,
        caps: dict[str, float] | None = None,
        flush: bool = True,
    ) -> str:
        """Enqueue a task and return its id (made up unless given; an id is an idempotency key)."""
        task_id = task_id or uuid.uuid4().hex
        doc: dict[str, Any] = {"task": task, "tenant": tenant}
        if tools is not None:
            doc["tools"] = tools
        if caps:
            doc["caps"] = caps
        self._producer.produce(self.topics.tasks, orjson.dumps(doc), key=task_id.encode())
        if flush:
            self.flush()
        return task_id

    def wait_until_running(self, *, timeout_s: float = 120.0, give_up: Any = lambda: None) -> None:
        """Submit probe tasks until one is answered: a runtime started at ``latest`` answers only tasks
        submitted once it has positioned itself. ``give_up()`` returning a reason stops the wait."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            probe = self.submit("Are you running?", task_id=f"probe-{uuid.uuid4().hex}", caps={"max_iterations": 1})
            try:
                self.wait(probe, timeout_s=2.0)
                return
            except TimeoutError:
                reason = give_up()
                if reason:
                    raise RuntimeError(f"the agent runtime is not running: {reason}") from None
        raise TimeoutError(f"the agent runtime answered no task within {timeout_s} s")

    def reply(self, escalation: dict[str, Any], text: str) -> None:
        """A human's answer to ``escalation`` (for an approval: ``approve``, or why not)."""
        doc = {"escalation_id": escalation["escalation_id"], "tenant": escalation["tenant"], "reply": text}
        with self._changed:
            self.escalations.pop(escalation["escalation_id"], None)
        self._producer.produce(self.topics.human_replies, orjson.dumps(doc), key=escalation["task_id"].encode())
        self.flush()

    def flush(self, timeout_s: float = 30.0) -> None:
        if self._producer.flush(timeout_s):
            raise TimeoutError(f"the broker did not take the messages within {timeout_s} s")

    def wait(self, task_id: str, *, timeout_s: float = 60.0) -> dict[str, Any]:
        """The task's result; :class:`TimeoutError` after ``timeout_s``."""
        return self._wait(lambda: self.results.get(task_id), f"no result for task {task_id}", timeout_s)

    def wait_escalation(self, task_id: str, *, timeout_s: float = 60.0) -> dict[str, Any]:
        """The first escalation of the task not yet replied to by this client."""

        def found() -> dict[str, Any] | None:
            return next((e for e in self.escalations.values() if e["task_id"] == task_id), None)

        return self._wait(found, f"no escalation from task {task_id}", timeout_s)

    def _wait(self, check: Any, what: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while (found := check()) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what} after {timeout_s} s")
                self._changed.wait(left)
            return found

    def _follow(self) -> None:
        while not self._closed.is_set():
            try:
                # poll() returns at the first message; consume(n, t) would wait for n or t.
                first = self._consumer.poll(0.05)
                msgs = [] if first is None else [first, *self._consumer.consume(500, 0)]
            except KafkaException:  # closed under us
                return
            with self._changed:
                for msg in msgs:
                    value = msg.value()
                    if msg.error() is not None or value is None:
                        continue
                    try:
                        doc = orjson.loads(value)
                    except orjson.JSONDecodeError:
                        continue  # not written by the runtime
                    if msg.topic() == self.topics.results and "task_id" in doc:
                        self.results[doc["task_id"]] = doc
                        self.received_at.setdefault(doc["task_id"], time.perf_counter())
                    elif msg.topic() == self.topics.escalations and "escalation_id" in doc:
                        self.escalations[doc["escalation_id"]] = doc
                self._changed.notify_all()

    def close(self) -> None:
        self._closed.set()
        self._reader.join(timeout=5)
        self._consumer.close()
        self._producer.flush(5)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
