"""Ordered byte key-value backends behind the keyed-state contract.

A backend stores raw bytes, iterates keys in byte order and applies a batch of
writes atomically. It knows nothing of epochs, TTLs or value encodings: that is
:class:`state.store.StateStore`'s job, so both backends pass one test suite.

- :class:`RocksDBBackend` (rocksdict): the production backend; state lives on
  disk with a bounded block cache, so it can be larger than memory, and
  survives a kill -9 through RocksDB's write-ahead log.
- :class:`MemoryBackend`: a dict, for tests and throwaway state. It is not
  durable: a store on it refuses to resume from a snapshot.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

from rocksdict import Options, Rdict, WriteBatch

from state.errors import StateError

__all__ = ["Backend", "MemoryBackend", "RocksDBBackend"]


class Backend(Protocol):
    durable: bool

    def get(self, key: bytes) -> bytes | None: ...

    def write(self, batch: Mapping[bytes, bytes | None]) -> None:
        """Apply all writes atomically; a ``None`` value deletes the key."""

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(key, value)`` for ``start <= key < stop`` in byte order."""

    def clear(self) -> None: ...

    def estimated_keys(self) -> int:
        """About how many keys the backend holds (for the state-size gauges)."""
        ...

    def close(self) -> None: ...


class MemoryBackend:
    durable = False

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def write(self, batch: Mapping[bytes, bytes | None]) -> None:
        for key, value in batch.items():
            if value is None:
                self._data.pop(key, None)
            else:
                self._data[key] = value

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        keys = sorted(k for k in self._data if start <= k < stop)
        return ((k, self._data[k]) for k in keys)

    def clear(self) -> None:
        self._data.clear()

    def estimated_keys(self) -> int:
        return len(self._data)

    def close(self) -> None:
        pass


class RocksDBBackend:
    durable = True

    def __init__(self, path: str | Path, *, write_buffer_mb: int = 16) -> None:
        self.path = Path(path)
        # left by a kill inside clear(): the database it held was being deleted
        shutil.rmtree(self._discarded(), ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_buffer_mb = write_buffer_mb
        self._db = self._open()

    def _open(self) -> Rdict:
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_write_buffer_size(self._write_buffer_mb << 20)
        try:
            return Rdict(str(self.path), options)
        except Exception as exc:  # rocksdict raises a bare Exception carrying RocksDB's status
            if "lock" in str(exc).lower():
                hint = (
                    "another process holds it: a second run of the same dataflow, or one still shutting down. "
                    "Stop it, or give this run its own state directory"
                )
            else:
                hint = "check that the path is a writable directory on a disk with free space"
            raise StateError(f"cannot open the RocksDB state at {self.path}: {exc}. {hint}.") from exc

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._db.get(key)
        return value

    def write(self, batch: Mapping[bytes, bytes | None]) -> None:
        wb = WriteBatch(raw_mode=True)
        for key, value in batch.items():
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
        self._db.write(wb)

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        it = self._db.iter()
        it.seek(start)
        while it.valid():
            key = it.key()
            if key >= stop:
                return
            yield key, it.value()
            it.next()

    def _discarded(self) -> Path:
        return self.path.with_name(self.path.name + ".discarded")

    def clear(self) -> None:
        self._db.close()
        # Rename, then delete: a kill while deleting in place leaves WAL files
        # that RocksDB refuses to open a new database over ("wal_dir contains
        # existing log file"), so the shard could not be opened again.
        self.path.rename(self._discarded())
        shutil.rmtree(self._discarded())
        self.path.mkdir(parents=True)
        self._db = self._open()

    def estimated_keys(self) -> int:
        return int(self._db.property_int_value("rocksdb.estimate-num-keys") or 0)

    def close(self) -> None:
        self._db.close()
