"""Agent tools: a name, a description, a JSON-schema input and an executor.

:data:`TOOLS` holds each tool's contract (:class:`Tool`). The agent runtime
(:mod:`dataflows.agent`) offers the tools to the model and validates each call
against its schema before anything runs; the tool workers
(:mod:`dataflows.agent_tools`) validate again and run the tool's
:data:`Executor`. To add a tool: its :class:`Tool` here, its executor in the
tool workers.

Shipped tools, each with the least power it needs (there is no shell):

- ``calculator``: arithmetic on numbers (``+ - * / // % **``, parentheses,
  ``abs round min max sqrt``), evaluated from the syntax tree, with bounded
  sizes; never ``eval``.
- ``fetch``: HTTP GET of a URL whose host (``host`` or ``host:port``) is on
  an allowlist (empty by default: nothing), no redirects followed, the
  response cut at ``max_bytes``.
- ``retrieve``: a query to the RAG dataflow over its request/reply topics.
- ``post``: HTTP POST of a JSON payload to a URL whose host is on an allowlist
  (empty by default), with the call id as its ``Idempotency-Key`` header. It
  changes the world, and the runtime cannot know whether the receiver honours
  the key, so it is ``unsafe``: a call that may have run before a crash is not
  run again; the task asks a human.
- ``human``: asks a person (escalation). It has no executor: the runtime pauses
  the task and waits for a reply on ``agent.human_replies``.

Each tool declares its ``side_effects``: ``none`` (a read: run again freely),
``idempotent`` (run again with the same idempotency key: the effect happens
once) or ``unsafe`` (a call in doubt is never run again). Executors get the
call id as the idempotency key.

Exceptions, under :class:`~patternflow.errors.PatternflowError`: :class:`ToolError`
(the call failed on its arguments or the world: the model is told) and its
subclass :class:`TransientToolError` (worth a retry).
"""

from __future__ import annotations

import ast
import functools
import math
import operator
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from jsonschema import Draft202012Validator

from patternflow.errors import PatternflowError

__all__ = [
    "HUMAN",
    "TOOLS",
    "Executor",
    "Tool",
    "ToolError",
    "TransientToolError",
    "calculate",
    "fetcher",
    "poster",
    "retriever",
    "run_calculator",
    "tools",
]

HUMAN = "human"


class ToolError(PatternflowError):
    """A tool could not do what its arguments asked: the model is told why."""


class TransientToolError(ToolError):
    """A tool failed for a reason that may pass (a connection reset, HTTP 5xx): retried with backoff."""


@dataclass(frozen=True)
class Tool:
    """A tool's contract: what the model is told and what its arguments must be. ``timeout_s``
    bounds one execution (the tool workers' per-tool timeout)."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON Schema (2020-12) of the arguments object
    timeout_s: float = 10.0
    side_effects: Literal["none", "idempotent", "unsafe"] = "none"

    def __post_init__(self) -> None:
        Draft202012Validator.check_schema(self.parameters)

    def spec(self) -> dict[str, Any]:
        """The tool as the chat-completions API lists it."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    @functools.cached_property
    def _validator(self) -> Draft202012Validator:
        return Draft202012Validator(self.parameters)

    def invalid(self, arguments: Any) -> str | None:
        """Why ``arguments`` do not fit the schema, or ``None``."""
        errors = sorted(self._validator.iter_errors(arguments), key=lambda e: list(e.path))
        if not errors:
            return None
        return "; ".join(f"{'/'.join(map(str, e.path)) or 'arguments'}: {e.message}" for e in errors[:3])


# Runs a validated call (its arguments and its idempotency key, the call id): the text the model reads, or ToolError.
Executor = Callable[[dict[str, Any], str], Awaitable[str]]


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


# --- calculator -------------------------------------------------------------

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS: dict[str, Callable[..., Any]] = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt}
_MAX_MAGNITUDE = 1e100


def _evaluate(node: ast.AST) -> Any:
    value: Any
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ToolError(f"exponent {right} is over 64")
        value = _BINARY[type(node.op)](left, right)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand))
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        if node.keywords or not node.args:
            raise ToolError(f"{node.func.id}() takes numbers only")
        value = _FUNCTIONS[node.func.id](*(_evaluate(a) for a in node.args))
    else:
        raise ToolError(f"not arithmetic: {ast.unparse(node)[:80]!r}")
    if isinstance(value, complex) or abs(value) > _MAX_MAGNITUDE:
        raise ToolError("the result is out of range")
    return value


