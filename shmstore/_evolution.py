"""Whether one value type may succeed another in a store: the evolution check.

A pure function of two descriptions (``_schema.describe``): :func:`check_successor` returns when
every value the old type can hold encodes to bytes that the new type decodes, *and* every value
the new type can hold encodes to bytes that the old type decodes -- old readers keep running
(Confluent's FULL compatibility; Avro's reader/writer resolution with defaults). Otherwise it
raises :class:`SchemaMismatchError` naming the field and the rule. It builds on msgspec's
"Schema Evolution" rules: decoders skip unknown fields and fill defaults of missing ones.

The rules, for a Struct (or dataclass, TypedDict) matched by its *encoded* field names:

1. a kept field keeps its type; a nested Struct evolves by these same rules, in containers and
   unions too (everything else -- constraints, enum values, literal values, ``tz`` -- is equal);
2. a new field has a default (old values do not carry it);
3. a removed field had a default (old readers fill it in);
4. a field with a default keeps one, and with ``omit_defaults`` on either side keeps the same
   one (values at the default travel without the field); under a new ``omit_defaults`` a field
   the old type requires must stay required (else it could travel without it);
5. ``tag_field`` and ``tag`` are unchanged (they select union members);
6. ``array_like`` is unchanged, and an array-like Struct (or NamedTuple) only appends: its old
   fields keep their positions;
7. an old type with ``forbid_unknown_fields`` gains no field, and a new one with it loses none
   (old values in the ring would carry the removed field).

A store checks a candidate against *every* type it has recorded, not only the newest: a reader
still running the first type decodes the newest values too. (V2 removing a defaulted field and V3
adding it back with another type passes each step alone and breaks V1's readers.)
"""

from __future__ import annotations

from typing import Any

from ._errors import SchemaMismatchError
from ._schema import render_type

__all__ = ["check_history", "check_successor", "dropped_fields"]

_POSITIONAL = frozenset({"namedtuple"})
_NESTED_KEYS = frozenset({"kind", "item", "key", "value", "items", "types"})


def check_successor(old: dict[str, Any], new: dict[str, Any]) -> None:
    """Return if *new* may succeed *old* (descriptions); else :class:`SchemaMismatchError`
    naming the field and the rule."""
    _Checker(old.get("defs", {}), new.get("defs", {})).types(old["type"], new["type"], "")


