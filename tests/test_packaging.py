"""What each install provides: the core (no extras) runs the streaming dataflow,
the clients need neither the dataflow engine nor the models, and each extra
imports its own dataflows with nothing but what it installs."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from tests.support.processes import ROOT


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("dataflows.event_counts", ["torch", "matplotlib", "sentence_transformers"]),
        ("clients.inference", ["bytewax", "torch", "operators.metrics"]),
        ("clients.gateway", ["bytewax", "torch", "operators.metrics"]),
        ("advisor.cli", ["bytewax", "torch", "confluent_kafka"]),
    ],
)
def test_a_module_imports_nothing_its_install_may_lack(module: str, forbidden: list[str]) -> None:
    code = f"import sys, {module}; print(*(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


# Each install (the core, then each extra) and the modules it is for.
MODULES_OF_EXTRA = {
    "": ["dataflows.event_counts", "dataflows.launch", "clients.inference", "clients.jobs", "clients.agents"],
    "online": ["dataflows.online_inference", "dataflows.async_jobs", "clients.gateway"],
    "batch": ["dataflows.batch_inference"],
    "streaming": ["dataflows.telemetry_anomalies", "dataflows.fraud_detection"],
    "rag": ["dataflows.rag"],
    "agent": ["dataflows.agent", "dataflows.agent_tools"],
}
OURS = {"patternflow", "state", "models", "operators", "clients", "dataflows", "advisor", "bench", "scripts", "tests"}


def _name(dist: str) -> str:
    return dist.lower().replace("_", "-")


def installed_with(extra: str) -> set[str]:
    """The distributions ``pip install patternflow[extra]`` installs: the requirements of the core
    and of the extra (following ``patternflow[other]``), and theirs, as this venv has them."""
    wanted, seen = [("patternflow", extra)], set()
    while wanted:
        dist, dist_extra = wanted.pop()
        if (dist, dist_extra) in seen:
            continue
        seen.add((dist, dist_extra))
        for line in importlib.metadata.requires(dist) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": dist_extra}):
                wanted += [(req.name, e) for e in req.extras or [""]]
                wanted.append((req.name, ""))
    return {_name(dist) for dist, _ in seen}


@pytest.mark.parametrize("extra", MODULES_OF_EXTRA)
def test_each_extra_imports_its_dataflows_with_only_what_it_installs(extra: str) -> None:
    allowed = installed_with(extra)
    blocked = sorted(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if module not in OURS and not {_name(d) for d in dists} & allowed
    )
    # Every installed package outside the extra's install is made unimportable, then its modules imported.
    code = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {set(blocked)!r}:
            raise ModuleNotFoundError(f"{{name}} is not installed by patternflow[{extra}]")
sys.meta_path.insert(0, Absent())
for module in {MODULES_OF_EXTRA[extra]!r}:
    __import__(module)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
