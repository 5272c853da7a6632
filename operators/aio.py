"""Bounded-concurrency async I/O for blocking calls (LLM, tools, HTTP), in the spirit of Flink's Async I/O.

Bytewax has no async operator: a step that calls an LLM for 200 ms would hold
every item behind it. :func:`async_map` hands each item to a coroutine on an
asyncio event loop the process runs in a daemon thread, keeps up to
``capacity`` of them in flight (the rest wait in order), and emits each result
as it completes (unordered). Each call has a timeout; failures ``retry_if``
accepts are retried with jittered exponential backoff. What still fails comes
out as :class:`Failed` with the reason, never as a crash: the caller decides
what a failure means.

Recovery: a shard's snapshot is the items it holds without a result emitted
(waiting or in flight). A resumed execution submits them again, so after a
kill -9 every item gets its result; a call in flight at the kill runs twice
(the price of at-least-once: the items' consumers drop duplicates by id).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Generic, TypeVar

import bytewax.operators as op
from bytewax.dataflow import operator
from bytewax.operators import KeyedStream, StatefulBatchLogic

from operators import metrics
from operators.stateful import shard_of
from patternflow.retry import RetryPolicy

__all__ = ["AsyncConfig", "Done", "Failed", "async_map", "attempts", "event_loop"]

X = TypeVar("X")
Y = TypeVar("Y")


def _never(exc: BaseException) -> bool:
    return False


@dataclass(frozen=True)
class AsyncConfig:
    """How an :func:`async_map` step calls out.

    ``capacity`` calls in flight per step and process at most (split over its
    ``shards``, which spread the items over the workers); ``timeout_s`` per
    attempt; up to ``retries`` more attempts for failures ``retry_if`` accepts,
    after ``backoff_s`` doubling each time (jittered): :attr:`retry` is that
    policy. A timeout is not retried: a call that hung once mostly hangs again,
    and retrying it multiplies the wait. ``poll_ms``: how often the step looks
    for completed calls.
    """

    capacity: int = 1_000
    timeout_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.2
    retry_if: Callable[[BaseException], bool] = _never
    shards: int = 1
    poll_ms: int = 1

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.shards < 1:
            raise ValueError(f"capacity and shards must be >= 1, got {self.capacity} and {self.shards}")
        if self.retries < 0 or self.backoff_s <= 0:  # refused here rather than at an item's first call
            raise ValueError(f"retries must be >= 0 and backoff_s > 0, got {self.retries} and {self.backoff_s}")

    @property
    def retry(self) -> RetryPolicy:
        """The policy ``retries``, ``backoff_s`` and ``retry_if`` describe; a timeout is never retried."""
        return RetryPolicy(
            retry_on=partial(_retried, self.retry_if),
            initial_interval_s=self.backoff_s,
            max_attempts=self.retries + 1,
        )


def _retried(retry_if: Callable[[BaseException], bool], exc: BaseException) -> bool:
    return not isinstance(exc, TimeoutError) and retry_if(exc)


@dataclass(frozen=True)
class Done(Generic[X, Y]):
    item: X
    value: Y
    attempts: int
    seconds: float


@dataclass(frozen=True)
class Failed(Generic[X]):
    """The call failed past its retries (``error`` says how) or timed out; ``exception`` is what the
    last attempt raised, so a caller can tell failures apart by type."""

    item: X
    error: str
    timed_out: bool
    attempts: int
    seconds: float
    exception: Exception = field(compare=False)


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def event_loop() -> asyncio.AbstractEventLoop:
    """The process's event loop for async steps, started on first use in a daemon thread."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="patternflow-async", daemon=True).start()
            _loop = loop
        return _loop


async def attempts(fn: Callable[[X], Awaitable[Y]], item: X, config: AsyncConfig) -> Done[X, Y] | Failed[X]:
    """``await fn(item)`` under ``config``'s timeout, retried as it says: :class:`Done` or :class:`Failed`."""
    start = time.perf_counter()
    tries = 0

    async def once() -> Y:
        nonlocal tries
        tries += 1
        return await asyncio.wait_for(fn(item), config.timeout_s)

    try:
        value = await config.retry.acall(once)
    except TimeoutError as exc:
        error = f"timed out after {config.timeout_s:g} s"
        return Failed(item, error, True, tries, time.perf_counter() - start, exc)
    except Exception as exc:
        return Failed(item, f"{type(exc).__name__}: {exc}", False, tries, time.perf_counter() - start, exc)
    return Done(item, value, tries, time.perf_counter() - start)


