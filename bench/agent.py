"""Agent loop benchmark: the runtime's overhead per turn, tasks in flight, and runaway tasks capped.

The model is the scripted test double (``models.scripted_llm``, its own
process) answering every call after 200 ms; the tool is ``fetch`` of a local
page that answers after 50 ms (its own process). A benchmark task takes three
model turns and two tool calls. Measured, on one worker of each dataflow:

- 1 task at a time, then 500 submitted at once: each task's wall time as its
  client sees it (submit to result), less the model and tool time the
  runtime's audit trail records for it, per model turn: the runtime's overhead
  (Kafka hops, state, checks). The baseline, in the same run: the same loop
  written directly (the same HTTP client and fetch tool, no Kafka, no state),
  one task and 500 tasks at once on asyncio.
- Tasks in flight: from the audit trail, the most tasks started and not
  finished at one moment.
- Runaway tasks (a model that never stops; one that repeats one call) with
  ``max_iterations`` 5: the share that ended ``cap_exceeded`` within the cap.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import orjson

from bench.report import parse_args, progress, write_report
from clients.agents import AgentClient
from dataflows.agent.program import SYSTEM
from dataflows.agent.tools import TOOLS, fetcher
from dataflows.launch import AgentStack
from models.chat import ChatClient
from operators.kafka import read_topic
from patternflow import default_brokers, free_port

LLM_MS = 200
TOOL_MS = 50
TURNS = 3  # model turns of a benchmark task (two with a fetch, one with the answer)
MAX_ITERATIONS = 5  # for the runaway tasks

PAGES = f"""
import asyncio, uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
async def page(request):
    await asyncio.sleep({TOOL_MS / 1000})
    return PlainTextResponse("page " + request.url.path)
uvicorn.run(Starlette(routes=[Route("/{{path:path}}", page)]), host="127.0.0.1", port=int(__import__("sys").argv[1]),
            log_level="warning", lifespan="off")
"""


def start(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{cmd} did not listen on port {port}")


def submit_and_wait(agents: AgentClient, tasks: list[str], caps: dict[str, float] | None = None) -> dict[str, Any]:
    """Submit ``tasks`` at once; each result with the client-side wall time (``client_ms``)."""
    started: dict[str, float] = {}
    for task in tasks:
        task_id = agents.submit(task, caps=caps, flush=False)
        started[task_id] = time.perf_counter()
    agents.flush()
    results = {}
    for task_id in started:  # results are recorded as they arrive, whatever order they are waited on in
        results[task_id] = agents.wait(task_id, timeout_s=300)
    seen = agents.received_at
    for task_id, result in results.items():
        result["client_ms"] = (seen[task_id] - started[task_id]) * 1000
    return results


def overheads(results: dict[str, Any], trail: dict[str, list[dict[str, Any]]]) -> list[float]:
    """Per task: (client wall time - model time - tool time) / model turns, in ms."""
    out = []
    for task_id, result in results.items():
        events = trail[task_id]
        busy = sum(e["latency_ms"] for e in events if e["event"] in ("llm", "tool") and "latency_ms" in e)
        out.append((result["client_ms"] - busy) / max(1, result["turns"]))
    return out


def in_flight(trail: dict[str, list[dict[str, Any]]]) -> int:
    """The most tasks started and not finished at one moment, by the runtime's own clock."""
    edges = []
    for events in trail.values():
        start = next((e["ts_ms"] for e in events if e["event"] == "task"), None)
        end = next((e["ts_ms"] for e in events if e["event"] == "result"), None)
        if start is not None and end is not None:
            edges += [(start, 1), (end, -1)]
    peak = now = 0
    for _, step in sorted(edges):
        now += step
        peak = max(peak, now)
    return peak


def audit_by_task(brokers: str, topic: str) -> dict[str, list[dict[str, Any]]]:
    trail: dict[str, list[dict[str, Any]]] = {}
    for msg in read_topic(brokers, topic):
        event = orjson.loads(msg.value or b"{}")
        trail.setdefault(event["task_id"], []).append(event)
    return trail


async def direct_task(model: ChatClient, fetch: Any, task: str) -> tuple[float, float]:
    """The same loop without the runtime: (wall ms, model + tool ms) of one task."""
    tools = [TOOLS["fetch"].spec()]
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task}]
    start, busy = time.perf_counter(), 0.0
    while True:
        t = time.perf_counter()
        reply = await model.complete(messages, tools, 1024)
        busy += time.perf_counter() - t
        messages.append(reply.message())
        if not reply.tool_calls:
            return (time.perf_counter() - start) * 1000, busy * 1000
        for call in reply.tool_calls:
            t = time.perf_counter()
            content = await fetch(orjson.loads(call.arguments), call.id)
            busy += time.perf_counter() - t
            messages.append({"role": "tool", "tool_call_id": call.id, "content": content})


