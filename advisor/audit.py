"""``patternflow audit``: antipatterns found in the running dataflows' settings and live metrics.

Every dataflow publishes its settings as the labels of
``patternflow_dataflow_info{dataflow="<name>"}`` on its metrics endpoint,
beside its counters (:func:`operators.metrics.serve`). The audit scrapes the
endpoints it is given (by default the dataflows' default ports, 9100 to 9108
on this host; an endpoint that does not answer is a dataflow not running) and
runs each check on what it finds. A :class:`Finding` names the antipattern,
the dataflow and its evidence.

Checks so far:

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

__all__ = ["DEFAULT_TARGETS", "Finding", "Scrape", "audit", "scrape", "targets"]

DEFAULT_TARGETS = "127.0.0.1:9100-9108"
MAX_ITERATIONS = 50
MAX_TASK_USD = 5.0
MAX_WALL_S = 3_600.0
MAX_TENANT_USD = 1_000.0
CAPPED_SHARE = 0.2
MIN_TASKS = 20


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
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    samples = [
        (s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(text) for s in family.samples
    ]
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


CHECKS: list[Callable[[Scrape], Finding | None]] = [_agent_caps]


def audit(scrapes: list[Scrape]) -> list[Finding]:
    return [finding for s in scrapes for check in CHECKS if (finding := check(s)) is not None]
