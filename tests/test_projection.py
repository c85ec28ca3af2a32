"""Projection reads: a few fields of a big value, decoded alone, never torn."""

from __future__ import annotations

import msgspec
import pytest

from shmstore import AsyncStore, SchemaMismatchError, Store


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
