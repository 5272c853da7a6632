"""The project's commands as users run them (the ``patternflow`` console script), and what the
dataflows declare: their names, settings prefixes and default metrics ports."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from importlib import import_module
from pathlib import Path

from dataflows.launch import LONG_RUNNING
from tests.support.processes import ROOT

__all__ = ["DATAFLOWS", "default_port", "env_prefix", "patternflow"]

DATAFLOWS = sorted([*LONG_RUNNING, "batch_inference"])


def patternflow(*args: str) -> subprocess.CompletedProcess[str]:
    """The console script pyproject.toml installs, as a user runs it."""
    script = Path(sys.executable).parent / "patternflow"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def default_port(dataflow: str) -> int:
    settings = import_module(f"dataflows.{dataflow}").Settings
    (port,) = [f.default for f in dataclasses.fields(settings) if f.name == "metrics_port"]
    assert isinstance(port, int)
    return port


def env_prefix(dataflow: str) -> str:
    """The prefix of the dataflow's settings in the environment, as its ``build`` reads them."""
    module = import_module(f"dataflows.{dataflow}")
    source = Path(module.__file__ or "").read_text()
    (prefix,) = set(re.findall(r'from_(?:env|args)\(Settings, (?:prefix=)?"([A-Z_]+)"', source))
    return prefix
