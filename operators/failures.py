"""The first failure of a dataflow cluster, named in every process's log.

Bytewax 0.21.1 hides why a process of a cluster stopped: the exception raised
in a worker reaches Rust as a panic, the process's network threads panic in
turn, and every process of the cluster, the failing one included, exits with
only ``PanicException: Send thread panic``. Two pieces put the cause back:

- :func:`guard` wraps the Python code Bytewax calls in every step of a flow
  (each core step's mapper, predicate, inspector, stateful logic, sources and
  sinks and their partitions): the first exception a step raises is handed to
  ``on_failure`` with the step's id before it goes on into Bytewax;
- :class:`FailureBoard` publishes that cause to a Kafka topic (``patternflow.failures``
  unless named: :func:`failures_topic`), keyed by the cluster (the dataflow and its
  process addresses), and reads it back: a process that stopped without a cause of
  its own (a peer failed) names its peer's.

``python -m dataflows.launch`` uses both; ``python -m bytewax.run`` does not.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from bytewax.dataflow import Dataflow, Operator, _CoreOperator
from bytewax.inputs import AbortExecution, StatefulSourcePartition, StatelessSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import StatefulSinkPartition, StatelessSinkPartition
from confluent_kafka import Producer

from operators.kafka import TopicSpec, ensure_topics, producer_config
from operators.kafka.tools import read_batches

__all__ = ["FAILURES_TOPIC", "FAILURES_TOPIC_ENV", "Failure", "FailureBoard", "cluster_key", "failures_topic", "guard"]

FAILURES_TOPIC = "patternflow.failures"
FAILURES_TOPIC_ENV = "PATTERNFLOW_FAILURES_TOPIC"
OnFailure = Callable[[str, BaseException], None]

# What Bytewax calls in each core step: functions, and objects (a source, a sink) whose methods it calls;
# and what those calls build that it calls in turn.
_FUNCTIONS = ("mapper", "predicate", "inspector", "builder")
_OBJECTS = ("source", "sink")
_BUILT = (
    StatefulBatchLogic,
    StatefulSourcePartition,
    StatelessSourcePartition,
    StatefulSinkPartition,
    StatelessSinkPartition,
)
_NOT_FAILURES = (StopIteration, AbortExecution, KeyboardInterrupt)  # how sources end, and Ctrl-C


def guard(flow: Dataflow, on_failure: OnFailure) -> Dataflow:
    """``flow``, its steps' code wrapped so that an exception is reported to ``on_failure(step_id, exc)``."""
    _guard_steps(flow.substeps, on_failure)
    return flow


def _guard_steps(steps: Sequence[Operator], on_failure: OnFailure) -> None:
    for step in steps:
        if not isinstance(step, _CoreOperator):
            _guard_steps(step.substeps, on_failure)
            continue
        # Steps are frozen dataclasses; Bytewax reads these fields when it builds the flow.
        for name in _FUNCTIONS:
            if hasattr(step, name):
                object.__setattr__(step, name, _call(getattr(step, name), step.step_id, on_failure))
        for name in _OBJECTS:
            if hasattr(step, name):
                object.__setattr__(step, name, _Guarded(getattr(step, name), step.step_id, on_failure))


def _call(fn: Callable[..., Any], step_id: str, on_failure: OnFailure) -> Callable[..., Any]:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            out = fn(*args, **kwargs)
        except _NOT_FAILURES:
            raise
        except BaseException as exc:
            on_failure(step_id, exc)
            raise
        if isinstance(out, _BUILT):
            return _Guarded(out, step_id, on_failure)
        if isinstance(out, Iterator):  # a lazy mapper's items (op.map) are made while Bytewax iterates
            return _iterate(out, step_id, on_failure)
        return out

    return guarded


def _iterate(items: Iterator[Any], step_id: str, on_failure: OnFailure) -> Iterator[Any]:
    try:
        yield from items
    except _NOT_FAILURES:
        raise
    except BaseException as exc:
        on_failure(step_id, exc)
        raise


class _Guarded:
    """Stands in for a source, sink, partition or stateful logic: its methods report what they raise.
    Bytewax checks these objects' classes, which this one reports as its target's."""

    def __init__(self, target: Any, step_id: str, on_failure: OnFailure) -> None:
        self._target, self._step_id, self._on_failure = target, step_id, on_failure

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(self._target)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        return _call(attr, self._step_id, self._on_failure) if callable(attr) else attr


@dataclass(frozen=True)
class Failure:
    """A process's first failure: which process, which step, and the exception with its traceback."""

    process_id: int
    step_id: str
    error: str  # "ExceptionType: message"
    traceback: str

    @classmethod
    def of(cls, process_id: int, step_id: str, exc: BaseException) -> Failure:
        where = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # less guard's own frame
        trace = "".join(traceback.format_exception(type(exc), exc, where))
        return cls(process_id, step_id, f"{type(exc).__name__}: {exc}", trace)

    def __str__(self) -> str:
        return f"process {self.process_id}, step {self.step_id!r}: {self.error}"


class FailureBoard:
    """Where the processes of a cluster tell each other why they stopped: one Kafka topic, keyed by cluster."""

    def __init__(
        self, brokers: str, cluster: str, *, topic: str = FAILURES_TOPIC, outage_limit_s: float = 30.0
    ) -> None:
        self.brokers, self.cluster, self.topic = brokers, cluster, topic
        self._outage_limit_s = outage_limit_s
        self._lock = threading.Lock()

    def ensure(self) -> FailureBoard:
        ensure_topics(self.brokers, [TopicSpec(self.topic, partitions=1, retention_ms=7 * 86_400_000)])
        return self

    def publish(self, failure: Failure, *, timeout_s: float = 5.0) -> bool:
        """Publish ``failure``; whether the broker took it within ``timeout_s``."""
        value = orjson.dumps({"cluster": self.cluster, **failure.__dict__})
        with self._lock:
            producer = Producer(producer_config(self.brokers, outage_limit_s=timeout_s))
            producer.produce(self.topic, value, key=self.cluster.encode())
            return producer.flush(timeout_s) == 0

    def first(self, since_ms: int, *, wait_s: float = 10.0) -> Failure | None:
        """The first failure published for this cluster at or after ``since_ms``, waiting up to ``wait_s`` for one."""
        deadline = time.monotonic() + wait_s
        while True:
            for batch in read_batches(self.brokers, self.topic, since_ms=since_ms, outage_limit_s=self._outage_limit_s):
                for key, value in zip(batch.keys, batch.values, strict=True):
                    if key == self.cluster.encode() and value:
                        doc = orjson.loads(value)
                        return Failure(doc["process_id"], doc["step_id"], doc["error"], doc["traceback"])
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)


def failures_topic() -> str:
    """``$PATTERNFLOW_FAILURES_TOPIC``, or :data:`FAILURES_TOPIC`: where the launcher's clusters publish
    their failures (on a secured cluster, a topic each dataflow's principal may read and write)."""
    return os.environ.get(FAILURES_TOPIC_ENV) or FAILURES_TOPIC


def cluster_key(flow_id: str, addresses: list[str]) -> str:
    """The key a cluster's failures are published under: its dataflow and its processes' addresses."""
    return f"{flow_id}@{';'.join(addresses)}"
