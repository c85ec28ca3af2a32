"""The CLI's type expressions (``shmstore._typeexpr``): what ``ls`` prints parses back to the
same schema, and nothing is ever evaluated."""

from __future__ import annotations

import datetime
import typing
import uuid
from typing import Any, Literal, Optional

import msgspec
import pytest

from shmstore._codec import fingerprint_of, type_name_of
from shmstore._typeexpr import TypeExpressionError, parse_type_expression, resolve_type
from shmstore.fsm import FsmSnapshotDTO


class Point(msgspec.Struct):
    x: int
    y: int


TYPES: list[Any] = [
    int,
    str,
    bytes,
    Any,
    None,
    dict[str, int],
    list[float],
    int | None,
    Optional[int],  # noqa: UP045 -- the typing spelling is the point
    typing.Dict[str, typing.List[int]],  # noqa: UP006
    tuple[int, ...],
    tuple[int, str],
    Literal["a", 1, True],
    dict[str, Point],
    list[dict[str, int | None]] | None,
    typing.Union[int, str],  # noqa: UP007
    datetime.datetime,
    uuid.UUID,
    FsmSnapshotDTO,
    frozenset[str],
]


@pytest.mark.parametrize("tp", TYPES, ids=str)
def test_what_ls_prints_resolves_to_the_same_schema(tp: Any) -> None:
    assert fingerprint_of(resolve_type(type_name_of(tp))) == fingerprint_of(tp)


def test_strings_in_literals_are_unquoted_not_evaluated() -> None:
    got = parse_type_expression(r"""typing.Literal['it\'s', "a\"b", -3]""")
    assert typing.get_args(got) == ("it's", 'a"b', -3)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "dict[str",
        "list[int]]",
        "__import__('os')",
        "int if True else str",
        "dict[str, int] extra",
        "a..b",
        "|int",
        "[" * 60 + "int" + "]" * 60,
        "list[" * 60 + "int" + "]" * 60,
    ],
)
def test_malformed_expressions_are_syntax_errors(text: str) -> None:
    with pytest.raises(TypeExpressionError) as raised:
        resolve_type(text)
    assert raised.value.syntax


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("frobnicate", "neither a builtin type nor a name of typing"),
        ("os:path", "is not a type a store can hold"),
        ("json:nope", "json has no attribute 'nope'"),
        ("no_such_module_h1:X", "is its directory on PYTHONPATH?"),
        ("no_such_module_h1.X", "is its directory on PYTHONPATH?"),
        ("dict[str, int, int]", "is not a type a store can hold"),
        ("typing.Optional[int, str]", "Optional"),
    ],
)
def test_what_cannot_be_a_type_says_why(text: str, message: str) -> None:
    with pytest.raises(TypeExpressionError, match=message) as raised:
        resolve_type(text)
    assert not raised.value.syntax
