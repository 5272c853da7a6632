"""Keyed state in RocksDB for Bytewax dataflows.

Bytewax keeps each key's state in a Python object and pickles it into its
recovery store at every snapshot; that caps state at memory size. Here keys are
hashed onto a fixed number of shards; each shard is one Bytewax key whose logic
owns a :class:`~state.StateStore` (one RocksDB database per shard under
``state_dir/<step id>/``). The shard's snapshot is just the store's commit
(number and lineage), and on resume the store rolls back to it, so after a
kill -9 state equals the state at the last completed snapshot and replayed
input is applied exactly once.

Every execution wakes every shard in its first epoch. Bytewax snapshots a key
only in epochs in which its logic ran, and resumes each key from its latest
snapshot older than the resume epoch. A run killed after writing the snapshots
of an epoch E, but before every worker had recorded E as complete, is resumed
from E, and what it wrote at E stays in the recovery store. If a shard then does
nothing in E (its items come in a later epoch: a Kafka consumer's first polls
return nothing), the next run to get past E resumes that shard from the dead
run's snapshot: a commit the store had rolled back and whose number it has
since reused, for instance for its state after emitting its windows. Killed
twice while flushing the windows emitted at the end of a bounded input, a
dataflow lost a whole shard's windows that way. A one-off input sends each
shard a wake-up, which Bytewax delivers in the resume epoch (a source emits its
first batch there), so every shard is snapshotted in E and the dead run's
snapshots are overwritten; should a rolled-back commit still come back, the
store refuses it.

:func:`keyed_state` runs a :class:`ShardProgram` (per-item logic plus timers)
over the shards; :func:`running_aggregate` is the simplest program: a fold per
key, emitted after every item.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, NamedTuple, Protocol, TypeVar

import bytewax.operators as op
from bytewax.dataflow import operator
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from bytewax.operators import KeyedStream, StatefulBatchLogic

from operators import metrics
from patternflow import LATEST_MS, hash_key, wall_ms
from state import MemoryBackend, RocksDBBackend, StateError, StateStore

__all__ = [
    "Expiring",
    "ShardProgram",
    "StateConfig",
    "Wake",
    "keyed_state",
    "running_aggregate",
    "shard_of",
    "sharded_state",
    "woken",
]

V = TypeVar("V")
V_in = TypeVar("V_in", contravariant=True)
W_out = TypeVar("W_out", covariant=True)
W = TypeVar("W")
A = TypeVar("A")


_SHARDS_KEY = "\x01shards"


class Wake(NamedTuple):
    """Sent to every shard as an execution starts (:func:`woken`); the shard first, as in ``(shard, key, value)``."""

    shard: str


class _WakePartition(StatelessSourcePartition[tuple[str, Wake]]):
    def __init__(self, wakes: list[tuple[str, Wake]]) -> None:
        self._wakes = wakes

    def next_batch(self) -> list[tuple[str, Wake]]:
        if not self._wakes:
            raise StopIteration()
        batch, self._wakes = self._wakes, []
        return batch


@dataclass(frozen=True)
class _WakeSource(DynamicSource[tuple[str, Wake]]):
    """One :class:`Wake` per shard, once per execution (not recovered: every execution sends them again)."""

    shards: int

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _WakePartition:
        # Worker 0 sends them all; Bytewax routes each to the worker that owns the shard.
        shards = range(self.shards) if worker_index == 0 else range(0)
        return _WakePartition([(str(shard), Wake(str(shard))) for shard in shards])


@dataclass(frozen=True)
class StateConfig:
    """Where and how a stateful step keeps its state.

    ``state_dir=None`` keeps state in memory (tests, throwaway runs): such a
    step cannot resume from a snapshot. ``max_pending_writes`` bounds the writes
    held in memory between snapshots; past it the store commits early.
    """

    state_dir: Path | None
    shards: int = 8
    undo_retain: int = 32
    max_pending_writes: int = 100_000
    now_ms: Callable[[], int] = wall_ms

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")

    def open_store(self, step_id: str, shard: str) -> StateStore:
        backend = (
            MemoryBackend() if self.state_dir is None else RocksDBBackend(self.state_dir / step_id / f"shard-{shard}")
        )
        return StateStore(backend, undo_retain=self.undo_retain, now_ms=self.now_ms)


class ShardProgram(Protocol[V_in, W_out]):
    """Per-shard logic: every method gets the shard's store and returns ``(key, output)`` pairs."""

    def on_item(self, store: StateStore, key: str, value: V_in) -> Iterable[tuple[str, W_out]]: ...

    def on_timer(self, store: StateStore) -> Iterable[tuple[str, W_out]]:
        """Called when :meth:`next_timer_ms` has passed, and after each batch."""

    def next_timer_ms(self, store: StateStore) -> int | None:
        """Wall-clock epoch ms at which :meth:`on_timer` should run next, if any."""

    def on_eof(self, store: StateStore) -> Iterable[tuple[str, W_out]]: ...


