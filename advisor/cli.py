"""``patternflow``: the platform's command line.

    patternflow advise FILE [--json]   the pattern a use case (YAML) needs, why, where to start, what does not fit

Exit codes: 0 done, 2 the input is invalid (the message says why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson
import yaml

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patternflow", description="The patternflow platform's command line.")
    commands = parser.add_subparsers(dest="command", required=True)
    advise_cmd = commands.add_parser("advise", help="the pattern a use case needs (a YAML file)")
    advise_cmd.add_argument("file", help="the use case, in YAML (see advisor/examples/)")
    advise_cmd.add_argument("--json", action="store_true", help="print the advice as one JSON object")
    advise_cmd.set_defaults(run=_advise)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
