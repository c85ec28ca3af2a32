"""Hardening round 3 (issue 20): each test reproduces one way the store was broken, and failed
on the code before the fix. Victims of machine-wide conditions (a full ``/dev/shm``) run in a
child interpreter inside a private mount namespace, with a small tmpfs of their own at
``/dev/shm``: the machine's ``/dev/shm`` is never filled or remounted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import objects_of

import shmstore
from shmstore import Store
from shmstore.fsm import FsmSnapshotDTO

HANG = 120  # seconds: bounds a hang, never a performance goal

can_unshare = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or sys.platform != "linux",
    reason="needs root and unshare(1) for a private /dev/shm",
)


def run_in_private_shm(script: str, size: str = "1m") -> dict[str, str]:
    """Run *script* in a fresh interpreter whose ``/dev/shm`` is a private tmpfs of *size*;
    it prints one JSON object, returned here."""
    command = f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec {sys.executable} -c "$0"'
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            command,
            textwrap.dedent(script),
        ],
        capture_output=True,
        text=True,
        timeout=HANG,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


FILL_AND_WAIT = """
import asyncio, json, os
import shmstore
from shmstore import AsyncStore, StateStoreError, Store

def fill():
    with open("/dev/shm/filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\\0" * 4096)
        except OSError:
            pass

def outcome(call):
    try:
        call()
    except StateStoreError as exc:
        return "StateStoreError: " + str(exc)
    except BaseException as exc:
        return "bare " + type(exc).__name__ + ": " + str(exc)
    return "returned"

from shmstore.fsm import AsyncStateStore

async def fsm_subscribe(fsm):
    await fsm.subscribe("s")

st = Store.create("victim", dict)
st.set({"a": 1})
ast = AsyncStore.open("victim", dict)
fsm = AsyncStateStore(name="fsm-victim", checkpoint_every=None)
fill()
out = {"sync": outcome(lambda: st.wait(1, timeout=0.5, spin=False))}
out["async"] = outcome(lambda: asyncio.run(ast.wait(1, timeout=0.5)))
out["fsm"] = outcome(lambda: asyncio.run(fsm_subscribe(fsm)))
out["value"] = repr(st.get_with_version())
print(json.dumps(out))
"""


@can_unshare
def test_wait_on_a_full_dev_shm_says_what_is_full() -> None:
    """Issue 20, item 4: ``sem_open`` fails with ENOSPC, and a bare ``OSError`` escaped."""
    out = run_in_private_shm(FILL_AND_WAIT)
    for kind in ("sync", "async", "fsm"):
        assert out[kind].startswith("StateStoreError: "), out
        assert "/dev/shm is full" in out[kind]
        assert "[Errno" not in out[kind]
    assert out["value"] == "({'a': 1}, 1)"


def test_a_history_that_is_not_iterable_says_so_as_the_original_did() -> None:
    """Issue 20, item 16: the original's ``tuple(history)`` said "object is not iterable", and
    the original FSM tests match that text."""
    with pytest.raises(TypeError, match="object is not iterable") as raised:
        FsmSnapshotDTO(version=1, state="IDLE", history=5)  # type: ignore[arg-type]
    assert "history must be an iterable of TransitionDTO" in str(raised.value)


def test_unlink_of_an_orphaned_handle_leaves_the_new_store_alone(store_name: str) -> None:
    """Issue 20 ("an orphan never touches the name's new store"): ``unlink()`` of a handle
    whose store was removed removed whatever store had the name by then."""
    orphan = Store.create(store_name, int, slot_size=64)
    try:
        orphan.set(1)
        shmstore.remove(store_name)
        with Store.create(store_name, int) as new:
            new.set(42)
            orphan.unlink()  # removes only what is provably the orphan's
            with Store.open(store_name, int) as fresh:
                assert fresh.get_with_version() == (42, 1)
            assert objects_of(store_name)  # the new store's segment is still there
    finally:
        orphan.close()
