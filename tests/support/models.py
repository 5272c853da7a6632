"""The registry's models, each loaded once per test run (MiniLM takes seconds to load)."""

from __future__ import annotations

import functools

from models.registry import Model, get_spec

__all__ = ["loaded"]


@functools.cache
def loaded(name: str) -> Model:
    """Model ``name`` of the registry, loaded the first time it is asked for; inference holds no state."""
    return get_spec(name).load()
