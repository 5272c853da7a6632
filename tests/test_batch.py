"""Batch inference pieces without a broker: decoding, scoring and committing files exactly once."""

from __future__ import annotations

import io
import re
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from bytewax.dataflow import Dataflow
from bytewax.errors import BytewaxRuntimeError
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import run_main

from dataflows.batch_inference import Settings
from dataflows.batch_inference.command import Progress
from dataflows.batch_inference.files import FileOutput, JsonlSource, ParquetSource, commit_files, committed_counts
from dataflows.batch_inference.scoring import BadRow, Lines, RowFields, Scored, Table, decode, score
from models.registry import REGISTRY
from models.schema import InvalidInput, Vector
from operators.kafka.message import KafkaBatch
from operators.settings import SettingsError, from_args
from tests.support.models import loaded

TABULAR = REGISTRY["tabular-risk"]
FIELDS = RowFields()


def row(i: int) -> list[float]:
    return [((i * 7 + j * 3) % 11) / 5 - 1 for j in range(8)]


@pytest.mark.parametrize(
    "values",
    [
        [row(1), row(2)],
        [row(1), [1.0, 2.0], row(3)],
        [row(1), [1, 2, 3, 4, 5, 6, 7, float("nan")], ["a"] * 8, [True] * 8, "x", None, row(2)],
        [],
    ],
)
def test_a_column_validates_as_each_row_does(values: list[object]) -> None:
    expected, reasons = [], {}
    for i, value in enumerate(values):
        try:
            expected.append(TABULAR.schema.validate(value))
        except InvalidInput as exc:
            reasons[i] = str(exc)
    schema = TABULAR.schema
    assert isinstance(schema, Vector)
    column, errors = schema.column(values)
    assert errors == reasons
    assert column.shape == (len(expected), 8) and column.dtype == np.float32
    assert np.allclose(column, np.asarray(expected, dtype=np.float32).reshape(-1, 8))


def test_kafka_records_decode_to_ids_and_a_column_with_bad_rows_kept() -> None:
    values = [
        orjson.dumps({"id": "c1", "inputs": row(1)}),
        orjson.dumps({"inputs": row(2)}),  # no id: the record key
        orjson.dumps({"inputs": row(3)}),  # no id, no key: where it was read
        b"{not json",
        orjson.dumps({"inputs": [1, 2]}),
        orjson.dumps([1, 2]),
        None,
    ]
    keys = [None, b"k2", None, b"k4", b"k5", None, None]
    n = len(values)
    batch = KafkaBatch("t", 3, values, keys, [()] * n, list(range(100, 100 + n)), [0] * n)
    rows = decode(batch, TABULAR, FIELDS)
    assert rows.ids == ["c1", "k2", "t[3]@102"]
    assert np.allclose(rows.inputs, np.asarray([row(1), row(2), row(3)], dtype=np.float32))
    bad = {b.source: b for b in rows.bad}
    assert set(bad) == {"t[3]@103", "t[3]@104", "t[3]@105", "t[3]@106"}
    assert bad["t[3]@103"].id == "k4" and bad["t[3]@103"].reason.startswith("not JSON")
    assert bad["t[3]@104"].reason == "inputs must be a list of 8 numbers, got a list of 2"
    assert "'inputs' field" in bad["t[3]@105"].reason


def test_jsonl_lines_skip_blanks_and_name_bad_rows_by_line() -> None:
    lines = [orjson.dumps({"id": "a", "inputs": row(1)}) + b"\n", b"\n", b"oops\n", orjson.dumps({"inputs": row(2)})]
    rows = decode(Lines("in.jsonl", 10, lines), TABULAR, FIELDS)
    assert rows.ids == ["a", "in.jsonl:13"]
    assert rows.bad == [BadRow("in.jsonl:12", "in.jsonl:12", rows.bad[0].reason)]


