"""Resuming keyed state after kills, against Bytewax's real recovery store.

Each run is an in-process Bytewax execution (``run_main``, one worker, an epoch
per source poll, ``backup_interval`` 0 as ``dataflows.launch`` runs them). A
kill -9 is an exception raised in the test sink while it flushes: Bytewax stops
there, with what it had written to its recovery store and what the state store
had committed, as after a kill at that moment.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.errors import BytewaxRuntimeError
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import run_main

from operators.stateful import StateConfig, keyed_state
from state import RocksDBBackend, StateRecoveryError, StateStore

STEP = "count"


class Killed(Exception):
    """Stands for a kill -9: the run stops here."""


class _Partition(StatefulSourcePartition[str, int]):
    """All remaining items in one poll, then EOF; the first poll after a start returns
    nothing, as a Kafka consumer's first non-blocking polls do."""

    def __init__(self, items: list[str], position: int) -> None:
        self._items = items
        self._position = position
        self._started = False

    def next_batch(self) -> list[str]:
        if not self._started:
            self._started = True
            return []
        if self._position == len(self._items):
            raise StopIteration()
        batch = self._items[self._position :]
        self._position = len(self._items)
        return batch

    def snapshot(self) -> int:
        return self._position


class ListSource(FixedPartitionedSource[str, int]):
    def __init__(self, items: list[str]) -> None:
        self.items = items

    def list_parts(self) -> list[str]:
        return ["only"]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _Partition:
        return _Partition(self.items, resume_state or 0)


class _SinkPartition(StatefulSinkPartition[tuple[str, int], None]):
    def __init__(self, sink: FlushingSink) -> None:
        self._sink = sink
        self._buffer: list[tuple[str, int]] = []

    def write_batch(self, values: list[tuple[str, int]]) -> None:
        self._buffer.extend(values)

    def snapshot(self) -> None:
        # Like KafkaSink: what was written is delivered only once the snapshot's flush completes.
        if self._sink.killed_in_flush:
            raise Killed("killed while flushing")
        self._sink.delivered.extend(self._buffer)
        self._buffer.clear()


class FlushingSink(FixedPartitionedSink[tuple[str, int], None]):
    def __init__(self) -> None:
        self.delivered: list[tuple[str, int]] = []
        self.killed_in_flush = False

    def list_parts(self) -> list[str]:
        return ["only"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _SinkPartition:
        return _SinkPartition(self)


class CountUntilEof:
    """Counts per key, all emitted at the end of the input (as windows that close only then)."""

    def on_item(self, store: StateStore, key: str, value: str) -> Iterable[tuple[str, Any]]:
        store.put(f"n/{key}", store.get(f"n/{key}", 0) + 1)
        return ()

    def on_timer(self, store: StateStore) -> Iterable[tuple[str, Any]]:
        return ()

    def next_timer_ms(self, store: StateStore) -> int | None:
        return None

    def on_eof(self, store: StateStore) -> Iterable[tuple[str, Any]]:
        counts = [(key.removeprefix("n/"), n) for key, n in store.items("n/")]
        for key, _ in counts:
            store.delete(f"n/{key}")
        return counts


def counts_flow(items: list[str], state_dir: Path, sink: FlushingSink) -> Dataflow:
    flow = Dataflow("counts")
    keyed = op.key_on("key", op.input("in", flow, ListSource(items)), lambda item: item)
    counts = keyed_state(STEP, keyed, CountUntilEof, StateConfig(state_dir, shards=2))
    # (key, count) -> ("only", (key, count)): the sink has one partition
    op.output("out", op.map("to_sink", counts, lambda kv: ("only", kv)), sink)
    return flow


def run(flow: Dataflow, recovery: Path) -> None:
    run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(recovery, timedelta(0)))


def run_killed_in_flush(flow: Dataflow, recovery: Path, sink: FlushingSink) -> None:
    sink.killed_in_flush = True
    with pytest.raises(BytewaxRuntimeError) as stopped:
        run(flow, recovery)
    assert isinstance(stopped.value.__cause__, Killed), stopped.value
    sink.killed_in_flush = False


def shard_snapshots_at_resume_epoch(recovery: Path) -> int:
    """Shard snapshots at the epoch the next run resumes from: written by a run that then died."""
    (part,) = recovery.glob("*.sqlite3")
    with sqlite3.connect(part) as db:
        (resume_epoch,) = db.execute(
            "SELECT MAX(worker_frontier) FROM fronts WHERE ex_num = (SELECT MAX(ex_num) FROM exs)"
        ).fetchone()
        (count,) = db.execute(
            "SELECT COUNT(*) FROM snaps WHERE step_id LIKE ? AND snap_epoch = ?", (f"%.{STEP}.logic", resume_epoch)
        ).fetchone()
    return int(count)


def test_killed_twice_while_flushing_the_end_of_input_loses_no_shard(tmp_path: Path) -> None:
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    init_db_dir(recovery, 1)
    items = ["a", "b", "a", "c", "d", "a", "e", "f", "b"]
    sink = FlushingSink()
    flow = counts_flow(items, tmp_path / "state", sink)

    # Run 1 counts everything and emits the counts at the end of the input; killed while its
    # sink flushes them, after the shards' snapshots of that epoch were written but before
    # Bytewax recorded the epoch as done.
    run_killed_in_flush(flow, recovery, sink)
    assert shard_snapshots_at_resume_epoch(recovery) == 2  # the scenario this test is about
    # Run 2 resumes from that epoch; its source is slow to start, so the end of the input
    # (and the shards' only work: emitting) falls in the next epoch. Killed in the flush again.
    run_killed_in_flush(flow, recovery, sink)
    assert sink.delivered == []

    # Run 3 resumes from after the epoch run 2 left behind. Before the fix it restored the
    # shards to the snapshots run 1 died with: commit numbers that run 2 had rolled back and
    # then reused for its state after emitting, so every count was silently gone.
    run(flow, recovery)
    assert sorted(sink.delivered) == [("a", 3), ("b", 2), ("c", 1), ("d", 1), ("e", 1), ("f", 1)]


def test_a_rolled_back_commit_is_refused_not_confused_with_a_reused_number(tmp_path: Path) -> None:
    store = StateStore(RocksDBBackend(tmp_path / "shard"))
    store.put("n", 1)
    kept = (store.commit(), store.lineage)
    store.put("n", 2)
    rolled_back = (store.commit(), store.lineage)  # a snapshot whose run was killed
    store.restore(*kept[:1], lineage=kept[1])
    store.put("n", 3)
    assert store.commit() == rolled_back[0]  # the number is used again, for another state
    with pytest.raises(StateRecoveryError, match="rolled back when an earlier run resumed"):
        store.restore(rolled_back[0], lineage=rolled_back[1])
    store.restore(kept[0], lineage=kept[1])
    assert store.get("n") == 1
    store.close()


def test_a_kill_inside_clear_leaves_a_shard_that_opens_empty(tmp_path: Path) -> None:
    store = StateStore(RocksDBBackend(tmp_path / "shard"))
    store.put("n", 1)
    store.commit()
    store.close()
    # where a kill -9 can stop clear(): the database moved aside, not yet deleted
    (tmp_path / "shard").rename(tmp_path / "shard.discarded")
    reopened = StateStore(RocksDBBackend(tmp_path / "shard"))
    assert reopened.get("n") is None
    assert not (tmp_path / "shard.discarded").exists()
    reopened.close()
