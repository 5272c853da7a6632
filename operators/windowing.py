"""Event-time windows (tumbling and sliding) whose state lives in RocksDB.

Bytewax's windowing keeps open windows in Python objects and tracks a watermark
per key, so a quiet key's windows close only on system time. Here each window's
accumulator is a row in the shard's :class:`~state.StateStore`, window ends sit
in its timer index, and the watermark is per shard: the latest event time seen,
plus the system time since that event arrived, minus ``allowed_lateness_ms``
(the semantics of Bytewax's ``EventClock``). A window closes, is emitted and
its row deleted once the watermark passes its end. A sliding window's item
is folded into every window that contains it and is still open; an item whose
windows have all closed goes to ``late``. At the end of a bounded input every
open window is emitted.

With ``stream_of`` (e.g. the Kafka partition an item came from) the shard keeps
a clock per stream and its watermark is the slowest stream's, as Flink takes
the minimum over input channels: however far one partition's reads run ahead
of another's, an item that is in order within its own partition is never late.
Until a shard has seen all ``streams``, the missing ones hold its watermark at
the first event time it saw, advanced by the system time since (as Flink's
idleness does), so a partition whose first items come late makes none of them
late, and an empty partition does not hold windows open for ever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

import bytewax.operators as op
from bytewax.dataflow import Stream, operator
from bytewax.operators import KeyedStream

from operators.stateful import StateConfig, keyed_state
from operators.streams import split
from state import StateStore

__all__ = [
    "EventClock",
    "Late",
    "SlidingWindower",
    "TumblingWindower",
    "Watermark",
    "WindowOut",
    "WindowResult",
    "window",
]

V = TypeVar("V")
A = TypeVar("A")

_CLOSE = "close"
_SEP = "\x00"
_CLOCKS_KEY = "\x01clocks"


@dataclass(frozen=True)
class WindowResult(Generic[A]):
    key: str
    start_ms: int
    end_ms: int
    value: A

    @property
    def id(self) -> str:
        """Stable across replays: a duplicate after recovery carries the same id."""
        return f"{self.key}@{self.start_ms}"


@dataclass(frozen=True)
class Late(Generic[V]):
    """An item that arrived after its window had closed."""

    key: str
    value: V


@dataclass(frozen=True)
class WindowOut(Generic[V, A]):
    down: Stream[WindowResult[A]]
    late: Stream[Late[V]]


def _one_stream(_: object) -> str:
    return ""


@dataclass(frozen=True)
class EventClock(Generic[V]):
    """Event time and the watermark.

    ``timestamp_ms`` reads an item's event time (epoch ms). A window waits
    ``allowed_lateness_ms`` past its end for late items. ``stream_of`` names the
    input stream an item came from (its Kafka partition, say) and ``streams``
    says how many there are: the watermark is the slowest stream's.
    """

    timestamp_ms: Callable[[V], int]
    allowed_lateness_ms: int = 0
    stream_of: Callable[[V], str] = _one_stream
    streams: int = 1

    def __post_init__(self) -> None:
        if self.allowed_lateness_ms < 0:
            raise ValueError(f"allowed_lateness_ms must be >= 0, got {self.allowed_lateness_ms}")
        if self.streams < 1:
            raise ValueError(f"streams must be >= 1, got {self.streams}")


@dataclass(frozen=True)
class SlidingWindower:
    """Windows of ``length_ms`` starting every ``slide_ms``, aligned to the epoch: an
    event at ``t`` is in each window ``[s, s + length_ms)`` with ``s`` a multiple of
    ``slide_ms`` and ``s <= t < s + length_ms``."""

    length_ms: int
    slide_ms: int

    def __post_init__(self) -> None:
        if not 0 < self.slide_ms <= self.length_ms:
            raise ValueError(f"need 0 < slide_ms <= length_ms, got {self.slide_ms}, {self.length_ms}")

    def starts(self, ts: int) -> range:
        """The starts of the windows that contain ``ts``, latest first."""
        last = ts - ts % self.slide_ms
        return range(last, ts - self.length_ms, -self.slide_ms)


@dataclass(frozen=True, init=False)
class TumblingWindower(SlidingWindower):
    """Back-to-back windows of ``length_ms``, aligned to the epoch (sliding by their length)."""

    def __init__(self, length_ms: int) -> None:
        super().__init__(length_ms, length_ms)


class Watermark(Generic[V]):
    """A shard's event-time watermark, kept in its store (see the module docstring): per
    stream the latest event time seen, advanced by the system time since it was seen,
    the slowest stream's, minus the allowed lateness."""

    def __init__(self, clock: EventClock[V], now_ms: Callable[[], int]) -> None:
        self._clock = clock
        self._now_ms = now_ms
        # Kept in the store: the latest event time per stream, and the first
        # event time the shard saw (where unseen streams hold the watermark).
        self._clocks: dict[str, int] | None = None
        self._origin_ms = 0
        # In memory: the system time each clock last moved (None: the origin).
        # On resume it restarts from now, so downtime does not advance the watermark.
        self._moved_at: dict[str | None, int] = {}

    def _load(self, store: StateStore) -> dict[str, int]:
        if self._clocks is None:
            doc = store.get(_CLOCKS_KEY, {"clocks": {}, "origin_ms": 0})
            self._clocks, self._origin_ms = doc["clocks"], doc["origin_ms"]
            now = self._now_ms()
            self._moved_at = {stream: now for stream in [*self._clocks, None]}
        return self._clocks

    def _terms(self, store: StateStore) -> list[tuple[int, int]]:
        """``(event time, system time it was reached)`` of each clock the watermark waits for."""
        clocks = self._load(store)
        terms = [(ts, self._moved_at[stream]) for stream, ts in clocks.items()]
        if terms and len(clocks) < self._clock.streams:
            terms.append((self._origin_ms, self._moved_at[None]))
        return terms

    def ms(self, store: StateStore) -> int | None:
        """The watermark now; ``None`` before the first item."""
        terms = self._terms(store)
        if not terms:
            return None
        now = self._now_ms()
        return min(ts + now - moved_at for ts, moved_at in terms) - self._clock.allowed_lateness_ms

    def observe(self, store: StateStore, value: V) -> None:
        """Move the item's stream's clock to its event time, if that is later."""
        ts = self._clock.timestamp_ms(value)
        clocks = self._load(store)
        stream = self._clock.stream_of(value)
        if ts > clocks.get(stream, -1):
            now = self._now_ms()
            if not clocks:
                self._origin_ms, self._moved_at[None] = ts, now
            clocks[stream] = ts
            self._moved_at[stream] = now
            store.put(_CLOCKS_KEY, {"clocks": clocks, "origin_ms": self._origin_ms})

    def reaches_at_ms(self, store: StateStore, event_ms: int) -> int | None:
        """The system time at which the watermark reaches ``event_ms`` (the slowest clock does)."""
        terms = self._terms(store)
        if not terms:
            return None
        return event_ms + self._clock.allowed_lateness_ms + max(moved_at - ts for ts, moved_at in terms)


