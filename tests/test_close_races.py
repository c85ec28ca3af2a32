"""close() racing other threads of the same handle must never crash the interpreter.

The writer mutex and the slots live in the mapping that close() unmaps, so a close that slips
under a thread still using them would be a segfault. Each scenario runs in a child interpreter,
so that a crash fails this test instead of killing the test run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCENARIOS = {
    "async-wait-timeouts-then-close": """
        import asyncio, contextlib, threading, time
        from shmstore import AsyncStore, Store
        async def main():
            with Store.create(NAME, int):
                for i in range(300):
                    st = AsyncStore.open(NAME, int)
                    with contextlib.suppress(TimeoutError):
                        await st.wait(0, timeout=0.0005)
                    # sweep close() across the background thread's way out
                    time.sleep((i % 30) * 10e-6)
                    st.close()
                    # Map nothing new until stray threads are done: a thread still using the
                    # closed mapping would otherwise write into the next one at the same address.
                    for t in threading.enumerate():
                        if t.name.startswith("shmstore-wait-"):
                            t.join()
        asyncio.run(main())
    """,
    "set-in-threads-while-closing": """
        import threading
        from shmstore import StateStoreError, Store
        unexpected = []
        with Store.create(NAME, int) as owner:
            for _ in range(100):
                st = Store.open(NAME, int)
                def hammer():
                    try:
                        while True:
                            st.set(1)
                    except StateStoreError as exc:
                        if "closed" not in str(exc):
                            unexpected.append(exc)
                    except BaseException as exc:
                        unexpected.append(exc)
                threads = [threading.Thread(target=hammer) for _ in range(2)]
                for t in threads:
                    t.start()
                st.close()
                for t in threads:
                    t.join()
        assert not unexpected, unexpected[:3]
    """,
    "wait-in-threads-while-closing": """
        import threading
        from shmstore import StateStoreError, Store
        unexpected = []
        with Store.create(NAME, int) as owner:
            for _ in range(100):
                st = Store.open(NAME, int)
                def sleeper():
                    try:
                        st.wait(0, timeout=5)
                    except StateStoreError as exc:
                        if "closed" not in str(exc):
                            unexpected.append(exc)
                    except BaseException as exc:
                        unexpected.append(exc)
                threads = [threading.Thread(target=sleeper) for _ in range(3)]
                for t in threads:
                    t.start()
                st.close()
                for t in threads:
                    t.join()
        assert not unexpected, unexpected[:3]
    """,
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_close_racing_other_threads_never_crashes(store_name: str, scenario: str) -> None:
    code = f"NAME = {store_name!r}\n" + textwrap.dedent(SCENARIOS[scenario])
    result = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
