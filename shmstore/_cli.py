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
import datetime
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from . import _cli_args as argtypes
from ._cli_schema import add_schema_parser
from ._errors import (
    StateStoreError,
    StateVersionError,
    StoreNotFoundError,
    SubscriberLaggedError,
)
from ._names import validate_name
from ._store import Store, remove
from ._typeexpr import TypeExpressionError, resolve_type
from .mirror._cli import add_mirror_parser

__all__ = ["EXIT_CONFLICT", "build_parser", "main", "one_line"]

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


def _type_for(spec: str) -> Any:
    """The one place the CLI turns ``--type`` text into a type (``_typeexpr``: ``module:Name``
    or any expression ``ls`` prints, parsed, never evaluated). A type rebuilt from a store's
    recorded schema, for when ``--type`` is absent, belongs here too."""
    try:
        return resolve_type(spec)
    except TypeExpressionError as exc:
        raise CliError(str(exc), EXIT_USAGE if exc.syntax else EXIT_ERROR) from None


def _age(created_ns: int) -> str:
    seconds = max(0.0, time.time() - created_ns / 1e9)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _when(ns: int) -> str | None:
    """``2026-11-28 11:48:09.563 UTC`` for a time in ns since the epoch; None for 0 (never)."""
    if ns <= 0:
        return None
    moment = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _clip(text: str, width: int) -> str:
    """*text* in at most *width* characters; a cut is marked with an ellipsis."""
    return text if len(text) <= width else text[: width - 3] + "..."


def _read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"standard input is not UTF-8 text: {exc}") from exc


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
                "schema_generation": s.schema_generation,
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
        f"{'NAME':<28} {'TYPE':<32} {'SCHEMA':<8} {'GEN':>3} {'VERSION':>9} {'SLOTS x SIZE':>16} "
        f"{'READERS':>8} {'AGE':>6}"
    )
    for r in rows:
        if "error" in r:
            _out(f"{r['name']:<28} (unreadable: {r['error']})")
            continue
        geometry = f"{r['slots']} x {r['slot_size']}"
        readers = f"{r['readers_alive']}/{r['readers_registered']}"
        type_name = _clip(r["type"], 32)
        _out(
            f"{r['name']:<28} {type_name:<32} {r['fingerprint'][:8]:<8} "
            f"{r['schema_generation']:>3} {r['version']:>9} "
            f"{geometry:>16} {readers:>8} {_age(r['created_ns']):>6}"
        )
    return EXIT_OK


def cmd_stat(args: argparse.Namespace) -> int:
    from ._inventory import unattributed_readers  # noqa: PLC0415

    with _opened(args.name) as st:
        stats = st.statistics()
        readers = st.readers()
    if args.prometheus:
        from .metrics import prometheus_text  # noqa: PLC0415

        sys.stdout.write(prometheus_text([stats]))
        return EXIT_OK
    data = stats.as_dict()
    for drop in ("lag", "reads", "retries"):  # this short-lived handle's own: meaningless here
        data.pop(drop)
    data["readers_dead"] = data["readers_registered"] - data["readers_alive"]
    unseen = unattributed_readers(args.name, readers)
    times = {key: _when(data[key]) for key in ("created_ns", "last_update_ns")}
    if args.json:
        data["created_utc"] = times["created_ns"]
        data["last_update_utc"] = times["last_update_ns"]
        data["readers_unattributed"] = [{"entry": r.index, "pid": r.pid} for r in unseen]
        _out(_json(data))
        return EXIT_OK
    data["readers_unattributed"] = len(unseen)
    width = max(map(len, data))
    for key, value in data.items():
        shown = str(value)
        if key in times:
            when = times[key]
            shown += f"  ({when}, {_age(value)} ago)" if when else "  (never)"
        elif key == "readers_unattributed" and unseen:
            entries = ", ".join(f"entry {r.index} (pid {r.pid} in its namespace)" for r in unseen)
            shown += (
                f"  ({entries}: alive, but no process this one can see holds it: "
                "another PID namespace, e.g. another container)"
            )
        _out(f"{key:<{width}}  {shown}")
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    with _opened(args.name) as st:
        value, version = st.get_with_version()
    _out(_json({"version": version, "value": value}) if args.version else _json(value))
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
    with _opened(name) as st, st.subscribe(after_version=after, timeout=WATCH_SLICE) as sub:
        checked = time.monotonic()
        while True:
            try:
                for version, value in sub:
                    _out(_json({"version": version, "value": value}))
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
            with _opened(name):
                return
        except StoreNotFoundError:
            time.sleep(WATCH_SLICE)


