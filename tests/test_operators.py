"""Stateful operators and settings, in-process, checked against plain-Python references."""

from __future__ import annotations

import random
import threading
from collections import Counter
from pathlib import Path

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from operators.stateful import StateConfig, _Fold, running_aggregate
from operators.windowing import EventClock, TumblingWindower, _Windows, window
from patternflow import hash_key
from state import MemoryBackend, StateStore


def frozen_clock() -> int:
    return 0  # system time never advances the watermark: results depend on the data alone


@pytest.mark.parametrize("state_dir", [None, "rocksdb"])
def test_tumbling_window_matches_a_batch_count(state_dir: str | None, tmp_path: Path) -> None:
    rng = random.Random(3)
    items = [(f"k{rng.randrange(5)}", i * 100 + rng.randrange(-250, 250)) for i in range(2_000)]
    config = StateConfig(tmp_path if state_dir else None, shards=3, now_ms=frozen_clock)
    flow = Dataflow("windows")
    up = op.input("in", flow, TestingSource(items, batch_size=50))
    clock: EventClock[int] = EventClock(lambda ts: ts, allowed_lateness_ms=300)
    out = window("w", up, clock, TumblingWindower(1_000), init=lambda: 0, fold=lambda n, _: n + 1, state=config)
    down: list = []
    late: list = []
    op.output("down", out.down, TestingSink(down))
    op.output("late", out.late, TestingSink(late))
    run_main(flow)

    # reference: replay the same watermark rule over the items in order, per shard
    late_expected = []
    max_seen: dict[int, int] = {}
    for key, ts in items:
        shard = hash_key(key) % 3
        end = ts - ts % 1_000 + 1_000
        if shard in max_seen and end <= max_seen[shard] - 300:
            late_expected.append((key, ts))
        max_seen[shard] = max(max_seen.get(shard, ts), ts)
    on_time = Counter((k, ts - ts % 1_000) for k, ts in items if (k, ts) not in set(late_expected))
    assert {(r.key, r.start_ms): r.value for r in down} == dict(on_time)
    assert len(down) == len(on_time)  # each window emitted once
    assert sorted((item.key, item.value) for item in late) == sorted(late_expected)
    assert late_expected, "the data should include late items"


@pytest.mark.parametrize("per_stream", [True, False])
def test_a_stream_read_behind_another_is_not_late_with_a_clock_per_stream(per_stream: bool) -> None:
    # the worst skew: all of partition 0 arrives before any of partition 1
    items = [("k", (p, ts)) for p in (0, 1) for ts in range(0, 100_000, 100)]
    flow = Dataflow("skew")
    up = op.input("in", flow, TestingSource(items, batch_size=100))
    config = StateConfig(None, shards=1, now_ms=frozen_clock)
    clock: EventClock[tuple[int, int]] = (
        EventClock(lambda v: v[1], stream_of=lambda v: str(v[0]), streams=2)
        if per_stream
        else EventClock(lambda v: v[1])
    )
    out = window("w", up, clock, TumblingWindower(1_000), init=lambda: 0, fold=lambda n, _: n + 1, state=config)
    down: list = []
    late: list = []
    op.output("down", out.down, TestingSink(down))
    op.output("late", out.late, TestingSink(late))
    run_main(flow)
    if per_stream:
        assert late == []
        assert sorted(r.value for r in down) == [20] * 100
    else:  # one clock for both: partition 1 arrives after the watermark passed it
        assert len(late) == 990


def test_an_unseen_partition_holds_windows_only_until_system_time_passes() -> None:
    now = [0]
    store = StateStore(MemoryBackend(), now_ms=lambda: now[0])
    clock: EventClock[int] = EventClock(lambda ts: ts, stream_of=lambda _: "0", streams=2)
    program = _Windows(clock, TumblingWindower(1_000), int, lambda n, _: n + 1, lambda: now[0])
    for ts in range(0, 5_000, 100):
        assert list(program.on_item(store, "k", ts)) == []
    assert list(program.on_timer(store)) == []  # partition 1 unseen: held at the first event time
    assert program.next_timer_ms(store) == 1_000
    now[0] = 2_000  # two seconds with nothing from partition 1
    closed = [result for _, result in program.on_timer(store)]
    assert [(r.start_ms, r.value) for r in closed] == [(0, 10), (1_000, 10)]


def test_running_aggregate_keeps_last_n_per_key(tmp_path: Path) -> None:
    items = [("a", 1), ("a", 2), ("b", 1), ("a", 3), ("a", 4)]
    flow = Dataflow("last_n")
    up = op.input("in", flow, TestingSource(items))
    out: list = []
    agg = running_aggregate("last3", up, list, lambda acc, v: [*acc, v][-3:], StateConfig(tmp_path, shards=2))
    op.output("out", agg, TestingSink(out))
    run_main(flow)
    assert [v for k, v in out if k == "a"] == [[1], [1, 2], [1, 2, 3], [2, 3, 4]]
    assert [v for k, v in out if k == "b"] == [[1]]


def test_running_aggregate_forgets_a_key_idle_past_its_ttl() -> None:
    now = [0]
    store = StateStore(MemoryBackend(), now_ms=lambda: now[0])
    program: _Fold[int, int] = _Fold(int, lambda acc, v: acc + v, ttl_ms=10_000)
    assert list(program.on_item(store, "a", 5)) == [("a", 5)]
    now[0] = 9_000
    assert list(program.on_item(store, "a", 1)) == [("a", 6)]  # refreshed: expires at 19,000
    assert program.next_timer_ms(store) == 19_000
    now[0] = 19_000
    program.on_timer(store)
    assert list(program.on_item(store, "a", 1)) == [("a", 1)]


def test_a_process_about_to_exit_lingers_until_its_metrics_are_scraped_twice() -> None:
    import urllib.request

    from operators import metrics
    from patternflow import free_port

    port = free_port()
    metrics.serve(port)
    assert not metrics.linger(5), "nobody scraped it yet: no wait"

    def scrape() -> None:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()

    def scrape_twice() -> None:
        scrape()
        scrape()

    scrape()
    scrapers = threading.Timer(0.2, scrape_twice)
    scrapers.start()
    assert metrics.linger(10), "two more scrapes came"
    scrapers.join()
    assert not metrics.linger(0.3), "no more scrapes: gives up after the timeout"
