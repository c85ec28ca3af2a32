"""The store's type as data (``_schema``): descriptions round-trip, rebuilt types read and write
the same bytes, and the description says what a reader of the store needs to know."""

from __future__ import annotations

import dataclasses
import datetime
import json
import typing
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schema_strategies import Color, type_pairs

from shmstore._schema import describe, rebuild, render

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.data())
def test_rebuilt_types_read_and_write_the_same_bytes(data: st.DataObject) -> None:
    tp, values = data.draw(type_pairs(3))
    description = describe(tp)
    json.dumps(description)  # JSON-able as it is
    rebuilt = rebuild(description)
    assert describe(rebuilt) == description
    for _ in range(3):
        value = data.draw(values)
        encoded = msgspec.msgpack.encode(value)
        as_rebuilt = msgspec.msgpack.decode(encoded, type=rebuilt)
        assert msgspec.msgpack.encode(as_rebuilt) == encoded
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(as_rebuilt), type=tp) == value


class Inner(msgspec.Struct, rename="camel", omit_defaults=True):
    some_value: int = 0


class Tagged(msgspec.Struct, tag_field="kind", tag="t", forbid_unknown_fields=True):
    inner: Inner
    color: Color = Color.RED
    when: datetime.datetime | None = None
    choice: Literal[1, 2] = 1
    limited: typing.Annotated[int, msgspec.Meta(ge=0, lt=10)] = 0


class Node(msgspec.Struct):
    value: int
    children: list[Node] = []


@dataclasses.dataclass
class DC:
    a: int
    b: str = "x"


class TD(typing.TypedDict, total=False):
    a: int


class NT(typing.NamedTuple):
    a: int
    b: str = "x"


def test_the_description_keeps_what_the_wire_depends_on() -> None:
    d = describe(Tagged)
    node = d["defs"]["Tagged"]
    assert (node["tag_field"], node["tag"], node["forbid_unknown_fields"]) == ("kind", "t", True)
    fields = {f["name"]: f for f in node["fields"]}
    assert fields["color"]["type"] == {
        "kind": "enum",
        "name": "Color",
        "members": [["RED", "red"], ["BLUE", "blue"]],
    }
    assert fields["color"]["default"] == "red"
    assert fields["limited"]["type"] == {"kind": "int", "ge": 0, "lt": 10}
    assert fields["choice"]["type"] == {"kind": "literal", "values": [1, 2]}
    inner = d["defs"]["Inner"]
    assert inner["omit_defaults"] is True
    assert inner["fields"][0]["encode_name"] == "someValue"
    text = render(d)
    assert "class Tagged(Struct, tag_field='kind', tag='t', forbid_unknown_fields=True):" in text
    assert "some_value: int = 0  # encoded as 'someValue'" in text


@pytest.mark.parametrize(
    ("tp", "value"),
    [
        (Node, Node(1, [Node(2, [Node(3)])])),
        (DC, DC(1, "y")),
        (TD, {"a": 1}),
        (TD, {}),
        (NT, NT(1, "z")),
        (dict[str, list[tuple[int, str]]], {"k": [(1, "a")]}),
    ],
)
def test_recursive_and_non_struct_types_rebuild(tp: Any, value: Any) -> None:
    rebuilt = rebuild(describe(tp))
    encoded = msgspec.msgpack.encode(value)
    assert msgspec.msgpack.encode(msgspec.msgpack.decode(encoded, type=rebuilt)) == encoded
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode("not it"), type=rebuilt)


def big_type(fields: int = 100) -> Any:
    """A type whose description is far larger than a header slot: 100 fields, each a nested
    Struct of its own."""
    leaf = msgspec.defstruct("Leaf", [("a", int, 0), ("b", list[str], []), ("c", float, 0.0)])
    return msgspec.defstruct(
        "Big",
        [(f"field_number_{i}", leaf, msgspec.field(default_factory=leaf)) for i in range(fields)],
    )


def test_a_hundred_field_nested_type_describes() -> None:
    tp = big_type()
    description = describe(tp)
    assert len(json.dumps(description)) > 10_000
    rebuilt = rebuild(description)
    value = tp()
    encoded = msgspec.msgpack.encode(value)
    assert msgspec.msgpack.encode(msgspec.msgpack.decode(encoded, type=rebuilt)) == encoded


def test_types_without_structure_are_refused() -> None:
    with pytest.raises(TypeError):
        describe(msgspec.Raw)
    with pytest.raises(ValueError, match="format"):
        rebuild({"format": 99})


class InfiniteDefault(msgspec.Struct):
    limit: float = float("inf")


def test_a_default_json_cannot_hold_is_not_described_rather_than_described_wrong() -> None:
    """The description is stored as JSON, where inf and nan do not exist (msgspec writes null):
    a rebuilt type would have a default of None. Such a type has no description (like a custom
    type), so its store records no structure and cannot evolve; it is never recorded wrong."""
    with pytest.raises(TypeError, match="JSON has no inf or nan"):
        describe(InfiniteDefault)

    class InfiniteInAList(msgspec.Struct):
        steps: list[float] = msgspec.field(default_factory=lambda: [1.0, float("-inf")])

    with pytest.raises(TypeError, match="JSON has no inf or nan"):
        describe(InfiniteInAList)
