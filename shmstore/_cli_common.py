"""What every verb of the ``shmstore`` command shares: exit statuses, the one-line error, output,
opening a store to inspect it, and turning ``--type`` into a type."""

from __future__ import annotations

import contextlib
import datetime
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import msgspec

from ._store import Store
from ._typeexpr import TypeExpressionError, resolve_type

__all__ = [
    "EXIT_CONFLICT",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CliError",
    "age",
    "clip",
    "json_line",
    "one_line",
    "opened",
    "out",
    "read_stdin",
    "type_for",
    "when",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1 (or ``code``)."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def json_line(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def opened(name: str, type_: Any = None, *, inspect: bool = True) -> Iterator[Store[Any]]:
    # Inspecting another user's store (root's ls/stat/get/watch) is fine; writing is not.
    st = Store.open(name, type_, allow_other_owner=inspect)
    try:
        yield st
    finally:
        st.close()


def type_for(spec: str) -> Any:
    """The one place the CLI turns ``--type`` text into a type (``_typeexpr``: ``module:Name``
    or any expression ``ls`` prints, parsed, never evaluated). Without ``--type`` a handle
    checks values against the store's recorded type itself."""
    try:
        return resolve_type(spec)
    except TypeExpressionError as exc:
        raise CliError(str(exc), EXIT_USAGE if exc.syntax else EXIT_ERROR) from None


def age(created_ns: int) -> str:
    seconds = max(0.0, time.time() - created_ns / 1e9)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def when(ns: int) -> str | None:
    """``2026-11-28 11:48:09.563 UTC`` for a time in ns since the epoch; None for 0 (never)."""
    if ns <= 0:
        return None
    moment = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def clip(text: str, width: int) -> str:
    """*text* in at most *width* characters; a cut is marked with an ellipsis."""
    return text if len(text) <= width else text[: width - 3] + "..."


def read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"standard input is not UTF-8 text: {exc}") from exc


_ERRNO_PREFIX = re.compile(r"\[Errno -?\d+\] ")


def one_line(exc: BaseException) -> str:
    """*exc*'s message as one line for an operator: an ``OSError``'s ``[Errno N]`` prefix is
    dropped, wherever a message quotes one (the store's errors that are also ``OSError``s,
    e.g. ``StoreNotFoundError``, would otherwise print ``[Errno 2] no store named 'x'``), and
    line breaks become spaces."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is None:
        text = exc.strerror
    else:
        text = str(exc)
    return " ".join(_ERRNO_PREFIX.sub("", text).split())