def test_parquet_rows_take_the_fast_path_and_the_slow_path_alike() -> None:
    good = pa.RecordBatch.from_pydict({"id": ["a", "b"], "inputs": [row(1), row(2)]})
    fast = decode(Table("f.parquet", 0, good), TABULAR, FIELDS)
    assert fast.ids == ["a", "b"] and fast.bad == []
    mixed = pa.RecordBatch.from_pydict({"id": ["a", None, "c"], "inputs": [row(1), row(2), [1.0]]})
    slow = decode(Table("f.parquet", 40, mixed), TABULAR, FIELDS)
    assert slow.ids == ["a"] and np.allclose(slow.inputs, fast.inputs[:1])
    assert [(b.id, b.source) for b in slow.bad] == [("f.parquet#41", "f.parquet#41"), ("c", "f.parquet#42")]


def test_batch_scores_equal_online_predictions() -> None:
    model = loaded("tabular-risk")
    inputs = [row(i) for i in range(50)]
    rows = decode(
        Table("f", 0, pa.RecordBatch.from_pydict({"id": list(map(str, range(50))), "inputs": inputs})), TABULAR, FIELDS
    )
    scored = score(model, rows).table
    assert scored is not None and scored.schema.names == ["id", "risk", "label"]
    online = model.predict(inputs)
    assert np.allclose(scored.column("risk").to_numpy(), [p["risk"] for p in online])
    assert scored.column("label").to_pylist() == [p["label"] for p in online]


