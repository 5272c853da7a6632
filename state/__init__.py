"""Keyed state: an ordered key-value contract, its RocksDB and in-memory
backends, and a store whose commits line up with Bytewax's snapshots."""

from state.backends import Backend, MemoryBackend, RocksDBBackend
from state.errors import StateError, StateRecoveryError
from state.store import StateStore

__all__ = [
    "Backend",
    "MemoryBackend",
    "RocksDBBackend",
    "StateError",
    "StateRecoveryError",
    "StateStore",
]
