"""The ``shmstore`` command: see and manage stores without writing Python.

Exit status: 0 success; 1 the command failed (one line on stderr says why); 2 usage error;
3 ``set --expect`` lost the compare-and-set (the store was at another version); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from ._errors import StateStoreError, StateVersionError, SubscriberLaggedError
from ._store import Store, remove
from .mirror._cli import add_mirror_parser

__all__ = ["EXIT_CONFLICT", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1 (or ``code``)."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def _opened(name: str, type_: Any = None, *, inspect: bool = True) -> Iterator[Store[Any]]:
    # Inspecting another user's store (root's ls/stat/get/watch) is fine; writing is not.
    st = Store.open(name, type_, allow_other_owner=inspect)
    try:
        yield st
    finally:
        st.close()


def _import_type(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"--type wants module:Name, got {spec!r}", EXIT_USAGE)
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise CliError(f"cannot import {spec!r}: {exc}") from exc
    return obj


def _age(created_ns: int) -> str:
    seconds = max(0.0, time.time() - created_ns / 1e9)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


# ---------------------------------------------------------------------------- verbs


def cmd_ls(args: argparse.Namespace) -> int:
    from ._inventory import list_store_names, listing_supported  # noqa: PLC0415

    if not listing_supported():
        raise CliError("listing stores needs /dev/shm (Linux); open a store by name instead")
    rows: list[dict[str, Any]] = []
    for name in list_store_names():
        try:
            with _opened(name) as st:
                s = st.statistics()
        except StateStoreError as exc:
            rows.append({"name": name, "error": str(exc)})
            continue
        rows.append(
            {
                "name": s.name,
                "type": s.type_name,
                "fingerprint": s.fingerprint,
                "version": s.version,
                "slots": s.slots,
                "slot_size": s.slot_size,
                "readers_alive": s.readers_alive,
                "readers_registered": s.readers_registered,
                "created_ns": s.created_ns,
            }
        )
    if args.json:
        _out(_json(rows))
        return EXIT_OK
    if not rows:
        _out("no stores")
        return EXIT_OK
    _out(
        f"{'NAME':<28} {'TYPE':<32} {'SCHEMA':<8} {'VERSION':>9} {'SLOTS x SIZE':>16} "
        f"{'READERS':>8} {'AGE':>6}"
    )
    for r in rows:
        if "error" in r:
            _out(f"{r['name']:<28} (unreadable: {r['error']})")
            continue
        geometry = f"{r['slots']} x {r['slot_size']}"
        readers = f"{r['readers_alive']}/{r['readers_registered']}"
        _out(
            f"{r['name']:<28} {r['type'][:32]:<32} {r['fingerprint'][:8]:<8} {r['version']:>9} "
            f"{geometry:>16} {readers:>8} {_age(r['created_ns']):>6}"
        )
    return EXIT_OK


def cmd_stat(args: argparse.Namespace) -> int:
    with _opened(args.name) as st:
        stats = st.statistics()
    if args.prometheus:
        from .metrics import prometheus_text  # noqa: PLC0415

        sys.stdout.write(prometheus_text([stats]))
        return EXIT_OK
    data = stats.as_dict()
    for drop in ("lag", "reads", "retries"):  # this short-lived handle's own: meaningless here
        data.pop(drop)
    data["readers_dead"] = data["readers_registered"] - data["readers_alive"]
    if args.json:
        _out(_json(data))
    else:
        width = max(map(len, data))
        for key, value in data.items():
            _out(f"{key:<{width}}  {value}")
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    with _opened(args.name) as st:
        value, version = st.get_with_version()
    _out(_json({"version": version, "value": value}) if args.version else _json(value))
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    with _opened(args.name) as st, st.subscribe(after_version=args.after) as sub:
        while True:
            try:
                for version, value in sub:
                    _out(_json({"version": version, "value": value}))
            except SubscriberLaggedError as lag:
                print(f"shmstore: {lag}", file=sys.stderr)


def cmd_set(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.value == "-" else args.value
    type_ = _import_type(args.type) if args.type else None
    with _opened(args.name, type_, inspect=False) as st:
        try:
            value = msgspec.json.decode(text, type=st.value_type)
        except msgspec.DecodeError as exc:
            raise CliError(f"value is not valid for {args.type or 'the store'}: {exc}") from exc
        if type_ is None and not st.writable:
            raise CliError(
                f"store {args.name!r} holds {st.type_name}; pass --type module:Class "
                "so that the value is checked against that type before it is written"
            )
        try:
            version = st.set(value, args.expect)
        except StateVersionError as exc:
            raise CliError(str(exc), EXIT_CONFLICT) from exc
    _out(_json({"version": version}))
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    if not remove(args.name):
        raise CliError(f"no store named {args.name!r}")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from ._inventory import SHM_DIR, find_orphans, listing_supported  # noqa: PLC0415

    if not listing_supported():
        raise CliError("gc needs /dev/shm and /proc (Linux)")
    orphans = find_orphans()
    if orphans.unreadable_processes:
        raise CliError(
            f"cannot inspect {orphans.unreadable_processes} process(es) that might use a store; "
            "run gc as root (or their owner) to decide safely"
        )
    reclaimed = 0
    for name in orphans.unused_stores:
        _out(
            f"{'removing' if args.yes else 'would remove'} store {name!r} (no live process maps it)"
        )
    for sem in orphans.stray_semaphores:
        _out(f"{'removing' if args.yes else 'would remove'} semaphore {sem} (its store is gone)")
    if args.yes:
        for name in orphans.unused_stores:
            remove(name)
        for sem in orphans.stray_semaphores:
            with contextlib.suppress(FileNotFoundError):
                (SHM_DIR / sem).unlink()
        from ._inventory import list_store_names  # noqa: PLC0415

        for name in list_store_names():  # the stores in use: reclaim their dead readers
            with contextlib.suppress(StateStoreError), _opened(name, inspect=False) as st:
                reclaimed += st.reclaim_dead_readers()
    total = len(orphans.unused_stores) + len(orphans.stray_semaphores)
    if args.yes:
        _out(f"removed {total} object(s); reclaimed {reclaimed} dead reader entr(ies)")
    else:
        _out(f"{total} object(s) to remove; run with --yes to remove them")
    return EXIT_OK


BENCHMARKS = ("harness", "core", "wake")


def cmd_bench(args: argparse.Namespace) -> int:
    # Benchmarks are programs in the source tree's benchmarks/ (they compare against peers a
    # runtime install need not have), so this verb works from a checkout (editable install).
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.which}.py"
    if not script.is_file():
        raise CliError(f"{script} not found: benchmarks ship with the source checkout")
    extra = [a for a in args.args if a != "--"]
    return subprocess.call([sys.executable, str(script), *extra])


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo  # noqa: PLC0415 -- other verbs need not load the FSM layer

    return run_demo(readers=args.readers, seconds=args.seconds, rate=args.rate)


# ---------------------------------------------------------------------------- parser


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


def _version(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a version is >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmstore",
        description="Typed, versioned state shared between processes: inspect and manage stores.",
        epilog="Exit status: 0 ok, 1 error, 2 usage, 3 set --expect conflict, 130 interrupted.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, run: Callable[[argparse.Namespace], int], help_: str) -> Any:
        p = verbs.add_parser(name, help=help_, description=help_)
        p.set_defaults(run=run)
        return p

    p = verb("ls", cmd_ls, "list the stores on this machine")
    p.add_argument("--json", action="store_true", help="one JSON array")

    p = verb("stat", cmd_stat, "header and counters of one store")
    p.add_argument("name")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object")
    fmt.add_argument("--prometheus", action="store_true", help="Prometheus text format")

    p = verb("get", cmd_get, "print the newest value as JSON (decoded without the store's type)")
    p.add_argument("name")
    p.add_argument("--version", action="store_true", help='print {"version": N, "value": ...}')

    p = verb("watch", cmd_watch, "print one JSON line per new version until Ctrl-C")
    p.add_argument("name")
    p.add_argument("--after", type=_version, default=None, help="start after this version")

    p = verb("set", cmd_set, "commit a value given as JSON (or - to read stdin)")
    p.add_argument("name")
    p.add_argument("value", help="the value as JSON, or - for standard input")
    p.add_argument("--type", metavar="MODULE:CLASS", help="validate against this type")
    p.add_argument("--expect", type=_version, metavar="VERSION", help="commit only at this version")

    p = verb("rm", cmd_rm, "remove a store (segment and semaphores) for everyone")
    p.add_argument("name")

    p = verb("gc", cmd_gc, "remove stores no live process uses, and stray semaphores")
    p.add_argument("--yes", action="store_true", help="really remove (default: dry run)")

    p = verb("bench", cmd_bench, "run a benchmark program from benchmarks/ (harness, core, wake)")
    p.add_argument("which", choices=BENCHMARKS)
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed on, e.g. -- --rounds 3")

    p = verb("demo", cmd_demo, "an FSM worker and reader processes sharing one store, live")
    p.add_argument("--readers", type=_positive_int, default=3, help="reader processes (3)")
    p.add_argument("--seconds", type=_positive_float, default=5.0, help="how long (5)")
    p.add_argument("--rate", type=_positive_float, default=1000.0, help="commits per second (1000)")

    add_mirror_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The library's warnings (a writer recovered from a dead one, readers reclaimed) are worth
    # showing an operator, as one line each like our own errors.
    logging.basicConfig(format="shmstore: %(message)s", level=logging.WARNING)
    try:
        code: int = args.run(args)
    except CliError as exc:
        print(f"shmstore: {exc}", file=sys.stderr)
        return exc.code
    except StateStoreError as exc:
        print(f"shmstore: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK  # `shmstore watch x | head`
    return code
