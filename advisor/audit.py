"""``patternflow audit``: antipatterns found in the running dataflows' settings and live metrics.

Every dataflow publishes its settings as the labels of
``patternflow_dataflow_info{dataflow="<name>"}`` on its metrics endpoint,
beside its counters (:func:`operators.metrics.serve`). The audit scrapes the
endpoints it is given (by default the dataflows' default ports, 9100 to 9108
on this host; an endpoint that does not answer is a dataflow not running) and
runs each check on what it finds. A :class:`Finding` names the antipattern,
the dataflow and its evidence.

The checks:

- **online serving for batch-shaped work** (``dataflows.online_inference``):
  one client (a reply topic and partition) sent at least :data:`CLIENT_SHARE`
  of at least :data:`MIN_REQUESTS` requests, and at least
  :data:`RELAXED_SHARE` of its requests could wait (no deadline, or more than
  ``RELAXED_BUDGET_S`` to it): work a batch job or the async jobs would do for
  less. The batches' mean fill is shown beside it.
- **streaming without state** (the streaming dataflows, :data:`STREAMING`):
  one whose features need history running without a Bytewax recovery
  directory, so its state is not recoverable and a restart starts every key
  from nothing.
- **RAG without retrieval eval** (``dataflows.rag``): no eval run
  (``scripts.eval_rag``) recorded for the index version it serves.
- **agent loops without caps** (``dataflows.agent``): a cap set past what
  bounds anything (more than :data:`MAX_ITERATIONS` iterations, more than
  :data:`MAX_TASK_USD` per task, more than :data:`MAX_WALL_S` of wall time,
  more than :data:`MAX_TENANT_USD` a day per tenant), or tasks that end at a
  cap more often than :data:`CAPPED_SHARE` (at least :data:`MIN_TASKS`
  finished): caps that bite that often are the loop's control flow.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from patternflow import RELAXED_BUDGET_S

__all__ = ["DEFAULT_TARGETS", "Finding", "Scrape", "audit", "scrape", "targets"]

DEFAULT_TARGETS = "127.0.0.1:9100-9108"
MAX_SCRAPE_BYTES = 64 << 20
MAX_ITERATIONS = 50
MAX_TASK_USD = 5.0
MAX_WALL_S = 3_600.0
MAX_TENANT_USD = 1_000.0
CAPPED_SHARE = 0.2
MIN_TASKS = 20
MIN_REQUESTS = 500
CLIENT_SHARE = 0.5
RELAXED_SHARE = 0.9
# The streaming dataflows, and the history their features need.
STREAMING = {
    "event_counts": "each key's open windows",
    "fraud_detection": "each card's history, the merchants table and the models",
    "telemetry_anomalies": "each series' model",
}


@dataclass(frozen=True)
class Scrape:
    """What one endpoint exported: the dataflow's settings and every sample, as (name, labels, value)."""

    target: str
    dataflow: str
    settings: dict[str, str]
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def total(self, name: str, **labels: str) -> float:
        return sum(v for n, ls, v in self.samples if n == name and all(ls.get(k) == x for k, x in labels.items()))


@dataclass(frozen=True)
class Finding:
    antipattern: str
    dataflow: str
    target: str
    evidence: list[str]


def targets(spec: str) -> list[str]:
    """``host:port`` endpoints from ``"host:9100-9108,other:9200"``."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        host, _, ports = part.rpartition(":")
        first, _, last = ports.partition("-")
        if not host or not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"{part!r} is not host:port or host:first-last")
        out += [f"{host}:{port}" for port in range(int(first), int(last or first) + 1)]
    return out


def scrape(target: str, timeout_s: float = 2.0) -> Scrape | None:
    """The endpoint's dataflow and samples; ``None`` if nothing answers there or it is not a dataflow."""
    try:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=timeout_s) as response:
            text = response.read(MAX_SCRAPE_BYTES).decode()
        families = text_string_to_metric_families(text)
        samples = [(s.name, dict(s.labels), s.value) for family in families for s in family.samples]
    except (urllib.error.URLError, OSError, ValueError):  # nothing there, or not Prometheus' text format
        return None
    info = next((labels for name, labels, _ in samples if name == "patternflow_dataflow_info"), None)
    if info is None:
        return None
    settings = {k: v for k, v in info.items() if k != "dataflow"}
    return Scrape(target, info["dataflow"], settings, samples)


