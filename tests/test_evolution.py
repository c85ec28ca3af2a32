"""The evolution check (``_evolution``), a pure function of two descriptions: whenever it
accepts, old values read as the new type and new values read as the old type; what it refuses
is named by field and rule."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schema_strategies import mutations, struct_specs, struct_values

from shmstore import SchemaMismatchError
from shmstore._evolution import check_history, check_successor
from shmstore._schema import describe

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _fields(value: Any) -> dict[Any, Any]:
    """Every field of the value (defaults too) by encoded name, or by position for an
    array-like Struct, as builtins."""
    names = type(value).__struct_encode_fields__
    values = [msgspec.to_builtins(getattr(value, f)) for f in type(value).__struct_fields__]
    if type(value).__struct_config__.array_like:
        return dict(enumerate(values))
    return dict(zip(names, values, strict=True))


def _same_field_types(old: Any, new: Any) -> set[Any]:
    """Encoded names (or positions) of fields whose types are described identically."""
    o, n = describe(old), describe(new)
    of = o["defs"][o["type"]["name"]]
    nf = n["defs"][n["type"]["name"]]
    if of.get("array_like"):
        return {
            i
            for i, (a, b) in enumerate(zip(of["fields"], nf["fields"], strict=False))
            if a["type"] == b["type"] and a["type"]["kind"] != "ref"
        }
    by_name = {f["encode_name"]: f for f in nf["fields"]}
    return {
        f["encode_name"]
        for f in of["fields"]
        if f["encode_name"] in by_name
        and by_name[f["encode_name"]]["type"] == f["type"]
        and f["type"]["kind"] != "ref"
    }


@SETTINGS
@given(st.data())
def test_whatever_the_check_accepts_reads_both_ways(data: st.DataObject) -> None:
    spec = data.draw(struct_specs(2))
    candidate = data.draw(mutations(spec))
    old = spec.build()
    try:
        new = candidate.build()
    except (TypeError, ValueError):
        return  # not a valid Struct at all (e.g. a tag on a type that msgspec refuses)
    try:
        check_successor(describe(old), describe(new))
    except SchemaMismatchError:
        event("refused")
        return
    event("accepted")
    kept = _same_field_types(old, new)
    for value in (data.draw(struct_values(old, spec)) for _ in range(3)):
        encoded = msgspec.msgpack.encode(value)
        as_new = msgspec.msgpack.decode(encoded, type=new)  # a new reader of an old value
        back = msgspec.msgpack.decode(msgspec.msgpack.encode(as_new), type=old)  # and back
        old_fields, new_fields, back_fields = _fields(value), _fields(as_new), _fields(back)
        for key in kept:
            assert new_fields.get(key) == old_fields.get(key), key
            assert back_fields.get(key) == old_fields.get(key), key
    for value in (data.draw(struct_values(new, candidate)) for _ in range(3)):
        msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=old)  # an old reader


class V1(msgspec.Struct):
    name: str
    count: int = 0


class V2(msgspec.Struct):
    name: str
    count: int = 0
    note: str = ""


class Retyped(msgspec.Struct):
    name: str
    count: str = ""


class NewRequired(msgspec.Struct, kw_only=True):
    name: str
    count: int = 0
    owner: str


class RemovedRequired(msgspec.Struct):
    count: int = 0


class A1(msgspec.Struct, array_like=True):
    x: int
    y: int = 0


class A2Reordered(msgspec.Struct, array_like=True):
    y: int = 0
    x: int = 0


class A2Appended(msgspec.Struct, array_like=True):
    x: int
    y: int = 0
    z: int = 0


class T1(msgspec.Struct, tag="one"):
    a: int


class T2(msgspec.Struct, tag="two"):
    a: int


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    a: int


class StrictGrown(msgspec.Struct, forbid_unknown_fields=True):
    a: int
    b: int = 0


class Omit1(msgspec.Struct, omit_defaults=True):
    a: int = 0


class Omit2(msgspec.Struct, omit_defaults=True):
    a: int = 1


class Outer1(msgspec.Struct):
    items: list[V1]


class Outer2(msgspec.Struct):
    items: list[Retyped]


class Outer3(msgspec.Struct):
    items: list[V2]


def check(old: Any, new: Any) -> None:
    check_successor(describe(old), describe(new))


@pytest.mark.parametrize(
    ("old", "new"),
    [(V1, V2), (V2, V1), (A1, A2Appended), (Outer1, Outer3), (Outer3, Outer1), (V1, V1)],
)
def test_compatible_successors_pass(old: Any, new: Any) -> None:
    check(old, new)


@pytest.mark.parametrize(
    ("old", "new", "field", "rule"),
    [
        (V1, Retyped, "count", "a field keeps its type"),
        (V1, NewRequired, "owner", "new fields have defaults"),
        (V1, RemovedRequired, "name", "a removed field had a default"),
        (A1, A2Reordered, "x", "array_like structs only append"),
        (T1, T2, "", "tags and tag fields are unchanged"),
        (Strict, StrictGrown, "b", "forbid_unknown_fields gains no fields"),
        (Omit1, Omit2, "a", "with omit_defaults a default is unchanged"),
        (Outer1, Outer2, "items[].count", "a field keeps its type"),
        (V1, A1, "", "array_like is unchanged"),
    ],
)
def test_incompatible_changes_name_the_field_and_the_rule(
    old: Any, new: Any, field: str, rule: str
) -> None:
    with pytest.raises(SchemaMismatchError) as caught:
        check(old, new)
    message = str(caught.value)
    assert rule in message
    if field:
        assert f"field {field!r}" in message


class V3ReAdded(msgspec.Struct):
    name: str
    note: int = 0  # V2 had note: str; V3 drops it, this brings it back with another type


def test_the_check_covers_every_recorded_type() -> None:
    history = [describe(V2), describe(V1)]  # V2, then V1 (note removed: it had a default)
    check_successor(describe(V1), describe(V3ReAdded))  # fine against the newest alone
    with pytest.raises(SchemaMismatchError, match="generation 0, whose readers may still run"):
        check_history(history, describe(V3ReAdded))
