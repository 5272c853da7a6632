"""Stream plumbing shared by every dataflow.

One idiom splits a stream in two: steps emit typed items (a ``DeadLetter``, a
``Late`` event, a ``Reply``) and :func:`split` separates them by type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import bytewax.operators as op
from bytewax.dataflow import Stream, operator

__all__ = ["Split", "split"]

A = TypeVar("A")
B = TypeVar("B")


@dataclass(frozen=True)
class Split(Generic[A, B]):
    """The two halves of :func:`split`: the items of the first type, and the rest."""

    first: Stream[A]
    rest: Stream[B]


@operator
def split(step_id: str, up: Stream[Any], kind: type[A], other_kind: type[B]) -> Split[A, B]:
    """Items that are instances of ``kind`` (``first``), and the others (``rest``,
    whose type ``other_kind`` names for the reader and the type checker)."""
    out = op.branch("branch", up, lambda item: isinstance(item, kind))
    return Split(cast(Stream[A], out.trues), cast(Stream[B], out.falses))
