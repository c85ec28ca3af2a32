"""Projection reads: a few fields of a big value, decoded alone, never torn."""

from __future__ import annotations

import sys

import msgspec
import pytest

from shmstore import AsyncStore, CorruptStoreError, SchemaMismatchError, StateStoreError, Store


class Reading(msgspec.Struct, frozen=True):
    version: int
    state: str
    history: list[int]
    note: str = ""


class Head(msgspec.Struct, frozen=True):
    version: int
    state: str


class WithDefault(msgspec.Struct, frozen=True):
    note: str = ""


def test_projection_decodes_only_its_fields_and_follows_commits(store_name: str) -> None:
    with Store.create(store_name, Reading) as st:
        view = st.projection(Head)
        assert view.get_with_version() == (None, 0)
        st.set(Reading(1, "IDLE", list(range(10_000))))
        first = view.get()
        assert first == Head(1, "IDLE")
        assert view.get() is first  # cached while the version stands
        st.set(Reading(2, "ACTIVE", []))
        assert view.get_with_version() == (Head(2, "ACTIVE"), 2)
        assert st.projection(WithDefault).get() == WithDefault("")
        ast = AsyncStore.open(store_name, Reading)
        try:
            assert ast.projection(Head).get() == Head(2, "ACTIVE")
        finally:
            ast.close()
    with pytest.raises(StateStoreError, match="is closed"):
        view.get()


def test_projection_follows_a_growth(store_name: str) -> None:
    with Store.create(store_name, Reading, slot_size=1024) as writer:
        writer.set(Reading(1, "A", []))
        with Store.open(store_name, Reading) as reader:
            view = reader.projection(Head)
            assert view.get() == Head(1, "A")
            writer.set(Reading(2, "B", list(range(50_000))))  # moves the store
            assert view.get() == Head(2, "B")


class Missing(msgspec.Struct):
    colour: str


class WrongType(msgspec.Struct):
    version: str


class Positional(msgspec.Struct, array_like=True):
    version: int


class Sparse(msgspec.Struct, omit_defaults=True):
    version: int
    note: str = ""


class NeedsNote(msgspec.Struct):
    note: str


@pytest.mark.parametrize(
    ("stored", "projected", "why"),
    [
        (Reading, Missing, "has no field 'colour'"),
        (Reading, WrongType, "Reading.version is"),
        (Reading, Positional, "array_like"),
        (Reading, dict, "needs msgspec Structs"),
        (Sparse, NeedsNote, "omits it when it holds its default"),
    ],
)
def test_incompatible_projections_are_refused(
    store_name: str, stored: type, projected: type, why: str
) -> None:
    with Store.create(store_name, stored) as st:
        with pytest.raises(SchemaMismatchError, match=why):
            st.projection(projected)


def test_fsm_readers_can_read_only_the_state(store_name: str) -> None:
    import asyncio  # noqa: PLC0415

    from shmstore.fsm import (  # noqa: PLC0415
        AsyncStateStore,
        FsmState,
        FsmStateView,
        create_transition,
        next_snapshot,
    )

    async def main() -> None:
        async with AsyncStateStore(name=store_name) as st:
            assert await st.get_state() is None
            current = await st.initialize_if_empty()
            for i in range(120):
                new = FsmState.ACTIVE if i % 2 else FsmState.IDLE
                transition = create_transition(current.state, new, trigger=f"T{i}")
                current = await st.set(next_snapshot(current, new, f"tick {i}", transition))
            head = await st.get_state()
            assert head == FsmStateView(
                version=current.version,
                state=current.state,
                reason=current.reason,
                ts_wall=current.ts_wall,
                prev_state=current.prev_state,
            )
            assert len(current.history) == 100  # what the projection did not have to build
            st.unlink()

    asyncio.run(main())


class CheckedHead(msgspec.Struct, frozen=True):
    """A projection whose decoding runs user code: it must never run on unconfirmed bytes."""

    version: int
    state: str

    def __post_init__(self) -> None:
        frames = []
        frame = sys._getframe()
        while frame is not None:
            frames.append(frame.f_code.co_name)
            frame = frame.f_back
        DECODED_INSIDE.append("read_newest_value" in frames)
        if self.version < 0:
            raise ValueError("a negative version")


DECODED_INSIDE: list[bool] = []


def test_a_projection_that_runs_user_code_decodes_only_confirmed_copies(store_name: str) -> None:
    with Store.create(store_name, Reading) as st:
        view = st.projection(CheckedHead)
        assert view.get() is None
        for version, size in ((1, 10), (2, 5000)):  # copied, and in place for its own type
            st.set(Reading(version, "S", list(range(size))))
            assert view.get() == CheckedHead(version, "S")
        assert DECODED_INSIDE  # it ran (for the decodes and the comparisons)...
        assert True not in DECODED_INSIDE  # ...but never inside the seqlock read
        st.set(Reading(-1, "S", list(range(5000))))
        with pytest.raises(CorruptStoreError, match="does not decode as CheckedHead"):
            view.get()
        # Its own decode still runs in place: the store's type runs no user code.
        assert st.projection(Head).get() == Head(-1, "S")


class Counted(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    count: int = 0
    tags: list[str] = msgspec.field(default_factory=list)


class CountSeven(msgspec.Struct, frozen=True):
    count: int = 7


class CountZero(msgspec.Struct, frozen=True):
    name: str
    count: int = 0
    tags: list[str] = msgspec.field(default_factory=list)


class StrictHead(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    state: str


class StrictAll(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    state: str
    history: list[int]
    note: str = ""


def test_a_projected_default_the_stored_value_does_not_hold_is_refused(store_name: str) -> None:
    """Issue 20, item 2: the stored type omits ``count=0`` on the wire; a projection that
    defaults it to 7 would report 7 for a value holding 0."""
    with Store.create(store_name, Counted) as st:
        st.set(Counted("a", 0))
        with pytest.raises(SchemaMismatchError, match=r"CountSeven.count defaults to 7.*0"):
            st.projection(CountSeven)
        assert st.projection(CountZero).get() == CountZero("a", 0)  # equal defaults are fine


def test_a_strict_projection_of_a_subset_is_refused_when_made(store_name: str) -> None:
    """Issue 20, item 3: a ``forbid_unknown_fields`` projection of fewer fields was accepted,
    then every read failed on the fields it does not have."""
    with Store.create(store_name, Reading) as st:
        st.set(Reading(1, "IDLE", [1, 2]))
        with pytest.raises(SchemaMismatchError, match=r"forbid_unknown_fields.*'history'"):
            st.projection(StrictHead)
        assert st.projection(StrictAll).get() == StrictAll(1, "IDLE", [1, 2])
