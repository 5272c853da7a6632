"""A TEST DOUBLE of an LLM: replays recorded turns over the OpenAI chat-completions wire format.

No LLM can be downloaded here, so tests, the demo and the benchmark run the
agent runtime against this server. It stands in for a model only; the runtime
talks to it with its real HTTP client (:class:`models.chat.ChatClient`), as it
would to vLLM, llama.cpp's server, Ollama or a hosted API.

A recording (JSON) holds scripts; a request is answered from the script whose
``task`` the conversation's first user message starts with::

    {"scripts": [{"task": "What is 17 * 23 + 4?",
                  "turns": [{"tool_calls": [{"name": "calculator", "arguments": "{\\"expression\\": \\"17*23+4\\"}"}]},
                            {"content": "17 * 23 + 4 = 395."}]}],
     "final": "Stopped early: ..."}

The turn replayed is the number of assistant messages in the request (plus
those a scripted summary stood for), so the server keeps no state: a repeated
request gets the same reply. In a turn, ``{n}`` in arguments becomes the turn
number and ``{url}`` the task's first URL, ``{last}`` in content the last tool result; a turn with ``"repeat":
true`` is replayed forever (a runaway agent); ``"status": 500`` answers with that
HTTP error. A request with no tools gets the recording's ``final`` text; a
request to summarise gets a scripted summary. Usage counts a token per 4 bytes.

Run: ``python -m models.scripted_llm --recordings models/recordings/agent.json --port 8011 --latency-ms 200``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["RECORDINGS", "ScriptedModel", "app", "serve"]

RECORDINGS = Path(__file__).parent / "recordings" / "agent.json"
_SUMMARY = re.compile(r"\[scripted summary of (\d+) turns\]")


class ScriptedModel:
    """The replies of a recording; :meth:`reply` answers one chat-completions request body."""

    def __init__(self, recording: dict[str, Any]) -> None:
        self.scripts = recording["scripts"]
        self.final = recording.get("final", "Stopped early ({reason}).")
        # What was asked, for tests: task and tools offered (the latest, so a long-running server stays small).
        self.requests: deque[dict[str, Any]] = deque(maxlen=100_000)

    def reply(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        messages = body["messages"]
        tools = [t["function"]["name"] for t in body.get("tools") or ()]
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        task = next((m["content"] for m in messages if m["role"] == "user"), "")
        self.requests.append({"task": task, "tools": tools})
        if system.startswith("Summarise"):
            turns = orjson.loads(messages[-1]["content"])
            message = {"role": "assistant", "content": f"[scripted summary of {_turns(turns)} turns]"}
        elif not tools:
            reason = re.search(r"\(([^)]*)\)", messages[-1]["content"] or "")
            message = {"role": "assistant", "content": self.final.format(reason=reason[1] if reason else "")}
        else:
            message = self._turn(task, messages)
            if "status" in message:
                return int(message["status"]), {"error": {"message": "scripted server error"}}
        usage = {
            "prompt_tokens": math.ceil(len(orjson.dumps(messages)) / 4),
            "completion_tokens": math.ceil(len(orjson.dumps(message)) / 4),
        }
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        choice = {"index": 0, "message": message, "finish_reason": finish}
        return 200, {"id": "scripted", "object": "chat.completion", "choices": [choice], "usage": usage}

    def _turn(self, task: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
        script = next((s for s in self.scripts if task.startswith(s["task"])), None)
        if script is None:
            return {"role": "assistant", "content": "The scripted test double has no recording for this task."}
        n = _turns(messages)
        turns = script["turns"]
        turn = turns[n] if n < len(turns) else turns[-1] if turns[-1].get("repeat") else {"content": "Done."}
        if "status" in turn:
            return {"status": turn["status"]}
        if "tool_calls" not in turn:
            last = next((m["content"] for m in reversed(messages) if m["role"] == "tool"), "")
            return {"role": "assistant", "content": turn["content"].replace("{last}", last)}
        url = re.search(r"https?://\S+", task)
        calls = [
            {
                "id": f"call_{n}_{i}",
                "type": "function",
                "function": {"name": c["name"], "arguments": _fill(c["arguments"], n, url[0] if url else "")},
            }
            for i, c in enumerate(turn["tool_calls"])
        ]
        return {"role": "assistant", "content": None, "tool_calls": calls}


def _fill(arguments: str, n: int, url: str) -> str:
    return arguments.replace("{n}", str(n)).replace("{url}", url)


def _turns(messages: list[dict[str, Any]]) -> int:
    """Assistant turns in ``messages``, counting those a scripted summary stands for."""
    count = 0
    for m in messages:
        if m["role"] == "assistant":
            count += 1
        elif m["role"] == "user" and (found := _SUMMARY.search(m.get("content") or "")):
            count += int(found[1])
    return count


def app(model: ScriptedModel, latency_ms: float = 0.0) -> Starlette:
    async def completions(request: Request) -> Response:
        body = orjson.loads(await request.body())
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)
        status, doc = model.reply(body)
        return Response(orjson.dumps(doc), status_code=status, media_type="application/json")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    routes = [Route("/v1/chat/completions", completions, methods=["POST"]), Route("/v1/models", models)]
    return Starlette(routes=routes)


@contextlib.contextmanager
def serve(model: ScriptedModel, port: int, latency_ms: float = 0.0) -> Iterator[str]:
    """The server in a thread of this process, for tests: yields its base URL."""
    config = uvicorn.Config(app(model, latency_ms), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the scripted LLM server did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description="A test double of an LLM: replays recorded agent turns.")
    parser.add_argument("--recordings", type=Path, default=RECORDINGS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before each reply")
    args = parser.parse_args()
    model = ScriptedModel(orjson.loads(args.recordings.read_bytes()))
    print(f"scripted LLM (a test double) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app(model, args.latency_ms), host=args.host, port=args.port, log_level="warning", lifespan="off")


if __name__ == "__main__":
    main()
