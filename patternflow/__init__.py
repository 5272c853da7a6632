"""Small helpers shared by every package, with no dependencies of their own.

Both the dataflows (which run Bytewax) and the clients (which must not) import
from here: the wall clock, the routing hash and the broker address default.
The exception tree's root and :class:`InvalidMessage` live in
:mod:`patternflow.errors`, the retry policy in :mod:`patternflow.retry`.
"""

from __future__ import annotations

import os
import socket
import time
import zlib

# Re-exported: every decoder and validator raises it, and imports it from here.
from patternflow.errors import InvalidMessage, PatternflowError

__all__ = [
    "BROKERS_ENV",
    "DEFAULT_BROKERS",
    "LATEST_MS",
    "RELAXED_BUDGET_S",
    "InvalidMessage",
    "PatternflowError",
    "default_brokers",
    "free_port",
    "hash_key",
    "wall_ms",
]

BROKERS_ENV = "KAFKA_BOOTSTRAP_SERVERS"
DEFAULT_BROKERS = "127.0.0.1:9092"
LATEST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the latest time a datetime can hold
# An online request with more than this from send to deadline (or none) could have waited for a
# batch job: online serving counts such requests, and ``patternflow audit`` weighs them.
RELAXED_BUDGET_S = 1.0


def default_brokers() -> str:
    """``$KAFKA_BOOTSTRAP_SERVERS``, or the local broker of ``make kafka-up``."""
    return os.environ.get(BROKERS_ENV) or DEFAULT_BROKERS


def wall_ms() -> int:
    """The wall clock in epoch milliseconds: the default ``now_ms`` wherever time is injected."""
    return time.time_ns() // 1_000_000


def hash_key(key: str | bytes) -> int:
    """A hash of a routing key that is the same in every process (``hash()`` is salted)."""
    return zlib.crc32(key if isinstance(key, bytes) else key.encode())


def free_port(block: int = 1) -> int:
    """A TCP port free on this host now (for test and benchmark servers), and the ``block - 1``
    after it too (a cluster's processes serve metrics on the port plus their process id)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + block <= 65536 and all(_free(p) for p in range(port + 1, port + block)):
            return port


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
