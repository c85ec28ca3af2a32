"""The ``shmstore`` command: see and manage stores without writing Python.

Exit status: 0 success; 1 the command failed (one line on stderr says why; ``watch`` also when
its store was removed or replaced); 2 usage error (a bad option value, a malformed ``--type``, an
unusable store name); 3 ``set --expect`` lost the compare-and-set (the store was at another
version); 130 interrupted (Ctrl-C, ``watch`` and ``mirror publish``/``follow`` too); 143 the demo
was stopped by ``SIGTERM``/``SIGHUP`` (a mirror worker stopped by ``SIGTERM`` exits 0: a clean
stop, as a service manager asks for one).

Errors are one line, never a traceback: library errors are ``StateStoreError`` (their message is
the line), bad arguments are caught here, and anything else is reported as an internal error in
one line too (``SHMSTORE_TRACEBACK=1`` shows the traceback, for a bug report).

Adding a verb: write ``cmd_<verb>(args) -> int`` and register it in :func:`build_parser` with
``verb(...)``; an argument called ``name`` is checked as a store name before the verb runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from . import _cli_args as argtypes
from ._cli_common import (
    EXIT_CONFLICT,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    json_line,
    one_line,
    opened,
    out,
    read_stdin,
    type_for,
)
from ._cli_inventory import cmd_doctor, cmd_gc, cmd_ls, cmd_rm, cmd_stat
from ._cli_schema import add_schema_parser
from ._errors import (
    StateStoreError,
    StateVersionError,
    StoreNotFoundError,
    StorePermissionError,
    SubscriberLaggedError,
)
from ._names import validate_name
from ._store import Store
from .mirror._cli import add_mirror_parser

__all__ = ["EXIT_CONFLICT", "build_parser", "main", "one_line"]


# ---------------------------------------------------------------------------- verbs


def cmd_get(args: argparse.Namespace) -> int:
    with opened(args.name) as st:
        value, version = st.get_with_version()
    out(json_line({"version": version, "value": value}) if args.version else json_line(value))
    return EXIT_OK


# A Ctrl-C that lands between Python's last signal check and the semaphore wait would wait for
# the next commit, which may never come: sleep in slices, so it is seen within one.
WATCH_SLICE = 1.0


def cmd_watch(args: argparse.Namespace) -> int:
    after = args.after
    while True:
        _watch_until_gone(args.name, after)
        if not args.follow:
            raise CliError(
                f"store {args.name!r} was removed or replaced by a new store of that name; "
                "stopped watching (--follow goes on with the new one)"
            )
        print(
            f"shmstore: store {args.name!r} was removed or replaced; following the next store "
            "of that name",
            file=sys.stderr,
            flush=True,
        )
        _wait_until_it_exists(args.name)
        after = None  # a new store: its current value, then every new one


def _watch_until_gone(name: str, after: int | None) -> None:
    """Print each version of store *name* after *after*; return once the name no longer
    points at the store this started with (``statistics().removed``), checked every
    ``WATCH_SLICE`` seconds, busy or idle."""
    with opened(name) as st, st.subscribe(after_version=after, timeout=WATCH_SLICE) as sub:
        checked = time.monotonic()
        while True:
            try:
                for version, value in sub:
                    out(json_line({"version": version, "value": value}))
                    if time.monotonic() - checked >= WATCH_SLICE:
                        break
            except SubscriberLaggedError as lag:
                print(f"shmstore: {lag}", file=sys.stderr)
            except TimeoutError:
                pass
            checked = time.monotonic()
            if st.statistics().removed:
                return


def _wait_until_it_exists(name: str) -> None:
    # Nothing signals the creation of a store: look for it once per slice (Ctrl-C ends this).
    while True:
        try:
            with opened(name):
                return
        except StoreNotFoundError:
            time.sleep(WATCH_SLICE)


def cmd_set(args: argparse.Namespace) -> int:
    text = read_stdin() if args.value == "-" else args.value
    type_ = type_for(args.type) if args.type is not None else None
    with opened(args.name, type_, inspect=False) as st:
        value = _decode_value(text, st.value_type, args.type or "the store")
        if not st.writable:  # the store says why (read-only, a replica, another container)
            try:
                st.set(value, args.expect)
            except StorePermissionError:
                raise
            except StateStoreError as exc:
                if type_ is None and st.mirror_status.role != "replica":
                    raise CliError(
                        f"store {args.name!r} holds {st.type_name}; pass --type "
                        f"{st.type_name!r} so that the value is checked against that type "
                        "before it is written"
                    ) from exc
                raise
        try:
            version = st.set(value, args.expect)
        except StateVersionError as exc:
            raise CliError(str(exc), EXIT_CONFLICT) from exc
    out(json_line({"version": version}))
    return EXIT_OK


def _decode_value(text: str, type_: Any, what: str) -> Any:
    """*text* (JSON) as a value of *type_*; bad input, however bad, is a one-line error."""
    try:
        return msgspec.json.decode(text, type=type_)
    except msgspec.DecodeError as exc:
        raise CliError(f"value is not valid for {what}: {exc}") from exc
    except RecursionError:
        raise CliError(f"value is not valid for {what}: JSON nested too deeply to decode") from None


def cmd_create(args: argparse.Namespace) -> int:
    type_ = type_for(args.type)
    options: dict[str, Any] = {"mode": args.mode, "group": args.group}
    for key in ("slots", "slot_size", "max_value_size", "max_readers"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    try:
        st = Store.create(args.name, type_, **options)
    except ValueError as exc:  # geometry out of range, an unknown group: the arguments' fault
        if isinstance(exc, StateStoreError):
            raise
        raise CliError(str(exc), EXIT_USAGE) from None
    with st:
        stats = st.statistics()
    out(
        json_line(
            {
                "name": stats.name,
                "type": stats.type_name,
                "slots": stats.slots,
                "slot_size": stats.slot_size,
                "max_value_size": st.max_value_size,
                "max_readers": stats.max_readers,
                "mode": f"{args.mode:04o}",
            }
        )
    )
    return EXIT_OK


BENCHMARKS = ("harness", "core", "wake", "fsm", "mirror")


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

    return run_demo(
        readers=args.readers,
        seconds=args.seconds,
        rate=args.rate,
        slow_reader=args.slow_reader,
    )


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmstore",
        description="Typed, versioned state shared between processes: inspect and manage stores.",
        epilog="Exit status: 0 ok, 1 error, 2 usage, 3 set --expect conflict, 130 interrupted, "
        "143 demo stopped by SIGTERM/SIGHUP.",
    )
    parser.add_argument("--version", action="version", version=f"shmstore {_package_version()}")
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

    p = verb(
        "watch",
        cmd_watch,
        "print one JSON line per new version until Ctrl-C, or until the store is removed or "
        "replaced (exit 1)",
    )
    p.add_argument("name")
    p.add_argument("--after", type=argtypes.version, default=None, help="start after this version")
    p.add_argument(
        "--follow",
        action="store_true",
        help="when the store is removed or replaced, wait for the next store of that name and "
        "watch it",
    )

    p = verb("set", cmd_set, "commit a value given as JSON (or - to read stdin)")
    p.add_argument("name")
    p.add_argument("value", help="the value as JSON, or - for standard input")
    p.add_argument(
        "--type",
        metavar="TYPE",
        help="validate against this type: module:Class, or as ls shows it ('dict[str, int]')",
    )
    p.add_argument(
        "--expect", type=argtypes.version, metavar="VERSION", help="commit only at this version"
    )

    p = verb("create", cmd_create, "create an empty store of a type")
    p.add_argument("name")
    p.add_argument(
        "--type",
        required=True,
        metavar="TYPE",
        help="module:Class, or a type as ls shows it, e.g. 'dict[str, int]'",
    )
    p.add_argument(
        "--slots", type=argtypes.positive_int, help="versions the ring keeps (default 8)"
    )
    p.add_argument(
        "--slot-size", type=argtypes.size, metavar="B", help="initial slot capacity (bytes)"
    )
    p.add_argument(
        "--max-value-size", type=argtypes.size, metavar="B", help="the largest value it may grow to"
    )
    p.add_argument(
        "--max-readers", type=argtypes.positive_int, help="processes that may wait at once"
    )
    p.add_argument(
        "--mode",
        type=argtypes.mode,
        default=0o600,
        help="permission bits, octal (0600; 0640: group reads)",
    )
    p.add_argument(
        "--group", type=argtypes.group, metavar="G", help="the store's group (name or gid)"
    )

    p = verb("rm", cmd_rm, "remove a store (segment and semaphores) for everyone")
    p.add_argument("name")

    p = verb(
        "gc",
        cmd_gc,
        "remove stores abandoned by crashed processes, and stray semaphores (dry run unless --yes)",
    )
    p.add_argument("--yes", action="store_true", help="really remove (default: dry run)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--older-than",
        type=argtypes.duration,
        metavar="AGE",
        help="also unused stores idle this long (90s, 30m, 12h, 7d)",
    )
    which.add_argument("--all", action="store_true", help="every store no live process has open")
    p.add_argument(
        "--prefix",
        metavar="TEXT",
        help="only stores whose names start with TEXT (stray semaphores are then left alone)",
    )

    verb(
        "doctor",
        cmd_doctor,
        "check what stores need here (/dev/shm, PID namespace, locks, semaphores, limits); "
        "exit 1 if a check fails",
    )

    p = verb(
        "bench",
        cmd_bench,
        "run a benchmark program from benchmarks/ (harness, core, wake, fsm, mirror)",
    )
    p.add_argument("which", choices=BENCHMARKS)
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed on, e.g. -- --rounds 3")

    p = verb("demo", cmd_demo, "an FSM worker and reader processes sharing one store, live")
    p.add_argument(
        "--readers", type=argtypes.readers, default=3, help="reader processes (3, at most 256)"
    )
    p.add_argument(
        "--seconds", type=argtypes.demo_seconds, default=30.0, help="how long (30; 0: until Ctrl-C)"
    )
    p.add_argument("--rate", type=argtypes.rate, default=1000.0, help="commits per second (1000)")
    p.add_argument(
        "--slow-reader",
        action="store_true",
        help="reader 0 takes 20 snapshots a second from its subscription: watch the FSM layer "
        "drop stale snapshots for it (the notices column)",
    )

    add_mirror_parser(verbs)
    add_schema_parser(verbs)
    return parser


def _package_version() -> str:
    from . import __version__  # noqa: PLC0415 -- the facade imports this module's neighbours

    return __version__


def _run(args: argparse.Namespace) -> int:
    name = getattr(args, "name", None)
    if name is not None:
        try:
            validate_name(name)
        except ValueError as exc:  # the name as typed is unusable: a usage error
            raise CliError(str(exc), EXIT_USAGE) from None
    code: int = args.run(args)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The library's warnings (a writer recovered from a dead one, readers reclaimed) are worth
    # showing an operator, as one line each like our own errors.
    logging.basicConfig(format="shmstore: %(message)s", level=logging.WARNING)
    try:
        return _run(args)
    except CliError as exc:
        print(f"shmstore: {one_line(exc)}", file=sys.stderr)
        return exc.code
    except StateStoreError as exc:
        print(f"shmstore: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK  # `shmstore watch x | head`
    except Exception as exc:
        if os.environ.get("SHMSTORE_TRACEBACK"):
            raise
        print(
            f"shmstore: internal error: {type(exc).__name__}: {one_line(exc)} "
            "(SHMSTORE_TRACEBACK=1 shows where; please report it)",
            file=sys.stderr,
        )
        return EXIT_ERROR


def _silence_stdout() -> None:
    # The reader went away: flushing stdout at exit would fail again and print to stderr.
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