class _Windows(Generic[V, A]):
    def __init__(
        self,
        clock: EventClock[V],
        windower: SlidingWindower,
        init: Callable[[], A],
        fold: Callable[[A, V], A],
        now_ms: Callable[[], int],
    ) -> None:
        self._timestamp_ms = clock.timestamp_ms
        self._windower = windower
        self._length_ms = windower.length_ms
        self._init = init
        self._fold = fold
        self._watermark = Watermark(clock, now_ms)

    def on_item(self, store: StateStore, key: str, value: V) -> Iterable[tuple[str, Late[V]]]:
        ts = self._timestamp_ms(value)
        watermark = self._watermark.ms(store)
        starts = [s for s in self._windower.starts(ts) if watermark is None or s + self._length_ms > watermark]
        if not starts:
            return ((key, Late(key, value)),)
        for start in starts:
            row = f"{key}{_SEP}{start}"
            acc = store.get(row)
            if acc is None:
                acc = self._init()
                store.set_timer(_CLOSE, row, start + self._length_ms)
            store.put(row, self._fold(acc, value))
        self._watermark.observe(store, value)
        return ()

    def _close(self, store: StateStore, upto_ms: int) -> list[tuple[str, WindowResult[A]]]:
        out = []
        for end, row in store.pop_due(_CLOSE, upto_ms):
            key, _, start = row.rpartition(_SEP)
            out.append((key, WindowResult(key, int(start), end, store.get(row))))
            store.delete(row)
        return out

    def on_timer(self, store: StateStore) -> Iterable[tuple[str, WindowResult[A]]]:
        watermark = self._watermark.ms(store)
        return () if watermark is None else self._close(store, watermark)

    def next_timer_ms(self, store: StateStore) -> int | None:
        due = store.next_due_ms(_CLOSE)
        return None if due is None else self._watermark.reaches_at_ms(store, due)

    def on_eof(self, store: StateStore) -> Iterable[tuple[str, WindowResult[A]]]:
        return self._close(store, 2**62)


@operator
def window(
    step_id: str,
    up: KeyedStream[V],
    clock: EventClock[V],
    windower: SlidingWindower,
    *,
    init: Callable[[], A],
    fold: Callable[[A, V], A],
    state: StateConfig,
) -> WindowOut[V, A]:
    """Fold each key's items into the windows (tumbling or sliding) that contain them by
    event time; closed windows leave on ``down``, items whose windows have all closed on ``late``."""
    out = keyed_state("state", up, lambda: _Windows(clock, windower, init, fold, state.now_ms), state)
    # (key, WindowResult | Late)
    results = split("split", op.key_rm("unkey", out), WindowResult, Late)
    return WindowOut(results.first, results.rest)
