"""Keyed state that stays consistent with Bytewax's recovery snapshots.

Bytewax recovers by replaying input from the offsets saved in its last
completed snapshot, so after a kill -9 the state must be put back to exactly
what it was at that snapshot: anything newer would count replayed input twice.

:class:`StateStore` keeps writes made since the last commit in a pending
overlay that reads see. :meth:`StateStore.commit` writes the overlay to the
backend in one atomic batch, together with an undo record per key (the bytes it
had before) and the new sequence number, and returns that number: it is the
token an operator hands Bytewax as its snapshot. On resume,
:meth:`StateStore.restore` applies the undo records newer than the token, newest
first, in one atomic batch. Undo records are kept back to the ``undo_retain``-th
last snapshot commit, so a restore can go back that many snapshots (Bytewax
resumes from its last or second to last unless its ``backup_interval`` holds
more). Early commits (``snapshot=False``), which bound the memory held between
snapshots, use no part of that allowance.

Commit numbers are reused after a restore (restoring to 4 makes the next commit
5 again), so a number alone does not name one state. Each restore therefore
starts a new *lineage* (a random id), and each snapshot commit is recorded with
the lineage it was made in: a snapshot token is the pair, and :meth:`restore`
refuses a pair it has rolled back instead of returning to whatever state now
carries that number. (Bytewax can hand back such a token: see
:mod:`operators.stateful`.)

Values are JSON documents (orjson): tuples come back as lists.

Expiry: a value put with ``ttl_ms`` reads as absent once its time has passed and
is deleted by :meth:`StateStore.expire`, which finds due keys through an ordered
timer index instead of scanning all state. Operators use the same index for
their own timers (window ends) through :meth:`set_timer` / :meth:`pop_due`.

Key encoding (bytes, ordered so that scans are prefix ranges)::

    b"d" + key                               -> expiry_ms (8 bytes BE, 0 = never) + orjson(value)
    b"t" + timer + b"\\0" + due_ms (8 BE) + key -> b""
    b"u" + seq (8 BE) + stored key           -> b"\\0" (was absent) or b"\\1" + previous bytes
    b"m:seq"                                 -> last committed seq (8 bytes BE)
    b"m:snapshots"                           -> {"snapshots": [[seq, lineage], ...], "undo_floor": seq} (orjson)

Exceptions: see :mod:`state.errors`.
"""

from __future__ import annotations

import contextlib
import heapq
import secrets
from bisect import bisect_left, insort
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from patternflow import wall_ms
from state.backends import Backend
from state.errors import StateError, StateRecoveryError

__all__ = ["StateError", "StateRecoveryError", "StateStore"]

_SEQ_KEY = b"m:seq"
_SNAPSHOTS_KEY = b"m:snapshots"
_TTL_TIMER = "ttl"
_ABSENT = b"\x00"
_PRESENT = b"\x01"


