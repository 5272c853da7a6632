"""Batch inference, a batch of rows at a time: decode, score, hand over as Arrow columns.

Rows never become one Python object each past decoding: a :class:`Rows` holds a
chunk's row ids and the model's input column (a numpy array for vector models),
:func:`score` runs the model's one forward pass over it and returns the outputs
as an Arrow record batch. Rows that cannot be scored (bad JSON, no input field,
a schema violation) travel beside them as :class:`BadRow` with the reason, and
are counted, never dropped.

Where a chunk comes from decides its row ids and where a bad row is reported:

- a Kafka record (:class:`~operators.kafka.message.KafkaBatch`): its value is a
  JSON object; the id is its ``id`` field, else the record key, else
  ``topic[partition]@offset``;
- a JSONL line (:class:`Lines`): the same object; the id falls back to ``file:line``;
- a Parquet record batch (:class:`Table`): the ``id`` and ``inputs`` columns.

The field names are :class:`RowFields`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from models.registry import Model, ModelSpec
from models.schema import Vector
from operators.kafka.message import KafkaBatch

__all__ = ["BadRow", "Lines", "RowFields", "Rows", "Scored", "Table", "decode", "score"]


@dataclass(frozen=True)
class RowFields:
    """Which field (JSON) or column (Parquet) holds a row's id and which its model input."""

    id: str = "id"
    inputs: str = "inputs"


class BadRow(NamedTuple):
    id: str
    source: str  # where the row was read: "orders[2]@1041", "in.jsonl:17", "in.parquet#5"
    reason: str


class Lines(NamedTuple):
    """Lines of a JSONL file, the first being line ``first_line`` (1-based)."""

    part: str
    first_line: int
    lines: list[bytes]


class Table(NamedTuple):
    """A Parquet record batch whose first row is row ``first_row`` of the file."""

    part: str
    first_row: int
    batch: pa.RecordBatch


@dataclass(frozen=True, slots=True)
class Rows:
    """A chunk's valid rows (ids, and the model's input column) and its bad rows."""

    part: str  # the input partition it was read from
    ids: list[str]
    inputs: Any
    bad: list[BadRow]


@dataclass(frozen=True, slots=True)
class Scored:
    """A chunk's outputs: ``table`` has the ``id`` column and the model's output columns."""

    part: str
    table: pa.RecordBatch | None
    bad: list[BadRow]


def decode(chunk: KafkaBatch | Lines | Table, spec: ModelSpec, fields: RowFields) -> Rows:
    if isinstance(chunk, KafkaBatch):
        topic, partition, offsets, keys = chunk.topic, chunk.partition, chunk.offsets, chunk.keys

        def kafka_where(i: int) -> str:
            return f"{topic}[{partition}]@{offsets[i]}"

        def kafka_id(i: int) -> str:
            key = keys[i]
            return key.decode(errors="replace") if key is not None else kafka_where(i)

        return _from_json(f"{topic}[{partition}]", chunk.values, spec, fields, kafka_where, kafka_id)
    if isinstance(chunk, Lines):
        file, first = chunk.part, chunk.first_line

        def line_where(i: int) -> str:
            return f"{file}:{first + i}"

        return _from_json(file, chunk.lines, spec, fields, line_where, line_where, skip_blank=True)
    return _from_table(chunk, spec, fields)


def _from_json(
    part: str,
    values: Sequence[bytes | None],
    spec: ModelSpec,
    fields: RowFields,
    where: Callable[[int], str],
    default_id: Callable[[int], str],
    *,
    skip_blank: bool = False,
) -> Rows:
    ids: list[str] = []
    raw: list[Any] = []
    at: list[int] = []  # the index in ``values`` of each row in ``raw``
    bad: list[BadRow] = []
    loads = orjson.loads
    for i, value in enumerate(values):
        if skip_blank and value is not None and not value.strip():
            continue  # a blank line is no row
        try:
            doc = loads(value or b"")
        except orjson.JSONDecodeError as exc:
            bad.append(BadRow(default_id(i), where(i), f"not JSON: {exc}"))
            continue
        if not isinstance(doc, dict) or fields.inputs not in doc:
            bad.append(BadRow(default_id(i), where(i), f"expected a JSON object with an {fields.inputs!r} field"))
            continue
        row_id = doc.get(fields.id)
        ids.append(default_id(i) if row_id is None else str(row_id))
        raw.append(doc[fields.inputs])
        at.append(i)
    column, errors = spec.schema.column(raw)
    if errors:
        bad.extend(BadRow(ids[j], where(at[j]), reason) for j, reason in errors.items())
        ids = [row_id for j, row_id in enumerate(ids) if j not in errors]
    return Rows(part, ids, column, bad)


def _from_table(chunk: Table, spec: ModelSpec, fields: RowFields) -> Rows:
    batch = chunk.batch
    ids = batch.column(fields.id).cast(pa.string()).to_pylist()
    inputs = batch.column(fields.inputs)
    column = _vector_column(inputs, spec.schema) if isinstance(spec.schema, Vector) else None
    if column is not None and None not in ids:
        return Rows(chunk.part, ids, column, [])
    # The slow path, row by row, says what is wrong with each bad row.
    where = [f"{chunk.part}#{chunk.first_row + i}" for i in range(batch.num_rows)]
    raw = inputs.to_pylist()
    keep = [i for i, row_id in enumerate(ids) if row_id is not None]
    bad = [
        BadRow(where[i], where[i], f"the {fields.id!r} column is null")
        for i, row_id in enumerate(ids)
        if row_id is None
    ]
    valid, errors = spec.schema.column([raw[i] for i in keep])
    bad.extend(BadRow(ids[keep[j]], where[keep[j]], reason) for j, reason in errors.items())
    return Rows(chunk.part, [ids[i] for j, i in enumerate(keep) if j not in errors], valid, bad)


def _vector_column(array: pa.Array, schema: Vector) -> np.ndarray | None:
    """The column as an ``(n, length)`` float32 array without a Python object per value,
    or ``None`` when some row is not ``length`` finite numbers."""
    kind = array.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        return None
    if array.null_count or not (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
        return None
    if len(array) and pc.min_max(pc.list_value_length(array)).as_py() != {"min": schema.length, "max": schema.length}:
        return None
    flat = array.flatten()
    if flat.null_count:
        return None
    values = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(array), schema.length)
    return values if np.isfinite(values).all() else None


def score(model: Model, rows: Rows) -> Scored:
    """One forward pass over the chunk's valid rows; the outputs as Arrow columns beside the ids."""
    if not rows.ids:
        return Scored(rows.part, None, rows.bad)
    outputs = model.forward(rows.inputs)
    columns = [pa.array(rows.ids, pa.string())] + [_arrow(values) for values in outputs.values()]
    table = pa.RecordBatch.from_arrays(columns, names=["id", *outputs])
    return Scored(rows.part, table, rows.bad)


def _arrow(values: np.ndarray) -> pa.Array:
    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
