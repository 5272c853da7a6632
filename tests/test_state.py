"""One suite for the keyed-state contract, run over every backend."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from state import MemoryBackend, RocksDBBackend, StateError, StateRecoveryError, StateStore


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


@pytest.fixture(params=["memory", "rocksdb"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator:
    opened: list[Any] = []

    def make():
        backend = MemoryBackend() if request.param == "memory" else RocksDBBackend(tmp_path / f"db{len(opened)}")
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        backend.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(make_backend, clock) -> StateStore:
    return StateStore(make_backend(), now_ms=clock, undo_retain=4)


def test_get_put_delete(store: StateStore) -> None:
    assert store.get("a") is None
    assert store.get("a", 0) == 0
    store.put("a", {"n": 1, "xs": [1, 2]})
    assert store.get("a") == {"n": 1, "xs": [1, 2]}
    store.commit()
    store.put("a", 2)
    assert store.get("a") == 2
    store.delete("a")
    assert store.get("a") is None
    store.commit()
    assert store.get("a") is None


def test_items_are_ordered_and_merge_pending_with_committed(store: StateStore) -> None:
    store.put("k/2", 2)
    store.put("k/1", 1)
    store.put("other", 0)
    store.commit()
    store.put("k/3", 3)
    store.delete("k/1")
    assert list(store.items("k/")) == [("k/2", 2), ("k/3", 3)]


def test_restore_rolls_back_to_a_commit(store: StateStore) -> None:
    store.put("a", 1)
    store.put("b", 1)
    first = store.commit()
    store.put("a", 2)
    store.delete("b")
    store.put("c", 3)
    store.commit()
    store.put("a", 99)  # pending only: lost by the restore, as in a crash
    store.restore(first)
    assert (store.get("a"), store.get("b"), store.get("c")) == (1, 1, None)
    # and the store keeps working from there
    store.put("a", 5)
    assert store.commit() == first + 1
    assert store.get("a") == 5


def test_restore_none_starts_empty(store: StateStore) -> None:
    store.put("a", 1)
    store.commit()
    store.restore(None)
    assert store.get("a") is None
    assert store.seq == 0


def test_restore_beyond_retained_undo_fails_loudly(store: StateStore) -> None:
    for i in range(10):
        store.put("a", i)
        store.commit()
    with pytest.raises(StateRecoveryError, match="undo_retain"):
        store.restore(2)
    store.restore(7)  # the oldest of the 4 retained snapshots
    assert store.get("a") == 6


def test_early_commits_do_not_use_up_the_undo_allowance(store: StateStore) -> None:
    store.put("a", 1)
    first = store.commit()
    for i in range(20):  # undo_retain is 4
        store.put("a", 100 + i)
        store.commit(snapshot=False)
    store.commit()
    store.restore(first)
    assert store.get("a") == 1


def test_restore_ahead_of_store_fails_loudly(store: StateStore) -> None:
    store.put("a", 1)
    store.commit()
    reason = "holds only commit 1" if store.backend.durable else "kept in memory"
    with pytest.raises(StateRecoveryError, match=reason):
        store.restore(7)


def test_random_histories_restore_to_every_retained_commit(make_backend, clock) -> None:
    """Against a plain-dict reference: restoring to commit k equals the reference at k."""
    rng = random.Random(7)
    for target in range(1, 6):
        store = StateStore(make_backend(), now_ms=clock, undo_retain=8)
        store.restore(None)
        reference: dict[str, int] = {}
        history: dict[int, dict[str, int]] = {0: {}}
        for _ in range(6):
            for _ in range(20):
                key = f"k{rng.randrange(8)}"
                if rng.random() < 0.2:
                    store.delete(key)
                    reference.pop(key, None)
                else:
                    store.put(key, rng.randrange(100))
                    reference[key] = store.get(key)
            history[store.commit()] = dict(reference)
        store.restore(target)
        assert dict(store.items()) == history[target]


def test_ttl_expiry(store: StateStore, clock: Clock) -> None:
    store.put("short", 1, ttl_ms=1_000)
    store.put("long", 2, ttl_ms=5_000)
    store.put("forever", 3)
    store.commit()
    clock.ms += 1_000
    assert store.get("short") is None  # reads as absent before the sweep
    assert store.expire() == ["short"]
    store.put("long", 4, ttl_ms=5_000)  # a write refreshes the TTL
    clock.ms += 4_500
    assert store.expire() == []
    clock.ms += 1_000
    assert store.expire() == ["long"]
    store.commit()
    assert dict(store.items()) == {"forever": 3}
    # nothing of the expired keys is left behind, timers included
    assert store.next_expiry_ms() is None


def test_timers_pop_in_due_order(store: StateStore) -> None:
    store.set_timer("close", "b", 20)
    store.set_timer("close", "a", 10)
    store.commit()
    store.set_timer("close", "c", 30)
    assert store.next_due_ms("close") == 10
    assert store.pop_due("close", 20) == [(10, "a"), (20, "b")]
    assert store.pop_due("close", 25) == []
    assert store.next_due_ms("close") == 30


def test_rocksdb_state_survives_reopen(tmp_path: Path) -> None:
    store = StateStore(RocksDBBackend(tmp_path / "db"))
    store.put("a", 1)
    seq = store.commit()
    store.put("a", 2)  # never committed
    store.close()
    reopened = StateStore(RocksDBBackend(tmp_path / "db"))
    reopened.restore(seq)
    assert reopened.get("a") == 1
    reopened.close()


def test_state_in_memory_cannot_resume_after_a_restart_and_says_why() -> None:
    store = StateStore(MemoryBackend())
    store.put("a", 1)
    seq = store.commit()
    store.restore(seq)  # within one process a memory store rolls back like any other
    assert store.get("a") == 1
    restarted = StateStore(MemoryBackend())
    with pytest.raises(StateRecoveryError, match="kept in memory and did not survive the restart"):
        restarted.restore(seq)


def test_a_second_process_on_the_same_state_directory_gets_a_state_error_saying_what_to_do(tmp_path: Path) -> None:
    first = RocksDBBackend(tmp_path / "db")
    with pytest.raises(StateError, match=r"another process holds it.*own state directory"):
        RocksDBBackend(tmp_path / "db")
    first.close()
    RocksDBBackend(tmp_path / "db").close()  # free again once the first closed it
