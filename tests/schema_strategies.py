"""Hypothesis strategies for msgspec value types together with strategies for their values, and
for mutations of a Struct type (the candidates an evolution check must judge)."""

from __future__ import annotations

import datetime
import decimal
import enum
import itertools
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from hypothesis import strategies as st


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


_names = itertools.count()

Pair = tuple[Any, st.SearchStrategy[Any]]

LEAVES: list[Pair] = [
    (int, st.integers(-(2**63), 2**63 - 1)),
    (str, st.text(max_size=4)),
    (bool, st.booleans()),
    (float, st.floats(allow_nan=False, allow_infinity=False)),
    (bytes, st.binary(max_size=4)),
    (datetime.datetime, st.datetimes()),
    (datetime.date, st.dates()),
    (uuid.UUID, st.uuids()),
    (decimal.Decimal, st.decimals(allow_nan=False, allow_infinity=False, places=3)),
    (Literal["a", "b"], st.sampled_from(["a", "b"])),
    (Color, st.sampled_from(list(Color))),
    (Level, st.sampled_from(list(Level))),
    (Annotated[int, msgspec.Meta(ge=0, le=100)], st.integers(0, 100)),
    (Annotated[str, msgspec.Meta(max_length=3)], st.text(max_size=3)),
    (int | None, st.none() | st.integers(-5, 5)),
]


@dataclass
class FieldSpec:
    name: str
    tp: Any
    values: st.SearchStrategy[Any]
    default: Any = msgspec.NODEFAULT  # a value, or NODEFAULT (required)


@dataclass
class StructSpec:
    fields: list[FieldSpec]
    options: dict[str, Any]

    def build(self) -> Any:
        name = f"S{next(_names)}"
        fields: list[Any] = []
        for f in self.fields:
            if f.default is msgspec.NODEFAULT:
                fields.append((f.name, f.tp))
            elif isinstance(f.default, (list, dict)) and not f.default:
                # An empty default as users write it (`[]`, `default_factory=list`), which
                # omit_defaults leaves out. (A `lambda: []` factory's it keeps: msgspec cannot
                # see its value. A type rebuilt from the description leaves it out, and every
                # reader decodes the same value; only the bytes differ.)
                fields.append((f.name, f.tp, type(f.default)()))
            elif isinstance(f.default, (list, dict, msgspec.Struct)):
                value = f.default
                fields.append(
                    (f.name, f.tp, msgspec.field(default_factory=lambda v=value: _copy(v)))
                )
            else:
                fields.append((f.name, f.tp, f.default))
        return msgspec.defstruct(name, fields, kw_only=True, **self.options)


def _copy(value: Any) -> Any:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=type(value))


def struct_values(cls: Any, spec: StructSpec) -> st.SearchStrategy[Any]:
    parts = {f.name: f.values for f in spec.fields}
    return st.fixed_dictionaries(parts).map(lambda kw: cls(**kw))


@st.composite
def type_pairs(draw: st.DrawFn, depth: int = 2) -> Pair:
    """A value type and a strategy for its values."""
    choice = draw(st.integers(0, 5 if depth > 0 else 0))
    if choice in (0, 1):
        return draw(st.sampled_from(LEAVES))
    inner_tp, inner = draw(type_pairs(depth - 1))
    if choice == 2:
        return list[inner_tp], st.lists(inner, max_size=3)  # type: ignore[valid-type]
    if choice == 3:
        return dict[str, inner_tp], st.dictionaries(st.text(max_size=3), inner, max_size=3)  # type: ignore[valid-type]
    if choice == 4:
        return tuple[inner_tp, ...], st.lists(inner, max_size=3).map(tuple)  # type: ignore[valid-type]
    spec = draw(struct_specs(depth - 1))
    cls = spec.build()
    return cls, struct_values(cls, spec)


@st.composite
def field_specs(draw: st.DrawFn, name: str, depth: int) -> FieldSpec:
    tp, values = draw(type_pairs(depth))
    default = draw(st.one_of(st.just(msgspec.NODEFAULT), values))
    return FieldSpec(name, tp, values, default)


@st.composite
def struct_specs(draw: st.DrawFn, depth: int = 1) -> StructSpec:
    n = draw(st.integers(0, 4))
    fields = [draw(field_specs(f"f{i}", depth)) for i in range(n)]
    options: dict[str, Any] = {}
    if draw(st.booleans()):
        options["array_like"] = True
    if draw(st.booleans()):
        options["omit_defaults"] = True
    if draw(st.integers(0, 3)) == 0:
        options["forbid_unknown_fields"] = True
    if draw(st.integers(0, 3)) == 0:
        options["rename"] = "camel"
    if draw(st.integers(0, 3)) == 0:
        options["tag"] = draw(st.sampled_from(["a", "b"]))
    return StructSpec(fields, options)


@st.composite
def mutations(draw: st.DrawFn, spec: StructSpec) -> StructSpec:
    """A successor candidate of *spec*: one to three edits of the kinds an evolution may bring,
    allowed or not."""
    fields = list(spec.fields)
    options = dict(spec.options)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                [
                    "add",
                    "add",
                    "remove",
                    "retype",
                    "default",
                    "swap",
                    "option",
                    "redefault",
                ]
            )
        )
        if kind == "add":
            new = draw(field_specs(f"n{next(_names)}", 1))
            fields.insert(draw(st.integers(0, len(fields))), new)
        elif kind == "remove" and fields:
            fields.pop(draw(st.integers(0, len(fields) - 1)))
        elif kind == "retype" and fields:
            i = draw(st.integers(0, len(fields) - 1))
            new = draw(field_specs(fields[i].name, 1))
            fields[i] = new
        elif kind == "default" and fields:
            i = draw(st.integers(0, len(fields) - 1))
            f = fields[i]
            if f.default is msgspec.NODEFAULT:
                fields[i] = FieldSpec(f.name, f.tp, f.values, draw(f.values))
            else:
                fields[i] = FieldSpec(f.name, f.tp, f.values)
        elif kind == "redefault" and fields:
            i = draw(st.integers(0, len(fields) - 1))
            f = fields[i]
            fields[i] = FieldSpec(f.name, f.tp, f.values, draw(f.values))
        elif kind == "swap" and len(fields) > 1:
            i = draw(st.integers(0, len(fields) - 2))
            fields[i], fields[i + 1] = fields[i + 1], fields[i]
        elif kind == "option":
            key = draw(
                st.sampled_from(["array_like", "omit_defaults", "forbid_unknown_fields", "tag"])
            )
            if key in options:
                del options[key]
            else:
                options[key] = "a" if key == "tag" else True
    return StructSpec(fields, options)
