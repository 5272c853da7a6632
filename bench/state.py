"""Keyed state: RocksDB against the in-memory backend, and recovery of 1M keys.

ops/s: read-modify-write of a counter per key (one get and one put is one op)
through :class:`state.StateStore`, committing every 10,000 ops as a snapshot
would, on one thread (one Bytewax worker). Recovery: a store with 1M keys, one
uncommitted and one committed-but-unsnapshotted epoch on top (as at a kill -9
between Bytewax's snapshot and ours), reopened and rolled back to the snapshot.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from bench.report import bar_chart, parse_args, progress, write_report
from state import MemoryBackend, RocksDBBackend, StateStore


def ops_per_s(store: StateStore, n_ops: int, n_keys: int) -> float:
    rng = random.Random(1)
    keys = [f"key-{rng.randrange(n_keys)}" for _ in range(n_ops)]
    start = time.perf_counter()
    for i, key in enumerate(keys):
        store.put(key, store.get(key, 0) + 1)
        if i % 10_000 == 9_999:
            store.commit()
    store.commit()
    return n_ops / (time.perf_counter() - start)


def _write_then_die(path: Path, n_keys: int, out: Connection) -> None:
    store = StateStore(RocksDBBackend(path))
    start = time.perf_counter()
    for i in range(n_keys):
        store.put(f"key-{i}", i)
        if i % 100_000 == 99_999:
            store.commit()
            progress(f"  wrote {i + 1:,} keys")
    snapshot = store.commit()
    out.send((snapshot, time.perf_counter() - start))
    for i in range(0, n_keys, 100):  # an epoch Bytewax never recorded
        store.put(f"key-{i}", -1)
    store.commit()
    store.put("key-0", -2)  # and writes still pending at the kill
    os.kill(os.getpid(), signal.SIGKILL)


def recovery_s(path: Path, n_keys: int) -> tuple[float, float]:
    """Seconds to write ``n_keys``, and seconds to reopen and roll back after a kill -9."""
    receive, send = multiprocessing.Pipe(duplex=False)
    writer = multiprocessing.get_context("spawn").Process(target=_write_then_die, args=(path, n_keys, send))
    writer.start()
    snapshot, write_s = receive.recv()
    writer.join()
    assert writer.exitcode == -signal.SIGKILL, writer.exitcode

    start = time.perf_counter()
    reopened = StateStore(RocksDBBackend(path))
    reopened.restore(snapshot)
    elapsed = time.perf_counter() - start
    rng = random.Random(2)
    for i in (0, n_keys - 1, *(rng.randrange(n_keys) for _ in range(1000))):
        assert reopened.get(f"key-{i}") == i, i
    reopened.close()
    return write_s, elapsed


def main() -> None:
    args = parse_args(__doc__)
    n_ops, n_keys = (200_000, 50_000) if args.quick else (1_000_000, 200_000)
    tmp = Path(tempfile.mkdtemp(prefix="bench-state-"))
    try:
        progress(f"{n_ops:,} get+put ops over {n_keys:,} keys")
        memory = ops_per_s(StateStore(MemoryBackend()), n_ops, n_keys)
        progress(f"memory:  {memory:,.0f} ops/s")
        rocks = ops_per_s(StateStore(RocksDBBackend(tmp / "ops")), n_ops, n_keys)
        progress(f"rocksdb: {rocks:,.0f} ops/s")
        progress("recovery of 1,000,000 keys")
        write_s, recover_s = recovery_s(tmp / "recovery", 1_000_000)
        progress(f"wrote 1M keys in {write_s:.1f} s; reopened and rolled back in {recover_s:.2f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "rocksdb_ops_per_s": round(rocks),
        "memory_ops_per_s": round(memory),
        "rocksdb_vs_memory": round(rocks / memory, 2),
        "recovery_s_1m_keys": round(recover_s, 3),
        "write_s_1m_keys": round(write_s, 1),
    }
    title = "Keyed state: get+put ops/s on one worker"
    write_report(
        "state",
        title,
        bar_chart(title, {"RocksDB": rocks, "in-memory": memory}, "ops per second (one get + one put)"),
        [
            f"{n_ops:,} read-modify-write ops over {n_keys:,} keys, a commit every 10,000 ops.",
            "Recovery: a process commits 1M keys, then an epoch of 10,000 updates that no snapshot "
            "recorded, holds more writes pending and is killed with SIGKILL; measured: reopening "
            "RocksDB (replaying its log) and rolling back to the snapshot. "
            "State is not loaded into memory, so recovery time does not grow with the key count.",
        ],
        result,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
