"""One retry policy for every retry loop: broker calls, LLM calls, tools, async steps.

A :class:`RetryPolicy` says what to retry (``retry_on``), how long to wait
between attempts (exponential backoff from ``initial_interval_s`` by
``backoff_factor``, capped at ``max_interval_s``, optionally jittered) and when
to stop (``max_attempts``, ``deadline_s``), after langgraph's ``RetryPolicy``
and Temporal's. :meth:`RetryPolicy.call` and :meth:`RetryPolicy.acall` run a
function under it; a failure the policy does not retry, or the last one, is
raised as it came, so callers see the real exception and its type.

    LLM_RETRY = RetryPolicy(retry_on=(ConnectionError, TimeoutError), initial_interval_s=0.25)
    reply = LLM_RETRY.call(lambda: post(url, body))
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["RetryOn", "RetryPolicy"]

T = TypeVar("T")
RetryOn = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """What to retry, how long to wait between attempts, and when to give up.

    ``retry_on``: the exception types worth another attempt, or a predicate on
    the exception; there is no default, as what a retry can fix differs by call.
    The wait after failed attempt ``n`` (from 1) is ``initial_interval_s *
    backoff_factor ** (n - 1)``, at most ``max_interval_s``; with ``jitter`` it is
    scaled by a uniform factor in [0.5, 1.5), so callers that failed together do
    not retry together. ``max_attempts`` counts the first attempt too (``None``:
    unbounded); no attempt starts more than ``deadline_s`` after the first
    (``None``: no deadline). With neither, the policy retries until the caller's
    ``on_retry`` raises (see :meth:`call`).
    """

    retry_on: RetryOn
    initial_interval_s: float = 0.5
    backoff_factor: float = 2.0
    max_interval_s: float = 128.0
    max_attempts: int | None = 3
    deadline_s: float | None = None
    jitter: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.initial_interval_s <= self.max_interval_s or self.backoff_factor < 1:
            raise ValueError(
                "a retry policy needs 0 < initial_interval_s <= max_interval_s and backoff_factor >= 1, got "
                f"{self.initial_interval_s}, {self.max_interval_s} and {self.backoff_factor}"
            )
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None, got {self.max_attempts}")
        if self.deadline_s is not None and not self.deadline_s >= 0:
            raise ValueError(f"deadline_s must be >= 0 or None, got {self.deadline_s}")

    def retries(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a failure ``retry_on`` accepts (attempts and deadline aside)."""
        if isinstance(self.retry_on, type | tuple):
            return isinstance(exc, self.retry_on)
        return self.retry_on(exc)

    def interval_s(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """The wait after failed attempt ``attempt`` (from 1); ``rand`` draws the jitter from [0, 1)."""
        try:
            grown = self.initial_interval_s * self.backoff_factor ** (attempt - 1)
        except OverflowError:  # a loop without an attempt limit reaches any attempt number
            grown = math.inf
        interval = min(self.max_interval_s, grown)
        return interval * (0.5 + rand()) if self.jitter else interval

    def next_wait_s(
        self, exc: BaseException, attempt: int, elapsed_s: float, rand: Callable[[], float] = random.random
    ) -> float | None:
        """How long to wait before another attempt, now that ``exc`` ended attempt ``attempt``
        ``elapsed_s`` after the first began; ``None``: give up."""
        if not self.retries(exc) or (self.max_attempts is not None and attempt >= self.max_attempts):
            return None
        wait = self.interval_s(attempt, rand)
        if self.deadline_s is not None and elapsed_s + wait > self.deadline_s:
            return None
        return wait

    def call(self, fn: Callable[[], T], *, on_retry: Callable[[BaseException], None] | None = None) -> T:
        """``fn()``, retried as the policy says; the failure that ends it is raised as it came.

        ``on_retry(exc)`` runs before each wait; an exception it raises ends the
        retries (how a caller keeps its own clock, as the broker outage rule does).
        """
        start, attempt = time.monotonic(), 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as exc:
                wait = self.next_wait_s(exc, attempt, time.monotonic() - start)
                if wait is None:
                    raise
                if on_retry is not None:
                    on_retry(exc)
                time.sleep(wait)

    async def acall(
        self, fn: Callable[[], Awaitable[T]], *, on_retry: Callable[[BaseException], None] | None = None
    ) -> T:
        """``await fn()``, retried as the policy says, waiting without blocking the event loop; see :meth:`call`."""
        start, attempt = time.monotonic(), 0
        while True:
            attempt += 1
            try:
                return await fn()
            except Exception as exc:
                wait = self.next_wait_s(exc, attempt, time.monotonic() - start)
                if wait is None:
                    raise
                if on_retry is not None:
                    on_retry(exc)
                await asyncio.sleep(wait)
