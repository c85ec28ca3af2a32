"""The operator's view of ``/dev/shm``: the ``ls``, ``stat``, ``rm``, ``gc`` and ``doctor`` verbs of
the ``shmstore`` command. Which stores exist and who uses them is ``_inventory``'s (and, across
PID namespaces, ``_procview``'s); what a deployment needs is ``_doctor``'s; this module prints."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from ._cli_common import (
    EXIT_ERROR,
    EXIT_OK,
    CliError,
    age,
    clip,
    json_line,
    opened,
    out,
    when,
)
from ._errors import StateStoreError, StoreNotFoundError
from ._store import remove

__all__ = ["cmd_doctor", "cmd_gc", "cmd_ls", "cmd_rm", "cmd_stat"]


def cmd_ls(args: argparse.Namespace) -> int:
    from ._inventory import list_store_names, listing_supported  # noqa: PLC0415

    if not listing_supported():
        raise CliError("listing stores needs /dev/shm (Linux); open a store by name instead")
    rows: list[dict[str, Any]] = []
    for name in list_store_names():
        try:
            with opened(name) as st:
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
        out(json_line(rows))
        return EXIT_OK
    if not rows:
        out("no stores")
        return EXIT_OK
    out(
        f"{'NAME':<28} {'TYPE':<32} {'SCHEMA':<8} {'GEN':>3} {'VERSION':>9} {'SLOTS x SIZE':>16} "
        f"{'READERS':>8} {'AGE':>6}"
    )
    for r in rows:
        if "error" in r:
            out(f"{r['name']:<28} (unreadable: {r['error']})")
            continue
        geometry = f"{r['slots']} x {r['slot_size']}"
        readers = f"{r['readers_alive']}/{r['readers_registered']}"
        type_name = clip(r["type"], 32)
        out(
            f"{r['name']:<28} {type_name:<32} {r['fingerprint'][:8]:<8} "
            f"{r['schema_generation']:>3} {r['version']:>9} "
            f"{geometry:>16} {readers:>8} {age(r['created_ns']):>6}"
        )
    return EXIT_OK


def cmd_stat(args: argparse.Namespace) -> int:
    from ._inventory import unattributed_readers  # noqa: PLC0415

    with opened(args.name) as st:
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
    times = {key: when(data[key]) for key in ("created_ns", "last_update_ns")}
    if args.json:
        data["created_utc"] = times["created_ns"]
        data["last_update_utc"] = times["last_update_ns"]
        data["readers_unattributed"] = [{"entry": r.index, "pid": r.pid} for r in unseen]
        out(json_line(data))
        return EXIT_OK
    data["readers_unattributed"] = len(unseen)
    width = max(map(len, data))
    for key, value in data.items():
        shown = str(value)
        if key in times:
            moment = times[key]
            shown += f"  ({moment}, {age(value)} ago)" if moment else "  (never)"
        elif key == "readers_unattributed" and unseen:
            entries = ", ".join(f"entry {r.index} (pid {r.pid} in its namespace)" for r in unseen)
            shown += (
                f"  ({entries}: alive, but no process this one can see holds it: "
                "another PID namespace, e.g. another container)"
            )
        out(f"{key:<{width}}  {shown}")
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
    # A stray semaphore's or segment's name carries only a hash: with --prefix, nothing says
    # whose it was. Nor is one garbage when /proc may not show a process that still has it open.
    leftovers = [("semaphore", sem) for sem in orphans.stray_semaphores] + [
        ("segment", seg) for seg in orphans.stray_segments
    ]
    strays = [] if prefix or not visibility.complete else leftovers
    if leftovers and not visibility.complete:
        out(
            f"keeping {len(leftovers)} semaphore(s) and segment(s) of removed stores: a process "
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
            out(f"keeping store {name!r}: in use: a process has it open{elsewhere}")
            busy += 1
            continue
        try:
            with opened(name) as st:
                verdict = gc_verdict(
                    st.statistics(),
                    older_than=args.older_than,
                    everything=args.all,
                )
        except StateStoreError as exc:
            if not args.all:
                out(f"keeping store {name!r}: cannot inspect it ({exc}); --all removes it")
                kept += 1
                continue
            reason = f"unreadable ({exc}) (--all)"
        else:
            if not verdict.remove:
                out(f"keeping store {name!r}: {verdict.reason}")
                if verdict.in_use:
                    busy += 1
                else:
                    kept += 1
                continue
            reason = verdict.reason
        out(f"{doing} store {name!r}: {reason}")
        doomed.append(name)
    for kind, file in strays:
        out(f"{doing} {kind} {file}: its store is gone")
    reclaimed = failed = 0
    if args.yes:
        for name in list(doomed):
            try:
                remove(name)
            except StateStoreError as exc:  # another user's store: say so, go on with the rest
                print(f"shmstore: {exc}", file=sys.stderr)
                doomed.remove(name)
                failed += 1
        for kind, file in list(strays):
            try:
                (SHM_DIR / file).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                print(f"shmstore: cannot remove {kind} {file}: {exc.strerror}", file=sys.stderr)
                strays.remove((kind, file))
                failed += 1
        from ._inventory import list_store_names  # noqa: PLC0415

        in_use = [n for n in list_store_names() if n.startswith(prefix)]
        for name in in_use:  # the stores in use: reclaim their dead readers
            with contextlib.suppress(StateStoreError), opened(name, inspect=False) as st:
                reclaimed += st.reclaim_dead_readers()
    total = len(doomed) + len(strays)
    kept_note = (
        f"; kept {kept} unused store(s) (--older-than AGE or --all to remove)" if kept else ""
    )
    if busy:
        kept_note += f"; kept {busy} store(s) in use by processes /proc does not show"
    if args.yes:
        out(f"removed {total} object(s); reclaimed {reclaimed} dead reader entr(ies){kept_note}")
    else:
        out(f"{total} object(s) to remove; run with --yes to remove them{kept_note}")
    return EXIT_ERROR if failed else EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from ._doctor import run_doctor  # noqa: PLC0415

    return run_doctor()
