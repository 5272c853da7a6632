"""What every LLM backend shares: its errors, and which HTTP answers are worth a retry.

Exceptions, under :class:`~patternflow.errors.PatternflowError`: :class:`LLMError` (the
server failed or answered in another form), and its subclasses :class:`LLMRefused` (the
server refused the request: not retried) and :class:`LLMUnavailable` (the server did not
take the request: retried, and nothing was billed).
"""

from __future__ import annotations

from patternflow.errors import PatternflowError

__all__ = ["LLMError", "LLMRefused", "LLMUnavailable", "check_status", "worth_retrying"]


class LLMError(PatternflowError, RuntimeError):
    """The LLM server failed, timed out, or answered in a form other than the one asked for."""


class LLMRefused(LLMError):
    """The server refused the request itself (an HTTP 4xx other than 429): retrying cannot help."""


class LLMUnavailable(LLMError):
    """The server did not take the request (no connection, HTTP 429 or 5xx): worth waiting for, and unbilled."""


def check_status(url: str, status: int, body: bytes) -> None:
    """:class:`LLMError` for an answer worth retrying (HTTP 429, 5xx), :class:`LLMRefused` for another non-200."""
    if status == 429 or status >= 500:
        raise LLMUnavailable(f"{url} answered HTTP {status}")
    if status != 200:
        raise LLMRefused(f"{url} refused the request: HTTP {status}: {body[:200].decode(errors='replace')}")


def worth_retrying(exc: BaseException) -> bool:
    """Whether another attempt may succeed: an :class:`LLMError` other than :class:`LLMRefused`."""
    return isinstance(exc, LLMError) and not isinstance(exc, LLMRefused)
