"""Where a source starts reading a partition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Position"]


@dataclass(frozen=True)
class Position:
    """Where a partition starts: ``earliest``, ``latest``, an ``offset`` or a ``timestamp`` (epoch ms)."""

    kind: Literal["earliest", "latest", "offset", "timestamp"]
    value: int = 0

    @classmethod
    def earliest(cls) -> Position:
        return cls("earliest")

    @classmethod
    def latest(cls) -> Position:
        return cls("latest")

    @classmethod
    def offset(cls, offset: int) -> Position:
        return cls("offset", offset)

    @classmethod
    def timestamp(cls, epoch_ms: int) -> Position:
        return cls("timestamp", epoch_ms)

    def __str__(self) -> str:
        return self.kind if self.kind in ("earliest", "latest") else f"{self.kind}:{self.value}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """``earliest`` | ``latest`` | ``offset:<n>`` | ``timestamp:<epoch ms>``."""
        kind, _, value = text.partition(":")
        if kind in ("earliest", "latest") and not value:
            return cls(kind)  # type: ignore[arg-type]
        if kind in ("offset", "timestamp") and value.isdigit():
            return cls(kind, int(value))  # type: ignore[arg-type]
        raise ValueError(f"expected earliest, latest, offset:<n> or timestamp:<epoch ms>, got {text!r}")
