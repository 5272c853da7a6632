"""An OpenAI-compatible chat-completions client with tool calling, for the agent loop.

It speaks the wire format vLLM, llama.cpp's server, Ollama and hosted APIs
share: ``POST {base_url}/chat/completions`` with ``messages``, ``tools`` and
``max_tokens``. A reply is read as the protocol means it, not as servers
sometimes word it:

- it asks for tools when its message has ``tool_calls``, whatever its
  ``finish_reason`` says (servers disagree on ``"tool_calls"`` vs ``"stop"``);
- a call's ``arguments`` is a JSON string that may not parse (kept raw for the
  runtime to answer with the error; a server that sends an object gets it back
  as JSON text);
- ``usage`` is accounted when the server reports it.

Spend is bounded before a call is made: :func:`estimate_tokens` counts a
prompt's tokens from above (bytes / 3, plus a per-message overhead; English
text runs about 4 bytes per token), and :class:`Prices` gives the worst-case
cost of a call whose completion is bounded by ``max_tokens``.

Exceptions: :class:`~models.llm.LLMError` (the server failed, timed out or
answered in another form) and :class:`~models.llm.LLMRefused` (it refused the
request: retrying cannot help).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from models.llm import LLMError, LLMUnavailable, check_status

__all__ = ["ChatClient", "ChatReply", "Prices", "ToolRequest", "estimate_tokens", "price_table"]

# USD per million tokens (input, output). ``scripted`` is the test double of
# models.scripted_llm, priced like a small hosted model so budgets bite in tests.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "scripted": (0.15, 0.60),
}


@dataclass(frozen=True)
class Prices:
    """USD per million input and output tokens."""

    input_per_mtok: float
    output_per_mtok: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6

    def completion_within(self, usd: float, prompt_tokens: int) -> int:
        """The most completion tokens a call with this prompt can take and cost at most ``usd``."""
        left = usd - self.cost(prompt_tokens, 0)
        if left < 0:
            return 0
        return 1 << 30 if self.output_per_mtok == 0 else math.floor(left * 1e6 / self.output_per_mtok)


def price_table(extra: str = "") -> dict[str, Prices]:
    """The built-in prices, with ``extra`` (``"model=in/out,model=in/out"``, USD per million tokens) on top."""
    table = {model: Prices(*p) for model, p in PRICES_PER_MTOK.items()}
    for entry in filter(None, (e.strip() for e in extra.split(","))):
        try:
            model, prices = entry.split("=", 1)
            inp, out = prices.split("/", 1)
            table[model.strip()] = Prices(float(inp), float(out))
        except ValueError:
            raise ValueError(f"price entry {entry!r} is not model=<input>/<output> (USD per million tokens)") from None
    return table


def estimate_tokens(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
    """An upper estimate of the prompt's tokens: a third of its JSON bytes, plus 4 per message."""
    size = len(orjson.dumps(messages)) + (len(orjson.dumps(tools)) if tools else 0)
    return math.ceil(size / 3) + 4 * len(messages)


@dataclass(frozen=True)
class ToolRequest:
    """A tool call as the model wrote it: ``arguments`` is its raw JSON text, unparsed."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatReply:
    content: str | None
    tool_calls: tuple[ToolRequest, ...]
    prompt_tokens: int | None  # None: the server did not say
    completion_tokens: int | None
    finish_reason: str | None = None

    def message(self) -> dict[str, Any]:
        """The reply as an assistant message for the conversation's history."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        return msg

    def to_json(self) -> dict[str, Any]:
        """The reply as a JSON document (the runtime's ``agent.llm_replies``); :meth:`from_json` reads it back."""
        calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in self.tool_calls]
        return {
            "content": self.content,
            "tool_calls": calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }

    @classmethod
    def from_json(cls, doc: Any) -> ChatReply:
        """A document :meth:`to_json` wrote; ``ValueError`` naming what is wrong otherwise."""
        try:
            calls = tuple(ToolRequest(str(c["id"]), str(c["name"]), str(c["arguments"])) for c in doc["tool_calls"])
            content, counts = doc["content"], (doc["prompt_tokens"], doc["completion_tokens"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an LLM reply: {exc!r}") from None
        if any(n is not None and _count(n) is None for n in counts):
            raise ValueError(f"token counts must be integers >= 0 or null, got {counts}")
        return cls(content if isinstance(content, str) else None, calls, *counts)


def parse_reply(raw: bytes) -> ChatReply:
    """A chat-completions response body; :class:`LLMError` if it is not one."""
    try:
        doc = orjson.loads(raw)
        choice = doc["choices"][0]
        msg = choice["message"]
        calls = tuple(
            ToolRequest(str(c.get("id") or f"call_{i}"), str(c["function"]["name"]), _raw_arguments(c["function"]))
            for i, c in enumerate(msg.get("tool_calls") or ())
        )
        content = msg.get("content")
        usage = doc.get("usage") or {}
        return ChatReply(
            content if isinstance(content, str) else None,
            calls,
            _count(usage.get("prompt_tokens")),
            _count(usage.get("completion_tokens")),
            choice.get("finish_reason"),
        )
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise LLMError(f"the server's reply is not a chat completion: {exc!r}") from exc


def _raw_arguments(function: dict[str, Any]) -> str:
    args = function.get("arguments", "")
    return args if isinstance(args, str) else orjson.dumps(args).decode()


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass
class ChatClient:
    """``await client.complete(messages, tools, max_tokens)`` against ``base_url`` (e.g.
    ``http://127.0.0.1:8000/v1``). One connection pool per client (aiohttp: httpx's async
    pool managed about a tenth of the requests per second here), made in the event loop
    that first uses it; each request has ``timeout_s``."""

    base_url: str
    model: str
    api_key: str = ""
    timeout_s: float = 60.0
    max_connections: int = 1_000
    _http: aiohttp.ClientSession | None = field(default=None, repr=False)

    async def complete(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, max_tokens: int
    ) -> ChatReply:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens}
        if tools:
            body["tools"] = tools
        if self._http is None:
            headers = {"Content-Type": "application/json"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            self._http = aiohttp.ClientSession(
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.max_connections),
            )
        url = self.base_url.rstrip("/") + "/chat/completions"
        try:
            async with self._http.post(url, data=orjson.dumps(body)) as response:
                raw = await response.read()
                status = response.status
        except aiohttp.ClientConnectorError as exc:  # never connected: nothing was sent
            raise LLMUnavailable(f"{url}: {exc!r}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LLMError(f"{url}: {exc!r}") from exc
        check_status(url, status, raw)
        return parse_reply(raw)

    async def close(self) -> None:
        """Close the connection pool (in the event loop that used it)."""
        if self._http is not None:
            await self._http.close()
            self._http = None
