"""Type expressions: the text a user gives ``--type``, turned into a type without ``eval``.

The CLI names a store's type the way ``shmstore ls`` prints it (``_codec.type_name_of``): a class
as ``module:Qualified.Name``, anything else as its ``repr`` -- ``dict[str, int]``,
``list[float]``, ``int | None``, ``typing.Optional[int]``, ``tuple[int, ...]``,
``dict[str, app.models.Point]``, ``typing.Literal['a', 1]``. :func:`resolve_type` accepts all of
those, so that whatever ``ls`` shows can be pasted after ``--type``.

Parsed, never evaluated: a small recursive-descent parser over this grammar, which can only
import modules, look up attributes and subscript what it found (a generic alias)::

    union      := primary ("|" primary)*
    primary    := "None" | ref ["[" arguments "]"]
    arguments  := argument ("," argument)* [","]
    argument   := union | "..." | literal | "[" arguments "]"   (Literal[...] / Callable[[...]])
    literal    := string | integer | "True" | "False"
    ref        := dotted [":" dotted]
    dotted     := NAME ("." NAME)*

A ``ref`` with a colon imports the module before it and looks the rest up in it. Without one,
a bare name is a builtin (``int``, ``dict``...) or a name of ``typing`` (``Any``, ``Optional``...);
a dotted name ``a.b.C`` imports the longest importable module prefix (``typing``, ``a.b``, ``a``)
and looks up the rest. Unions are built with ``typing.Union`` (``None | int`` is not valid Python,
but the union it names is). Modules are searched in the current directory first, as
``python -m`` does (a console script's ``sys.path`` starts with its own directory instead).

Errors: :class:`TypeExpressionError` (a :class:`StateStoreError` and ``ValueError``), whose
``syntax`` flag tells a malformed expression (a usage error) from one that names something that
cannot be imported or is not a type a store can hold.

This module is the one place the CLI turns text into a type. Without ``--type`` the CLI needs
none: an untyped handle checks what it writes against the store's recorded type (``_evolve``).
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import os
import re
import sys
import typing
from collections.abc import Iterator
from typing import Any, Final

import msgspec

from ._errors import StateStoreError

__all__ = ["TypeExpressionError", "parse_type_expression", "resolve_type"]

_TOKEN: Final = re.compile(
    r"""\s*(?:
        (?P<ellipsis>\.\.\.)
      | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<int>-?\d+)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<punct>[.:\[\],|])
    )""",
    re.VERBOSE,
)
_BUILTIN_TYPES: Final = frozenset(
    {
        "bool",
        "bytearray",
        "bytes",
        "complex",
        "dict",
        "float",
        "frozenset",
        "int",
        "list",
        "memoryview",
        "object",
        "set",
        "str",
        "tuple",
        "type",
    }
)
_ESCAPES: Final = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t", "r": "\r", "0": "\0"}
_MAX_DEPTH: Final = 50  # nesting a type name never needs; keeps a hostile one from recursing


class TypeExpressionError(StateStoreError, ValueError):
    """Raised by :func:`resolve_type` for a type expression that is malformed (``syntax`` is
    true), names something that cannot be imported, or is not a type a store can hold."""

    def __init__(self, message: str, *, syntax: bool = False) -> None:
        super().__init__(message)
        self.syntax = syntax


class _Ellipsis:
    """The ``...`` of ``tuple[int, ...]`` while parsing (Ellipsis itself is a valid result)."""


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    stripped = text.rstrip()
    while pos < len(stripped):
        match = _TOKEN.match(stripped, pos)
        if match is None or match.end() == pos:
            bad = stripped[pos:].lstrip()[:1]
            raise TypeExpressionError(
                f"--type {text!r}: unexpected {bad!r} at position {pos + 1}; write a type as "
                "module:Name or as `shmstore ls` shows it (e.g. 'dict[str, int]')",
                syntax=True,
            )
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


def _unquote(token: str) -> str:
    body = token[1:-1]
    out: list[str] = []
    chars = iter(body)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "\\")
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
        else:
            out.append(ch)
    return "".join(out)


@contextlib.contextmanager
def _current_directory_first() -> Iterator[None]:
    """Import as ``python -m`` would: the current directory first, for this import only."""
    here = os.getcwd()
    added = "" not in sys.path and here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(here)


def _import(module: str, spec: str) -> Any:
    try:
        with _current_directory_first():
            return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise TypeExpressionError(
            f"cannot import {module!r} for --type {spec!r}: {exc}; is its directory on "
            "PYTHONPATH? (the current directory is searched too)"
        ) from None
    except Exception as exc:  # importing runs the module's code: any failure is the answer
        raise TypeExpressionError(
            f"cannot import {module!r} for --type {spec!r}: {type(exc).__name__}: {exc}"
        ) from None


def _attribute(obj: Any, path: list[str], spec: str, where: str) -> Any:
    for part in path:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TypeExpressionError(
                f"cannot import {spec!r}: {where} has no attribute {'.'.join(path)!r}"
            ) from None
    return obj


def _find_module_prefix(parts: list[str], spec: str) -> tuple[Any, list[str]]:
    """The longest importable module prefix of a dotted name, and the rest."""
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        try:
            with _current_directory_first():
                return importlib.import_module(module), parts[cut:]
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if not (module == missing or module.startswith(missing + ".")):
                raise TypeExpressionError(  # the module exists; one it imports does not
                    f"cannot import {module!r} for --type {spec!r}: {exc}"
                ) from None
        except Exception as exc:
            raise TypeExpressionError(
                f"cannot import {module!r} for --type {spec!r}: {type(exc).__name__}: {exc}"
            ) from None
    raise TypeExpressionError(
        f"cannot import {'.'.join(parts)!r} for --type {spec!r}: no module {parts[0]!r}; is "
        "its directory on PYTHONPATH? (or write module:Name)"
    )


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.pos = 0
        self.depth = 0

    def fail(self, what: str) -> TypeExpressionError:
        near = repr(self.tokens[self.pos][1]) if self.pos < len(self.tokens) else "the end"
        return TypeExpressionError(
            f"--type {self.text!r}: {what}, found {near}; write a type as module:Name or as "
            "`shmstore ls` shows it (e.g. 'dict[str, int]')",
            syntax=True,
        )

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")

    def take(self, value: str) -> bool:
        if self.peek() == ("punct", value):
            self.pos += 1
            return True
        return False

    def expect(self, value: str) -> None:
        if not self.take(value):
            raise self.fail(f"expected {value!r}")

    def whole(self) -> Any:
        if not self.tokens:
            raise self.fail("expected a type")
        result = self.union()
        if self.pos != len(self.tokens):
            raise self.fail("expected the end of the type")
        return result

    def union(self) -> Any:
        members = [self.primary()]
        while self.take("|"):
            members.append(self.primary())
        if len(members) == 1:
            return members[0]
        return typing.Union[tuple(members)]  # noqa: UP007 -- built at run time

    def primary(self) -> Any:
        kind, value = self.peek()
        if kind != "name":
            raise self.fail("expected a type name")
        if value == "None":
            self.pos += 1
            return None
        origin = self.ref()
        if not self.take("["):
            return origin
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.fail(f"nested deeper than {_MAX_DEPTH}")
        arguments = self.arguments()
        self.depth -= 1
        try:
            return origin[arguments[0] if len(arguments) == 1 else tuple(arguments)]
        except TypeError as exc:
            raise TypeExpressionError(f"--type {self.text!r}: {exc}") from None

    def arguments(self) -> list[Any]:
        out = [self.argument()]
        while self.take(","):
            if self.peek() == ("punct", "]"):
                break
            out.append(self.argument())
        self.expect("]")
        return out

    def argument(self) -> Any:
        kind, value = self.peek()
        if kind == "ellipsis":
            self.pos += 1
            return ...
        if kind == "string":
            self.pos += 1
            return _unquote(value)
        if kind == "int":
            self.pos += 1
            return int(value)
        if kind == "name" and value in ("True", "False"):
            self.pos += 1
            return value == "True"
        if self.take("["):
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise self.fail(f"nested deeper than {_MAX_DEPTH}")
            inner = self.arguments()
            self.depth -= 1
            return inner
        return self.union()

    def dotted(self) -> list[str]:
        parts = []
        while True:
            kind, value = self.peek()
            if kind != "name":
                raise self.fail("expected a name")
            parts.append(value)
            self.pos += 1
            if not self.take("."):
                return parts

    def ref(self) -> Any:
        first = self.dotted()
        if self.take(":"):
            attribute = self.dotted()
            module = ".".join(first)
            return _attribute(_import(module, self.text), attribute, self.text, module)
        if len(first) == 1:
            name = first[0]
            if name in _BUILTIN_TYPES:
                return getattr(builtins, name)
            if not name.startswith("_") and hasattr(typing, name):
                return getattr(typing, name)
            raise TypeExpressionError(
                f"--type {self.text!r}: {name!r} is neither a builtin type nor a name of "
                "typing; write module:Name for a type of yours"
            )
        if first[0] == "typing":
            return _attribute(typing, first[1:], self.text, "typing")
        if first[0] == "builtins":
            return _attribute(builtins, first[1:], self.text, "builtins")
        module, rest = _find_module_prefix(first, self.text)
        return _attribute(module, rest, self.text, module.__name__)


def parse_type_expression(text: str) -> Any:
    """The type *text* names (see the module essay); :class:`TypeExpressionError` if it is
    malformed or names something that cannot be imported. Not checked against msgspec."""
    return _Parser(text).whole()


def resolve_type(text: str) -> Any:
    """The type *text* names, checked to be one a store can hold (msgspec can decode it).
    Raises :class:`TypeExpressionError`."""
    tp = parse_type_expression(text)
    try:
        msgspec.json.Decoder(tp)
    except (TypeError, ValueError) as exc:
        raise TypeExpressionError(
            f"--type {text!r} is not a type a store can hold: {exc}"
        ) from None
    return tp
