"""Dataflows as clusters of processes, started as users start them (``python -m dataflows.launch
NAME --processes N``): exact results, and a failure that every process names."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.event_counts import counts_by_id, events, expected_counts, prepare, run_to_end, start_dataflow

pytestmark = pytest.mark.e2e


def test_event_counts_as_two_processes_counts_exactly_and_every_process_names_a_lost_state_directory(
    brokers: str, topic: str, tmp_path: Path
) -> None:
    msgs = events(topic, 20_000)
    prepare(brokers, topic, msgs, partitions=4)
    run_to_end(start_dataflow(topic, tmp_path, brokers, processes=2))
    by_id, rows = counts_by_id(brokers, topic)
    assert by_id == expected_counts(msgs) and rows == len(by_id)

    # One shard's state directory is lost: the process that owns the shard cannot resume it.
    (shard,) = [d for d in (tmp_path / "state").glob("*/shard-3")]
    shutil.rmtree(shard)
    cluster = start_dataflow(topic, tmp_path, brokers, processes=2)
    cluster.wait(timeout=120)
    log = cluster.log.read_text(errors="replace")
    assert cluster.returncode == 1, cluster.output()
    for process in ("[0]", "[1]"):  # each process's own lines name the first cause
        lines = [line for line in log.splitlines() if line.startswith(process)]
        assert any("the first cause: process" in line and "StateRecoveryError" in line for line in lines), log[-4000:]
    assert "the state directory was lost" in log
    assert "exited first with status 1" in log
