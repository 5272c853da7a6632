"""``operators.failures.guard``: the first exception any step raises is reported with the step's id (no broker)."""

from __future__ import annotations

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.errors import BytewaxRuntimeError
from bytewax.testing import TestingSink, TestingSource, run_main

from operators.failures import Failure, guard


def flow(fail_on: int, out: list[tuple[str, int]]) -> Dataflow:
    flow = Dataflow("guarded")
    numbers = op.key_on("key", op.input("in", flow, TestingSource(range(10))), lambda x: str(x % 2))
    sums = op.stateful_map("sum", numbers, lambda total, x: ((total or 0) + x, (total or 0) + x))

    def check(item: tuple[str, int]) -> tuple[str, int]:
        if item[1] >= fail_on:
            raise ValueError(f"a sum of {item[1]}")
        return item

    op.output("out", op.map("check", sums, check), TestingSink(out))
    return flow


def test_a_run_without_failures_is_unchanged_and_reports_nothing() -> None:
    reported: list[tuple[str, BaseException]] = []
    out: list[tuple[str, int]] = []
    run_main(guard(flow(10_000, out), lambda step, exc: reported.append((step, exc))))
    assert sorted(out) == sorted([("0", s) for s in (0, 2, 6, 12, 20)] + [("1", s) for s in (1, 4, 9, 16, 25)])
    assert reported == []  # the source's end (StopIteration) is not a failure


def test_the_first_exception_is_reported_with_its_step_and_still_stops_the_run() -> None:
    reported: list[tuple[str, BaseException]] = []
    with pytest.raises(BytewaxRuntimeError) as raised:
        run_main(guard(flow(12, []), lambda step, exc: reported.append((step, exc))))
    ((step, exc),) = reported
    causes, cause = [], raised.value.__cause__
    while cause is not None:
        causes.append(cause)
        cause = cause.__cause__
    assert exc in causes  # what Bytewax raises is caused by it
    assert step.startswith("guarded.check") and str(exc) == "a sum of 12"
    failure = Failure.of(1, step, exc)
    assert str(failure) == f"process 1, step {step!r}: ValueError: a sum of 12"
    assert "in check" in failure.traceback and "in guarded" not in failure.traceback
