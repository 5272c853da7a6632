"""Lookback features equal a batch computation over the same events, whatever their order."""

from __future__ import annotations

from pathlib import Path

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.fraud_detection.features import Features, _Lookback, lookback_features
from operators.stateful import StateConfig
from operators.windowing import EventClock, Late
from state import MemoryBackend, StateStore

Event = tuple[str, int, float]  # key, event time (ms), value
LOOKBACKS = (1_000, 5_000, 20_000)


def reference(events: list[Event], lateness: int) -> list[Features | None]:
    """Per event in arrival order: its features over the on-time events that arrived up to it (None: late)."""
    out: list[Features | None] = []
    kept: list[Event] = []
    latest = None
    for key, ts, value in events:
        if latest is not None and ts < latest - lateness:
            out.append(None)
            continue
        latest = ts if latest is None else max(latest, ts)
        kept.append((key, ts, value))
        mine = [(t, v) for k, t, v in kept if k == key]
        times = np.array([t for t, _ in mine])
        values = np.array([v for _, v in mine])
        previous = times[(times <= ts)]
        previous = np.sort(previous)[:-1]  # this event excluded (one copy of its time)
        prev = int(previous.max()) if len(previous) and previous.max() > ts - LOOKBACKS[-1] else None
        out.append(
            Features(
                counts={lb: int(((times > ts - lb) & (times <= ts)).sum()) for lb in LOOKBACKS},
                sums={lb: float(values[(times > ts - lb) & (times <= ts)].sum()) for lb in LOOKBACKS},
                n=len(mine),
                mean=float(values.mean()),
                std=float(values.std()),
                since_previous_ms=None if prev is None else ts - prev,
                complete=bool(times.min() <= ts - LOOKBACKS[-1]),
            )
        )
    return out


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(
        # event times on a 500 ms grid, so that events fall exactly on lookback boundaries
        st.tuples(
            st.sampled_from(["card-1", "card-2"]), st.integers(0, 120).map(lambda i: i * 500), st.floats(0, 1_000)
        ),
        min_size=1,
        max_size=80,
    ),
    lateness=st.sampled_from([0, 2_000, 30_000]),
)
def test_lookback_features_equal_a_batch_computation(events: list[Event], lateness: int) -> None:
    store = StateStore(MemoryBackend(), now_ms=lambda: 0)
    clock: EventClock[Event] = EventClock(lambda e: e[1], allowed_lateness_ms=lateness)
    program = _Lookback(clock, lambda e: e[2], LOOKBACKS, None, lambda: 0)
    expected = reference(events, lateness)
    for event, want in zip(events, expected, strict=True):
        ((_, out),) = program.on_item(store, event[0], event)
        if want is None:
            assert isinstance(out, Late)
            continue
        got: Features = out[1]
        assert (got.counts, got.n, got.since_previous_ms, got.complete) == (
            want.counts,
            want.n,
            want.since_previous_ms,
            want.complete,
        )
        assert all(abs(got.sums[lb] - want.sums[lb]) < 1e-6 for lb in LOOKBACKS)
        assert abs(got.mean - want.mean) < 1e-6 and abs(got.std - want.std) < 1e-6


def test_lookback_features_in_a_dataflow_send_late_events_aside(tmp_path: Path) -> None:
    events = [("c", ts, 1.0) for ts in (10_000, 11_000, 12_000, 2_000, 12_500)]  # 2,000 is 10 s behind
    flow = Dataflow("features")
    up = op.input("in", flow, TestingSource([(k, (k, ts, v)) for k, ts, v in events]))
    clock: EventClock[Event] = EventClock(lambda e: e[1], allowed_lateness_ms=1_000)
    out = lookback_features(
        "f",
        up,
        clock,
        value_of=lambda e: e[2],
        lookbacks_ms=LOOKBACKS,
        state=StateConfig(tmp_path, shards=2, now_ms=lambda: 0),
    )
    down: list = []
    late: list = []
    op.output("down", out.down, TestingSink(down))
    op.output("late", out.late, TestingSink(late))
    run_main(flow)
    assert [(e[1], f.counts[5_000]) for e, f in down] == [(10_000, 1), (11_000, 2), (12_000, 3), (12_500, 4)]
    assert [item.value for item in late] == [("c", 2_000, 1.0)]
