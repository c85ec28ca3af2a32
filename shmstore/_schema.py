"""A store's value type as data: describing a msgspec type, and rebuilding a type from that.

A store records its type's *structure* in shared memory (see ``_schemarecord``), so that tools
and untyped handles can validate values without the program's classes, and so that an evolution
can be checked against what the running readers use. The description is JSON-able data built
from ``msgspec.inspect.type_info``: one dict per type node, ``{"kind": ..., ...}``, with the
Structs (and dataclasses, TypedDicts, NamedTuples) in a table of definitions referenced by name,
as JSON Schema's ``$defs`` are, so that recursive and shared types describe finitely::

    {"type": {"kind": "ref", "name": "Config"},
     "defs": {"Config": {"kind": "struct", "fields": [...], "array_like": false, ...}}}

What a description keeps is exactly what decides the wire format and validation: encoded field
names (``rename``), field types, whether a field is required and its default (as builtins),
``Meta`` constraints, ``tag``/``tag_field``, ``array_like``, ``omit_defaults``,
``forbid_unknown_fields``, enum values, literal values, container shapes, ``tz`` of times.
Docstrings, class names of nested types (but as names of definitions), ``Meta`` titles and
examples are left out: they do not change a byte.

:func:`rebuild` makes a type from a description with ``msgspec.defstruct``: values encoded by
the original type decode as the rebuilt one and re-encode to the same bytes (tested with
hypothesis). Dataclasses and TypedDicts rebuild as Structs of the same wire shape (``UNSET``
for a TypedDict key that may be absent), NamedTuples as array-like Structs. Types msgspec can
decode but not describe (custom types with a ``dec_hook``, ``Raw``, ``Ext``) raise
``TypeError`` from :func:`describe`: such a store records no structure and cannot evolve.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import itertools
import math
import re
import sys
import types
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

import msgspec
import msgspec.inspect as mi

__all__ = ["SCHEMA_FORMAT", "describe", "rebuild", "render", "render_type"]

_modules = itertools.count()

SCHEMA_FORMAT = 1
"""Bumped when the shape of a description changes incompatibly."""

_SCALARS: dict[type, str] = {
    mi.AnyType: "any",
    mi.NoneType: "none",
    mi.BoolType: "bool",
    mi.BytesType: "bytes",
    mi.ByteArrayType: "bytearray",
    mi.MemoryViewType: "memoryview",
    mi.DateType: "date",
    mi.TimeDeltaType: "timedelta",
    mi.UUIDType: "uuid",
    mi.DecimalType: "decimal",
}
_CONSTRAINTS: dict[type, tuple[str, ...]] = {
    mi.IntType: ("gt", "ge", "lt", "le", "multiple_of"),
    mi.FloatType: ("gt", "ge", "lt", "le", "multiple_of"),
    mi.StrType: ("min_length", "max_length", "pattern"),
    mi.BytesType: ("min_length", "max_length"),
    mi.ByteArrayType: ("min_length", "max_length"),
    mi.ListType: ("min_length", "max_length"),
    mi.SetType: ("min_length", "max_length"),
    mi.FrozenSetType: ("min_length", "max_length"),
    mi.VarTupleType: ("min_length", "max_length"),
    mi.DictType: ("min_length", "max_length"),
}
_DICTS = tuple(t for t in (mi.DictType, getattr(mi, "FrozenDictType", None)) if t is not None)
_COLLECTIONS = {
    mi.ListType: "list",
    mi.SetType: "set",
    mi.FrozenSetType: "frozenset",
    mi.VarTupleType: "vartuple",
}


def describe(tp: Any) -> dict[str, Any]:
    """The JSON-able description of *tp*. ``TypeError`` for a type msgspec cannot decode or
    that has parts with no description (custom types, ``Raw``, ``Ext``)."""
    try:
        info = mi.type_info(tp)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot describe {tp!r}: {exc}") from None
    defs: dict[str, dict[str, Any]] = {}
    names: dict[int, str] = {}
    root = _node(info, defs, names)
    described = {"format": SCHEMA_FORMAT, "type": root, "defs": defs}
    try:
        # Through JSON once, so that a description compares equal to its recorded copy
        # (tuples become lists, and so on).
        return msgspec.json.decode(msgspec.json.encode(described))  # type: ignore[no-any-return]
    except (TypeError, ValueError, msgspec.DecodeError) as exc:
        raise TypeError(f"cannot describe {tp!r}: {exc}") from None


def _constraints(info: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in _CONSTRAINTS.get(type(info), ()):
        value = getattr(info, attr)
        if value is not None:
            out[attr] = value
    return out


def _builtin(value: Any) -> Any:
    try:
        plain = msgspec.to_builtins(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot describe the default {value!r}: {exc}") from None
    if not _finite(plain):
        # The description is stored as JSON, which has no inf or nan (msgspec writes null):
        # a type whose default holds one is recorded without a structure, never wrongly.
        raise TypeError(f"cannot describe the default {value!r}: JSON has no inf or nan")
    return plain


def _finite(plain: Any) -> bool:
    if isinstance(plain, float):
        return math.isfinite(plain)
    if isinstance(plain, list):
        return all(map(_finite, plain))
    if isinstance(plain, dict):
        return all(map(_finite, plain.values()))
    return True


def _node(info: Any, defs: dict[str, dict[str, Any]], names: dict[int, str]) -> dict[str, Any]:
    kind = _SCALARS.get(type(info))
    if kind is not None:
        return {"kind": kind, **_constraints(info)}
    if isinstance(info, mi.IntType):
        return {"kind": "int", **_constraints(info)}
    if isinstance(info, mi.FloatType):
        return {"kind": "float", **_constraints(info)}
    if isinstance(info, mi.StrType):
        return {"kind": "str", **_constraints(info)}
    if isinstance(info, (mi.DateTimeType, mi.TimeType)):
        return {"kind": "datetime" if isinstance(info, mi.DateTimeType) else "time", "tz": info.tz}
    if isinstance(info, mi.Metadata):
        return _node(info.type, defs, names)  # titles, examples: not on the wire
    if isinstance(info, mi.LiteralType):
        return {"kind": "literal", "values": list(info.values)}
    if isinstance(info, mi.EnumType):
        members = [[m.name, _builtin(m.value)] for m in info.cls]
        return {"kind": "enum", "name": info.cls.__name__, "members": members}
    if isinstance(info, mi.UnionType):
        return {"kind": "union", "types": [_node(t, defs, names) for t in info.types]}
    collection = _COLLECTIONS.get(type(info))
    if collection is not None:
        return {
            "kind": collection,
            "item": _node(info.item_type, defs, names),
            **_constraints(info),
        }
    if isinstance(info, mi.TupleType):
        return {"kind": "tuple", "items": [_node(t, defs, names) for t in info.item_types]}
    if isinstance(info, _DICTS):
        return {
            "kind": "dict",
            "key": _node(info.key_type, defs, names),
            "value": _node(info.value_type, defs, names),
            **_constraints(info),
        }
    if isinstance(info, (mi.StructType, mi.DataclassType, mi.TypedDictType, mi.NamedTupleType)):
        return {"kind": "ref", "name": _define(info, defs, names)}
    raise TypeError(f"cannot describe {info!r}: shmstore records no structure for it")


def _define(info: Any, defs: dict[str, dict[str, Any]], names: dict[int, str]) -> str:
    cls = info.cls
    known = names.get(id(cls))
    if known is not None:
        return known
    name = cls.__qualname__
    n = 2
    while name in defs:
        name = f"{cls.__qualname__}_{n}"
        n += 1
    names[id(cls)] = name
    defs[name] = {}  # reserved before the fields: a recursive reference finds the name
    fields = []
    for f in info.fields:
        entry: dict[str, Any] = {
            "name": f.name,
            "encode_name": getattr(f, "encode_name", f.name),
            "type": _node(f.type, defs, names),
            "required": bool(f.required),
        }
        if not f.required:
            if f.default is not msgspec.NODEFAULT:
                entry["default"] = _builtin(f.default)
            elif f.default_factory is not msgspec.NODEFAULT:
                entry["default"] = _builtin(f.default_factory())
        fields.append(entry)
    if isinstance(info, mi.StructType):
        config = cls.__struct_config__
        node: dict[str, Any] = {
            "kind": "struct",
            "fields": fields,
            "tag_field": info.tag_field,
            "tag": info.tag,
            "array_like": bool(info.array_like),
            "omit_defaults": bool(config.omit_defaults),
            "forbid_unknown_fields": bool(info.forbid_unknown_fields),
        }
    else:
        kind = {
            mi.DataclassType: "dataclass",
            mi.TypedDictType: "typeddict",
            mi.NamedTupleType: "namedtuple",
        }[type(info)]
        node = {"kind": kind, "fields": fields}
    defs[name] = node
    return str(name)


# ---------------------------------------------------------------------------- rebuilding


_SCALAR_TYPES: dict[str, Any] = {
    "any": Any,
    "none": None,
    "bool": bool,
    "date": datetime.date,
    "timedelta": datetime.timedelta,
    "uuid": uuid.UUID,
    "decimal": decimal.Decimal,
}
_CONSTRAINED: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "bytes": bytes,
    "bytearray": bytearray,
    "memoryview": memoryview,
}


def rebuild(description: dict[str, Any]) -> Any:
    """A type whose values have the wire format *description* describes (see module doc).
    ``ValueError`` for a description this version cannot read."""
    if not isinstance(description, dict) or description.get("format") != SCHEMA_FORMAT:
        raise ValueError("not a schema description of a format this shmstore reads")
    builder = _Builder(description.get("defs", {}))
    try:
        tp = builder.type(description["type"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"damaged schema description: {exc!r}") from None
    if builder.recursive:
        sys.modules[builder.module.__name__] = builder.module  # resolves the forward references
    return tp


def _meta(tp: Any, node: dict[str, Any]) -> Any:
    keys = {k: v for k, v in node.items() if k not in ("kind", "item", "key", "value")}
    if not keys:
        return tp
    return Annotated[tp, msgspec.Meta(**keys)]


class _Builder:
    def __init__(self, defs: dict[str, dict[str, Any]]) -> None:
        self.defs = defs
        self.built: dict[str, Any] = {}
        self.building: set[str] = set()
        self.recursive = False
        # The rebuilt classes' module: forward references of recursive types resolve in it.
        self.module = types.ModuleType(f"shmstore._rebuilt_{next(_modules)}")

    def type(self, node: dict[str, Any]) -> Any:
        kind = node["kind"]
        if kind in _SCALAR_TYPES:
            return _SCALAR_TYPES[kind]
        if kind in _CONSTRAINED:
            return _meta(_CONSTRAINED[kind], node)
        if kind in ("datetime", "time"):
            base = datetime.datetime if kind == "datetime" else datetime.time
            tz = node.get("tz")
            return base if tz is None else Annotated[base, msgspec.Meta(tz=tz)]
        if kind == "literal":
            return Literal[tuple(node["values"])]
        if kind == "enum":
            return enum.Enum(node["name"], [(name, value) for name, value in node["members"]])
        if kind == "union":
            return Union[tuple(self.type(t) for t in node["types"])]  # noqa: UP007
        if kind in ("list", "set", "frozenset"):
            container: Any = {"list": list, "set": set, "frozenset": frozenset}[kind]
            return _meta(container[self.type(node["item"])], node)
        if kind == "vartuple":
            return _meta(tuple[self.type(node["item"]), ...], node)  # type: ignore[misc]
        if kind == "tuple":
            items = tuple(self.type(t) for t in node["items"])
            return tuple[items] if items else tuple[()]  # type: ignore[valid-type]
        if kind == "dict":
            return _meta(dict[self.type(node["key"]), self.type(node["value"])], node)  # type: ignore[misc]
        if kind == "ref":
            return self.ref(node["name"])
        raise ValueError(f"unknown type kind {kind!r} in a schema description")

    def ref(self, name: str) -> Any:
        built = self.built.get(name)
        if built is not None:
            return built
        ident = _identifier(name)
        if name in self.building:
            # A recursive type: a forward reference, resolved in the rebuilt classes' module.
            self.recursive = True
            return ident
        node = self.defs[name]
        kind = node["kind"]
        options: dict[str, Any] = {}
        if kind == "struct":
            options = {
                "tag_field": node["tag_field"],
                "tag": node["tag"],
                "array_like": node["array_like"],
                "omit_defaults": node["omit_defaults"],
                "forbid_unknown_fields": node["forbid_unknown_fields"],
            }
        elif kind == "namedtuple":
            options = {"array_like": True}
        elif kind not in ("dataclass", "typeddict"):
            raise ValueError(f"unknown definition kind {kind!r} in a schema description")
        self.building.add(name)
        fields: list[Any] = []
        renames: dict[str, str] = {}
        for f in node["fields"]:
            if f["encode_name"] != f["name"]:
                renames[f["name"]] = f["encode_name"]
            tp = self.type(f["type"])
            if f["required"]:
                fields.append((f["name"], tp))
            elif "default" in f:
                fields.append((f["name"], tp, _default(tp, f["default"])))
            else:  # a TypedDict key that may be absent
                fields.append((f["name"], Union[tp, msgspec.UnsetType], msgspec.UNSET))  # noqa: UP007
        self.building.discard(name)
        # kw_only: the wire order is the declared order (array_like too), whatever mix of
        # required and defaulted fields Python would refuse positionally.
        cls = msgspec.defstruct(
            ident,
            fields,
            module=self.module.__name__,
            rename=renames or None,
            kw_only=True,
            **options,
        )
        setattr(self.module, ident, cls)
        self.built[name] = cls
        return cls


def _identifier(name: str) -> str:
    ident = re.sub(r"\W", "_", name)
    return ident if ident.isidentifier() else f"T_{ident}"


def _default(tp: Any, value: Any) -> Any:
    """A field default of type *tp* from its description (builtins)."""
    if isinstance(value, (list, dict)):
        if not value:
            return type(value)()  # msgspec copies empty mutable defaults itself
        # Converted when first used: *tp* may name a class that is still being rebuilt.
        factory: Callable[[], Any] = lambda: msgspec.convert(value, tp, strict=False)  # noqa: E731
        return msgspec.field(default_factory=factory)
    try:
        return msgspec.convert(value, tp, strict=False)  # enums, datetimes, tuples...
    except (msgspec.ValidationError, TypeError, ValueError, NameError):
        return value


# ---------------------------------------------------------------------------- rendering


def render(description: dict[str, Any]) -> str:
    """The description as readable, Python-like text (``shmstore schema NAME``)."""
    defs = description.get("defs", {})
    lines = [f"value: {render_type(description['type'])}"]
    for name, node in defs.items():
        options = []
        if node["kind"] == "struct":
            for key in ("tag_field", "tag"):
                if node.get(key) is not None:
                    options.append(f"{key}={node[key]!r}")
            for key in ("array_like", "omit_defaults", "forbid_unknown_fields"):
                if node.get(key):
                    options.append(f"{key}=True")
        base = {"struct": "Struct", "dataclass": "dataclass", "typeddict": "TypedDict"}.get(
            node["kind"], "NamedTuple"
        )
        lines.append("")
        lines.append(f"class {name}({', '.join([base, *options])}):")
        if not node["fields"]:
            lines.append("    pass")
        for f in node["fields"]:
            text = f"    {f['name']}: {render_type(f['type'])}"
            if "default" in f:
                text += f" = {f['default']!r}"
            elif not f["required"]:
                text += " = UNSET"
            if f["encode_name"] != f["name"]:
                text += f"  # encoded as {f['encode_name']!r}"
            lines.append(text)
    return "\n".join(lines)


def render_type(node: dict[str, Any]) -> str:
    kind = node["kind"]
    extras = {k: v for k, v in node.items() if k not in ("kind", "item", "key", "value")}
    if kind == "ref":
        return str(node["name"])
    if kind == "none":
        return "None"
    if kind == "union":
        return " | ".join(render_type(t) for t in node["types"])
    if kind == "literal":
        return f"Literal[{', '.join(repr(v) for v in node['values'])}]"
    if kind == "enum":
        values = ", ".join(repr(v) for _n, v in node["members"])
        return f"{node['name']}(enum of {values})"
    if kind in ("list", "set", "frozenset"):
        text = f"{kind}[{render_type(node['item'])}]"
    elif kind == "vartuple":
        text = f"tuple[{render_type(node['item'])}, ...]"
    elif kind == "tuple":
        text = f"tuple[{', '.join(render_type(t) for t in node['items'])}]"
        extras = {}
    elif kind == "dict":
        text = f"dict[{render_type(node['key'])}, {render_type(node['value'])}]"
    elif kind in ("datetime", "time"):
        tz = node.get("tz")
        return kind if tz is None else f"{kind}(tz={tz})"
    else:
        text = "Any" if kind == "any" else kind
    if extras:
        meta = ", ".join(f"{k}={v!r}" for k, v in extras.items())
        text = f"Annotated[{text}, Meta({meta})]"
    return text
