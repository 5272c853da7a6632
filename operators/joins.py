"""Joins of keyed streams, with their state in RocksDB.

:func:`join_table` enriches a stream from a table (a compacted reference topic,
say): each item leaves with the table's row for its key as it stands when the
item is processed. Rows and items are processed in the order they arrive, so an
update changes the items after it, never those before; a ``None`` row deletes.
Until a key's first row arrives its items leave with ``None``: the caller
decides on partial data and can say so.

:func:`join_within` joins two streams in event time: each item waits for the
first item of the other stream with its key, up to ``within_ms`` of event time
past its own. The pair leaves as soon as both are there; an item whose wait
ends unmatched leaves alone (the other side ``None``) once the watermark passes
its time plus ``within_ms``, which is also when its state goes. Nothing stays
forever and nothing is dropped: a full outer join bounded in time. The
watermark is :class:`~operators.windowing.Watermark`'s with a clock per side:
the slower side's event time, advanced by system time while a side is idle.

Items and rows are kept as JSON documents (see :mod:`state.store`); event times
are epoch ms >= 0 (a dataflow sends others to its dead-letter topic first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import bytewax.operators as op
from bytewax.dataflow import operator
from bytewax.operators import KeyedStream

from operators.stateful import Expiring, StateConfig, keyed_state
from operators.windowing import EventClock, Watermark
from state import StateStore

__all__ = ["Enriched", "Joined", "join_table", "join_within"]

L = TypeVar("L")
R = TypeVar("R")
V = TypeVar("V")
T = TypeVar("T")

_ROW = "row\x00"
_WAIT = "wait"
_SEP = "\x00"


@dataclass(frozen=True)
class Enriched(Generic[V, T]):
    value: V
    row: T | None  # the table's row for the item's key when it was processed


class _Tagged(NamedTuple):
    side: Literal["stream", "table", "left", "right"]
    value: Any
    ts: int = 0


class _TableJoin(Expiring[Enriched[Any, Any]]):
    def __init__(self, row_ttl_ms: int | None) -> None:
        self._row_ttl_ms = row_ttl_ms

    def on_item(self, store: StateStore, key: str, value: _Tagged) -> Iterable[tuple[str, Enriched[Any, Any]]]:
        if value.side == "table":
            if value.value is None:
                store.delete(_ROW + key)
            else:
                store.put(_ROW + key, value.value, ttl_ms=self._row_ttl_ms)
            return ()
        return ((key, Enriched(value.value, store.get(_ROW + key))),)


@operator
def join_table(
    step_id: str,
    stream: KeyedStream[V],
    table: KeyedStream[T | None],
    state: StateConfig,
    *,
    row_ttl_ms: int | None = None,
) -> KeyedStream[Enriched[V, T]]:
    """Each ``stream`` item with ``table``'s current row for its key (see the module docstring);
    with ``row_ttl_ms`` a row not updated for that long is forgotten."""
    items = op.map("tag_stream", stream, lambda kv: (kv[0], _Tagged("stream", kv[1])))
    rows = op.map("tag_table", table, lambda kv: (kv[0], _Tagged("table", kv[1])))
    tagged: KeyedStream[_Tagged] = op.merge("both", items, rows)
    return keyed_state("state", tagged, lambda: _TableJoin(row_ttl_ms), state)


@dataclass(frozen=True)
class Joined(Generic[L, R]):
    """A pair, or one side alone (the other ``None``) when its wait ended unmatched."""

    left: L | None
    right: R | None


class _IntervalJoin:
    def __init__(
        self, within_ms: int, lateness_ms: int, now_ms: Callable[[], int], *, hold_pairs: bool = False
    ) -> None:
        self._within_ms = within_ms
        self._hold_pairs = hold_pairs
        # A clock per side, the watermark the slower side's: one stream read ahead of the
        # other (a replay; a backlog) cannot end the waits of items the other has yet to match.
        clock: EventClock[_Tagged] = EventClock(
            lambda t: t.ts, allowed_lateness_ms=lateness_ms, stream_of=lambda t: t.side, streams=2
        )
        self._watermark = Watermark(clock, now_ms)

    def on_item(self, store: StateStore, key: str, item: _Tagged) -> Iterable[tuple[str, Joined[Any, Any]]]:
        other = "right" if item.side == "left" else "left"
        waiting = store.get(f"{other}{_SEP}{key}")
        self._watermark.observe(store, item)
        watermark = self._watermark.ms(store)
        if waiting is not None:
            store.delete(f"{other}{_SEP}{key}")
            store.cancel_timer(_WAIT, f"{other}{_SEP}{key}", waiting["due_ms"])
            pair = (item.value, waiting["value"]) if item.side == "left" else (waiting["value"], item.value)
            left_due = item.ts + self._within_ms if item.side == "left" else waiting["due_ms"]
            if not self._hold_pairs or (watermark is not None and left_due <= watermark):
                return ((key, Joined(*pair)),)
            store.put(f"pair{_SEP}{key}", {"value": pair, "due_ms": left_due})
            store.set_timer(_WAIT, f"pair{_SEP}{key}", left_due)
            return ()
        due = item.ts + self._within_ms
        if (watermark is not None and due <= watermark) or store.get(f"{item.side}{_SEP}{key}") is not None:
            # Its wait is over already, or an earlier item of its side waits for the same match.
            return ((key, self._released(item.side, item.value)),)
        store.put(f"{item.side}{_SEP}{key}", {"value": item.value, "due_ms": due})
        store.set_timer(_WAIT, f"{item.side}{_SEP}{key}", due)
        return ()

    @staticmethod
    def _released(side: str, value: Any) -> Joined[Any, Any]:
        if side == "pair":
            return Joined(*value)
        return Joined(value, None) if side == "left" else Joined(None, value)

    def _expire(self, store: StateStore, upto_ms: int) -> list[tuple[str, Joined[Any, Any]]]:
        out = []
        for _, row in store.pop_due(_WAIT, upto_ms):
            side, _, key = row.partition(_SEP)
            waiting = store.get(row)
            store.delete(row)
            out.append((key, self._released(side, waiting["value"])))
        return out

    def on_timer(self, store: StateStore) -> Iterable[tuple[str, Joined[Any, Any]]]:
        watermark = self._watermark.ms(store)
        return () if watermark is None else self._expire(store, watermark)

    def next_timer_ms(self, store: StateStore) -> int | None:
        due = store.next_due_ms(_WAIT)
        return None if due is None else self._watermark.reaches_at_ms(store, due)

    def on_eof(self, store: StateStore) -> Iterable[tuple[str, Joined[Any, Any]]]:
        return self._expire(store, 2**62)


@operator
def join_within(
    step_id: str,
    left: KeyedStream[L],
    right: KeyedStream[R],
    *,
    left_ms: Callable[[L], int],
    right_ms: Callable[[R], int],
    within_ms: int,
    state: StateConfig,
    allowed_lateness_ms: int = 0,
    hold_pairs: bool = False,
) -> KeyedStream[Joined[L, R]]:
    """Join each item with the first item of the other stream with its key within ``within_ms``
    of event time (``left_ms``, ``right_ms``); see the module docstring. With ``hold_pairs`` a
    pair too waits until the left item's bound: every left item leaves when its bound passes,
    matched or not (labels that mature together, whatever their outcome)."""
    tagged_left = op.map("tag_left", left, lambda kv: (kv[0], _Tagged("left", kv[1], left_ms(kv[1]))))
    tagged_right = op.map("tag_right", right, lambda kv: (kv[0], _Tagged("right", kv[1], right_ms(kv[1]))))
    both: KeyedStream[_Tagged] = op.merge("both", tagged_left, tagged_right)
    return keyed_state(
        "state", both, lambda: _IntervalJoin(within_ms, allowed_lateness_ms, state.now_ms, hold_pairs=hold_pairs), state
    )
