"""Process entry points of the rolling-upgrade tests (importable by spawned children): three
versions of one snapshot type, and writers and readers that each run one of them."""

from __future__ import annotations

import traceback
from multiprocessing.synchronize import Event
from typing import Any

import msgspec

from shmstore import SchemaMismatchError, Store

WAIT = 60  # seconds: bounds a hang, never a synchronization


class V1(msgspec.Struct):
    name: str
    count: int = 0
    label: str = ""


class V2(msgspec.Struct):
    """V1 plus one field with a default."""

    name: str
    count: int = 0
    label: str = ""
    note: str = "n/a"


class V3(msgspec.Struct):
    """V2 without ``label``, which had a default."""

    name: str
    count: int = 0
    note: str = "n/a"


TYPES = {"V1": V1, "V2": V2, "V3": V3}


def make(kind: str, version: int) -> Any:
    """The value the writer of *kind* commits as *version*: count is the version itself."""
    if kind == "V1":
        return V1(f"v{version}", version, label=f"L{version}")
    if kind == "V2":
        return V2(f"v{version}", version, label=f"L{version}", note=f"N{version}")
    return V3(f"v{version}", version, note=f"N{version}")


def _report(results: Any, fn: Any, *args: Any) -> None:
    try:
        results.put(fn(*args))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def subscriber(  # noqa: PLR0917 -- a process target takes positional arguments
    name: str, kind: str, until: int, ready: Event, tag: str, results: Any
) -> None:
    """Read every version up to *until* with the type *kind*, never reopening the store; report
    what was read as builtins, with the type each value decoded as."""

    def run() -> Any:
        seen: list[tuple[int, str, dict[str, Any]]] = []
        with Store.open(name, TYPES[kind]) as st:
            projection = st.projection(TYPES[kind])
            with st.subscribe(after_version=0, timeout=WAIT) as sub:
                ready.set()
                for version, value in sub:
                    seen.append((version, type(value).__name__, msgspec.to_builtins(value)))
                    if version >= until:
                        break
            final = (st.get(), projection.get(), st.version)
        return (
            "read",
            tag,
            seen,
            msgspec.to_builtins(final[0]),
            msgspec.to_builtins(final[1]),
            final[2],
        )

    _report(results, run)


def writer(  # noqa: PLR0917 -- a process target takes positional arguments
    name: str,
    kind: str,
    first: int,
    last: int,
    evolve: bool,
    done: Event,
    again: Event | None,
    results: Any,
) -> None:
    """Commit versions *first*..*last* with type *kind* (evolving the store first if asked).
    With *again*, wait for it and try one more commit, reporting whether it was refused and
    whether the store was left unchanged."""

    def run() -> Any:
        with Store.open(name, TYPES[kind], evolve=evolve) as st:
            for version in range(first, last + 1):
                assert st.set(make(kind, version), expected_version=version - 1) == version
            done.set()
            if again is None:
                return ("wrote", kind, st.schema_generation)
            assert again.wait(WAIT)
            before = (st.version, msgspec.msgpack.encode(st.get()))
            try:
                st.set(make(kind, 999))
            except SchemaMismatchError as exc:
                after = (st.version, msgspec.msgpack.encode(st.get()))
                return ("refused", str(exc), before == after)
            return ("accepted", kind, st.version)

    _report(results, run)


def late_reader(name: str, kind: str, results: Any) -> None:
    """Open the store with *kind* after the evolutions and read the newest value."""

    def run() -> Any:
        with Store.open(name, TYPES[kind]) as st:
            value = st.get()
            return ("late", kind, type(value).__name__, msgspec.to_builtins(value), st.version)

    _report(results, run)