def _agent_caps(s: Scrape) -> Finding | None:
    if s.dataflow != "agent":
        return None
    evidence = []
    limits = (
        ("max_iterations", MAX_ITERATIONS, "iterations per task"),
        ("max_cost_usd", MAX_TASK_USD, "USD per task"),
        ("max_wall_s", MAX_WALL_S, "seconds per task"),
        ("tenant_daily_budget_usd", MAX_TENANT_USD, "USD a day per tenant"),
    )
    for name, most, unit in limits:
        value = float(s.settings.get(name, "inf"))
        if value > most:
            evidence.append(f"AGENT_{name.upper()}={s.settings.get(name)}: over {most:g} {unit} bounds nothing")
    finished = s.total("patternflow_agent_tasks_total")
    capped = s.total("patternflow_agent_tasks_total", status="cap_exceeded")
    if finished >= MIN_TASKS and capped / finished > CAPPED_SHARE:
        reasons = sorted(
            {
                ls["reason"]
                for n, ls, v in s.samples
                if n == "patternflow_agent_tasks_total" and ls.get("status") == "cap_exceeded" and v
            }
        )
        evidence.append(
            f"{capped:.0f} of {finished:.0f} finished tasks ended at a cap ({', '.join(reasons)}): "
            "the caps are doing the loop's work"
        )
    return Finding("agent loops without caps", s.dataflow, s.target, evidence) if evidence else None


def _online_batch_shaped(s: Scrape) -> Finding | None:
    if s.dataflow != "online_inference":
        return None
    requests = "patternflow_online_requests_total"
    by_client: dict[str, float] = {}
    for name, labels, value in s.samples:
        if name == requests:
            by_client[labels["client"]] = by_client.get(labels["client"], 0.0) + value
    total = sum(by_client.values())
    if total < MIN_REQUESTS:
        return None
    client, sent = max(by_client.items(), key=lambda kv: kv[1])
    relaxed = s.total(requests, client=client, budget="relaxed")
    if sent / total < CLIENT_SHARE or relaxed / sent < RELAXED_SHARE:
        return None
    batches = s.total("patternflow_online_batch_fill_count")
    fill = s.total("patternflow_online_batch_fill_sum") / batches if batches else 0.0
    return Finding(
        "online serving for batch-shaped work",
        s.dataflow,
        s.target,
        [
            f"client {client} sent {sent:.0f} of {total:.0f} requests ({sent / total:.0%}), {relaxed / sent:.0%} "
            f"of them with no deadline or more than {RELAXED_BUDGET_S:g} s to it",
            f"{batches:.0f} batches filled {fill:.0%} of ONLINE_MAX_BATCH_SIZE={s.settings.get('max_batch_size')} "
            "on average",
            "work that can wait is cheaper as a batch job (python -m dataflows.batch_inference) "
            "or submitted to the async jobs (dataflows.async_jobs)",
        ],
    )


def _streaming_state(s: Scrape) -> Finding | None:
    history = STREAMING.get(s.dataflow)
    if history is None or s.settings.get("bytewax_recovery"):
        return None
    keys = s.total("patternflow_state_keys")
    return Finding(
        "streaming without state",
        s.dataflow,
        s.target,
        [
            f"runs without a recovery directory (python -m bytewax.run ... -r DIR): its state ({history}; "
            f"{keys:.0f} keys now) is not recoverable, and a restart starts every key from nothing",
        ],
    )


def _rag_eval(s: Scrape) -> Finding | None:
    if s.dataflow != "rag" or any(name == "patternflow_rag_eval" for name, _, _ in s.samples):
        return None
    # A dataflow still loading its models serves the info metric before it labels it with the version.
    infos = (ls for n, ls, _ in s.samples if n == "patternflow_rag_index_info" and "version" in ls)
    version = next((ls["version"] for ls in infos), "not published yet")
    return Finding(
        "RAG without retrieval eval",
        s.dataflow,
        s.target,
        [
            f"no retrieval eval run is recorded for the index it serves ({version}): how well it retrieves "
            "is unmeasured",
            "run python -m scripts.eval_rag against it; the run is recorded on its evals topic",
        ],
    )


CHECKS: list[Callable[[Scrape], Finding | None]] = [_online_batch_shaped, _streaming_state, _rag_eval, _agent_caps]


def audit(scrapes: list[Scrape]) -> list[Finding]:
    return [finding for s in scrapes for check in CHECKS if (finding := check(s)) is not None]
