"""recorded_state: a shard resumed from a snapshot decides again exactly what it decided before the
kill, whatever order its inputs are read again in and whatever the time is now."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from operators.stateful import StateConfig, Wake, _RecordedShardLogic
from state import StateStore


@dataclass(frozen=True)
class Ask:
    """A request for one of the two places a gate admits, until the gate closes at ``CLOSES_MS``."""

    name: str
    source: str  # where it was read, e.g. topic:partition:offset


CLOSES_MS = 5_000


class Gate:
    """Order and time decide: the first two asks are admitted, and none after the gate's timer runs."""

    def on_item(self, store: StateStore, key: str, value: Ask) -> Iterable[tuple[str, Any]]:
        if store.get("opened_ms") is None:
            store.put("opened_ms", store.now_ms())
            store.set_timer("close", "gate", CLOSES_MS)
        admitted = store.get("admitted", 0)
        ok = admitted < 2 and not store.get("closed", False)
        store.put("admitted", admitted + ok)
        return [(key, (value.name, ok, store.now_ms()))]

    def on_timer(self, store: StateStore) -> Iterable[tuple[str, Any]]:
        if store.pop_due("close", store.now_ms()):
            store.put("closed", True)
            return [("gate", ("closed", True, store.now_ms()))]
        return []

    def next_timer_ms(self, store: StateStore) -> int | None:
        return store.next_due_ms("close")

    def on_eof(self, store: StateStore) -> Iterable[tuple[str, Any]]:
        return []


class Clock:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1_000
        monkeypatch.setattr("operators.stateful.wall_ms", lambda: self.now)


def shard(tmp_path: Path, resume: Any = None, patience_s: float = 30.0) -> _RecordedShardLogic[Ask, Any]:
    config = StateConfig(tmp_path, shards=1, replay_patience_s=patience_s)
    return _RecordedShardLogic("gate", Gate(), config, resume, lambda ask: ask.source)


def feed(logic: _RecordedShardLogic[Ask, Any], *asks: Ask) -> list[Any]:
    out: list[Any] = []
    for ask in asks:
        out += [value for _, value in logic.on_batch([("0", ask.name, ask)])[0]]
    return out


def kill(logic: _RecordedShardLogic[Ask, Any]) -> None:
    """What a kill -9 leaves: the files as they are (the test closes them to open them again)."""
    assert logic._store is not None and logic._log is not None
    logic._store.close()
    logic._log.close()


A, B, C, D = (Ask(name, f"asks:0:{n}") for n, name in enumerate("abcd"))


def test_a_resumed_shard_applies_the_inputs_after_its_snapshot_in_their_recorded_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch)
    first = shard(tmp_path)
    before = feed(first, A)
    token = first.snapshot()
    clock.now = 2_000
    before += feed(first, B, C)
    assert [(name, ok) for name, ok, _ in before] == [("a", True), ("b", True), ("c", False)]
    kill(first)

    clock.now = 3_000
    again = shard(tmp_path, token)
    # Read again in another order: c waits for b, its turn in the record.
    assert feed(again, C) == []
    assert feed(again, B) == before[1:]  # the same decisions, at the times they were first made
    assert feed(again, D) == [("d", False, 3_000)]  # after the replay: decided afresh, now


def test_timer_runs_are_replayed_in_their_place_and_none_runs_before_the_replay_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch)
    first = shard(tmp_path)
    token = (feed(first, A), first.snapshot())[1]
    before = feed(first, B)
    clock.now = CLOSES_MS
    before += [value for _, value in first.on_notify()[0]]
    before += feed(first, C)
    assert [(name, ok) for name, ok, _ in before] == [("b", True), ("closed", True), ("c", False)]
    kill(first)

    clock.now = 60_000  # long past the gate's time: a timer run now would refuse b
    again = shard(tmp_path, token)
    assert again.on_batch([Wake("0")])[0] == []
    assert again.on_notify()[0] == []
    assert feed(again, C) == []
    assert feed(again, B) == before


def test_an_input_that_does_not_come_back_ends_the_replay_and_what_follows_is_decided_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(monkeypatch)
    first = shard(tmp_path)
    token = (feed(first, A), first.snapshot())[1]
    feed(first, B, C)
    kill(first)

    clock.now = 3_000
    again = shard(tmp_path, token, patience_s=1.0)
    assert feed(again, C) == []  # waits for b
    clock.now = 4_500
    with caplog.at_level(logging.WARNING):
        out = [value for _, value in again.on_notify()[0]]
    assert out == [("c", True, 4_500)]
    assert "replay stopped after 1 of 3 recorded inputs, input asks:0:1 did not come back" in caplog.text
    assert feed(again, D) == [("d", False, 4_500)]
    kill(again)

    # Resumed again from the same snapshot: the record is what this run decided (c, then d); b is out of it.
    again = shard(tmp_path, token)
    assert feed(again, D) == []
    assert feed(again, C) == [("c", True, 4_500), ("d", False, 4_500)]


def test_a_shard_killed_before_its_first_snapshot_replays_its_record_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch)
    first = shard(tmp_path)
    before = feed(first, A, B, C)
    kill(first)
    clock.now = 9_000
    again = shard(tmp_path)  # nothing to resume from: empty state, the input read from its start
    assert feed(again, C) == []
    assert feed(again, B) == []
    assert feed(again, A) == [*before, ("closed", True, 9_000)]  # then the gate's timer, due long ago, runs


def test_inputs_a_replay_holds_are_in_its_snapshot_and_survive_another_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch)
    first = shard(tmp_path)
    token = (feed(first, A), first.snapshot())[1]
    before = feed(first, B, C)
    kill(first)

    clock.now = 3_000
    again = shard(tmp_path, token)
    assert feed(again, C, D) == []  # c waits for b (read from another partition), d for the replay's end
    token = again.snapshot()  # the source's offsets in it are past c and d
    kill(again)

    clock.now = 4_000
    third = shard(tmp_path, token)
    assert feed(third, B) == [*before, ("d", False, 4_000)]
