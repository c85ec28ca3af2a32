"""shmstore.fsm snapshot types: the original DTOs' behaviour, fact by fact (issue 12)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import time
import uuid
from typing import Any

import msgspec
import pytest

from shmstore.fsm import (
    FsmSnapshotDTO,
    FsmState,
    TransitionDTO,
    TransitionStatus,
    create_transition,
    initial_snapshot,
    next_snapshot,
)

SNAPSHOT_FIELDS = [
    ("version", dataclasses.MISSING),
    ("state", dataclasses.MISSING),
    ("reason", ""),
    ("ts_mono", 0.0),
    ("ts_wall", 0.0),
    ("snapshot_id", ""),
    ("prev_state", None),
    ("fsm_instance_id", ""),
    ("source_module", "fsm_handler"),
    ("attempt_count", 0),
    ("history", None),
    ("context_data", None),
    ("state_metadata", None),
]
TRANSITION_FIELDS = [
    ("from_state", dataclasses.MISSING),
    ("to_state", dataclasses.MISSING),
    ("trigger_event", dataclasses.MISSING),
    ("status", TransitionStatus.SUCCESS),
    ("error_message", ""),
    ("ts_mono", 0.0),
    ("ts_wall", 0.0),
]


def is_uuid4(text: str) -> bool:
    return uuid.UUID(text).version == 4 and str(uuid.UUID(text)) == text


def transition(i: int = 0) -> TransitionDTO:
    return create_transition(FsmState.IDLE, FsmState.ACTIVE, trigger=f"E{i}")


# ---------------------------------------------------------------- enums


def test_enum_values() -> None:
    assert {s.name: int(s) for s in FsmState} == {
        "UNSPECIFIED": 0,
        "BOOTING": 1,
        "IDLE": 2,
        "ACTIVE": 3,
        "ERROR_STATE": 4,
        "SHUTDOWN": 5,
    }
    assert {s.name: int(s) for s in TransitionStatus} == {
        "UNSPECIFIED": 0,
        "SUCCESS": 1,
        "FAILED": 2,
        "PENDING": 3,
    }


# ---------------------------------------------------------------- the dataclass protocol


@pytest.mark.parametrize(
    ("cls", "expected"),
    [(FsmSnapshotDTO, SNAPSHOT_FIELDS), (TransitionDTO, TRANSITION_FIELDS)],
    ids=["snapshot", "transition"],
)
def test_fields_order_and_defaults_are_the_originals(
    cls: type[Any], expected: list[tuple[str, Any]]
) -> None:
    assert dataclasses.is_dataclass(cls)
    assert [(f.name, f.default) for f in dataclasses.fields(cls)] == expected
    assert cls.__dataclass_params__.frozen is True


@pytest.mark.parametrize(
    ("cls", "expected"),
    [(FsmSnapshotDTO, SNAPSHOT_FIELDS), (TransitionDTO, TRANSITION_FIELDS)],
    ids=["snapshot", "transition"],
)
def test_signature_is_the_originals(cls: type[Any], expected: list[tuple[str, Any]]) -> None:
    params = inspect.signature(cls).parameters.values()
    empty = inspect.Parameter.empty
    assert [(p.name, dataclasses.MISSING if p.default is empty else p.default) for p in params] == (
        expected
    )


def test_instances_are_frozen_dataclasses() -> None:
    t = transition()
    s = FsmSnapshotDTO(version=1, state=FsmState.IDLE, history=[t], context_data={"k": [1]})
    for obj in (s, t):
        assert dataclasses.is_dataclass(obj)
        assert not isinstance(obj, type)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.version = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.trigger_event = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del s.reason  # type: ignore[misc]
    assert s.version == 1
    assert t.trigger_event == "E0"


def test_replace_asdict_astuple() -> None:
    t = transition()
    s = FsmSnapshotDTO(version=1, state=FsmState.IDLE, history=[t], context_data={"k": [1]})
    r = dataclasses.replace(s, version=7, reason="replaced")
    assert type(r) is FsmSnapshotDTO
    assert (r.version, r.reason, r.snapshot_id, r.history) == (7, "replaced", s.snapshot_id, (t,))
    assert (s.version, s.reason) == (1, "")
    d = dataclasses.asdict(s)
    assert list(d) == [name for name, _ in SNAPSHOT_FIELDS]
    assert d["history"] == (dataclasses.asdict(t),)
    assert d["history"][0]["trigger_event"] == "E0"
    assert d["context_data"] == {"k": [1]}
    assert d["context_data"] is not s.context_data  # asdict deep-copies, as for a dataclass
    assert dataclasses.astuple(t)[:3] == (FsmState.IDLE, FsmState.ACTIVE, "E0")
    with pytest.raises(TypeError):
        dataclasses.replace(s, no_such_field=1)  # type: ignore[call-arg]


def test_pickle_copy_and_hash() -> None:
    t = transition()
    s = FsmSnapshotDTO(version=1, state=FsmState.IDLE, history=[t])
    assert pickle.loads(pickle.dumps(s)) == s
    assert copy.deepcopy(s) == s
    assert copy.copy(t) == t
    assert hash(t) == hash(copy.deepcopy(t))  # frozen: transitions are hashable


# ---------------------------------------------------------------- construction normalises


def test_transition_signature_and_timestamps() -> None:
    before_mono, before_wall = time.monotonic(), time.time()
    t = TransitionDTO(FsmState.IDLE, FsmState.ACTIVE, "GO")
    assert (t.status, t.error_message) == (TransitionStatus.SUCCESS, "")
    assert before_mono <= t.ts_mono <= time.monotonic()
    assert before_wall <= t.ts_wall <= time.time()
    fixed = TransitionDTO(FsmState.IDLE, FsmState.ACTIVE, "GO", ts_mono=5.0, ts_wall=6.0)
    assert (fixed.ts_mono, fixed.ts_wall) == (5.0, 6.0)
    zero = TransitionDTO(FsmState.IDLE, FsmState.ACTIVE, "GO", ts_mono=0.0, ts_wall=0.0)
    assert zero.ts_mono > 0.0
    assert zero.ts_wall > 0.0


def test_snapshot_normalises_history() -> None:
    t0, t1 = transition(0), transition(1)
    assert FsmSnapshotDTO(version=0, state=FsmState.IDLE).history == ()
    assert FsmSnapshotDTO(version=0, state=FsmState.IDLE, history=None).history == ()
    assert FsmSnapshotDTO(version=0, state=FsmState.IDLE, history=[t0, t1]).history == (t0, t1)
    from_gen = FsmSnapshotDTO(version=0, state=FsmState.IDLE, history=(t for t in [t0]))
    assert from_gen.history == (t0,)
    assert type(from_gen.history) is tuple
    with pytest.raises(TypeError):
        FsmSnapshotDTO(version=0, state=FsmState.IDLE, history=123)  # type: ignore[arg-type]


def test_snapshot_normalises_dicts_times_and_ids() -> None:
    before_mono, before_wall = time.monotonic(), time.time()
    s = FsmSnapshotDTO(
        version=0, state=FsmState.IDLE, context_data=None, state_metadata=None, ts_mono=0.0
    )
    assert (s.context_data, s.state_metadata) == ({}, {})
    assert before_mono <= s.ts_mono <= time.monotonic()
    assert before_wall <= s.ts_wall <= time.time()
    assert is_uuid4(s.snapshot_id)
    assert is_uuid4(s.fsm_instance_id)
    assert s.snapshot_id != s.fsm_instance_id
    other = FsmSnapshotDTO(version=0, state=FsmState.IDLE, snapshot_id="", fsm_instance_id="")
    assert other.snapshot_id != s.snapshot_id
    kept = FsmSnapshotDTO(
        version=0,
        state=FsmState.IDLE,
        ts_mono=1.5,
        ts_wall=2.5,
        snapshot_id="snap",
        fsm_instance_id="fsm",
        context_data={"a": 1},
    )
    assert (kept.ts_mono, kept.ts_wall, kept.snapshot_id, kept.fsm_instance_id) == (
        1.5,
        2.5,
        "snap",
        "fsm",
    )
    assert kept.context_data == {"a": 1}


def test_positional_construction_in_field_order() -> None:
    s = FsmSnapshotDTO(3, FsmState.ACTIVE, "why", 1.0, 2.0, "sid", FsmState.IDLE, "fid", "mod", 4)
    assert (s.version, s.state, s.reason, s.prev_state, s.source_module, s.attempt_count) == (
        3,
        FsmState.ACTIVE,
        "why",
        FsmState.IDLE,
        "mod",
        4,
    )
    assert (s.history, s.context_data) == ((), {})
    with pytest.raises(TypeError):
        FsmSnapshotDTO(3, FsmState.ACTIVE, version=4)  # type: ignore[misc]


# ---------------------------------------------------------------- the decode path


def test_decoded_snapshot_equals_the_original_field_for_field() -> None:
    s = next_snapshot(initial_snapshot(), FsmState.IDLE, "booted", transition())
    s = dataclasses.replace(s, context_data={"n": 1, "l": [1, "x"]}, state_metadata={"m": None})
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(s), type=FsmSnapshotDTO)
    assert back == s
    for f in dataclasses.fields(FsmSnapshotDTO):
        assert getattr(back, f.name) == getattr(s, f.name), f.name
    assert type(back.history) is tuple
    assert type(back.state) is FsmState
    assert type(back.history[0].status) is TransitionStatus


def test_decoding_does_not_run_the_normaliser() -> None:
    """The read path stays msgspec's: bytes with a 0.0 timestamp and empty ids decode as they
    are (a normaliser would have stamped them), so no Python code runs per decoded object."""
    raw = {
        "version": 1,
        "state": 2,
        "reason": "",
        "ts_mono": 0.0,
        "ts_wall": 0.0,
        "snapshot_id": "",
        "prev_state": None,
        "fsm_instance_id": "",
        "source_module": "x",
        "attempt_count": 0,
        "history": [
            {"from_state": 1, "to_state": 2, "trigger_event": "E", "ts_mono": 0.0, "ts_wall": 0.0}
        ],
        "context_data": {},
        "state_metadata": {},
    }
    got = msgspec.msgpack.decode(msgspec.msgpack.encode(raw), type=FsmSnapshotDTO)
    assert (got.ts_mono, got.ts_wall, got.snapshot_id, got.fsm_instance_id) == (0.0, 0.0, "", "")
    assert (got.history[0].ts_mono, got.history[0].ts_wall) == (0.0, 0.0)


# ---------------------------------------------------------------- helpers


def test_add_transition_trims_only_with_a_positive_limit() -> None:
    ts = [transition(i) for i in range(6)]
    s = initial_snapshot()
    grown = s
    for t in ts:
        grown = grown.add_transition(t)
    assert grown.history == tuple(ts)
    assert s.history == ()  # immutable: a new snapshot each time
    assert grown.add_transition(ts[0], max_history=3).history == (ts[4], ts[5], ts[0])
    for unbounded in (None, 0, -1):
        assert len(grown.add_transition(ts[0], max_history=unbounded).history) == 7
    assert grown.add_transition(ts[0], max_history=1).history == (ts[0],)


def test_create_transition_keywords_are_trigger_and_error_msg() -> None:
    t = create_transition(
        from_state=FsmState.ACTIVE,
        to_state=FsmState.ERROR_STATE,
        trigger="FAULT",
        status=TransitionStatus.FAILED,
        error_msg="sensor lost",
    )
    assert (t.from_state, t.to_state, t.trigger_event, t.status, t.error_message) == (
        FsmState.ACTIVE,
        FsmState.ERROR_STATE,
        "FAULT",
        TransitionStatus.FAILED,
        "sensor lost",
    )
    plain = create_transition(FsmState.IDLE, FsmState.ACTIVE, "GO")
    assert (plain.status, plain.error_message) == (TransitionStatus.SUCCESS, "")
    assert plain.ts_mono > 0
    with pytest.raises(TypeError):
        create_transition(FsmState.IDLE, FsmState.ACTIVE, trigger_event="GO")  # type: ignore[call-arg]


def test_next_snapshot_on_a_state_change() -> None:
    s0 = dataclasses.replace(
        initial_snapshot(), context_data={"k": 1}, state_metadata={"m": 2}, attempt_count=3
    )
    t = create_transition(s0.state, FsmState.IDLE, trigger="BOOTED")
    s1 = next_snapshot(s0, FsmState.IDLE, "booted", t)
    assert (s1.version, s1.state, s1.prev_state, s1.reason, s1.attempt_count) == (
        1,
        FsmState.IDLE,
        FsmState.BOOTING,
        "booted",
        4,
    )
    assert s1.snapshot_id != s0.snapshot_id
    assert is_uuid4(s1.snapshot_id)
    assert (s1.fsm_instance_id, s1.source_module) == (s0.fsm_instance_id, s0.source_module)
    assert s1.history == (t,)
    assert (s1.context_data, s1.state_metadata) == ({"k": 1}, {"m": 2})
    assert s1.context_data is not s0.context_data
    assert s1.state_metadata is not s0.state_metadata
    assert s1.ts_mono >= s0.ts_mono


def test_next_snapshot_without_a_state_change() -> None:
    s1 = next_snapshot(initial_snapshot(), FsmState.IDLE, "booted")
    same = next_snapshot(s1, FsmState.IDLE, "still idle")
    assert (same.version, same.prev_state, same.attempt_count) == (1, FsmState.BOOTING, 1)
    assert same.history == ()
    assert same.snapshot_id != s1.snapshot_id
    long = s1
    for i in range(150):  # the helper never trims: that is the store's max_history
        long = next_snapshot(long, FsmState.IDLE, "tick", transition(i))
    assert len(long.history) == 150


def test_initial_snapshot() -> None:
    before = time.time()
    s = initial_snapshot()
    assert (s.version, s.state, s.prev_state, s.reason, s.source_module, s.attempt_count) == (
        0,
        FsmState.BOOTING,
        None,
        "COLD_START",
        "initial_boot",
        0,
    )
    assert before <= s.ts_wall <= time.time()
    assert s.ts_mono > 0
    assert (s.history, s.context_data, s.state_metadata) == ((), {}, {})
