"""Map an ML use case to one of the five patterns, with reasons, a starting point and warnings.

A use case is a small YAML document (:class:`UseCase`); :func:`advise` returns
the pattern it needs (:class:`Advice`): why, the dataflow and settings to
start from, and a warning for each thing declared that does not fit the
pattern, the four antipatterns first among them:

- online serving for batch-shaped work (big requests, relaxed deadlines, a
  schedule);
- streaming without state (features over history, no keyed state);
- RAG without retrieval eval (no labelled query set);
- agent loops without caps (no iteration or budget limit).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from patternflow.errors import PatternflowError

__all__ = ["Advice", "UseCase", "UseCaseError", "advise"]

Arrives = Literal["on_request", "on_schedule", "continuously"]
ARRIVALS = ("on_request", "on_schedule", "continuously")


class UseCaseError(PatternflowError, ValueError):
    """The use case is not a valid description: the message says which field and why."""


@dataclass(frozen=True)
class UseCase:
    """What a use case declares. Only ``name`` and ``arrives`` are required."""

    name: str
    arrives: Arrives  # how its inputs come: a request waiting for the answer, a schedule, or a stream of events
    latency_budget_ms: float | None = None  # how long a caller waits for one answer
    requests_per_s: float | None = None
    rows_per_request: int = 1
    can_wait: bool = False  # results may come later, fetched by id
    freshness_s: float | None = None  # how old a result or an index may be
    needs_history: bool = False  # features over past events (counts, velocities, windows)
    keeps_state: bool | None = None  # whether the planned design keeps per-key state (None: not said)
    needs_retrieval: bool = False
    eval_set: str | None = None  # the labelled queries retrieval is measured on
    needs_tools: bool = False
    max_iterations: int | None = None
    max_cost_usd: float | None = None

    @classmethod
    def from_doc(cls, doc: Any) -> UseCase:
        if not isinstance(doc, dict):
            raise UseCaseError("a use case is a YAML mapping of fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise UseCaseError(f"unknown fields {unknown}: the fields are {sorted(known)}")
        for required in ("name", "arrives"):
            if required not in doc:
                raise UseCaseError(f"{required!r} is required")
        if doc["arrives"] not in ARRIVALS:
            raise UseCaseError(f"arrives must be one of {', '.join(ARRIVALS)}, got {doc['arrives']!r}")
        for name in ("latency_budget_ms", "requests_per_s", "freshness_s", "max_cost_usd"):
            value = doc.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
                raise UseCaseError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("rows_per_request", "max_iterations"):
            value = doc.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UseCaseError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("can_wait", "needs_history", "keeps_state", "needs_retrieval", "needs_tools"):
            value = doc.get(name)
            if value is not None and not isinstance(value, bool):
                raise UseCaseError(f"{name} must be true or false, got {value!r}")
        return cls(**doc)


@dataclass(frozen=True)
class Advice:
    use_case: str
    pattern: str
    dataflow: str
    reasons: list[str]
    settings: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        if self.dataflow == "dataflows.batch_inference":  # a bounded job: a command for orchestrators
            return "python -m dataflows.batch_inference --help"
        return f"python -m dataflows.launch {self.dataflow.removeprefix('dataflows.')} --snapshot-s 1"

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "command": self.command}

    def text(self) -> str:
        lines = [f"{self.use_case}: {self.pattern}", "", "why:"]
        lines += [f"  - {r}" for r in self.reasons]
        env = [f"{name}={value}" for name, value in self.settings.items()]
        lines += ["", "start from:", "  " + " ".join([*env, self.command])]
        if self.warnings:
            lines += ["", "warnings:"]
            lines += [f"  ! {w}" for w in self.warnings]
        return "\n".join(lines)


# What the patterns deliver here (measured by bench/, see the README): online round trip p50 3 ms; RAG query
# p95 91 ms without generation, about 0.6 s with extractive answers; a document searchable in about 1 s.
ONLINE_FLOOR_MS = 5
RAG_QUERY_MS = 150
RAG_ANSWER_MS = 1_000
RAG_FRESHNESS_S = 2
AGENT_TURN_MS = 1_000  # one model call, at least, per turn
BATCH_SHAPED_ROWS = 1_000  # rows in one request past which online serving is the wrong shape
WAITING_MS = 60_000  # a caller that waits a minute or more can take the result by id
MAX_JOB_ROWS = 10_000  # JOBS_MAX_INPUTS' limit
ONLINE_MAX_RPS = 3_000  # one worker sustained 3,200 requests/s at p99 <= 100 ms (bench.online)


def advise(uc: UseCase) -> Advice:
    """The pattern ``uc`` needs, with reasons, starting settings and warnings."""
    if uc.needs_tools:
        return _agent(uc)
    if uc.needs_retrieval:
        return _rag(uc)
    if uc.arrives == "continuously":
        return _streaming(uc)
    if uc.arrives == "on_schedule":
        return _batch(uc, ["inputs arrive on a schedule: a bounded job over a fixed range, throughput first"])
    return _on_request(uc)


def _on_request(uc: UseCase) -> Advice:
    budget = uc.latency_budget_ms
    waits = not uc.can_wait and (budget is None or budget < WAITING_MS)
    if uc.rows_per_request > MAX_JOB_ROWS and not waits:
        return _batch(
            uc, [f"{uc.rows_per_request} rows at a time, and no one waits: a batch job over files or a topic"]
        )
    if not waits:
        reasons = ["the caller does not wait for the answer: enqueue, run at the workers' pace, fetch it by id"]
        if uc.rows_per_request >= BATCH_SHAPED_ROWS:
            reasons.append(f"{uc.rows_per_request} rows per request is batch-shaped: one job runs them together")
        rows = max(BATCH_SHAPED_ROWS, uc.rows_per_request)
        return Advice(uc.name, "async jobs", "dataflows.async_jobs", reasons, {"JOBS_MAX_INPUTS": str(rows)})
    reasons = ["a caller waits for each answer: request/reply, micro-batched, each request under its deadline"]
    if budget is not None:
        reasons.append(f"send each request with the deadline_ms header at now + {budget:g} ms")
    warnings = []
    if budget is None:
        warnings.append("no latency_budget_ms declared: say how long a caller waits, so requests carry a deadline")
    elif budget < ONLINE_FLOOR_MS:
        warnings.append(
            f"a {budget:g} ms budget is under the {ONLINE_FLOOR_MS} ms a Kafka round trip takes here: "
            "call the model in-process"
        )
    if uc.rows_per_request >= BATCH_SHAPED_ROWS:
        warnings.append(
            f"online serving for batch-shaped work: {uc.rows_per_request} rows per request from one caller; "
            "send them as an async job (or a batch job) unless the caller truly waits for them"
        )
    if uc.requests_per_s and uc.requests_per_s > ONLINE_MAX_RPS:
        warnings.append(
            f"{uc.requests_per_s:g} requests/s is past the {ONLINE_MAX_RPS:,} one worker sustained at "
            "p99 <= 100 ms here: plan more partitions and workers"
        )
    return Advice(uc.name, "online inference", "dataflows.online_inference", reasons, {}, warnings)


def _batch(uc: UseCase, reasons: list[str]) -> Advice:
    warnings = []
    if uc.latency_budget_ms is not None and uc.latency_budget_ms < WAITING_MS:
        warnings.append("a latency budget does not fit a scheduled job: if a caller waits, this is online inference")
    return Advice(uc.name, "batch inference", "dataflows.batch_inference", reasons, {}, warnings)


def _streaming(uc: UseCase) -> Advice:
    reasons = ["inputs are a continuous stream of events: decisions as they arrive"]
    warnings = []
    if uc.needs_history:
        reasons.append("features over past events: windows and per-key state, kept in RocksDB and snapshotted")
        if uc.keeps_state is False:
            warnings.append(
                "streaming without state: the features need history, but the design keeps no keyed "
                "state; recomputing from each event alone loses what came before"
            )
    if uc.freshness_s is not None and uc.freshness_s >= 3_600:
        warnings.append(f"results may be {uc.freshness_s:g} s old: a scheduled batch job is cheaper than a stream")
    dataflow = "dataflows.fraud_detection" if uc.needs_history else "dataflows.telemetry_anomalies"
    return Advice(uc.name, "streaming inference", dataflow, reasons, {}, warnings)


def _rag(uc: UseCase) -> Advice:
    reasons = [
        "answers come from documents: index them as they arrive, retrieve (vector + BM25), answer with citations"
    ]
    warnings = []
    if uc.eval_set is None:
        warnings.append(
            "RAG without retrieval eval: declare eval_set (labelled queries, BEIR format) and run "
            "scripts/eval_rag.py against each index and model version"
        )
    if uc.latency_budget_ms is not None and uc.latency_budget_ms < RAG_ANSWER_MS:
        if uc.latency_budget_ms < RAG_QUERY_MS:
            warnings.append(f"a {uc.latency_budget_ms:g} ms budget is under retrieval alone (p95 about 91 ms here)")
        else:
            warnings.append(
                f"a {uc.latency_budget_ms:g} ms budget fits retrieval, not generation: "
                'ask with "answer": false and generate elsewhere, or relax the budget'
            )
    if uc.freshness_s is not None and uc.freshness_s < RAG_FRESHNESS_S:
        warnings.append(f"freshness of {uc.freshness_s:g} s is under the about 1 s a document takes to be searchable")
    return Advice(uc.name, "RAG", "dataflows.rag", reasons, {}, warnings)


def _agent(uc: UseCase) -> Advice:
    reasons = ["the work needs tools chosen as it goes: an LLM decides, the runtime checks, tools act, in a loop"]
    warnings = []
    if uc.max_iterations is None or uc.max_cost_usd is None:
        missing = [n for n in ("max_iterations", "max_cost_usd") if getattr(uc, n) is None]
        warnings.append(
            f"agent loops without caps: declare {' and '.join(missing)}; the runtime's defaults "
            "(10 iterations, 0.10 USD) apply until you do"
        )
    if uc.latency_budget_ms is not None and uc.latency_budget_ms < 3 * AGENT_TURN_MS:
        warnings.append(
            f"a {uc.latency_budget_ms:g} ms budget leaves room for barely one model call: if the steps are "
            "known in advance, a fixed pipeline (online inference, RAG) is faster and cheaper"
        )
    if uc.needs_retrieval:
        reasons.append("retrieval is one of its tools: run dataflows.rag beside it (the retrieve tool)")
    settings = {
        "AGENT_MAX_ITERATIONS": str(uc.max_iterations or 10),
        "AGENT_MAX_COST_USD": str(uc.max_cost_usd if uc.max_cost_usd is not None else 0.10),
    }
    return Advice(uc.name, "agent loop", "dataflows.agent", reasons, settings, warnings)
