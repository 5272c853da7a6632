"""API keys of the HTTP gateway: who may call it, and which models each caller may use.

Keys come from ``GATEWAY_API_KEYS_FILE`` (a file) or ``GATEWAY_API_KEYS`` (the same lines, ``;``
between them), one key per line::

    # name   key                                  models (comma-separated, or * for all)
    fraud    3f1c0b8e6a9d4c27b5e1f0a2d8c6b4e9      tabular-risk
    search   9a7e2c4b1d0f8e6a3c5b7d9f1e2a4c6b      rag,minilm-embeddings

A request carries its key as ``Authorization: Bearer <key>`` (or ``X-API-Key: <key>``). Without
one, or with a key not in the list: 401. With a key not allowed the model it asks for: 403.
With no key configured at all the gateway is open, as on a laptop (it says so at start).
Keys are held only as SHA-256 digests and compared in constant time; logs and answers name a
key by its name, never by its value.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["ApiKey", "ApiKeys", "Denied"]


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  # SHA-256 of the key
    models: frozenset[str]  # "*": every model

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


@dataclass(frozen=True)
class Denied:
    """Why a request may not pass: its HTTP status (401, 403) and what to tell the caller."""

    status: int
    error: str


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The configured keys; an empty set lets every request through."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self.keys = tuple(keys)

    @classmethod
    def parse(cls, lines: Iterable[str], source: str) -> ApiKeys:
        """Keys from ``name key models`` lines (``#`` starts a comment); a bad line is a ``ValueError``
        naming ``source`` and the line number, not its text (it may hold a key)."""
        keys = []
        for number, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 3 or len(parts[1]) < 16:
                raise ValueError(f"{source} line {number}: expected 'name key models' with a key of 16+ characters")
            name, key, models = parts
            keys.append(ApiKey(name, _digest(key), frozenset(m for m in models.split(",") if m)))
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise ValueError(f"{source}: a key name is used twice")
        return cls(keys)

    def check(self, headers: Mapping[str, str], model: str | None) -> Denied | None:
        """``None`` if a request with ``headers`` may use ``model`` (``None``: any route not tied to one)."""
        if not self.keys:
            return None
        auth = headers.get("authorization", "")
        given = auth[len("bearer ") :].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
        if not given:
            return Denied(401, "an API key is required: send 'Authorization: Bearer <key>'")
        digest = _digest(given)
        found = None
        for key in self.keys:  # every key compared, in constant time: no timing tells which one nearly matched
            if hmac.compare_digest(key.digest, digest):
                found = key
        if found is None:
            return Denied(401, "unknown API key")
        if model is not None and not found.allows(model):
            return Denied(403, f"API key {found.name!r} may not use model {model!r}")
        return None
