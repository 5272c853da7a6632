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

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import bytewax.operators as op
from bytewax.dataflow import operator
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from bytewax.operators import KeyedStream, StatefulBatchLogic

from operators import metrics
from patternflow import LATEST_MS, hash_key, wall_ms
from state import MemoryBackend, RocksDBBackend, StateError, StateStore
from state.journal import InputLog

__all__ = [
    "Expiring",
    "ShardProgram",
    "StateConfig",
    "Wake",
    "keyed_state",
    "recorded_state",
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
DAY_MS = 86_400_000
logger = logging.getLogger(__name__)


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
    replay_patience_s: float = 30.0  # recorded_state: how long a replay waits for an input to come back

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
# A recorded shard's: the store's, and the inputs read but not yet applied (a replay holds them)
_RecordedSnapshot = tuple[_Snapshot, list[tuple[str, V]]]


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
        items = [(value[1], value[2]) for value in values if not isinstance(value, Wake)]
        out = self._apply_items(store, items) + self._timers(store)
        self._items.inc(len(items))
        self._seconds.observe(time.perf_counter() - start)
        return self._done(store, out)

    def _apply_items(self, store: StateStore, items: list[tuple[str, V]]) -> list[tuple[str, W]]:
        return [out for key, value in items for out in self._program.on_item(store, key, value)]

    def _timers(self, store: StateStore) -> list[tuple[str, W]]:
        return list(self._program.on_timer(store))

    def on_notify(self) -> tuple[list[tuple[str, W]], bool]:
        if self._store is None:
            return [], StatefulBatchLogic.RETAIN
        return self._done(self._store, self._timers(self._store))

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


_POSITION_KEY = "\x01inputs"


class _RecordedShardLogic(_ShardLogic[V, W]):
    """A shard whose program depends on the order of its inputs and on the time: each input (and each
    timer run) is recorded in an :class:`~state.journal.InputLog` before it is applied, with the time
    it is applied at, and the store holds how many it applied. Resumed from a snapshot, the shard
    applies the inputs recorded after it in their recorded order, at their recorded times, whatever
    order they are read again in (early ones wait, new ones wait for the replay to end), and runs
    no timer until then: it decides again exactly what it decided before the kill. An input that
    does not come back within ``replay_patience_s`` ends the replay (logged): what follows is
    decided afresh, in the order inputs come. The inputs a replay holds are in the shard's
    snapshot: the source's offsets in it are past them."""

    def __init__(
        self,
        step_id: str,
        program: ShardProgram[V, W],
        config: StateConfig,
        resume: _RecordedSnapshot[V] | None,
        input_id: Callable[[V], str | None],
    ) -> None:
        self._input_id = input_id
        self._log: InputLog | None = None
        self._applied = 0
        self._positions: dict[str, int] = {}  # replay: the recorded inputs' positions, by id
        self._held: dict[int, tuple[str, V]] = {}  # replay: recorded inputs read again, by position
        self._fresh: list[tuple[str, V]] = []  # replay: inputs never applied, in the order they came
        self._progress_ms = wall_ms()
        super().__init__(step_id, program, config, None if resume is None else resume[0])
        if resume is not None and self._log is not None:
            self._hold(resume[1])  # what a replay held when the snapshot was taken

    def _hold(self, items: list[tuple[str, V]]) -> None:
        """Keep ``items`` for the replay: each recorded one for its place, the others for after it."""
        for item in items:
            input_id = self._input_id(item[1])
            n = None if input_id is None else self._positions.get(input_id)
            if n is not None and n > self._applied:
                self._held[n] = item
            else:
                self._fresh.append(item)

    @property
    def _replaying(self) -> bool:
        return self._log is not None and self._applied < self._log.end

    def _open(self, shard: str, seq: int | None, lineage: str | None = None) -> StateStore:
        store = super()._open(shard, seq, lineage)
        if self._config.state_dir is not None:
            self._log = InputLog(self._config.state_dir / self._step_id / f"inputs-{shard}", DAY_MS // 1000)
            # Without a snapshot (none was taken before a kill) the state starts empty and the input from
            # its start: the record replays from its first entry. A record of another run, under a state
            # directory used again with new input, finds no input of its own and is given up.
            self._applied = store.get(_POSITION_KEY, 0)
            self._positions = self._log.positions(self._applied)
            self._progress_ms = wall_ms()
        return store

    def _apply(self, store: StateStore, item: tuple[str, V] | None, now: int) -> list[tuple[str, W]]:
        """Apply an input (``None``: a timer run) at ``now``, as the ``n``-th, recording it first if new."""
        self._applied += 1
        if self._log is not None and self._applied > self._log.end:
            self._log.append(self._applied, None if item is None else self._input_id(item[1]), now)
        store.put(_POSITION_KEY, self._applied)
        with store.at(now):
            if item is None:
                return list(self._program.on_timer(store))
            return list(self._program.on_item(store, *item))

    def _timers(self, store: StateStore) -> list[tuple[str, W]]:
        now, due = wall_ms(), self._program.next_timer_ms(store)
        if self._replaying or due is None or due > now:
            return []
        return self._apply(store, None, now)

    def _replay(self, store: StateStore) -> list[tuple[str, W]]:
        assert self._log is not None
        out: list[tuple[str, W]] = []
        while self._replaying:
            entry = self._log.entry(self._applied + 1)
            if entry is None:
                return out + self._give_up(store, "its record is gone (older than a day)")
            input_id, now = entry
            if input_id is not None and self._applied + 1 not in self._held:
                if wall_ms() - self._progress_ms > self._config.replay_patience_s * 1000:
                    return out + self._give_up(store, f"input {input_id} did not come back")
                return out
            out.extend(self._apply(store, None if input_id is None else self._held.pop(self._applied + 1), now))
            self._progress_ms = wall_ms()
        self._positions = {}
        fresh, self._fresh = self._fresh, []
        for item in fresh:
            out.extend(self._apply(store, item, wall_ms()))
        return out

    def _give_up(self, store: StateStore, why: str) -> list[tuple[str, W]]:
        assert self._log is not None
        logger.warning(
            "step %s shard %s: replay stopped after %d of %d recorded inputs, %s; what follows is decided afresh",
            self._step_id,
            self._shard,
            self._applied,
            self._log.end,
            why,
        )
        self._log.truncate(self._applied)
        held = [self._held[n] for n in sorted(self._held)]
        self._held.clear()
        self._fresh[:0] = held
        return self._replay(store)

    def _apply_items(self, store: StateStore, items: list[tuple[str, V]]) -> list[tuple[str, W]]:
        if self._replaying:
            self._hold(items)
            return self._replay(store)
        return [out for item in items for out in self._apply(store, item, wall_ms())]

    def on_notify(self) -> tuple[list[tuple[str, W]], bool]:
        if self._store is not None and self._replaying:
            return self._done(self._store, self._replay(self._store) + self._timers(self._store))
        return super().on_notify()

    def on_eof(self) -> tuple[list[tuple[str, W]], bool]:
        if self._store is None:
            return [], StatefulBatchLogic.RETAIN
        out = self._give_up(self._store, "the input ended") if self._replaying else []
        with self._store.at(wall_ms()):
            out.extend(self._program.on_eof(self._store))
        return self._done(self._store, out)

    def notify_at(self) -> datetime | None:
        if self._replaying:
            return datetime.now(UTC) + timedelta(seconds=1)
        return super().notify_at()

    def snapshot(self) -> _RecordedSnapshot[V]:  # type: ignore[override]
        held = [self._held[n] for n in sorted(self._held)]
        return super().snapshot(), [*held, *self._fresh]


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
def recorded_state(
    step_id: str,
    up: KeyedStream[V],
    program_factory: Callable[[], ShardProgram[V, W]],
    config: StateConfig,
    input_id: Callable[[V], str | None],
) -> KeyedStream[W]:
    """:func:`keyed_state` for a program whose decisions depend on the order of its inputs across
    keys and on the time (a shared budget, a deadline): after a kill -9 it decides again exactly as
    before (see :class:`_RecordedShardLogic`). ``input_id`` names an input uniquely and the same way
    each time it is read (a Kafka message: its topic, partition and offset); an input without one
    is never replayed in its recorded place. The program reads the time from ``store.now_ms()``."""

    def to_shard(key_value: tuple[str, V]) -> tuple[str, tuple[str, str, V]]:
        key, value = key_value
        shard = shard_of(key, config.shards)
        return shard, (shard, key, value)

    def build(resume: Any) -> _RecordedShardLogic[V, W]:  # a _RecordedSnapshot, or None
        return _RecordedShardLogic(step_id, program_factory(), config, resume, input_id)

    outs = op.stateful_batch("logic", woken(op.map("shard", up, to_shard), config.shards), build)
    return op.map("unshard", outs, lambda shard_out: shard_out[1])


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