# (shard, commit seq, lineage); snapshots written before lineages were kept are (shard, commit seq)
_Snapshot = tuple[str, int, str] | tuple[str, int]


class _ShardLogic(StatefulBatchLogic[tuple[str, str, V] | Wake, tuple[str, W], _Snapshot], Generic[V, W]):
    """One shard's logic. Its snapshot names the shard and the commit: Bytewax gives a
    builder only the resume state, and a resumed shard must know which store to open."""

    def __init__(
        self,
        step_id: str,
        program: ShardProgram[V, W],
        config: StateConfig,
        resume: _Snapshot | None,
    ) -> None:
        self._step_id = step_id
        self._program = program
        self._config = config
        self._shard = ""
        self._store: StateStore | None = None
        self._items = metrics.ITEMS.labels(step_id, "ok")
        self._seconds = metrics.STEP_SECONDS.labels(step_id)
        if resume is not None:
            self._open(*resume)

    def _open(self, shard: str, seq: int | None, lineage: str | None = None) -> StateStore:
        self._shard = shard
        store = self._store = self._config.open_store(self._step_id, shard)
        store.restore(seq, lineage=lineage)
        written_with = store.get(_SHARDS_KEY)
        if written_with is None:
            store.put(_SHARDS_KEY, self._config.shards)
        elif written_with != self._config.shards:
            raise StateError(
                f"step {self._step_id!r}: its state was written with {written_with} shards, and is now read "
                f"with {self._config.shards}: keys would land on shards that do not hold them. Set the shard "
                "count back, or start over with empty recovery and state directories."
            )
        return store

    def _done(self, store: StateStore, out: list[tuple[str, W]]) -> tuple[list[tuple[str, W]], bool]:
        if store.pending_writes > self._config.max_pending_writes:
            store.commit(snapshot=False)
        return out, StatefulBatchLogic.RETAIN

    def on_batch(self, values: list[tuple[str, str, V] | Wake]) -> tuple[list[tuple[str, W]], bool]:
        start = time.perf_counter()
        store = self._store or self._open(values[0][0], None)
        out: list[tuple[str, W]] = []
        items = [value for value in values if not isinstance(value, Wake)]
        for _, key, value in items:
            out.extend(self._program.on_item(store, key, value))
        out.extend(self._program.on_timer(store))
        self._items.inc(len(items))
        self._seconds.observe(time.perf_counter() - start)
        return self._done(store, out)

    def on_notify(self) -> tuple[list[tuple[str, W]], bool]:
        if self._store is None:
            return [], StatefulBatchLogic.RETAIN
        return self._done(self._store, list(self._program.on_timer(self._store)))

    def on_eof(self) -> tuple[list[tuple[str, W]], bool]:
        if self._store is None:
            return [], StatefulBatchLogic.RETAIN
        return self._done(self._store, list(self._program.on_eof(self._store)))

    def notify_at(self) -> datetime | None:
        due = None if self._store is None else self._program.next_timer_ms(self._store)
        # A timer past what datetime can hold (an event from year 10000 and on) waits for EOF, not a crash.
        return None if due is None else datetime.fromtimestamp(min(due, LATEST_MS) / 1000, tz=UTC)

    def snapshot(self) -> tuple[str, int, str]:
        assert self._store is not None, "Bytewax snapshots a logic only after it saw items"
        seq = self._store.commit()
        metrics.STATE_KEYS.labels(self._step_id, self._shard).set(self._store.backend.estimated_keys())
        return self._shard, seq, self._store.lineage


