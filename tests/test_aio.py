"""The bounded-concurrency async operator, run by Bytewax on a testing source (no broker)."""

from __future__ import annotations

import asyncio
import threading
import time

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from operators.aio import AsyncConfig, Done, Failed, async_map


class Flaky(RuntimeError):
    pass


def run(items: list[int], fn, config: AsyncConfig) -> list[tuple[str, Done | Failed]]:
    flow = Dataflow("aio")
    keyed = op.key_on("key", op.input("in", flow, TestingSource(items)), lambda x: f"k{x % 7}")
    out: list = []
    op.output("out", async_map("call", keyed, fn, config), TestingSink(out))
    run_main(flow)
    return out


def test_every_item_gets_its_result_and_calls_overlap_up_to_capacity() -> None:
    lock, now, peak = threading.Lock(), [0], [0]

    async def slow_square(x: int) -> int:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        await asyncio.sleep(0.05)
        with lock:
            now[0] -= 1
        return x * x

    start = time.perf_counter()
    out = run(list(range(200)), slow_square, AsyncConfig(capacity=50, shards=2))
    elapsed = time.perf_counter() - start
    values = [r.value for _, r in out if isinstance(r, Done)]
    assert sorted(values) == sorted(x * x for x in range(200))
    assert all(key == f"k{r.item % 7}" for key, r in out)
    assert peak[0] <= 50
    assert peak[0] >= 25, "calls should overlap"
    assert elapsed < 200 * 0.05 / 4, f"200 calls of 50 ms took {elapsed:.2f} s: not concurrent"


def test_transient_failures_retry_others_fail_with_the_reason_and_slow_calls_time_out() -> None:
    tries: dict[int, int] = {}

    async def fn(x: int) -> int:
        tries[x] = tries.get(x, 0) + 1
        if x == 1 and tries[x] < 3:
            raise Flaky("try again")
        if x == 2:
            raise ValueError("bad argument")
        if x == 3:
            await asyncio.sleep(5)
        return x

    config = AsyncConfig(timeout_s=0.2, retries=2, backoff_s=0.01, retry_if=lambda e: isinstance(e, Flaky))
    results = {r.item: r for _, r in run([0, 1, 2, 3], fn, config)}
    assert isinstance(results[0], Done) and results[0].attempts == 1
    assert isinstance(results[1], Done) and results[1].attempts == 3
    assert isinstance(results[2], Failed) and results[2].error == "ValueError: bad argument"
    assert results[2].attempts == 1 and not results[2].timed_out
    assert isinstance(results[3], Failed) and results[3].timed_out and "timed out after 0.2 s" in results[3].error
    assert tries[3] == 1, "a timeout is not retried"


def test_retries_stop_at_the_limit() -> None:
    async def always_flaky(x: int) -> int:
        raise Flaky("down")

    config = AsyncConfig(retries=2, backoff_s=0.001, retry_if=lambda e: isinstance(e, Flaky))
    ((_, result),) = run([5], always_flaky, config)
    assert isinstance(result, Failed) and result.attempts == 3 and "Flaky: down" in result.error