async def direct(llm_url: str, pages: str, task: str, sequential: int, concurrent: int) -> dict[str, float]:
    model = ChatClient(llm_url, "scripted")
    fetch = fetcher(frozenset({pages}))
    try:
        one = [await direct_task(model, fetch, task) for _ in range(sequential)]
        start, cpu = time.perf_counter(), busy_cpu_s()
        await asyncio.gather(*(direct_task(model, fetch, task) for _ in range(concurrent)))
        return {
            "overhead_1": statistics.median((wall - busy) / TURNS for wall, busy in one),
            "tasks_per_s": concurrent / (time.perf_counter() - start),
            "cpu_ms_per_task": (busy_cpu_s() - cpu) * 1000 / concurrent,
        }
    finally:
        await model.close()
        await fetch.close()


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (every process, every core: the broker's too), from /proc/stat."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    args = parse_args(__doc__)
    sequential, concurrent, runaway = (5, 500, 50) if args.quick else (30, 500, 200)
    brokers = default_brokers()
    llm_port, pages_port = free_port(), free_port()
    pages = f"127.0.0.1:{pages_port}"
    task = f"Bench task: http://{pages}/page"
    prefix = f"bench-agent-{uuid.uuid4().hex[:6]}"
    llm_url = f"http://127.0.0.1:{llm_port}/v1"
    servers = [
        start(
            [sys.executable, "-m", "models.scripted_llm", "--port", str(llm_port), "--latency-ms", str(LLM_MS)],
            llm_port,
        ),
        start([sys.executable, "-c", PAGES, str(pages_port)], pages_port),
    ]
    settings = {
        "AGENT_TOOLS": "fetch,calculator",
        "AGENT_TOOLS_TOOLS": "fetch,calculator",
        "AGENT_TOOLS_FETCH_ALLOWLIST": pages,
        "AGENT_TENANT_DAILY_BUDGET_USD": "1000",
        "AGENT_MAX_ITERATIONS": str(MAX_ITERATIONS),
    }
    try:
        progress(f"baseline: the loop written directly, {sequential} tasks one at a time, then {concurrent} at once")
        base = asyncio.run(direct(llm_url, pages, task, sequential, concurrent))
        with tempfile.TemporaryDirectory() as tmp, AgentStack(brokers, Path(tmp), llm_url, prefix, **settings) as stack:
            stack.start()
            with AgentClient(brokers, topic_prefix=prefix) as agents:
                progress("warm-up: one task through both dataflows")
                submit_and_wait(agents, [task])
                progress(f"{sequential} tasks, one at a time")
                one: dict[str, Any] = {}
                for _ in range(sequential):
                    one.update(submit_and_wait(agents, [task]))
                progress(f"{concurrent} tasks submitted at once")
                start_s, cpu_s = time.perf_counter(), busy_cpu_s()
                many = submit_and_wait(agents, [task] * concurrent)
                many_s, many_cpu_s = time.perf_counter() - start_s, busy_cpu_s() - cpu_s
                progress(f"{runaway} runaway tasks (max_iterations {MAX_ITERATIONS})")
                stops = submit_and_wait(agents, ["Keep counting", "Check the same thing again"] * (runaway // 2))
            stack.check()
            trail = audit_by_task(brokers, f"{prefix}.audit")
    finally:
        for server in servers:
            server.kill()

    over_1, over_many = overheads(one, trail), overheads(many, trail)
    capped = [r for r in stops.values() if r["status"] == "cap_exceeded" and r["turns"] <= MAX_ITERATIONS]
    done = sum(r["status"] == "done" for r in [*one.values(), *many.values()])
    result = {
        "overhead_ms_per_turn": round(statistics.median(over_1), 2),
        "overhead_ms_per_turn_500": round(statistics.median(over_many), 1),
        "direct_overhead_ms_per_turn": round(base["overhead_1"], 2),
        "tasks_per_s_500": round(concurrent / many_s, 1),
        "direct_tasks_per_s_500": round(base["tasks_per_s"], 1),
        "tasks_per_s_vs_direct": round(concurrent / many_s / base["tasks_per_s"], 2),
        "cpu_ms_per_task_500": round(many_cpu_s * 1000 / concurrent, 2),
        "direct_cpu_ms_per_task_500": round(base["cpu_ms_per_task"], 2),
        # The most tasks/s these cores could give at this CPU per task, against the direct loop's.
        "cpu_ceiling_vs_direct": round((os.cpu_count() or 1) / (many_cpu_s / concurrent) / base["tasks_per_s"], 2),
        "max_in_flight": in_flight({t: trail[t] for t in many}),
        "runaway_capped_pct": round(100 * len(capped) / len(stops), 1),
        "tasks_done_pct": round(100 * done / (len(one) + len(many)), 1),
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.boxplot([over_1, over_many], tick_labels=["1 task", f"{concurrent} at once"])
    left.axhline(base["overhead_1"], color="#aaaaaa", linestyle="--", label="direct loop, 1 task")
    left.set_ylabel("ms per model turn")
    left.set_title("Runtime overhead per turn")
    left.legend()
    right.bar(["patternflow", "direct loop"], [result["tasks_per_s_500"], result["direct_tasks_per_s_500"]])
    right.set_ylabel("tasks per second")
    right.set_title(f"{concurrent} tasks at once")
    fig.tight_layout()
    notes = [
        f"A task: {TURNS} model turns ({LLM_MS} ms each, the scripted test double) and 2 fetches of a local page "
        f"({TOOL_MS} ms each); one worker per dataflow, the broker on the same 2 cores.",
        "Overhead per turn: the client's wall time for a task less the model and tool latencies the audit trail "
        "records, divided by the task's model turns; the median over tasks. The direct loop is the same loop without "
        "Kafka or state, with the same HTTP client and tool.",
        "CPU per task: what the whole machine spent busy (every process on both cores: model double, page "
        "server, broker, the dataflows and this client) during the 500-task run, divided by 500. "
        "`cpu_ceiling_vs_direct`: the tasks/s the machine's cores could give at patternflow's CPU per task (cores "
        "/ CPU per task), over the direct loop's measured tasks/s: the ceiling of `tasks_per_s_vs_direct` here. "
        "Every turn crosses Kafka three times (the reply, the tool call, the tool result), and each crossing "
        "costs a produce, a broker append and a fetch, and a pass through the dataflow's steps, in Python.",
        "",
    ]
    write_report(
        "agent", "Agent loop: overhead per turn, tasks in flight, runaway tasks", fig, notes, result, quick=args.quick
    )


if __name__ == "__main__":
    main()
