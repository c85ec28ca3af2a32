"""Chaos soak: writers and readers SIGKILLed and restarted at random while invariants hold.

Two writers CAS-increment a counter (so the committed value is always ``version - 1``), three
readers follow it (two sleeping in ``wait()``, one polling), and a monkey SIGKILLs a random one
every 50-500 ms and starts a replacement. Checked all along: no reader sees a version go back or a
value that does not match its version (torn or misdirected), no process is stuck for more than
2 s, and waiting readers always find a registry entry although dead ones are never unregistered
(``max_readers`` is small, so a leak would show as ``RegistryFullError``). At the end: the counter
equals the number of commits, dead entries are reclaimed, and nothing is left in ``/dev/shm``.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from pathlib import Path
from typing import Any

import pytest
from workers import chaos_reader, chaos_writer

from shmstore import Store

ctx = mp.get_context("spawn")
STUCK = 2.0
SPAWN_GRACE = 10.0  # a replacement is not "stuck" while its interpreter starts


def soak(store_name: str, seconds: float, violations_dir: Path) -> dict[str, int]:
    roles: list[tuple[str, Any, dict[str, Any]]] = [
        ("writer", chaos_writer, {}),
        ("writer", chaos_writer, {}),
        ("reader", chaos_reader, {"waits": True}),
        ("reader", chaos_reader, {"waits": True}),
        ("reader", chaos_reader, {"waits": False}),
    ]
    # Lock-free shared memory only: a worker may be killed anywhere, including inside a
    # multiprocessing primitive, whose lock would then stay held and hang everyone else.
    heartbeats = ctx.RawArray("d", len(roles))
    stop = ctx.RawValue("b", 0)
    rng = random.Random(20261128)
    kills = {"writer": 0, "reader": 0}

    def start(slot: int) -> Any:
        _role, target, extra = roles[slot]
        heartbeats[slot] = time.monotonic() + SPAWN_GRACE
        p = ctx.Process(
            target=target,
            args=(store_name, slot),
            kwargs={
                "heartbeats": heartbeats,
                "violations": str(violations_dir),
                "stop": stop,
                **extra,
            },
            daemon=True,
        )
        p.start()
        return p

    found: list[str] = []
    with Store.create(store_name, int, max_readers=4) as st:
        st.set(0)
        procs = [start(slot) for slot in range(len(roles))]
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(0.05, 0.5))  # the monkey's pace, not synchronization
                now = time.monotonic()
                for slot, p in enumerate(procs):
                    if p.exitcode is not None:
                        found.append(f"{roles[slot][0]} {slot} exited with {p.exitcode}")
                    elif now - heartbeats[slot] > STUCK:
                        found.append(
                            f"{roles[slot][0]} {slot} stuck for {now - heartbeats[slot]:.1f} s"
                        )
                victim = rng.randrange(len(procs))
                procs[victim].kill()
                procs[victim].join(30)
                kills[roles[victim][0]] += 1
                procs[victim] = start(victim)
        finally:
            stop.value = 1
            for p in procs:
                p.join(30)
                if p.is_alive():
                    found.append(f"{p.name} did not stop")
                    p.kill()
                    p.join()
        for report in sorted(violations_dir.iterdir()):
            found += report.read_text().splitlines()
        value, version = st.get_with_version()
        stats = st.statistics()
        # Every commit was one increment, and none was lost or half-done.
        assert value == version - 1
        assert stats.commits == version
        # Dead readers' entries (all were killed or stopped) are reclaimed by a registration.
        with pytest.raises(TimeoutError):
            st.wait(version, timeout=0.01)
        assert [pid for _i, pid, _alive in st._registry.entries()] == [st._pid]
    assert found == []
    return {"commits": version, **{f"{k}_kills": n for k, n in kills.items()}}


def test_chaos_soak_short(store_name: str, tmp_path: Path) -> None:
    result = soak(store_name, 10.0, tmp_path)
    assert result["commits"] > 1000
    assert result["writer_kills"] + result["reader_kills"] >= 10


@pytest.mark.slow
def test_chaos_soak(store_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    seconds = request.config.getoption("--soak-seconds")
    result = soak(store_name, seconds, tmp_path)
    assert result["writer_kills"] + result["reader_kills"] >= seconds
