"""The keyed-state exception tree, under :class:`~patternflow.errors.PatternflowError`::

StateError               the state cannot be opened or used (a path, a lock, a shard count)
 └── StateRecoveryError  the store cannot return to the snapshot asked for
"""

from __future__ import annotations

from patternflow.errors import PatternflowError

__all__ = ["StateError", "StateRecoveryError"]


class StateError(PatternflowError):
    """Keyed state cannot be opened or used as asked; the message says what to do."""


class StateRecoveryError(StateError):
    """The store cannot return to the snapshot Bytewax resumes from."""
