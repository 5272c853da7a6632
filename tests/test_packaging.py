"""What each install provides: the core (no extras) runs the streaming dataflow,
and the clients need neither the dataflow engine nor the models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


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
