"""Stream-table and stream-stream joins, against the order and time rules they promise."""

from __future__ import annotations

from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from operators.joins import Enriched, Joined, _IntervalJoin, _TableJoin, _Tagged, join_within
from operators.stateful import StateConfig
from state import MemoryBackend, StateStore


def frozen_clock() -> int:
    return 0  # the watermark moves with event time only


def test_a_table_update_changes_later_items_never_earlier_ones() -> None:
    program, store = _TableJoin(row_ttl_ms=None), StateStore(MemoryBackend())
    arrivals = [
        ("m1", _Tagged("stream", "p0")),  # before the table has the merchant: partial data
        ("m1", _Tagged("table", {"risk": 1})),
        ("m1", _Tagged("stream", "p1")),
        ("m2", _Tagged("stream", "p2")),
        ("m1", _Tagged("table", {"risk": 2})),
        ("m1", _Tagged("stream", "p3")),
        ("m1", _Tagged("table", None)),  # deleted
        ("m1", _Tagged("stream", "p4")),
    ]
    out = [e for key, item in arrivals for _, e in program.on_item(store, key, item)]
    assert out == [
        Enriched("p0", None),
        Enriched("p1", {"risk": 1}),
        Enriched("p2", None),
        Enriched("p3", {"risk": 2}),
        Enriched("p4", None),
    ]


def joined(program: _IntervalJoin, store: StateStore, *items: tuple[str, _Tagged]) -> list[Joined[Any, Any]]:
    return [j for key, item in items for _, j in program.on_item(store, key, item)]


def test_an_interval_join_pairs_within_the_bound_and_releases_the_unmatched() -> None:
    program, store = _IntervalJoin(within_ms=1_000, lateness_ms=0, now_ms=frozen_clock), StateStore(MemoryBackend())
    assert joined(program, store, ("a", _Tagged("left", "pay-a", 0)), ("b", _Tagged("left", "pay-b", 100))) == []
    assert joined(program, store, ("a", _Tagged("right", "cb-a", 900))) == [Joined("pay-a", "cb-a")]
    assert joined(program, store, ("c", _Tagged("right", "cb-c", 950))) == []  # before its left: it waits
    assert joined(program, store, ("c", _Tagged("left", "pay-c", 1_000))) == [Joined("pay-c", "cb-c")]
    assert joined(program, store, ("d", _Tagged("left", "pay-d", 1_200))) == []
    # The watermark is the slower side's: the right side (950) holds b (due at 1,100), whatever the left reads.
    assert list(program.on_timer(store)) == []
    assert joined(program, store, ("x", _Tagged("right", "cb-x", 1_150))) == []
    assert [j for _, j in program.on_timer(store)] == [Joined("pay-b", None)]  # both sides passed 1,100
    # A right item whose left's bound had passed when it came: it leaves alone at once.
    assert joined(program, store, ("z", _Tagged("right", "cb-z", 100))) == [Joined(None, "cb-z")]
    assert sorted(map(str, (j for _, j in program.on_eof(store)))) == sorted(
        map(str, [Joined("pay-d", None), Joined(None, "cb-x")])
    )
    assert [k for k, _ in store.items()] == ["\x01clocks"]  # nothing else left


def test_join_within_in_a_dataflow_accounts_for_every_item_once() -> None:
    payments: list[tuple[str, dict[str, Any]]] = [(f"p{i}", {"id": f"p{i}", "ts": i * 10}) for i in range(300)]
    labels: list[tuple[str, dict[str, Any]]] = [
        (f"p{i}", {"id": f"p{i}", "ts": i * 10 + 500}) for i in range(0, 300, 7)
    ]
    flow = Dataflow("join")
    left = op.input("left", flow, TestingSource(payments, batch_size=20))
    right = op.input("right", flow, TestingSource(labels, batch_size=5))
    out = join_within(
        "label",
        left,
        right,
        left_ms=lambda p: p["ts"],
        right_ms=lambda c: c["ts"],
        within_ms=100_000,  # longer than the input: every label finds its payment
        state=StateConfig(None, shards=3, now_ms=frozen_clock),
    )
    got: list = []
    op.output("out", out, TestingSink(got))
    run_main(flow)
    pairs = {key: j for key, j in got}
    assert len(got) == len(pairs) == 300
    assert {k for k, j in pairs.items() if j.right is not None} == {k for k, _ in labels}
    assert all(j.left is not None and j.left["id"] == k for k, j in pairs.items())
