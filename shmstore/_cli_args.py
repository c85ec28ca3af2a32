"""Argument types of the ``shmstore`` command: each turns one option's text into a value.

argparse names a type function in its "invalid <name> value" message: these raise
``ArgumentTypeError`` themselves, so every message talks about the value, not about a helper.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "duration",
    "group",
    "mode",
    "number",
    "positive_float",
    "positive_int",
    "rate",
    "readers",
    "size",
    "version",
]


def number(text: str, kind: Callable[[str], Any], what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    value: int = number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value: float = number(text, float, "a number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def demo_seconds(text: str) -> float:
    value: float = number(text, float, "a number")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(
            f"must be a positive finite number, or 0 to run until Ctrl-C, got {text!r}"
        )
    return value


def readers(text: str) -> int:
    from ._demo import MAX_READERS  # noqa: PLC0415

    value = positive_int(text)
    if value > MAX_READERS:
        raise argparse.ArgumentTypeError(f"at most {MAX_READERS} reader processes, got {value}")
    return value


def rate(text: str) -> float:
    from ._demo import MAX_RATE  # noqa: PLC0415

    value = positive_float(text)
    if value > MAX_RATE:
        raise argparse.ArgumentTypeError(f"at most {MAX_RATE:.0f} per second, got {text!r}")
    return value


def version(text: str) -> int:
    value: int = number(text, int, "a version number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"a version is >= 0, got {value}")
    return value


def size(text: str) -> int:
    """A size in bytes: ``4096``, ``64k``, ``16M``, ``1G`` (powers of 1024)."""
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    value: int = number(digits, int, "a size in bytes like 4096, 64k or 16M") * scale
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def mode(text: str) -> int:
    """Permission bits in octal, like chmod's: ``0640``, ``640``, ``0o640``."""
    digits = text[2:] if text.lower().startswith("0o") else text
    try:
        value = int(digits, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected permission bits in octal like 0640, got {text!r}"
        ) from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"permission bits are 0000..0777, got {text!r}")
    return value


def group(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def duration(text: str) -> float:
    from ._inventory import parse_duration  # noqa: PLC0415

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