def cmd_set(args: argparse.Namespace) -> int:
    text = _read_stdin() if args.value == "-" else args.value
    type_ = _type_for(args.type) if args.type is not None else None
    with _opened(args.name, type_, inspect=False) as st:
        value = _decode_value(text, st.value_type, args.type or "the store")
        if st.mirror_status.role == "replica":
            st.set(value, args.expect)  # refused, with the message that names the origin
        if type_ is None and not st.writable:
            raise CliError(
                f"store {args.name!r} holds {st.type_name}; pass --type {st.type_name!r} "
                "so that the value is checked against that type before it is written"
            )
        try:
            version = st.set(value, args.expect)
        except StateVersionError as exc:
            raise CliError(str(exc), EXIT_CONFLICT) from exc
    _out(_json({"version": version}))
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
    type_ = _type_for(args.type)
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
    _out(
        _json(
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


def cmd_rm(args: argparse.Namespace) -> int:
    if not remove(args.name):
        raise CliError(f"no store named {args.name!r}")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from ._inventory import (  # noqa: PLC0415
        SHM_DIR,
        find_orphans,
        gc_blind_spot,
        gc_verdict,
        listing_supported,
    )
    from ._procview import process_visibility  # noqa: PLC0415
    from ._segment import attached_elsewhere  # noqa: PLC0415

    if not listing_supported():
        raise CliError("gc needs /dev/shm and /proc (Linux)")
    visibility = process_visibility()
    if not visibility.complete:
        print(f"shmstore: warning: {gc_blind_spot(visibility)}", file=sys.stderr)
    orphans = find_orphans()
    if orphans.unreadable_processes:
        raise CliError(
            f"cannot inspect {orphans.unreadable_processes} process(es) that might use a store; "
            "run gc as root (or their owner) to decide safely"
        )
    doing = "removing" if args.yes else "would remove"
    prefix = args.prefix or ""
    # A stray semaphore's name carries only a hash: with --prefix, nothing says whose it was.
    # Nor is one garbage when /proc may not show a process that still has it open.
    strays = [] if prefix or not visibility.complete else list(orphans.stray_semaphores)
    if orphans.stray_semaphores and not visibility.complete:
        _out(
            f"keeping {len(orphans.stray_semaphores)} semaphore(s) of removed stores: a process "
            "this one cannot see may still have them open"
        )
    doomed: list[str] = []
    kept = busy = 0
    elsewhere = "" if visibility.complete else " (in another PID namespace)"
    for name in orphans.unused_stores:
        if not name.startswith(prefix):
            continue
        try:
            attached = bool(attached_elsewhere(name))  # asked before our own handle opens it
        except StoreNotFoundError:
            continue  # removed meanwhile
        except StateStoreError:
            attached = False  # not ours to read: the open below says so
        if attached:
            _out(f"keeping store {name!r}: in use: a process has it open{elsewhere}")
            busy += 1
            continue
        try:
            with _opened(name) as st:
                verdict = gc_verdict(
                    st.statistics(),
                    older_than=args.older_than,
                    everything=args.all,
                )
        except StateStoreError as exc:
            if not args.all:
                _out(f"keeping store {name!r}: cannot inspect it ({exc}); --all removes it")
                kept += 1
                continue
            reason = f"unreadable ({exc}) (--all)"
        else:
            if not verdict.remove:
                _out(f"keeping store {name!r}: {verdict.reason}")
                if verdict.in_use:
                    busy += 1
                else:
                    kept += 1
                continue
            reason = verdict.reason
        _out(f"{doing} store {name!r}: {reason}")
        doomed.append(name)
    for sem in strays:
        _out(f"{doing} semaphore {sem}: its store is gone")
    reclaimed = failed = 0
    if args.yes:
        for name in list(doomed):
            try:
                remove(name)
            except StateStoreError as exc:  # another user's store: say so, go on with the rest
                print(f"shmstore: {exc}", file=sys.stderr)
                doomed.remove(name)
                failed += 1
        for sem in list(strays):
            try:
                (SHM_DIR / sem).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                print(f"shmstore: cannot remove semaphore {sem}: {exc.strerror}", file=sys.stderr)
                strays.remove(sem)
                failed += 1
        from ._inventory import list_store_names  # noqa: PLC0415

        in_use = [n for n in list_store_names() if n.startswith(prefix)]
        for name in in_use:  # the stores in use: reclaim their dead readers
            with contextlib.suppress(StateStoreError), _opened(name, inspect=False) as st:
                reclaimed += st.reclaim_dead_readers()
    total = len(doomed) + len(strays)
    kept_note = (
        f"; kept {kept} unused store(s) (--older-than AGE or --all to remove)" if kept else ""
    )
    if busy:
        kept_note += f"; kept {busy} store(s) in use by processes /proc does not show"
    if args.yes:
        _out(f"removed {total} object(s); reclaimed {reclaimed} dead reader entr(ies){kept_note}")
    else:
        _out(f"{total} object(s) to remove; run with --yes to remove them{kept_note}")
    return EXIT_ERROR if failed else EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from ._doctor import run_doctor  # noqa: PLC0415

    return run_doctor()


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


_ERRNO_PREFIX = re.compile(r"\[Errno -?\d+\] ")


def one_line(exc: BaseException) -> str:
    """*exc*'s message as one line for an operator: an ``OSError``'s ``[Errno N]`` prefix is
    dropped, wherever a message quotes one (the store's errors that are also ``OSError``s,
    e.g. ``StoreNotFoundError``, would otherwise print ``[Errno 2] no store named 'x'``), and
    line breaks become spaces."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is None:
        text = exc.strerror
    else:
        text = str(exc)
    return " ".join(_ERRNO_PREFIX.sub("", text).split())


def _silence_stdout() -> None:
    # The reader went away: flushing stdout at exit would fail again and print to stderr.
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
