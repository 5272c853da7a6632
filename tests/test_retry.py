"""The retry policy every retry loop uses: its waits, its limits, and what it retries; and the
broker outage rule built on it (no broker needed)."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable

import numpy as np
import pytest
from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException

from dataflows.rag.answers import Extractive, OpenAIChat
from models.llm import LLMError, LLMRefused
from operators.aio import AsyncConfig
from operators.kafka.client import Outage
from operators.kafka.errors import KafkaUnavailable
from patternflow.retry import RetryPolicy


class Flaky(ConnectionError):
    pass


def failing(times: int, exc: Exception, calls: list[int]) -> Callable[[], str]:
    """A call that raises ``exc`` its first ``times`` calls, then answers; ``calls`` counts them."""

    def fn() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise exc
        return "ok"

    return fn


def test_waits_grow_by_the_factor_up_to_the_cap() -> None:
    policy = RetryPolicy(retry_on=Flaky, initial_interval_s=0.05, max_interval_s=2.0, jitter=False)
    assert [policy.interval_s(n) for n in range(1, 9)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert policy.interval_s(100_000) == 2.0, "an unbounded loop's late attempts stay at the cap"


def test_jitter_scales_each_wait_by_half_to_one_and_a_half_with_the_given_randomness() -> None:
    policy = RetryPolicy(retry_on=Flaky, initial_interval_s=0.25, max_interval_s=4.0)
    assert policy.interval_s(1, lambda: 0.0) == 0.125
    assert policy.interval_s(3, lambda: 0.5) == 1.0
    assert policy.interval_s(9, lambda: 0.999) == pytest.approx(4.0 * 1.499)
    seeded = [random.Random(7).random, random.Random(7).random]
    assert [policy.interval_s(2, seeded[0]) for _ in range(5)] == [policy.interval_s(2, seeded[1]) for _ in range(5)]
    draws = [policy.interval_s(2, random.Random(seed).random) for seed in range(200)]
    assert all(0.25 <= d < 0.75 for d in draws) and len(set(draws)) == 200


def test_max_attempts_counts_the_first_attempt_and_none_is_unbounded() -> None:
    policy = RetryPolicy(retry_on=Flaky, max_attempts=3)
    assert policy.next_wait_s(Flaky(), 2, 0.0) is not None
    assert policy.next_wait_s(Flaky(), 3, 0.0) is None
    unbounded = RetryPolicy(retry_on=Flaky, max_attempts=None, jitter=False, max_interval_s=1.0, initial_interval_s=1.0)
    assert unbounded.next_wait_s(Flaky(), 10_000, 1e9) == 1.0


def test_no_attempt_starts_past_the_deadline() -> None:
    policy = RetryPolicy(retry_on=Flaky, initial_interval_s=1.0, max_attempts=None, deadline_s=10.0, jitter=False)
    assert policy.next_wait_s(Flaky(), 1, 8.5) == 1.0
    assert policy.next_wait_s(Flaky(), 1, 9.5) is None, "the next attempt would start 10.5 s after the first"


def test_retry_on_takes_exception_types_or_a_predicate() -> None:
    by_types = RetryPolicy(retry_on=(Flaky, TimeoutError))
    assert by_types.retries(Flaky()) and by_types.retries(TimeoutError())
    assert not by_types.retries(ValueError())
    by_predicate = RetryPolicy(retry_on=lambda exc: "again" in exc.args)
    assert by_predicate.retries(Flaky("again")) and not by_predicate.retries(Flaky("never"))
    assert by_predicate.next_wait_s(Flaky("never"), 1, 0.0) is None


def test_call_retries_what_the_policy_accepts_and_returns_the_answer() -> None:
    calls: list[int] = []
    retried: list[BaseException] = []
    policy = RetryPolicy(retry_on=Flaky, initial_interval_s=0.001, max_attempts=3)
    assert policy.call(failing(2, Flaky("down"), calls), on_retry=retried.append) == "ok"
    assert len(calls) == 3 and [str(e) for e in retried] == ["down", "down"]


def test_call_raises_the_last_failure_as_it_came_once_attempts_run_out() -> None:
    calls: list[int] = []
    policy = RetryPolicy(retry_on=Flaky, initial_interval_s=0.001, max_attempts=3)
    with pytest.raises(Flaky, match="down"):
        policy.call(failing(5, Flaky("down"), calls))
    assert len(calls) == 3


def test_call_does_not_retry_what_the_policy_does_not_accept() -> None:
    calls: list[int] = []
    policy = RetryPolicy(retry_on=Flaky, initial_interval_s=0.001, max_attempts=None)
    with pytest.raises(ValueError, match="bad input"):
        policy.call(failing(5, ValueError("bad input"), calls))
    assert len(calls) == 1


def test_an_exception_from_on_retry_ends_an_unbounded_loop() -> None:
    """How the broker outage rule keeps its own clock across calls."""

    class GaveUp(Exception):
        pass

    seen = itertools.count(1)

    def give_up_at_the_fourth(exc: BaseException) -> None:
        if next(seen) == 4:
            raise GaveUp from exc

    calls: list[int] = []
    policy = RetryPolicy(retry_on=Flaky, initial_interval_s=0.001, max_attempts=None)
    with pytest.raises(GaveUp):
        policy.call(failing(100, Flaky("down"), calls), on_retry=give_up_at_the_fourth)
    assert len(calls) == 4


def test_acall_retries_in_the_event_loop_the_same_way() -> None:
    calls: list[int] = []
    sync = failing(2, Flaky("down"), calls)

    async def fn() -> str:
        return sync()

    policy = RetryPolicy(retry_on=Flaky, initial_interval_s=0.001, max_attempts=3)
    assert asyncio.run(policy.acall(fn)) == "ok"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(Flaky):
        asyncio.run(RetryPolicy(retry_on=Flaky, initial_interval_s=0.001, max_attempts=2).acall(fn))
    assert len(calls) == 2


def test_a_deadline_bounds_real_calls() -> None:
    calls: list[int] = []
    policy = RetryPolicy(retry_on=Flaky, initial_interval_s=0.02, max_attempts=None, deadline_s=0.1, jitter=False)
    with pytest.raises(Flaky):
        policy.call(failing(1_000, Flaky("down"), calls))
    # 0.02 + 0.04 = 0.06 s of waits fit before 0.1 s; the next 0.08 would not: three attempts, fewer if slow.
    assert 1 <= len(calls) <= 3


@pytest.mark.parametrize(
    "bad",
    [
        {"initial_interval_s": 0.0},
        {"initial_interval_s": 5.0, "max_interval_s": 1.0},
        {"backoff_factor": 0.5},
        {"max_attempts": 0},
        {"deadline_s": -1.0},
    ],
)
def test_an_impossible_policy_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(retry_on=Flaky, **bad)  # type: ignore[arg-type]


def test_the_broker_outage_clock_runs_across_calls_and_refusals_are_not_retried() -> None:
    down = KafkaException(RdKafkaError(RdKafkaError._TRANSPORT))
    outage = Outage("test", limit_s=0.2)
    calls: list[int] = []
    with pytest.raises(KafkaUnavailable):
        outage.call(failing(1_000, down, calls))
    assert len(calls) > 1, "a transient error is retried until the outage is past its limit"
    calls.clear()  # still failing: the clock does not restart with a new call
    with pytest.raises(KafkaUnavailable):
        outage.call(failing(1_000, down, calls))
    assert len(calls) == 1
    outage.ok()
    calls.clear()
    assert outage.call(failing(1, down, calls)) == "ok" and len(calls) == 2
    refused = KafkaException(RdKafkaError(RdKafkaError.TOPIC_AUTHORIZATION_FAILED))
    with pytest.raises(KafkaException):
        Outage("test").call(failing(1_000, refused, calls := []))
    assert len(calls) == 1


def test_the_settings_of_each_retry_loop_map_onto_its_old_waits() -> None:
    steps = AsyncConfig(retries=2, backoff_s=0.2, retry_if=lambda exc: True).retry
    assert steps.max_attempts == 3 and [steps.interval_s(n, lambda: 0.5) for n in (1, 2)] == [0.2, 0.4]
    assert steps.retries(ConnectionError()) and not steps.retries(TimeoutError()), "a timeout is never retried"
    unused = Extractive(lambda texts: np.zeros((len(texts), 8)))
    llm = OpenAIChat("http://127.0.0.1:9/v1", "m", fallback=unused, retries=4).retry
    assert llm.max_attempts == 5 and [llm.interval_s(n, lambda: 0.5) for n in range(1, 7)] == [0.25, 0.5, 1, 2, 4, 4]
    assert llm.retries(LLMError("HTTP 503")) and not llm.retries(LLMRefused("HTTP 400"))
    with pytest.raises(ValueError, match="retries must be >= 0"):
        AsyncConfig(retries=-1)
