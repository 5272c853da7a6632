"""Prometheus metrics shared by every dataflow.

Each process serves one endpoint (:func:`serve`); series carry the step id so a
dashboard can break a dataflow down step by step.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.metrics_core import Metric

from operators.settings import process_id
from patternflow.secrets import public

if TYPE_CHECKING:
    from models.quality import Prequential

__all__ = [
    "AGENT_ITERATIONS",
    "AGENT_SPEND",
    "AGENT_TASKS",
    "AGENT_WAITING_MODEL",
    "ASYNC_IN_FLIGHT",
    "ASYNC_WAITING",
    "BATCH_EXPECTED",
    "BATCH_ROWS",
    "CONSUMER_LAG",
    "DATAFLOW",
    "ERRORS",
    "INFERENCE_SECONDS",
    "ITEMS",
    "MODEL_PR_AUC",
    "MODEL_ROC_AUC",
    "ONLINE_BATCH_FILL",
    "ONLINE_REQUESTS",
    "RAG_EVAL",
    "RAG_EVAL_TIME",
    "RAG_INDEX",
    "STATE_KEYS",
    "STEP_SECONDS",
    "linger",
    "model_quality",
    "serve",
]

ITEMS = Counter("patternflow_items", "Items handled by a step, by outcome", ["step", "outcome"])
ERRORS = Counter("patternflow_errors", "Items a step sent to the dead-letter topic", ["step", "error"])
STEP_SECONDS = Histogram(
    "patternflow_step_seconds",
    "Time a step spent on one batch of items",
    ["step"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
INFERENCE_SECONDS = Histogram(
    "patternflow_inference_seconds",
    "Per-request latency of online inference, by stage: queue (produced to read), batch_wait "
    "(read to batch formed), compute (the batch's forward pass), serialize, end_to_end (produced to reply)",
    ["model", "stage"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
ONLINE_REQUESTS = Counter(
    "patternflow_online_requests",
    "Online inference requests, by model, client (its reply topic and partition) and deadline budget: "
    "tight (at most RELAXED_BUDGET_S from send to deadline) or relaxed (more, or no deadline)",
    ["model", "client", "budget"],
)
ONLINE_BATCH_FILL = Histogram(
    "patternflow_online_batch_fill",
    "Size of each micro-batch formed, as a share of max_batch_size",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.99, 1.0),
)
CONSUMER_LAG = Gauge(
    "patternflow_consumer_lag_messages",
    "Messages between a source partition's position and its end",
    ["step", "topic", "partition"],
)

BATCH_ROWS = Counter("patternflow_batch_rows", "Rows a batch job has written, by outcome (ok, bad)", ["job", "outcome"])
BATCH_EXPECTED = Gauge("patternflow_batch_rows_expected", "Rows in a batch job's input range", ["job"])

STATE_KEYS = Gauge(
    "patternflow_state_keys",
    "Keys a stateful step's shard holds (RocksDB's estimate), at its last snapshot",
    ["step", "shard"],
)

ASYNC_IN_FLIGHT = Gauge("patternflow_async_in_flight", "Calls an async step has in flight", ["step"])
ASYNC_WAITING = Gauge("patternflow_async_waiting", "Items an async step holds until a call slot frees", ["step"])

AGENT_TASKS = Counter(
    "patternflow_agent_tasks",
    "Agent tasks finished, by status and reason (the cap hit, for cap_exceeded)",
    ["status", "reason"],
)
AGENT_WAITING_MODEL = Gauge(
    "patternflow_agent_waiting_model",
    "Agent tasks waiting for the model to come back (it failed past its retries); they ask again",
)
AGENT_ITERATIONS = Histogram(
    "patternflow_agent_iterations",
    "Model calls a finished agent task made, by status",
    ["status"],
    buckets=(1, 2, 3, 5, 8, 13, 21, 34, 55),
)
AGENT_SPEND = Counter(
    "patternflow_agent_llm",
    "Agent model calls' tokens and cost, by model and what (prompt_tokens, completion_tokens, usd)",
    ["model", "what"],
)

MODEL_ROC_AUC = Gauge(
    "patternflow_model_roc_auc", "Prequential ROC-AUC of an online model, by step and key", ["step", "key"]
)
MODEL_PR_AUC = Gauge(
    "patternflow_model_pr_auc",
    "Prequential PR-AUC (average precision) of an online model, by step and key",
    ["step", "key"],
)

RAG_INDEX = Info("patternflow_rag_index", "The version of the index a RAG dataflow serves (model, chunking, fusion)")
RAG_EVAL = Gauge(
    "patternflow_rag_eval",
    "Figures of the latest retrieval eval run recorded for the index the RAG dataflow serves, by split and metric",
    ["split", "metric"],
)
RAG_EVAL_TIME = Gauge(
    "patternflow_rag_eval_timestamp_seconds", "When that eval run was recorded (epoch seconds)", ["split"]
)

DATAFLOW = Info("patternflow_dataflow", "A running dataflow and its settings, one label each", ["dataflow"])

_served: set[int] = set()
_lock = threading.Lock()


class _Scraped:
    """The default registry as the endpoint serves it, counting the scrapes it has answered."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = threading.Condition()

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        with self.changed:
            self.count += 1
            self.changed.notify_all()

    def restricted_registry(self, names: Iterable[str]) -> Any:
        return REGISTRY.restricted_registry(names)


_scraped = _Scraped()


def linger(timeout_s: float, scrapes: int = 2) -> bool:
    """Wait, at most ``timeout_s``, until the endpoint has answered ``scrapes`` more scrapes, so a
    process about to exit (a batch job) has its last counts in Prometheus, and a rate over them
    (two samples at least). An endpoint nobody has scraped yet is not waited for. True if scraped."""
    with _scraped.changed:
        if _scraped.count == 0:
            return False
        target = _scraped.count + scrapes
        return _scraped.changed.wait_for(lambda: _scraped.count >= target, timeout_s)


def model_quality(step: str, key: str, quality: Prequential) -> None:
    """Export a model's prequential ROC-AUC and PR-AUC."""
    MODEL_ROC_AUC.labels(step, key).set(quality.roc_auc)
    MODEL_PR_AUC.labels(step, key).set(quality.pr_auc)


def recovery_directory(argv: list[str] | None = None) -> str:
    """The ``-r`` / ``--recovery-directory`` that ``python -m bytewax.run`` was given, or its
    environment variable; empty when the dataflow runs without recovery."""
    args = sys.argv if argv is None else argv
    for i, arg in enumerate(args):
        if arg in ("-r", "--recovery-directory") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--recovery-directory="):
            return arg.split("=", 1)[1]
    return os.environ.get("BYTEWAX_RECOVERY_DIRECTORY", "")


def serve(port: int, settings: Any = None) -> None:
    """Serve ``/metrics`` on ``port`` plus ``BYTEWAX_PROCESS_ID`` (so processes on one
    host do not collide), once per process; ``0`` disables it. A dataflow passes its
    settings (a dataclass of ``dataflows.<name>``): they are published, secrets redacted
    (:func:`patternflow.secrets.public`), as the labels of
    ``patternflow_dataflow_info{dataflow="<name>"}``, for ``patternflow audit``, with
    ``bytewax_recovery``: the recovery directory the process runs with (empty: none)."""
    if settings is not None:
        name = type(settings).__module__.removeprefix("dataflows.")
        DATAFLOW.labels(name).info({**public(settings), "bytewax_recovery": recovery_directory()})
    if not port:
        return
    port += process_id()
    with _lock:
        if port not in _served:
            start_http_server(port, registry=_scraped)
            _served.add(port)
