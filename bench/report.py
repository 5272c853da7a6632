"""Shared output of the benchmarks: a Markdown report with a plot, and the JSON line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import orjson
from matplotlib.figure import Figure

RESULTS = Path(__file__).parent / "results"


def parse_args(doc: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--quick", action="store_true", help="a smaller run, under two minutes")
    return parser.parse_args()


def progress(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def bar_chart(title: str, bars: dict[str, float], unit: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(list(bars), list(bars.values()), color=["#1f77b4", "#aaaaaa"] * (len(bars) // 2 + 1))
    ax.set_xlabel(unit)
    ax.set_title(title)
    for y, value in enumerate(bars.values()):
        ax.text(value, y, f" {value:,.0f}", va="center")
    fig.tight_layout()
    return fig


def write_report(
    name: str,
    title: str,
    figure: Figure,
    notes: list[str],
    result: dict[str, Any],
    *,
    quick: bool,
    tables: tuple[str, ...] = (),
) -> Path:
    """Write ``bench/results/<name>.md`` and ``<name>.png``; print the result as the last line."""
    RESULTS.mkdir(exist_ok=True)
    png = RESULTS / f"{name}.png"
    figure.savefig(png, dpi=120)
    lines = [f"# {title}", "", f"![{title}]({png.name})", "", "| measure | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in result.items()]
    command = f"python -m bench.{name}" + (" --quick" if quick else "")
    lines += ["", *tables, *notes, f"Command: `{command}`", ""]
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(lines))
    progress(f"report: {md}")
    print(orjson.dumps(result).decode(), flush=True)
    return md
