"""The ``shmstore`` command: see and manage stores without writing Python.

Exit status: 0 success; 1 the command failed (one line on stderr says why); 2 usage error;
3 ``set --expect`` lost the compare-and-set (the store was at another version); 130 interrupted
(Ctrl-C); 143 the demo was stopped by ``SIGTERM``/``SIGHUP``.

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
import importlib
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from ._cli_schema import add_schema_parser
from ._errors import StateStoreError, StateVersionError, SubscriberLaggedError
from ._names import validate_name
from ._store import Store, remove
from .mirror._cli import add_mirror_parser

__all__ = ["EXIT_CONFLICT", "build_parser", "main"]

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
    except Exception as exc:  # importing runs arbitrary module code: any failure is the answer
        raise CliError(f"cannot import {spec!r}: {type(exc).__name__}: {exc}") from exc
    try:
        msgspec.json.Decoder(obj)
    except (TypeError, ValueError) as exc:
        raise CliError(f"--type {spec!r} is not a type a store can hold: {exc}") from exc
    return obj


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
    times = {key: _when(data[key]) for key in ("created_ns", "last_update_ns")}
    if args.json:
        data["created_utc"] = times["created_ns"]
        data["last_update_utc"] = times["last_update_ns"]
        _out(_json(data))
        return EXIT_OK
    width = max(map(len, data))
    for key, value in data.items():
        shown = str(value)
        if key in times:
            when = times[key]
            shown += f"  ({when}, {_age(value)} ago)" if when else "  (never)"
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
    with (
        _opened(args.name) as st,
        st.subscribe(after_version=args.after, timeout=WATCH_SLICE) as sub,
    ):
        while True:
            try:
                for version, value in sub:
                    _out(_json({"version": version, "value": value}))
            except SubscriberLaggedError as lag:
                print(f"shmstore: {lag}", file=sys.stderr)
            except TimeoutError:
                continue


def cmd_set(args: argparse.Namespace) -> int:
    text = _read_stdin() if args.value == "-" else args.value
    type_ = _import_type(args.type) if args.type else None
    with _opened(args.name, type_, inspect=False) as st:
        try:
            value = msgspec.json.decode(text, type=st.value_type)
        except msgspec.DecodeError as exc:
            raise CliError(f"value is not valid for {args.type or 'the store'}: {exc}") from exc
        if st.mirror_status.role == "replica":
            st.set(value, args.expect)  # refused, with the message that names the origin
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
    from ._inventory import SHM_DIR, find_orphans, gc_verdict, listing_supported  # noqa: PLC0415

    if not listing_supported():
        raise CliError("gc needs /dev/shm and /proc (Linux)")
    orphans = find_orphans()
    if orphans.unreadable_processes:
        raise CliError(
            f"cannot inspect {orphans.unreadable_processes} process(es) that might use a store; "
            "run gc as root (or their owner) to decide safely"
        )
    doing = "removing" if args.yes else "would remove"
    prefix = args.prefix or ""
    # A stray semaphore's name carries only a hash: with --prefix, nothing says whose it was.
    strays = [] if prefix else list(orphans.stray_semaphores)
    doomed: list[str] = []
    kept = 0
    for name in orphans.unused_stores:
        if not name.startswith(prefix):
            continue
        try:
            with _opened(name) as st:
                verdict = gc_verdict(
                    st.statistics(), older_than=args.older_than, everything=args.all
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
    if args.yes:
        _out(f"removed {total} object(s); reclaimed {reclaimed} dead reader entr(ies){kept_note}")
    else:
        _out(f"{total} object(s) to remove; run with --yes to remove them{kept_note}")
    return EXIT_ERROR if failed else EXIT_OK


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

    return run_demo(readers=args.readers, seconds=args.seconds, rate=args.rate)


# ---------------------------------------------------------------------------- parser
# argparse names a type function in its "invalid <name> value" message: these raise
# ArgumentTypeError themselves, so every message talks about the value, not about a helper.


def _number(text: str, kind: Callable[[str], Any], what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value: int = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value: float = _number(text, float, "a number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _readers(text: str) -> int:
    from ._demo import MAX_READERS  # noqa: PLC0415

    value = _positive_int(text)
    if value > MAX_READERS:
        raise argparse.ArgumentTypeError(f"at most {MAX_READERS} reader processes, got {value}")
    return value


def _rate(text: str) -> float:
    from ._demo import MAX_RATE  # noqa: PLC0415

    value = _positive_float(text)
    if value > MAX_RATE:
        raise argparse.ArgumentTypeError(f"at most {MAX_RATE:.0f} per second, got {text!r}")
    return value


def _version(text: str) -> int:
    value: int = _number(text, int, "a version number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"a version is >= 0, got {value}")
    return value


def _duration(text: str) -> float:
    from ._inventory import parse_duration  # noqa: PLC0415

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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

    p = verb(
        "gc",
        cmd_gc,
        "remove stores abandoned by crashed processes, and stray semaphores (dry run unless --yes)",
    )
    p.add_argument("--yes", action="store_true", help="really remove (default: dry run)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--older-than",
        type=_duration,
        metavar="AGE",
        help="also unused stores idle this long (90s, 30m, 12h, 7d)",
    )
    which.add_argument("--all", action="store_true", help="every store no live process has open")
    p.add_argument(
        "--prefix",
        metavar="TEXT",
        help="only stores whose names start with TEXT (stray semaphores are then left alone)",
    )

    p = verb(
        "bench",
        cmd_bench,
        "run a benchmark program from benchmarks/ (harness, core, wake, fsm, mirror)",
    )
    p.add_argument("which", choices=BENCHMARKS)
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed on, e.g. -- --rounds 3")

    p = verb("demo", cmd_demo, "an FSM worker and reader processes sharing one store, live")
    p.add_argument("--readers", type=_readers, default=3, help="reader processes (3, at most 256)")
    p.add_argument("--seconds", type=_positive_float, default=5.0, help="how long (5)")
    p.add_argument("--rate", type=_rate, default=1000.0, help="commits per second (1000)")

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
        except ValueError as exc:
            raise CliError(str(exc)) from None
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
        print(f"shmstore: {exc}", file=sys.stderr)
        return exc.code
    except StateStoreError as exc:
        print(f"shmstore: {exc}", file=sys.stderr)
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
            f"shmstore: internal error: {type(exc).__name__}: {exc} "
            "(SHMSTORE_TRACEBACK=1 shows where; please report it)",
            file=sys.stderr,
        )
        return EXIT_ERROR


def _silence_stdout() -> None:
    # The reader went away: flushing stdout at exit would fail again and print to stderr.
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
