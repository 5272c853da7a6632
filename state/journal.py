"""A write-through journal: records that survive a kill -9 from the moment they are written.

Keyed state (:class:`~state.StateStore`) rolls back to the last snapshot on
resume, which is what keeps counts exact under replay. A side effect that
already happened cannot roll back: what records it must outlive the snapshot
epochs. The tool workers journal each finished call under its idempotency key
before they publish its result, so a call replayed after a kill -9 gets the
journaled result instead of running again. Records live ``ttl_s`` (RocksDB's
TTL compaction drops them after that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from rocksdict import AccessType, Rdict

__all__ = ["Journal"]


class Journal:
    def __init__(self, path: Path, ttl_s: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(path), access_type=AccessType.with_ttl(ttl_s))

    def get(self, key: str) -> Any:
        raw = self._db.get(key.encode())
        return None if raw is None else orjson.loads(raw)

    def put(self, key: str, value: Any) -> None:
        """Written to RocksDB's log before returning: a kill -9 after this keeps it."""
        self._db[key.encode()] = orjson.dumps(value)

    def close(self) -> None:
        self._db.close()
