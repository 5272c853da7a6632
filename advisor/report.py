"""``patternflow report``: the Grafana dashboards' panels as one static HTML page of PNG plots.

For users without Grafana: every panel of every dashboard in
``deploy/grafana/dashboards`` (the same PromQL, so the report and the
dashboards cannot drift apart) is asked of Prometheus over a time range
(``/api/v1/query_range``) and drawn with matplotlib, one PNG per panel, beside
an ``index.html`` that shows them in the dashboards' order. The page loads
nothing from the network; should a PNG go missing, it says which.
"""

from __future__ import annotations

import html
import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from patternflow.errors import PatternflowError

__all__ = ["DASHBOARDS", "Panel", "ReportError", "dashboards", "query_range", "render"]

DASHBOARDS = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards"
ORDER = ["online", "batch", "streaming", "rag", "agent"]  # the patterns, as the README tells them
POINTS = 240  # per series: a step of range / POINTS, at least 1 s


class ReportError(PatternflowError):
    """Prometheus could not be asked, or refused a query (the message says which and why)."""


@dataclass(frozen=True)
class Panel:
    dashboard: str  # the file's stem: the pattern
    title: str
    unit: str
    expr: str
    legend: str

    @property
    def image(self) -> str:
        return f"{self.dashboard}-{re.sub(r'[^a-z0-9]+', '-', self.title.lower()).strip('-')[:60]}.png"


Series = tuple[dict[str, str], list[tuple[float, float]]]


def dashboards(directory: Path = DASHBOARDS) -> list[tuple[str, list[Panel]]]:
    """Each dashboard's title and panels (one target each), the patterns in :data:`ORDER` first."""
    files = sorted(directory.glob("*.json"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    out = []
    for path in files:
        doc = json.loads(path.read_text())
        panels = [
            Panel(
                path.stem,
                p["title"],
                p.get("fieldConfig", {}).get("defaults", {}).get("unit", ""),
                t["expr"],
                t.get("legendFormat", ""),
            )
            for p in doc["panels"]
            for t in p.get("targets", [])
        ]
        out.append((doc["title"], panels))
    return out


def query_range(prometheus: str, expr: str, start: float, end: float) -> list[Series]:
    """The series ``expr`` gives from ``start`` to ``end`` (epoch seconds): (labels, [(t, value)])."""
    step = max(1.0, (end - start) / POINTS)
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    url = f"{prometheus.rstrip('/')}/api/v1/query_range?{query}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            doc = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # a bad query: Prometheus says why in the body
        doc = json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, OSError) as exc:
        raise ReportError(
            f"cannot reach Prometheus at {prometheus} ({exc}): start it (docker compose up starts one), "
            "or name yours with --prometheus URL"
        ) from exc
    if doc.get("status") != "success":
        raise ReportError(f"Prometheus refused {expr!r}: {doc.get('error', doc)}")
    return [(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in doc["data"]["result"]]


def legend(fmt: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt).strip()
    return text or ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"


def _plot(panel: Panel, series: list[Series], start: float, end: float, path: Path) -> bool:
    """Draw the panel to ``path``; whether it had any finite value."""

    def _day(t: float) -> float:  # matplotlib's dates: days since its epoch
        return float(date2num(datetime.fromtimestamp(t, tz=UTC)))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.dates import DateFormatter, date2num
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(7.5, 3.0), dpi=100)
    drawn = False
    for labels, points in series[:20]:
        kept = [(_day(t), v) for t, v in points if math.isfinite(v)]
        if kept:
            drawn = True
            ax.plot([t for t, _ in kept], [v for _, v in kept], label=legend(panel.legend, labels), linewidth=1.4)
    ax.set_xlim(_day(start), _day(end))
    ax.xaxis.set_major_formatter(DateFormatter("%H:%M:%S"))
    if panel.unit == "percentunit":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    elif panel.unit:
        ax.set_ylabel(panel.unit, fontsize=8)
    ax.set_title(panel.title, fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=6, loc="upper left", ncol=2 if len(series) > 6 else 1, framealpha=0.6)
    else:
        ax.text(0.5, 0.5, "no data in this range", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return drawn


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
section {{ margin-bottom: 2rem; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1rem; }}
figure {{ margin: 0; width: 750px; }} figure img {{ width: 100%; }}
figcaption {{ font-size: 0.8rem; color: #555; }} code {{ font-size: 0.75rem; }}
#missing {{ color: #b00; font-weight: bold; }}
</style></head>
<body data-figures="{figures}">
<h1>{title}</h1>
<p>{subtitle}</p>
<p id="missing" hidden></p>
{sections}
<script>
window.addEventListener("load", () => {{
  const images = [...document.images];
  const missing = images.filter((img) => !(img.complete && img.naturalWidth > 0)).map((img) => img.alt);
  document.body.dataset.loaded = images.length - missing.length;
  if (missing.length) {{
    const p = document.getElementById("missing");
    p.textContent = missing.length + " figure(s) did not load (keep the PNGs beside index.html): " + missing.join("; ");
    p.hidden = false;
  }}
}});
</script>
</body></html>
"""


def render(
    prometheus: str,
    out: Path,
    start: float,
    end: float,
    directory: Path = DASHBOARDS,
    progress: Callable[[str], Any] = lambda _: None,
) -> tuple[Path, int, int]:
    """Write ``out/index.html`` and a PNG per panel; return the page, the panels, and those with data."""
    out.mkdir(parents=True, exist_ok=True)
    sections, panels, with_data = [], 0, 0
    for title, members in dashboards(directory):
        progress(f"{title}: {len(members)} panels")
        figures = []
        for panel in members:
            has_data = _plot(panel, query_range(prometheus, panel.expr, start, end), start, end, out / panel.image)
            panels, with_data = panels + 1, with_data + has_data
            figures.append(
                f'<figure><img src="{html.escape(panel.image)}" alt="{html.escape(panel.title)}">'
                f"<figcaption><details><summary>PromQL</summary><code>{html.escape(panel.expr)}</code>"
                "</details></figcaption></figure>"
            )
        sections.append(f'<section><h2>{html.escape(title)}</h2><div class="grid">{"".join(figures)}</div></section>')
    when = " to ".join(datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S") for t in (start, end))
    page = _PAGE.format(
        title="patternflow report",
        subtitle=html.escape(f"{when} UTC, from {prometheus}; {with_data} of {panels} panels have data"),
        figures=panels,
        sections="\n".join(sections),
    )
    index = out / "index.html"
    index.write_text(page)
    return index, panels, with_data