def woken(up: KeyedStream[V], shards: int) -> KeyedStream[V | Wake]:
    """``up``, keyed by shard (``"0"`` to ``str(shards - 1)``), plus a :class:`Wake` for every
    shard in the epoch each execution resumes from, so a stateful step on it snapshots
    every shard there (see the module docstring). Call it once per step scope."""
    wakes = op.input("wake", up.flow(), _WakeSource(shards))
    return op.merge("woken", up, wakes)


def shard_of(key: str, shards: int) -> str:
    """The shard (``"0"`` to ``str(shards - 1)``) that holds ``key``."""
    return str(hash_key(key) % shards)


@operator
def keyed_state(
    step_id: str,
    up: KeyedStream[V],
    program_factory: Callable[[], ShardProgram[V, W]],
    config: StateConfig,
) -> KeyedStream[W]:
    """Run a :class:`ShardProgram` over RocksDB-backed state, keyed as ``up`` is."""

    def to_shard(key_value: tuple[str, V]) -> tuple[str, tuple[str, str, V]]:
        key, value = key_value
        shard = shard_of(key, config.shards)
        return shard, (shard, key, value)

    return _run_shards(step_id, op.map("shard", up, to_shard), program_factory, config)


@operator
def sharded_state(
    step_id: str,
    up: KeyedStream[tuple[str, str, V]],
    program_factory: Callable[[], ShardProgram[V, W]],
    config: StateConfig,
) -> KeyedStream[W]:
    """:func:`keyed_state` for items already addressed to a shard: ``(shard, (shard, key,
    value))``, the shard from :func:`shard_of`, or each shard in turn to reach them all."""
    return _run_shards(step_id, up, program_factory, config)


def _run_shards(
    step_id: str,
    up: KeyedStream[tuple[str, str, V]],
    program_factory: Callable[[], ShardProgram[V, W]],
    config: StateConfig,
) -> KeyedStream[W]:
    def build(resume: _Snapshot | None) -> _ShardLogic[V, W]:
        return _ShardLogic(step_id, program_factory(), config, resume)

    outs = op.stateful_batch("logic", woken(up, config.shards), build)
    # (shard, (key, out)) -> (key, out)
    return op.map("unshard", outs, lambda shard_out: shard_out[1])


class Expiring(Generic[W]):
    """The timer part of a :class:`ShardProgram` whose only timers are its values' TTLs:
    expired values are deleted, and nothing is emitted for them or at EOF."""

    def on_timer(self, store: StateStore) -> Iterable[tuple[str, W]]:
        store.expire()
        return ()

    def next_timer_ms(self, store: StateStore) -> int | None:
        return store.next_expiry_ms()

    def on_eof(self, store: StateStore) -> Iterable[tuple[str, W]]:
        return ()


@dataclass(frozen=True)
class _Fold(Expiring[A], Generic[V, A]):
    init: Callable[[], A]
    fold: Callable[[A, V], A]
    ttl_ms: int | None

    def on_item(self, store: StateStore, key: str, value: V) -> Iterable[tuple[str, A]]:
        acc = store.get(key)
        acc = self.fold(self.init() if acc is None else acc, value)
        store.put(key, acc, ttl_ms=self.ttl_ms)
        return ((key, acc),)


@operator
def running_aggregate(
    step_id: str,
    up: KeyedStream[V],
    init: Callable[[], A],
    fold: Callable[[A, V], A],
    config: StateConfig,
    ttl_ms: int | None = None,
) -> KeyedStream[A]:
    """Fold each key's values into an accumulator kept in RocksDB; emit it after every item.

    The accumulator must be a JSON document (numbers, strings, lists, dicts).
    With ``ttl_ms`` a key that sees no item for that long is forgotten.
    """
    return keyed_state("state", up, lambda: _Fold(init, fold, ttl_ms), config)
