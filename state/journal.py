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
from rocksdict import AccessType, Rdict, WriteBatch

__all__ = ["InputLog", "Journal"]


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


class InputLog:
    """The order in which a shard applied its inputs, and the time each saw: written through, like
    :class:`Journal`, so that a shard resumed from an older snapshot applies the inputs it applied
    before in the same order at the same times (see :mod:`operators.stateful`).

    Entry ``n`` (1, 2, ...) is an input's id, or ``None`` for a timer run, and its time in ms: one
    write per input.
    """

    def __init__(self, path: Path, ttl_s: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(path), access_type=AccessType.with_ttl(ttl_s))
        last = self._db.iter()
        last.seek_to_last()
        self.end = int.from_bytes(last.key()[2:], "big") if last.valid() else 0
        del last

    def append(self, n: int, input_id: str | None, now_ms: int) -> None:
        """Record entry ``n``: the one after :attr:`end`, or one that replaces what followed."""
        self._db[_entry_key(n)] = orjson.dumps([input_id, now_ms])
        self.end = n

    def entry(self, n: int) -> tuple[str | None, int] | None:
        raw = self._db.get(_entry_key(n))
        if raw is None:
            return None
        input_id, now_ms = orjson.loads(raw)
        return input_id, now_ms

    def positions(self, after: int) -> dict[str, int]:
        """The entries after ``after`` (those a resumed shard replays), by input id."""
        found: dict[str, int] = {}
        for n in range(after + 1, self.end + 1):
            entry = self.entry(n)
            if entry is not None and entry[0] is not None:
                found[entry[0]] = n
        return found

    def truncate(self, n: int) -> None:
        """Forget the entries after ``n``: they will not be replayed."""
        batch = WriteBatch()
        for m in range(n + 1, self.end + 1):
            batch.delete(_entry_key(m))
        self._db.write(batch)
        self.end = n

    def close(self) -> None:
        self._db.close()


def _entry_key(n: int) -> bytes:
    return b"n:" + n.to_bytes(8, "big")
