"""Input schemas: each validates one request's ``inputs`` and says what it expected.

A violation raises :class:`InvalidInput` (an ``InvalidMessage``) whose message names
what was expected and what arrived; the dataflow answers it as an ``error``
reply and copies the request to the dead-letter topic.

``column(values)`` validates many instances at once, for batch jobs: it returns
the model's input column for the valid ones (in order) and the reason for each
invalid one, by index; the reasons are those ``validate`` gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from patternflow import InvalidMessage

__all__ = ["InvalidInput", "Text", "Vector"]


class InvalidInput(InvalidMessage):
    """A request's ``inputs`` do not match its model's schema (:class:`~models.registry.UnknownModel`:
    or it names no known model)."""


@dataclass(frozen=True)
class Vector:
    """A list of ``length`` finite numbers."""

    length: int

    def validate(self, value: Any) -> list[float]:
        if not isinstance(value, list) or len(value) != self.length:
            got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
            raise InvalidInput(f"inputs must be a list of {self.length} numbers, got {got}")
        if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value):
            raise InvalidInput(f"inputs must be {self.length} finite numbers, got {value!r:.200}")
        return [float(x) for x in value]

    def column(self, values: list[Any]) -> tuple[np.ndarray, dict[int, str]]:
        """An ``(n, length)`` float32 array of the valid rows, and the reasons for the others."""
        try:
            # One conversion for the whole column in the common case: every row a list of numbers.
            array = np.asarray(values)
        except ValueError:  # ragged rows
            array = np.empty(0)
        if array.shape == (len(values), self.length) and array.dtype.kind in "fiu" and np.isfinite(array).all():
            return array.astype(np.float32, copy=False), {}
        return _one_by_one(self.validate, values, lambda valid: np.asarray(valid, np.float32).reshape(-1, self.length))

    def describe(self) -> str:
        return f"a list of {self.length} numbers"


@dataclass(frozen=True)
class Text:
    """A non-empty string of at most ``max_chars`` characters."""

    max_chars: int

    def validate(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise InvalidInput(f"inputs must be a non-empty string, got {value!r:.100}")
        if len(value) > self.max_chars:
            raise InvalidInput(f"inputs must be at most {self.max_chars} characters, got {len(value)}")
        return value

    def column(self, values: list[Any]) -> tuple[list[str], dict[int, str]]:
        """The valid strings, and the reasons for the others."""
        return _one_by_one(self.validate, values, list)

    def describe(self) -> str:
        return f"a string of at most {self.max_chars} characters"


def _one_by_one(validate: Any, values: list[Any], to_column: Any) -> tuple[Any, dict[int, str]]:
    valid: list[Any] = []
    errors: dict[int, str] = {}
    for i, value in enumerate(values):
        try:
            valid.append(validate(value))
        except InvalidInput as exc:
            errors[i] = str(exc)
    return to_column(valid), errors
