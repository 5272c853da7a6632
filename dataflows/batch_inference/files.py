"""Files in and out of a Bytewax dataflow: bounded, resumable reads, and output committed once.

Inputs. :class:`ParquetSource` reads Parquet files, one Bytewax partition per
row group, a :class:`~dataflows.batch_inference.scoring.Table` per record batch;
:class:`JsonlSource` reads JSONL files, one partition per file, a
:class:`~dataflows.batch_inference.scoring.Lines` per chunk. Both keep their position (rows or
bytes read) in Bytewax's snapshots, so a resumed job reads on from there, and
end by themselves when their files are read.

Output. :func:`commit_files` writes each chunk's rows and bad rows to files
that become visible only when committed, so a reader never sees a file a crash
could take back and the output holds every row exactly once:

    <output>/part-<shard>-<seq>.<parquet|jsonl>    rows (id and the model's outputs)
    <errors>/part-<shard>-<seq>.jsonl              bad rows: {"id", "source", "reason"}
    <errors>/.commits/<shard>.json                 rows and bad rows committed by that shard

Chunks are spread over ``shards`` writers by input partition. A writer appends
to hidden ``.part-*.tmp`` files and, at each Bytewax snapshot, closes them,
fsyncs and renames them into place, and numbers its next files ``seq + 1``;
the snapshot holds that number and the counts. A writer resumed from a
snapshot deletes its files numbered from that snapshot's ``seq`` on: they hold
rows of epochs that did not complete, which the inputs are about to read again.
Every execution wakes every writer in its first epoch
(:func:`operators.stateful.woken`), so no writer is later resumed from a dead
execution's snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import bytewax.operators as op
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from bytewax.dataflow import operator
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.operators import KeyedStream, StatefulBatchLogic

from dataflows.batch_inference.scoring import BadRow, Lines, Scored, Table
from operators import metrics
from operators.stateful import Wake, woken

__all__ = [
    "FileOutput",
    "Format",
    "JsonlSource",
    "ParquetSource",
    "commit_files",
    "committed_counts",
    "write_atomically",
]

Format = Literal["parquet", "jsonl"]


class _RowGroup(StatefulSourcePartition[Table, int]):
    def __init__(self, path: Path, group: int, columns: list[str], batch_size: int, done: int) -> None:
        self._part = path.name
        self._file = pq.ParquetFile(path)
        self._first = sum(self._file.metadata.row_group(g).num_rows for g in range(group))
        self._done = done
        self._batches = self._file.iter_batches(batch_size=batch_size, row_groups=[group], columns=columns)
        skipped = 0
        while skipped < done:  # batches are read whole, so a resume point is a batch boundary
            skipped += next(self._batches).num_rows

    def next_batch(self) -> list[Table]:
        batch = next(self._batches)  # StopIteration ends the partition
        table = Table(self._part, self._first + self._done, batch)
        self._done += batch.num_rows
        return [table]

    def snapshot(self) -> int:
        return self._done

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class ParquetSource(FixedPartitionedSource[Table, int]):
    """Read ``columns`` of ``paths``, ``batch_size`` rows per item, each row group a partition."""

    paths: Sequence[Path]
    columns: Sequence[str]
    batch_size: int

    def list_parts(self) -> list[str]:
        return [
            f"{i}#{group}" for i, path in enumerate(self.paths) for group in range(pq.ParquetFile(path).num_row_groups)
        ]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _RowGroup:
        index, group = map(int, for_part.split("#"))
        return _RowGroup(self.paths[index], group, list(self.columns), self.batch_size, resume_state or 0)


class _JsonlFile(StatefulSourcePartition[Lines, tuple[int, int]]):
    def __init__(self, path: Path, batch_size: int, state: tuple[int, int]) -> None:
        self._name = path.name
        self._file = path.open("rb")
        self._offset, self._line = state  # bytes read, lines read
        self._file.seek(self._offset)
        self._batch_size = batch_size

    def next_batch(self) -> list[Lines]:
        lines = list(islice(self._file, self._batch_size))
        if not lines:
            raise StopIteration()
        self._offset += sum(map(len, lines))
        first = self._line + 1
        self._line += len(lines)
        return [Lines(self._name, first, lines)]

    def snapshot(self) -> tuple[int, int]:
        return self._offset, self._line

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class JsonlSource(FixedPartitionedSource[Lines, tuple[int, int]]):
    """Read ``paths``, one JSON document per line, ``batch_size`` lines per item, each file a partition."""

    paths: Sequence[Path]
    batch_size: int

    def list_parts(self) -> list[str]:
        return [str(i) for i in range(len(self.paths))]

    def build_part(self, step_id: str, for_part: str, resume_state: tuple[int, int] | None) -> _JsonlFile:
        return _JsonlFile(self.paths[int(for_part)], self.batch_size, resume_state or (0, 0))


@dataclass(frozen=True)
class FileOutput:
    """Where :func:`commit_files` writes: rows to ``directory`` as ``format`` (``None``: rows
    go elsewhere, e.g. a topic, and only bad rows and counts are written), bad rows to ``errors``."""

    directory: Path | None
    errors: Path
    format: Format = "parquet"
    shards: int = 8
    job: str = ""  # labels the job's metrics


class _Commit(NamedTuple):
    shard: str
    seq: int  # the number of the files being written now
    rows: int  # committed so far
    bad: int


class _Writer(StatefulBatchLogic[tuple[str, Scored] | Wake, None, _Commit]):
    def __init__(self, out: FileOutput, resume: _Commit | None) -> None:
        self._out = out
        self._state = resume
        self._rows: _PartFile | None = None
        self._bad: _PartFile | None = None
        self._pending_rows = self._pending_bad = 0
        self._counted = {outcome: metrics.BATCH_ROWS.labels(out.job, outcome) for outcome in ("ok", "bad")}
        if resume is not None:
            self._start(resume)

    def _start(self, state: _Commit) -> None:
        """Take back whatever this shard wrote after ``state`` was committed."""
        self._state = state
        for directory in (self._out.directory, self._out.errors):
            if directory is None or not directory.exists():
                continue
            for path in directory.glob(f"*part-{state.shard}-*"):
                seq = int(path.name.split("-")[2].split(".")[0])
                if seq >= state.seq:
                    path.unlink()
        self._record(state)

    def _record(self, state: _Commit) -> None:
        commits = self._out.errors / ".commits"
        commits.mkdir(parents=True, exist_ok=True)
        write_atomically(commits / f"{state.shard}.json", orjson.dumps({"rows": state.rows, "bad": state.bad}))

    def on_batch(self, values: list[tuple[str, Scored] | Wake]) -> tuple[list[None], bool]:
        state = self._state
        if state is None:  # the first execution: every value names its shard first
            state = _Commit(values[0][0], 0, 0, 0)
            self._start(state)
        for value in values:
            if isinstance(value, Wake):
                continue
            scored = value[1]
            if scored.table is not None:
                if self._out.directory is not None:
                    self._rows = self._rows or _PartFile.open(self._out.directory, state, self._out.format)
                    self._rows.write(scored.table)
                self._pending_rows += scored.table.num_rows
                self._counted["ok"].inc(scored.table.num_rows)
            if scored.bad:
                self._bad = self._bad or _PartFile.open(self._out.errors, state, "jsonl")
                self._bad.write_bad(scored.bad)
                self._pending_bad += len(scored.bad)
                self._counted["bad"].inc(len(scored.bad))
        return [], StatefulBatchLogic.RETAIN

    def snapshot(self) -> _Commit:
        state = self._state
        assert state is not None, "Bytewax snapshots a logic only after it saw items"
        if not (self._pending_rows or self._pending_bad):
            return state
        for part in (self._rows, self._bad):
            if part is not None:
                part.commit()
        self._rows = self._bad = None
        state = self._state = _Commit(
            state.shard, state.seq + 1, state.rows + self._pending_rows, state.bad + self._pending_bad
        )
        self._pending_rows = self._pending_bad = 0
        self._record(state)
        return state


class _PartFile:
    """One file being written, hidden until :meth:`commit`."""

    def __init__(self, final: Path, fmt: Format) -> None:
        self._final = final
        self._tmp = final.with_name(f".{final.name}.tmp")
        self._fmt = fmt
        self._file: IO[bytes] | None = self._tmp.open("wb") if fmt == "jsonl" else None
        self._parquet: pq.ParquetWriter | None = None

    @classmethod
    def open(cls, directory: Path, state: _Commit, fmt: Format) -> _PartFile:
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory / f"part-{state.shard}-{state.seq:06d}.{fmt}", fmt)

    def write(self, table: pa.RecordBatch) -> None:
        if self._file is not None:
            self._write_json(table.to_pylist())
            return
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self._tmp, table.schema)
        self._parquet.write_batch(table)

    def write_bad(self, rows: list[BadRow]) -> None:
        self._write_json([row._asdict() for row in rows])

    def _write_json(self, docs: list[dict[str, Any]]) -> None:
        assert self._file is not None, "a JSONL file"
        self._file.write(b"".join(orjson.dumps(doc) + b"\n" for doc in docs))

    def commit(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._file is not None:
            self._file.close()
        _fsync(self._tmp)
        os.replace(self._tmp, self._final)
        _fsync(self._final.parent)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably: a crash leaves the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Make a file's bytes, or a directory's entries, durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@operator
def commit_files(step_id: str, up: KeyedStream[Scored], out: FileOutput) -> None:
    """Write ``up`` (keyed by writer shard, ``"0"`` to ``str(out.shards - 1)``) as the module docstring says."""
    # (shard, (shard, Scored)): a writer learns its shard from its first value, a Scored or its Wake
    named = op.map("name_shard", up, lambda shard_scored: (shard_scored[0], shard_scored))
    written = op.stateful_batch("write", woken(named, out.shards), lambda resume: _Writer(out, resume))
    # The writer emits nothing; Bytewax runs a dataflow only if it ends in an output or inspect step.
    op.inspect("end", written, lambda step_id, item: None)


def committed_counts(errors: Path) -> tuple[int, int]:
    """Rows and bad rows that :func:`commit_files` has committed under ``errors``, over all shards."""
    rows = bad = 0
    for path in (errors / ".commits").glob("*.json"):
        counts = orjson.loads(path.read_bytes())
        rows += counts["rows"]
        bad += counts["bad"]
    return rows, bad
