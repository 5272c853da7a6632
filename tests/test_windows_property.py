"""Windowed aggregates equal a batch computation over the same events, whatever their order.

The reference (numpy) takes the events in arrival order, decides lateness by
the rule the watermark implements (an event is late when every window that
contains it ends at or before the largest event time seen so far, minus the
allowed lateness), and sums the on-time events of each window in one pass.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.windowing import EventClock, SlidingWindower, _Windows
from state import MemoryBackend, StateStore

Event = tuple[str, int, float]  # key, event time (ms), value


def reference(events: list[Event], windower: SlidingWindower, lateness_ms: int) -> tuple[dict, list[Event]]:
    keys = np.array([k for k, _, _ in events])
    ts = np.array([t for _, t, _ in events], dtype=np.int64)
    values = np.array([v for _, _, v in events])
    seen_before = np.maximum.accumulate(np.concatenate([[np.iinfo(np.int64).min], ts[:-1]]))
    watermark = np.where(np.arange(len(ts)) == 0, np.iinfo(np.int64).min, seen_before - lateness_ms)
    latest_end = ts - ts % windower.slide_ms + windower.length_ms  # the last window that contains it
    late = latest_end <= watermark
    sums: dict = {}
    for i in np.flatnonzero(~late):
        for start in windower.starts(int(ts[i])):
            if start + windower.length_ms > watermark[i]:  # that window was still open
                key = (str(keys[i]), start)
                sums[key] = sums.get(key, 0.0) + float(values[i])
    return sums, [events[i] for i in np.flatnonzero(late)]


events_strategy = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 20_000), st.floats(-100, 100, allow_nan=False)),
    min_size=1,
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(
    events=events_strategy,
    length=st.sampled_from([1_000, 3_000, 5_000]),
    slides=st.integers(1, 5),
    lateness=st.sampled_from([0, 500, 2_000]),
)
def test_sliding_window_sums_equal_a_batch_computation(
    events: list[Event], length: int, slides: int, lateness: int
) -> None:
    windower = SlidingWindower(length, length // slides)
    store = StateStore(MemoryBackend(), now_ms=lambda: 0)
    clock: EventClock[Event] = EventClock(lambda e: e[1], allowed_lateness_ms=lateness)
    program = _Windows(clock, windower, float, lambda acc, e: acc + e[2], lambda: 0)
    late = [out.value for e in events for _, out in program.on_item(store, e[0], e)]
    emitted = [r for _, r in program.on_timer(store)] + [r for _, r in program.on_eof(store)]

    expected, expected_late = reference(events, windower, lateness)
    got = {(r.key, r.start_ms): r.value for r in emitted}
    assert len(got) == len(emitted), "each window is emitted once"
    assert got.keys() == expected.keys()
    assert all(abs(got[k] - expected[k]) < 1e-6 for k in got)
    assert late == expected_late
