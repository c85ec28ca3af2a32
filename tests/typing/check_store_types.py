"""Checked by mypy (see test_code_quality.py), never run: the public API's static types."""

from __future__ import annotations

from typing import Any, assert_type

import msgspec

from shmstore import Store


class Point(msgspec.Struct):
    x: int
    y: int


def typed(name: str) -> None:
    st = Store.create(name, Point)
    assert_type(st, Store[Point])
    assert_type(st.get(), Point | None)
    assert_type(st.get_with_version(), tuple[Point | None, int])
    assert_type(st.set(Point(1, 2)), int)
    assert_type(st.version, int)
    st.set("not a point")  # type: ignore[arg-type]
    with Store.open(name, Point) as reader:
        assert_type(reader, Store[Point])
    with Store.open(name, Point, readonly=True) as ro:
        assert_type(ro, Store[Point])
        assert_type(ro.readonly, bool)
        assert_type(ro.wait_mode, str)
    assert_type(Store.create(name, Point, mode=0o640, group="staff"), Store[Point])
    assert_type(Store.open_or_create(name, Point), Store[Point])
    assert_type(st.update(lambda p: Point(p.x + 1, p.y) if p else Point(0, 0)), int)


def untyped(name: str) -> None:
    raw = Store.open(name)
    assert_type(raw, Store[Any])
