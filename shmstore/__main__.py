"""The ``shmstore`` command (also ``python -m shmstore``).

Exit status: 0 success, 1 the command failed (one line on stderr says why), 2 usage error,
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys

from ._errors import StateStoreError

__all__ = ["main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmstore", description="Typed, versioned state shared between processes."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    demo = verbs.add_parser(
        "demo",
        help="an FSM worker and reader processes sharing one store, with a live summary",
        description="Run an FSM worker process and N reader processes (subscribing and "
        "polling) on one store; print commits/s, read latency and lag; remove the store at "
        "the end or on Ctrl-C.",
    )
    demo.add_argument("--readers", type=_positive_int, default=3, help="reader processes (3)")
    demo.add_argument("--seconds", type=_positive_float, default=5.0, help="how long (5)")
    demo.add_argument(
        "--rate", type=_positive_float, default=1000.0, help="commits per second (1000)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "demo":
            from ._demo import run_demo  # noqa: PLC0415 -- other verbs need not load the FSM

            return run_demo(readers=args.readers, seconds=args.seconds, rate=args.rate)
    except StateStoreError as exc:
        print(f"shmstore: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
