"""Process entry points for tests/test_permissions.py and tests/test_conveniences.py.

The other-user workers start as root (the test runs as root), import everything they will need,
then drop to another uid, gid and supplementary groups before touching the store: after that
they may not be able to read the interpreter's own files (``/root`` is private), so nothing may
be imported lazily. Every outcome goes back through a ``Pipe`` as plain data: exception *names*
and messages, never tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from typing import Any

from shmstore import AsyncStore, StateStoreError, Store, _provision
from shmstore._names import segment_name

STEP = 60.0  # seconds: bounds a hang, never a speed


def become(uid: int, gid: int, groups: list[int]) -> None:
    """Drop root for good: supplementary groups first, then the gid, then the uid."""
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except (StateStoreError, OSError, TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)


def other_user_session(
    name: str, conn: Connection, *, uid: int, gid: int, groups: list[int], plan: dict[str, Any]
) -> None:
    """Open store *name* as another user and report what that user can do.

    Reports ``{"open": ...}`` first; if the open worked, ``"ready"`` with the handle's state, then
    waits for the version the parent names (``{"wait_for": v}``), optionally commits
    (``plan["commit"]``) and reports everything in one dict.
    """
    become(uid, gid, groups)
    report: dict[str, Any] = {"euid": os.geteuid()}
    kwargs: dict[str, Any] = {"allow_other_owner": plan.get("allow_other_owner", True)}
    if "readonly" in plan:
        kwargs["readonly"] = plan["readonly"]
    try:
        st = Store.open(name, int, **kwargs)
    except (StateStoreError, OSError) as exc:
        conn.send({**report, "open": type(exc).__name__, "message": str(exc)})
        return
    with st:
        report.update(
            open="ok",
            readonly=st.readonly,
            writable=st.writable,
            wait_mode=st.wait_mode,
            value=st.get(),
            version=st.version,
        )
        stats = st.statistics()
        report["stats_readonly"] = stats.readonly
        report["stats_wait_mode"] = stats.wait_mode
        report["set"] = _outcome(lambda: st.set(-1))
        report["update"] = _outcome(lambda: st.update(lambda v: (v or 0) + 1))
        report["unlink"] = _outcome(st.unlink)  # sticky /dev/shm: only the owner may remove
        conn.send(report)
        if not conn.poll(STEP):
            return
        command = conn.recv()
        got = _outcome(lambda: st.wait(command["wait_for"], timeout=STEP))
        done: dict[str, Any] = {"waited": got, "wait_mode": st.wait_mode}
        if plan.get("commit") is not None:
            done["commit"] = _outcome(lambda: st.set(plan["commit"]))
        conn.send(done)


def other_user_create(
    name: str,
    conn: Connection,
    *,
    uid: int,
    gid: int,
    groups: list[int],
    group: int,
    mode: int = 0o640,
) -> None:
    """Try to create store *name* with ``group=group`` as another user; report the outcome
    (the segment's gid if it was created)."""
    become(uid, gid, groups)

    def create() -> int:
        with Store.create(name, int, mode=mode, group=group):
            return os.stat("/dev/shm/" + segment_name(name).lstrip("/")).st_gid

    conn.send(_outcome(create))


def open_or_create_racer(name: str, start: Barrier, conn: Connection) -> None:
    """Race the others to ``open_or_create``; report whether this process made the store (a spy
    on the provisioning step that only the creator completes) and the store's ``created_ns``."""
    created: list[bool] = []
    real_create = _provision.create

    def spy(*args: Any, **kwargs: Any) -> Any:
        attached = real_create(*args, **kwargs)
        created.append(True)
        return attached

    _provision.create = spy  # type: ignore[assignment]
    start.wait(STEP)
    with Store.open_or_create(name, int, slots=4) as st:
        conn.send((bool(created), st.created_ns, st.geometry.slots, os.getpid()))


def incrementer(name: str, start: Barrier, n: int, use_async: bool) -> None:
    """``n`` increments of the store's int through ``update``, sync or async."""
    start.wait(STEP)
    if use_async:

        async def run() -> None:
            async with AsyncStore.open(name, int) as ast:
                for _ in range(n):
                    await ast.update(lambda v: (v or 0) + 1)

        asyncio.run(run())
    else:
        with Store.open(name, int) as st:
            for _ in range(n):
                st.update(lambda v: (v or 0) + 1)


def bumper(name: str, conn: Connection) -> None:
    """Commit once per request (``"bump"``) and answer with the new version; ``"stop"`` ends."""
    with Store.open(name, int) as st:
        conn.send("ready")
        while conn.poll(STEP):
            if conn.recv() == "stop":
                return
            conn.send(st.set(st.version * 10))


def registered_reader(name: str, conn: Connection) -> None:
    """Register as a waiter of store *name* (a first, timed-out wait), say so, then block until
    killed (or told to go)."""
    with Store.open(name, int) as st:
        with contextlib.suppress(TimeoutError):
            st.wait(st.version, timeout=0.01)
        conn.send("registered")
        conn.poll(STEP)


def other_user_follow_growth(
    name: str, conn: Connection, *, uid: int, gid: int, groups: list[int]
) -> None:
    """As another user, read a ``bytes`` store, wait for the parent's next commit (which grows
    the store into a new ring) and report the new value's length and the handle's state."""
    become(uid, gid, groups)

    def follow() -> tuple[int, int, bool]:
        with Store.open(name, bytes, allow_other_owner=True) as st:
            seen = st.version
            conn.send(("ready", seen))
            version = st.wait(seen, timeout=STEP)
            value = st.get()
            return version, len(value or b""), st.readonly

    conn.send(_outcome(follow))
