"""Settings that are secrets: passwords, keys, tokens. Their values never reach logs, metrics labels,
manifests or reports; wherever settings are published, :func:`public` stands in for them.

A setting is a secret when its field says so (:func:`secret_field`, which also keeps it out of the
settings' ``repr``) or when its name does (:data:`SECRET_NAME`: ``*password``, ``*secret``,
``*api_key``, ``*token``, ``*credentials``, ``*private_key``), so a secret added without the marker
is still kept out.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

__all__ = ["REDACTED", "SECRET_NAME", "is_secret", "public", "secret_field"]

SECRET_NAME = re.compile(r"(password|passwd|secret|api_?key|(^|_)token|credentials?|private_?key)$", re.IGNORECASE)
REDACTED = "<redacted>"


def secret_field(default: str = "", **metadata: Any) -> Any:
    """A dataclass field holding a secret: marked as one and left out of ``repr``."""
    return dataclasses.field(default=default, repr=False, metadata={**metadata, "secret": True})


def is_secret(field: dataclasses.Field[Any]) -> bool:
    """Whether ``field`` holds a secret, by its marker or by its name."""
    return bool(field.metadata.get("secret")) or bool(SECRET_NAME.search(field.name))


def public(settings: Any) -> dict[str, str]:
    """Each field of the dataclass ``settings`` as text, secrets as :data:`REDACTED` (empty ones as empty)."""
    return {
        f.name: (REDACTED if is_secret(f) and getattr(settings, f.name) else str(getattr(settings, f.name)))
        for f in dataclasses.fields(settings)
    }