class _AsyncLogic(StatefulBatchLogic[X, Done[X, Y] | Failed[X], list[X]], Generic[X, Y]):
    def __init__(
        self, step_id: str, fn: Callable[[X], Awaitable[Y]], config: AsyncConfig, resume: list[X] | None
    ) -> None:
        self._fn = fn
        self._config = config
        self._limit = -(-config.capacity // config.shards)
        self._waiting: deque[X] = deque(resume or ())
        self._running: dict[int, X] = {}
        self._completed: deque[tuple[int, Future[Done[X, Y] | Failed[X]]]] = deque()
        self._next_id = 0
        self._in_flight = metrics.ASYNC_IN_FLIGHT.labels(step_id)
        self._waiting_gauge = metrics.ASYNC_WAITING.labels(step_id)
        self._ok = metrics.ITEMS.labels(step_id, "ok")
        self._failed = metrics.ITEMS.labels(step_id, "failed")

    def _start(self) -> None:
        loop = event_loop()
        while self._waiting and len(self._running) < self._limit:
            item = self._waiting.popleft()
            call_id, self._next_id = self._next_id, self._next_id + 1
            self._running[call_id] = item
            future = asyncio.run_coroutine_threadsafe(attempts(self._fn, item, self._config), loop)
            future.add_done_callback(partial(self._on_done, call_id))

    def _on_done(self, call_id: int, future: Future[Done[X, Y] | Failed[X]]) -> None:
        self._completed.append((call_id, future))  # in the event loop's thread: deque appends are atomic

    def _emit(self) -> tuple[list[Done[X, Y] | Failed[X]], bool]:
        out: list[Done[X, Y] | Failed[X]] = []
        while self._completed:
            call_id, future = self._completed.popleft()
            del self._running[call_id]
            out.append(future.result())
        self._start()
        self._ok.inc(sum(isinstance(o, Done) for o in out))
        self._failed.inc(sum(isinstance(o, Failed) for o in out))
        self._in_flight.set(len(self._running))
        self._waiting_gauge.set(len(self._waiting))
        return out, StatefulBatchLogic.RETAIN

    def on_batch(self, values: list[X]) -> tuple[list[Done[X, Y] | Failed[X]], bool]:
        self._waiting.extend(values)
        return self._emit()

    def on_notify(self) -> tuple[list[Done[X, Y] | Failed[X]], bool]:
        return self._emit()

    def on_eof(self) -> tuple[list[Done[X, Y] | Failed[X]], bool]:
        # Bytewax notifies no more after EOF: the last calls are waited for here.
        out: list[Done[X, Y] | Failed[X]] = []
        while self._running or self._waiting:
            time.sleep(self._config.poll_ms / 1000)
            out.extend(self._emit()[0])
        return out, StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if self._completed:
            return datetime.now(UTC)
        if self._running or self._waiting:
            return datetime.now(UTC) + timedelta(milliseconds=self._config.poll_ms)
        return None

    def snapshot(self) -> list[X]:
        return [*self._running.values(), *self._waiting]


@operator
def async_map(
    step_id: str, up: KeyedStream[X], fn: Callable[[X], Awaitable[Y]], config: AsyncConfig
) -> KeyedStream[Done[X, Y] | Failed[X]]:
    """``await fn(item)`` for every item, ``config.capacity`` at a time; results in completion order,
    keyed as their items were."""

    def to_shard(key_value: tuple[str, X]) -> tuple[str, tuple[str, X]]:
        return shard_of(key_value[0], config.shards), key_value

    def build(resume: list[tuple[str, X]] | None) -> _AsyncLogic[tuple[str, X], Any]:
        async def call(key_value: tuple[str, X]) -> Any:
            return await fn(key_value[1])

        return _AsyncLogic(step_id, call, config, resume)

    outs = op.stateful_batch("calls", op.map("shard", up, to_shard), build)

    def unshard(shard_out: tuple[str, Done[Any, Y] | Failed[Any]]) -> tuple[str, Done[X, Y] | Failed[X]]:
        result = shard_out[1]
        key, item = result.item
        return key, replace(result, item=item)

    return op.map("unshard", outs, unshard)
