"""Input schemas: each validates one request's ``inputs`` and says what it expected.

A violation raises :class:`InvalidInput` (an ``InvalidMessage``) whose message names
what was expected and what arrived; the dataflow answers it as an ``error``
reply and copies the request to the dead-letter topic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from common import InvalidMessage

__all__ = ["InvalidInput", "Text", "Vector"]


class InvalidInput(InvalidMessage):
    """A request's ``inputs`` do not match its model's schema (or name no known model)."""


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

    def describe(self) -> str:
        return f"a string of at most {self.max_chars} characters"