def test_file_sources_resume_where_their_snapshot_says(tmp_path: Path) -> None:
    table = pa.table({"id": [str(i) for i in range(10)], "inputs": [row(i) for i in range(10)]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=4)
    source = ParquetSource([tmp_path / "in.parquet"], ["id", "inputs"], batch_size=3)
    assert source.list_parts() == ["0#0", "0#1", "0#2"]
    part = source.build_part("read", "0#1", None)
    first = part.next_batch()[0]
    assert (first.first_row, first.batch.num_rows) == (4, 3)
    resumed = source.build_part("read", "0#1", part.snapshot())
    rest = resumed.next_batch()[0]
    assert (rest.first_row, rest.batch.column("id").to_pylist()) == (7, ["7"])

    (tmp_path / "in.jsonl").write_bytes(b"".join(b'{"n": %d}\n' % i for i in range(7)))
    jsonl = JsonlSource([tmp_path / "in.jsonl"], batch_size=3)
    part2 = jsonl.build_part("read", "0", None)
    part2.next_batch()
    resumed2 = jsonl.build_part("read", "0", part2.snapshot())
    lines = resumed2.next_batch()[0]
    assert (lines.first_line, lines.lines) == (4, [b'{"n": 3}\n', b'{"n": 4}\n', b'{"n": 5}\n'])


class Killed(Exception):
    """Stands for a kill -9 while an epoch's snapshots are taken (the writers' may be taken already)."""


class _Chunks(StatefulSourcePartition[Scored, int]):
    """One chunk of ids per poll, each with one bad row."""

    def __init__(self, chunks: list[list[str]], position: int) -> None:
        self._chunks, self._position = chunks, position

    def next_batch(self) -> list[Scored]:
        if self._position == len(self._chunks):
            raise StopIteration()
        ids = self._chunks[self._position]
        self._position += 1
        bad = [BadRow(f"bad-{ids[0]}", "test", "a bad row")]
        return [Scored(f"part-{self._position % 3}", pa.RecordBatch.from_pydict({"id": ids}), bad)]

    def snapshot(self) -> int:
        return self._position


class ChunkSource(FixedPartitionedSource[Scored, int]):
    def __init__(self, chunks: list[list[str]]) -> None:
        self.chunks = chunks

    def list_parts(self) -> list[str]:
        return ["only"]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _Chunks:
        return _Chunks(self.chunks, resume_state or 0)


class _KillerPartition(StatefulSinkPartition[Any, None]):
    def __init__(self, sink: KillerSink) -> None:
        self._sink = sink

    def write_batch(self, values: list[Any]) -> None:
        pass

    def snapshot(self) -> None:
        self._sink.snapshots += 1
        if self._sink.snapshots == self._sink.kill_at:
            raise Killed()


class KillerSink(FixedPartitionedSink[Any, None]):
    """Kills the run in its ``kill_at``-th snapshot of the run."""

    def __init__(self, kill_at: int | None) -> None:
        self.kill_at, self.snapshots = kill_at, 0

    def list_parts(self) -> list[str]:
        return ["only"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _KillerPartition:
        return _KillerPartition(self)


def test_committed_files_hold_every_row_once_however_often_the_job_is_killed(tmp_path: Path) -> None:
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    init_db_dir(recovery, 1)
    chunks = [[f"r{i}-{j}" for j in range(5)] for i in range(12)]
    out = FileOutput(tmp_path / "out", tmp_path / "errors", "parquet", shards=2)

    def run(kill_at: int | None, epoch: timedelta = timedelta(0)) -> None:
        flow = Dataflow("commit")
        scored = op.input("in", flow, ChunkSource(chunks))
        commit_files("commit", op.key_on("by_writer", scored, lambda s: str(int(s.part[-1]) % 2)), out)
        op.output("killer", op.map("to_killer", scored, lambda s: ("only", s.part)), KillerSink(kill_at))
        run_main(flow, epoch_interval=epoch, recovery_config=RecoveryConfig(recovery, timedelta(0)))

    for kill_at in (3, 2, 2, 5, 1):  # a resumed run killed again, before it got as far, too
        with pytest.raises(BytewaxRuntimeError) as stopped:
            run(kill_at)
        assert isinstance(stopped.value.__cause__, Killed), stopped.value
    # With several workers one can commit files epochs ahead of the epoch the run resumes
    # from (a slower worker had not recorded it): such a file must go, as this stand-in does.
    ahead = sorted((tmp_path / "out").glob("part-0-*"))[-1]
    shutil.copy(ahead, ahead.with_name("part-0-000099.parquet"))
    run(None, timedelta(seconds=30))  # the rest in one epoch: the dead runs' file names are not reused
    ids = ds.dataset(tmp_path / "out", format="parquet").to_table().column("id").to_pylist()
    assert sorted(ids) == sorted(i for chunk in chunks for i in chunk)
    errors = b"".join(f.read_bytes() for f in (tmp_path / "errors").glob("part-*"))
    assert sorted(orjson.loads(line)["id"] for line in errors.splitlines()) == sorted(f"bad-{c[0]}" for c in chunks)
    assert committed_counts(tmp_path / "errors") == (60, 12)


def test_progress_reports_rows_rate_and_eta_in_a_log() -> None:
    out = io.StringIO()  # not a terminal: whole lines, no redrawing
    done = iter([0, 40])
    with Progress("nightly", 100, lambda: next(done), out=out):
        pass
    first, last = out.getvalue().splitlines()
    assert first.startswith("[nightly]:   0%") and "0/100" in first
    # Share, rows of the total, elapsed<ETA and the rate.
    assert re.fullmatch(r"\[nightly\]:\s+40%\|.*\| 40/100 \[\d\d:\d\d<\d\d:\d\d, *[\d.]+ rows/s\]", last), last
    assert "\r" not in out.getvalue()


def test_a_flag_wins_over_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_MODEL", "minilm-embeddings")
    monkeypatch.setenv("BATCH_WORKERS", "3")
    s = from_args(Settings, "BATCH_", ["--job", "j", "--input", "x.parquet", "--workers", "5"])
    assert (s.job, s.model, s.workers) == ("j", "minilm-embeddings", 5)
    with pytest.raises(SettingsError, match="BATCH_WORKERS='many' is not valid: expected an integer"):
        from_args(Settings, "BATCH_", ["--job", "j", "--input", "x.parquet", "--workers", "many"])
