"""``patternflow``: the platform's command line.

    patternflow advise FILE [--json]   the pattern a use case (YAML) needs, why, where to start, what does not fit
    patternflow audit [--targets T]    antipatterns in the running dataflows' settings and metrics
    patternflow report [--since 1h]    the dashboards' panels as a static HTML page of PNG plots

Exit codes: 0 done (``audit``: no antipattern found), 1 ``audit`` found one (so CI can
gate on it), 2 the input is invalid, no dataflow answered, or Prometheus could not be
asked (the message says why).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import orjson
import yaml

from advisor import audit, report
from advisor.advise import UseCase, UseCaseError, advise

__all__ = ["main"]


def _advise(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        doc = yaml.safe_load(path.read_text())
        advice = advise(UseCase.from_doc(doc))
    except OSError as exc:
        print(f"patternflow advise: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    except (yaml.YAMLError, UseCaseError) as exc:
        print(f"patternflow advise: {path} is not a valid use case: {exc}", file=sys.stderr)
        return 2
    print(orjson.dumps(advice.to_json()).decode() if args.json else advice.text())
    return 0


def _audit(args: argparse.Namespace) -> int:
    try:
        endpoints = audit.targets(args.targets)
    except ValueError as exc:
        print(f"patternflow audit: --targets: {exc}", file=sys.stderr)
        return 2
    scrapes = [found for target in endpoints if (found := audit.scrape(target)) is not None]
    if not scrapes:
        print(
            f"patternflow audit: no dataflow answered at {args.targets}: start one, or name its metrics port",
            file=sys.stderr,
        )
        return 2
    findings = audit.audit(scrapes)
    if args.json:
        print(
            orjson.dumps(
                {"dataflows": [s.dataflow for s in scrapes], "findings": [f.__dict__ for f in findings]}
            ).decode()
        )
    else:
        print("audited: " + ", ".join(f"{s.dataflow} ({s.target})" for s in scrapes))
        for finding in findings:
            print(f"\n{finding.antipattern}: {finding.dataflow} at {finding.target}")
            print("\n".join(f"  - {e}" for e in finding.evidence))
        print(f"\n{len(findings)} antipattern(s) found" if findings else "no antipattern found")
    return 1 if findings else 0


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 6h or 2d")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def _report(args: argparse.Namespace) -> int:
    end = time.time()
    try:
        index, panels, with_data = report.render(
            args.prometheus, Path(args.out), end - args.since, end, progress=lambda line: print(f"  {line}")
        )
    except report.ReportError as exc:
        print(f"patternflow report: {exc}", file=sys.stderr)
        return 2
    print(f"{with_data} of {panels} panels have data; open {index}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patternflow", description="The patternflow platform's command line.")
    commands = parser.add_subparsers(dest="command", required=True)
    advise_cmd = commands.add_parser("advise", help="the pattern a use case needs (a YAML file)")
    advise_cmd.add_argument("file", help="the use case, in YAML (see advisor/examples/)")
    advise_cmd.add_argument("--json", action="store_true", help="print the advice as one JSON object")
    advise_cmd.set_defaults(run=_advise)
    audit_cmd = commands.add_parser("audit", help="antipatterns in the running dataflows (their metrics endpoints)")
    audit_cmd.add_argument(
        "--targets",
        default=audit.DEFAULT_TARGETS,
        help=f"host:port or host:first-last, comma-separated ({audit.DEFAULT_TARGETS})",
    )
    audit_cmd.add_argument("--json", action="store_true", help="print the findings as one JSON object")
    audit_cmd.set_defaults(run=_audit)
    report_cmd = commands.add_parser("report", help="the dashboards' panels as a static HTML page with PNG plots")
    report_cmd.add_argument("--prometheus", default="http://127.0.0.1:9090", help="its URL (http://127.0.0.1:9090)")
    report_cmd.add_argument("--since", type=_seconds, default=3600.0, help="how far back: 90s, 30m, 6h, 2d (1h)")
    report_cmd.add_argument("--out", default="var/report", help="the directory to write (var/report)")
    report_cmd.set_defaults(run=_report)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