def _be(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _data_key(key: str) -> bytes:
    return b"d" + key.encode()


def _timer_prefix(timer: str) -> bytes:
    return b"t" + timer.encode() + b"\x00"


def _undo_prefix(seq: int) -> bytes:
    return b"u" + _be(seq)


def _new_lineage() -> str:
    return secrets.token_hex(8)


class StateStore:
    """Epoch-consistent keyed state over a :class:`~state.backends.Backend`."""

    def __init__(
        self,
        backend: Backend,
        *,
        undo_retain: int = 32,
        now_ms: Callable[[], int] = wall_ms,
    ) -> None:
        if undo_retain < 1:
            raise ValueError(f"undo_retain must be >= 1, got {undo_retain}")
        self.backend = backend
        self.undo_retain = undo_retain
        self._now_ms = now_ms
        self._pending: dict[bytes, bytes | None] = {}
        # Pending keys by namespace. Timers are scanned on the hot path (the next
        # due, the due ones), so their keys are kept sorted: a scan is a bisect,
        # not a sort of every timer set in the epoch.
        self._pending_timers: list[bytes] = []
        self._pending_data: set[bytes] = set()
        self._load_meta()

    def now_ms(self) -> int:
        """The store's clock (wall time, or the time :meth:`at` fixes): what TTLs and programs go by."""
        return self._now_ms()

    @contextlib.contextmanager
    def at(self, now_ms: int) -> Iterator[None]:
        """Within the block, the store's clock reads ``now_ms``: a replayed input sees the time it first saw."""
        clock, self._now_ms = self._now_ms, lambda: now_ms
        try:
            yield
        finally:
            self._now_ms = clock

    def _load_meta(self) -> None:
        raw = self.backend.get(_SEQ_KEY)
        self.seq = int.from_bytes(raw, "big") if raw else 0
        meta = orjson.loads(self.backend.get(_SNAPSHOTS_KEY) or b'{"snapshots": [], "undo_floor": 0}')
        # [seq, lineage] pairs; stores written before lineages were kept list bare numbers.
        self._snapshots: list[list[Any]] = [s if isinstance(s, list) else [s, ""] for s in meta["snapshots"]]
        self._undo_floor: int = meta["undo_floor"]
        # Commits made from here on belong to a history no token handed out so far can name.
        self.lineage = _new_lineage()

    def _meta(self) -> bytes:
        return orjson.dumps({"snapshots": self._snapshots, "undo_floor": self._undo_floor})

    # -- reads and writes -------------------------------------------------

    def _raw_get(self, key: bytes) -> bytes | None:
        if key in self._pending:
            return self._pending[key]
        return self.backend.get(key)

    def _raw_put(self, key: bytes, value: bytes | None) -> None:
        if key not in self._pending:
            if key[:1] == b"t":
                insort(self._pending_timers, key)
            else:
                self._pending_data.add(key)
        self._pending[key] = value

    def _clear_pending(self) -> None:
        self._pending.clear()
        self._pending_timers.clear()
        self._pending_data.clear()

    def get(self, key: str, default: Any = None) -> Any:
        raw = self._raw_get(_data_key(key))
        if raw is None:
            return default
        expiry = int.from_bytes(raw[:8], "big")
        if expiry and expiry <= self._now_ms():
            return default
        return orjson.loads(raw[8:])

    def put(self, key: str, value: Any, *, ttl_ms: int | None = None) -> None:
        dkey = _data_key(key)
        old = self._raw_get(dkey)
        old_expiry = int.from_bytes(old[:8], "big") if old else 0
        expiry = self._now_ms() + ttl_ms if ttl_ms else 0
        if old_expiry != expiry:
            if old_expiry:
                self.cancel_timer(_TTL_TIMER, key, old_expiry)
            if expiry:
                self.set_timer(_TTL_TIMER, key, expiry)
        self._raw_put(dkey, _be(expiry) + orjson.dumps(value))

    def delete(self, key: str) -> None:
        dkey = _data_key(key)
        old = self._raw_get(dkey)
        if old is None:
            return
        old_expiry = int.from_bytes(old[:8], "big")
        if old_expiry:
            self.cancel_timer(_TTL_TIMER, key, old_expiry)
        self._raw_put(dkey, None)

    def items(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        """Live ``(key, value)`` pairs whose key starts with ``prefix``, in key order."""
        start = _data_key(prefix)
        now = self._now_ms()
        for dkey, raw in self._scan(start, start + b"\xff"):
            expiry = int.from_bytes(raw[:8], "big")
            if not expiry or expiry > now:
                yield dkey[1:].decode(), orjson.loads(raw[8:])

    # -- timers -----------------------------------------------------------

    def set_timer(self, timer: str, key: str, due_ms: int) -> None:
        self._raw_put(_timer_prefix(timer) + _be(due_ms) + key.encode(), b"")

    def cancel_timer(self, timer: str, key: str, due_ms: int) -> None:
        self._raw_put(_timer_prefix(timer) + _be(due_ms) + key.encode(), None)

    def pop_due(self, timer: str, upto_ms: int) -> list[tuple[int, str]]:
        """Remove and return ``(due_ms, key)`` of timers due at or before ``upto_ms``."""
        if upto_ms < 0:  # timers are due at epoch ms >= 0; a watermark can be earlier (lateness near the epoch)
            return []
        prefix = _timer_prefix(timer)
        due = list(self._scan(prefix, prefix + _be(upto_ms + 1)))
        out = []
        for tkey, _ in due:
            self._raw_put(tkey, None)
            rest = tkey[len(prefix) :]
            out.append((int.from_bytes(rest[:8], "big"), rest[8:].decode()))
        return out

    def next_due_ms(self, timer: str) -> int | None:
        prefix = _timer_prefix(timer)
        for tkey, _ in self._scan(prefix, prefix + b"\xff" * 9):
            return int.from_bytes(tkey[len(prefix) : len(prefix) + 8], "big")
        return None

    def next_expiry_ms(self) -> int | None:
        """When the next value put with ``ttl_ms`` expires, if any."""
        return self.next_due_ms(_TTL_TIMER)

    def expire(self) -> list[str]:
        """Delete values whose TTL has passed; return their keys."""
        expired = []
        for _, key in self.pop_due(_TTL_TIMER, self._now_ms()):
            self._raw_put(_data_key(key), None)
            expired.append(key)
        return expired

    def _scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        if start[:1] == b"t":  # a scan stays within one namespace
            timers = self._pending_timers
            keys = timers[bisect_left(timers, start) : bisect_left(timers, stop)]
        else:
            keys = sorted(k for k in self._pending_data if start <= k < stop)
        pending = [(k, self._pending[k]) for k in keys]
        stored = ((k, v) for k, v in self.backend.scan(start, stop) if k not in self._pending)
        for key, value in heapq.merge(pending, stored, key=lambda kv: kv[0]):
            if value is not None:
                yield key, value

    # -- epochs -----------------------------------------------------------

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    def commit(self, *, snapshot: bool = True) -> int:
        """Write pending changes atomically; return the new sequence number.

        ``snapshot=False`` makes an early commit, which only bounds the pending
        writes held in memory: restores return to snapshot commits, and undo
        records reach back to the ``undo_retain``-th last of them.
        """
        seq = self.seq + 1
        batch: dict[bytes, bytes | None] = {}
        undo = _undo_prefix(seq)
        for key, value in self._pending.items():
            before = self.backend.get(key)
            batch[undo + key] = _ABSENT if before is None else _PRESENT + before
            batch[key] = value
        if snapshot:
            self._snapshots.append([seq, self.lineage])
            if len(self._snapshots) > self.undo_retain:
                del self._snapshots[: -self.undo_retain]
                # a restore goes back to the oldest retained snapshot at most
                new_floor = self._snapshots[0][0] + 1
                for key, _ in self.backend.scan(_undo_prefix(self._undo_floor), _undo_prefix(new_floor)):
                    batch[key] = None
                self._undo_floor = new_floor
            batch[_SNAPSHOTS_KEY] = self._meta()
        batch[_SEQ_KEY] = _be(seq)
        self.backend.write(batch)
        self._clear_pending()
        self.seq = seq
        return seq

    def restore(self, seq: int | None, *, lineage: str | None = None) -> None:
        """Return to the state committed as ``seq`` (``None``: empty state).

        With ``lineage`` (the :attr:`lineage` the snapshot commit was made in),
        refuse a commit that an earlier restore rolled back. Pending writes are
        discarded; later commits start a new lineage.
        """
        self._clear_pending()
        if not seq:
            self.backend.clear()
            self._load_meta()
            return
        if seq > self.seq and not self.backend.durable:
            raise StateRecoveryError(
                f"the snapshot to resume from is commit {seq}, but this state was kept in memory and did not "
                "survive the restart: give the step a state directory (StateConfig.state_dir) to resume, or "
                "start over with an empty recovery directory."
            )
        if seq > self.seq:
            raise StateRecoveryError(
                f"the snapshot to resume from is commit {seq}, but the state store at "
                f"{getattr(self.backend, 'path', 'memory')} holds only commit {self.seq}; "
                "the state directory was lost or belongs to another run. Point the state "
                "directory at the one used with this recovery directory, or delete both to start over."
            )
        if seq + 1 < self._undo_floor:
            raise StateRecoveryError(
                f"cannot roll state back to commit {seq}: undo records reach back to commit "
                f"{self._undo_floor - 1} only; raise undo_retain above the number of snapshots "
                "Bytewax keeps (backup_interval / snapshot interval)."
            )
        if lineage is not None and [seq, lineage] not in self._snapshots:
            raise StateRecoveryError(
                f"the snapshot to resume from is commit {seq} of lineage {lineage}, which the state store at "
                f"{getattr(self.backend, 'path', 'memory')} rolled back when an earlier run resumed (the number "
                "now names another state): the recovery store handed back a snapshot written by a run that was "
                "killed, and resuming from it would lose or double-count input. Delete the recovery and state "
                "directories together to start over from the input."
            )
        batch: dict[bytes, bytes | None] = {}
        # Oldest undo record first: a key's value before commit seq+1 is the one to restore.
        for ukey, before in self.backend.scan(_undo_prefix(seq + 1), _undo_prefix(self.seq + 1)):
            key = ukey[9:]
            if key not in batch:
                batch[key] = None if before == _ABSENT else before[1:]
            batch[ukey] = None
        self._snapshots = [s for s in self._snapshots if s[0] <= seq]
        batch[_SNAPSHOTS_KEY] = self._meta()
        batch[_SEQ_KEY] = _be(seq)
        self.backend.write(batch)
        self.seq = seq
        self.lineage = _new_lineage()

    def close(self) -> None:
        self.backend.close()