def calculate(expression: str) -> str:
    """``expression`` evaluated as arithmetic; :class:`ToolError` for anything else."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"not an expression: {exc.msg}") from None
    try:
        value = _evaluate(tree)
    except (ZeroDivisionError, OverflowError, ValueError) as exc:
        raise ToolError(f"{type(exc).__name__}: {exc}") from None
    return repr(int(value)) if isinstance(value, float) and value.is_integer() and abs(value) < 1e15 else repr(value)


async def run_calculator(args: dict[str, Any], key: str) -> str:
    return calculate(args["expression"])


def fetcher(allowlist: frozenset[str], max_bytes: int = 100_000, timeout_s: float = 10.0) -> HttpTool:
    """HTTP GET for hosts on ``allowlist`` (``"example.com"`` or ``"127.0.0.1:8080"``); redirects are not followed."""
    return HttpTool("GET", "fetch", allowlist, max_bytes, timeout_s)


def poster(allowlist: frozenset[str], max_bytes: int = 10_000, timeout_s: float = 10.0) -> HttpTool:
    """HTTP POST of ``payload`` as JSON to hosts on ``allowlist``, the call id as its ``Idempotency-Key``."""
    return HttpTool("POST", "post", allowlist, max_bytes, timeout_s)


class HttpTool:
    """An HTTP tool: ``method`` to hosts on ``allowlist``, through one connection pool made in the
    event loop that first uses it (:meth:`close` it there)."""

    def __init__(self, method: str, tool: str, allowlist: frozenset[str], max_bytes: int, timeout_s: float) -> None:
        self._method, self._tool, self._allowlist = method, tool, allowlist
        self._max_bytes, self._timeout_s = max_bytes, timeout_s
        self._http: aiohttp.ClientSession | None = None

    async def __call__(self, args: dict[str, Any], key: str) -> str:
        method, url, max_bytes = self._method, args["url"], self._max_bytes
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not ({parts.hostname, parts.netloc} & self._allowlist):
            allowed = ", ".join(sorted(self._allowlist)) or "empty"
            raise ToolError(f"{parts.netloc or url!r} is not on the {self._tool} allowlist ({allowed})")
        if self._http is None:  # the tool's own timeout (the workers') comes first; this one is a backstop
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s + 1))
        body = b""
        sent = {"json": args["payload"], "headers": {"Idempotency-Key": key}} if method == "POST" else {}
        try:
            async with self._http.request(method, url, allow_redirects=False, **sent) as response:
                async for piece in response.content.iter_chunked(64 * 1024):
                    body += piece
                    if len(body) >= max_bytes:
                        break
                status = response.status
        except TimeoutError as exc:
            raise ToolError(f"{method} {url} timed out") from exc
        except aiohttp.ClientConnectionError as exc:
            raise TransientToolError(f"{method} {url}: {type(exc).__name__}") from exc
        except aiohttp.ClientError as exc:
            raise ToolError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        if status >= 500:
            raise TransientToolError(f"{method} {url} answered HTTP {status}")
        return f"HTTP {status}\n{body[:max_bytes].decode(errors='replace')}"

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


def retriever(predict: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]], k: int = 3) -> Executor:
    """Queries to the RAG dataflow; ``predict`` sends one and returns its reply."""

    async def run(args: dict[str, Any], key: str) -> str:
        reply = await predict({"query": args["query"], "k": args.get("k", k)})
        if reply.get("status") != "ok":
            raise TransientToolError(f"the RAG dataflow answered {reply.get('status')}: {reply.get('error')}")
        outputs = reply["outputs"]
        sources = "\n".join(f"[{h['doc_id']}] {h.get('title') or ''}" for h in outputs["hits"])
        return f"{outputs['answer']['text']}\n\nSources:\n{sources or 'none'}"

    return run


TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        Tool(
            "calculator",
            "Evaluate an arithmetic expression.",
            _object(
                {"expression": {"type": "string", "maxLength": 200, "description": "e.g. (17 * 23) + 4"}},
                ["expression"],
            ),
            timeout_s=1.0,
        ),
        Tool(
            "fetch",
            "Fetch a web page by URL (HTTP GET; only hosts on the operator's allowlist).",
            _object({"url": {"type": "string", "maxLength": 2000, "description": "an http(s) URL"}}, ["url"]),
        ),
        Tool(
            "retrieve",
            "Search the document index: sentences that answer the query, cited, and the best documents.",
            _object(
                {
                    "query": {"type": "string", "minLength": 1, "maxLength": 1000},
                    "k": {"type": "integer", "minimum": 1, "maximum": 10},
                },
                ["query"],
            ),
        ),
        Tool(
            "post",
            "Send a JSON payload by HTTP POST to a URL (only hosts on the operator's allowlist): it acts.",
            _object(
                {
                    "url": {"type": "string", "maxLength": 2000, "description": "an http(s) URL"},
                    "payload": {"type": "object", "description": "the JSON object to send"},
                },
                ["url", "payload"],
            ),
            side_effects="unsafe",
        ),
        Tool(
            HUMAN,
            "Ask a human operator a question and wait for the reply (when unsure, or for approval).",
            _object({"question": {"type": "string", "minLength": 1, "maxLength": 2000}}, ["question"]),
            timeout_s=0.0,  # no executor: the runtime escalates and waits up to its human timeout
        ),
    )
}


def tools(names: Iterable[str]) -> dict[str, Tool]:
    """The tools named in ``names``; a name not in :data:`TOOLS` is an error."""
    wanted = list(names)
    unknown = [n for n in wanted if n not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tools {unknown}: the tools are {sorted(TOOLS)}")
    return {name: TOOLS[name] for name in wanted}