def check_history(history: list[dict[str, Any]], new: dict[str, Any]) -> None:
    """:func:`check_successor` against every recorded type, newest first; the error names the
    schema generation it conflicts with when that is not the newest."""
    last = len(history) - 1
    for generation in range(last, -1, -1):
        try:
            check_successor(history[generation], new)
        except SchemaMismatchError as exc:
            if generation == last:
                raise
            raise SchemaMismatchError(
                f"{exc} -- against schema generation {generation}, whose readers may still run"
            ) from None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class _Checker:
    def __init__(self, old_defs: dict[str, Any], new_defs: dict[str, Any]) -> None:
        self.old_defs = old_defs
        self.new_defs = new_defs
        self.seen: set[tuple[str, str]] = set()

    def fail(self, path: str, what: str, rule: str) -> SchemaMismatchError:
        where = f"field {path!r}" if path else "the value's type"
        return SchemaMismatchError(f"{where}: {what} ({rule})")

    def types(self, old: dict[str, Any], new: dict[str, Any], path: str) -> None:
        kind = old["kind"]
        if kind == "ref" and new["kind"] == "ref":
            self.definitions(old["name"], new["name"], path)
            return
        changed = self.fail(
            path,
            f"type changed from {render_type(old)} to {render_type(new)}",
            "a field keeps its type",
        )
        if kind != new["kind"]:
            raise changed
        own_old = {k: v for k, v in old.items() if k not in _NESTED_KEYS}
        own_new = {k: v for k, v in new.items() if k not in _NESTED_KEYS}
        if own_old != own_new:
            raise changed
        if kind in ("list", "set", "frozenset", "vartuple"):
            self.types(old["item"], new["item"], f"{path}[]")
        elif kind == "dict":
            self.types(old["key"], new["key"], f"{path}{{key}}")
            self.types(old["value"], new["value"], f"{path}{{}}")
        elif kind in ("tuple", "union"):
            members = "items" if kind == "tuple" else "types"
            if len(old[members]) != len(new[members]):
                raise changed
            for i, (o, n) in enumerate(zip(old[members], new[members], strict=True)):
                self.types(o, n, f"{path}[{i}]" if kind == "tuple" else path)
        elif old != new:
            raise changed

    def definitions(self, old_name: str, new_name: str, path: str) -> None:
        if (old_name, new_name) in self.seen:
            return  # a recursive type: this pair is being checked already
        self.seen.add((old_name, new_name))
        old, new = self.old_defs[old_name], self.new_defs[new_name]
        if old["kind"] != new["kind"]:
            raise self.fail(
                path, f"a {old['kind']} became a {new['kind']}", "a field keeps its type"
            )
        for key, rule in (
            ("tag_field", "tags and tag fields are unchanged"),
            ("tag", "tags and tag fields are unchanged"),
            ("array_like", "array_like is unchanged"),
        ):
            if old.get(key) != new.get(key):
                raise self.fail(
                    path, f"{key} changed from {old.get(key)!r} to {new.get(key)!r}", rule
                )
        positional = bool(old.get("array_like")) or old["kind"] in _POSITIONAL
        omit = bool(old.get("omit_defaults")) or bool(new.get("omit_defaults"))
        old_fields, new_fields = old["fields"], new["fields"]
        if positional:
            pairs = []
            for i, of in enumerate(old_fields):
                if i >= len(new_fields):
                    raise self.fail(
                        _join(path, of["encode_name"]),
                        "removed",
                        "array_like structs only append",
                    )
                nf = new_fields[i]
                if nf["encode_name"] != of["encode_name"]:
                    raise self.fail(
                        _join(path, of["encode_name"]),
                        f"position {i} now holds {nf['encode_name']!r}",
                        "array_like structs only append",
                    )
                pairs.append((of, nf))
            added = new_fields[len(old_fields) :]
            removed: list[dict[str, Any]] = []
        else:
            by_name = {f["encode_name"]: f for f in new_fields}
            old_names = {f["encode_name"] for f in old_fields}
            pairs = [
                (of, by_name[of["encode_name"]])
                for of in old_fields
                if of["encode_name"] in by_name
            ]
            added = [f for f in new_fields if f["encode_name"] not in old_names]
            removed = [f for f in old_fields if f["encode_name"] not in by_name]
        for of, nf in pairs:
            field_path = _join(path, of["encode_name"])
            self.types(of["type"], nf["type"], field_path)
            if nf["required"] and not of["required"]:
                raise self.fail(
                    field_path,
                    "had a default and is now required",
                    "a field with a default keeps one: old values may lack it",
                )
            if omit and "default" in of and "default" in nf and of["default"] != nf["default"]:
                raise self.fail(
                    field_path,
                    f"default changed from {of['default']!r} to {nf['default']!r}",
                    "with omit_defaults a default is unchanged: values at it travel without it",
                )
            if new.get("omit_defaults") and of["required"] and not nf["required"]:
                raise self.fail(
                    field_path,
                    "required by old readers and now omitted when at its default",
                    "under omit_defaults a required field stays required",
                )
        for nf in added:
            field_path = _join(path, nf["encode_name"])
            if nf["required"]:
                raise self.fail(field_path, "added without a default", "new fields have defaults")
            if old.get("forbid_unknown_fields"):
                raise self.fail(
                    field_path,
                    "added",
                    "a type with forbid_unknown_fields gains no fields: its readers refuse them",
                )
        for of in removed:
            field_path = _join(path, of["encode_name"])
            if of["required"]:
                raise self.fail(
                    field_path, "removed but had no default", "a removed field had a default"
                )
            if new.get("forbid_unknown_fields"):
                raise self.fail(
                    field_path,
                    "removed",
                    "a type with forbid_unknown_fields loses no fields: old values carry them",
                )


def dropped_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Paths of the fields *new* has and *old* lacks (what values of *old* would drop),
    following Structs nested in kept fields."""
    old_defs, new_defs = old.get("defs", {}), new.get("defs", {})
    found: list[str] = []
    seen: set[tuple[str, str]] = set()

    def walk(o: dict[str, Any], n: dict[str, Any], path: str) -> None:
        if o.get("kind") == "ref" and n.get("kind") == "ref":
            pair = (o["name"], n["name"])
            if pair in seen or pair[0] not in old_defs or pair[1] not in new_defs:
                return
            seen.add(pair)
            od, nd = old_defs[pair[0]], new_defs[pair[1]]
            by_name = {f["encode_name"]: f for f in od.get("fields", ())}
            for nf in nd.get("fields", ()):
                of = by_name.get(nf["encode_name"])
                field_path = _join(path, nf["encode_name"]) if path else nf["encode_name"]
                if of is None:
                    found.append(repr(field_path))
                else:
                    walk(of["type"], nf["type"], field_path)
            return
        for key in ("item", "value"):
            if key in o and key in n:
                walk(o[key], n[key], path)

    walk(old["type"], new["type"], "")
    return found
