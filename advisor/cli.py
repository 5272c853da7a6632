"""``patternflow``: the platform's command line.

    patternflow advise FILE [--json]   the pattern a use case (YAML) needs, why, where to start, what does not fit
    patternflow audit [--targets T]    antipatterns in the running dataflows' settings and metrics

Exit codes: 0 done (``audit``: no antipattern found), 1 ``audit`` found one (so CI can
gate on it), 2 the input is invalid or no dataflow answered (the message says why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson
import yaml

from advisor import audit
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
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
