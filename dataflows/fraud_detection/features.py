"""Per-key features over event-time lookbacks, with their state in RocksDB.

:func:`lookback_features` keeps, per key (a card, say), the events of the
longest lookback and running statistics, and emits with each event its
features as of that event: for every lookback ``L``, the count and the sum of
the values of the key's events with event time in ``(t - L, t]``; the count,
mean and standard deviation of all the key's values so far; and the time since
its previous event (in event time, when within the longest lookback). These
are sliding windows evaluated at each event (Flink's ``OVER`` windows), the
velocity features of fraud detection.

Events arrive out of order within ``allowed_lateness_ms`` of the shard's
watermark (:class:`~operators.windowing.Watermark`): an out-of-order event is
placed in order and its features count the events that have arrived so far, so
a decision never waits for data (``complete`` says whether the key's history
spans the longest lookback). An event behind the watermark leaves on ``late``
and changes nothing. A key idle for ``ttl_ms`` of system time is forgotten.
"""

from __future__ import annotations

import math
from bisect import bisect_right, insort
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import bytewax.operators as op
from bytewax.dataflow import Stream, operator
from bytewax.operators import KeyedStream

from operators.stateful import Expiring, StateConfig, keyed_state
from operators.streams import split
from operators.windowing import EventClock, Late, Watermark
from state import StateStore

__all__ = ["Features", "FeaturesOut", "lookback_features", "new_history", "observe"]

V = TypeVar("V")


@dataclass(frozen=True)
class Features:
    counts: dict[int, int]  # by lookback ms: events in (t - L, t], this one included
    sums: dict[int, float]  # by lookback ms: their values' sum
    n: int  # events of the key so far, this one included
    mean: float
    std: float
    since_previous_ms: int | None  # event time since the key's previous event (None: none in the longest lookback)
    complete: bool  # the key's history spans the longest lookback


@dataclass(frozen=True)
class FeaturesOut(Generic[V]):
    down: Stream[tuple[V, Features]]
    late: Stream[Late[V]]


def new_history(first_ms: int) -> dict[str, Any]:
    """A key's history before its first event (a plain dict: it pickles and serialises as JSON)."""
    return {"times": [], "values": [], "first_ms": first_ms, "n": 0, "mean": 0.0, "m2": 0.0}


def observe(doc: dict[str, Any], ts: int, x: float, watermark: int | None, lookbacks_ms: Sequence[int]) -> Features:
    """Add the event ``(ts, x)`` to a key's history (updated in place) and return its features as of
    the event; events older than any lookback of any event still to come (the watermark bounds how
    early) are dropped from the history."""
    longest = max(lookbacks_ms)
    times, values = doc["times"], doc["values"]
    at = bisect_right(times, ts)
    previous = times[at - 1] if at else None
    insort(times, ts)
    values.insert(at, x)
    horizon = min(ts, watermark if watermark is not None else ts) - longest
    cut = bisect_right(times, horizon)
    del times[:cut], values[:cut]
    n = doc["n"] + 1
    delta = x - doc["mean"]
    mean = doc["mean"] + delta / n
    m2 = doc["m2"] + delta * (x - mean)
    doc.update(n=n, mean=mean, m2=m2, first_ms=min(doc["first_ms"], ts))

    upto = bisect_right(times, ts)
    counts, sums = {}, {}
    for lookback in lookbacks_ms:
        since = bisect_right(times, ts - lookback)
        counts[lookback] = upto - since
        sums[lookback] = math.fsum(values[since:upto])
    return Features(
        counts=counts,
        sums=sums,
        n=n,
        mean=mean,
        std=math.sqrt(m2 / n),
        since_previous_ms=None if previous is None or previous <= ts - longest else ts - previous,
        complete=doc["first_ms"] <= ts - longest,
    )


class _Lookback(Expiring[Any], Generic[V]):
    def __init__(
        self,
        clock: EventClock[V],
        value_of: Callable[[V], float],
        lookbacks_ms: Sequence[int],
        ttl_ms: int | None,
        now_ms: Callable[[], int],
    ) -> None:
        self._ts_of, self._value_of = clock.timestamp_ms, value_of
        self._lookbacks = sorted(lookbacks_ms)
        self._ttl_ms = ttl_ms
        self._watermark = Watermark(clock, now_ms)

    def on_item(self, store: StateStore, key: str, value: V) -> Iterable[tuple[str, Any]]:
        ts, x = self._ts_of(value), float(self._value_of(value))
        watermark = self._watermark.ms(store)
        if watermark is not None and ts < watermark:
            return ((key, Late(key, value)),)
        self._watermark.observe(store, value)
        doc = store.get(key) or new_history(ts)
        features = observe(doc, ts, x, watermark, self._lookbacks)
        store.put(key, doc, ttl_ms=self._ttl_ms)
        return ((key, (value, features)),)


@operator
def lookback_features(
    step_id: str,
    up: KeyedStream[V],
    clock: EventClock[V],
    *,
    value_of: Callable[[V], float],
    lookbacks_ms: Sequence[int],
    state: StateConfig,
    ttl_ms: int | None = None,
) -> FeaturesOut[V]:
    """Each event with its key's :class:`Features` as of the event; see the module docstring."""
    if not lookbacks_ms or min(lookbacks_ms) <= 0:
        raise ValueError(f"lookbacks_ms must be positive, got {list(lookbacks_ms)}")
    out = keyed_state("state", up, lambda: _Lookback(clock, value_of, lookbacks_ms, ttl_ms, state.now_ms), state)
    # (key, (event, Features) | Late)
    results = split("split", op.key_rm("unkey", out), Late, tuple)
    return FeaturesOut(results.rest, results.first)
