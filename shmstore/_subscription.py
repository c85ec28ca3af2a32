"""Subscriptions: every committed version, in order, for as long as the ring still holds it.

A subscription remembers the next version it wants and reads exactly that slot of the ring
(``Ring.read`` checks that the slot still holds that message). A subscriber that keeps up sees
every version once, in order. One that falls more than the ring depth behind finds its next
version overwritten; it is then told exactly how many versions it missed -- by
:class:`SubscriberLaggedError` -- and continues from the newest. The error does not end the
subscription: iterate again and the newest version comes next::

    with store.subscribe() as sub:
        while True:
            try:
                for version, value in sub:
                    handle(version, value)
            except SubscriberLaggedError as lag:
                log.warning("missed %d versions", lag.missed)
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypeVar

from ._errors import SubscriberLaggedError

__all__ = ["Subscription"]

T = TypeVar("T")


class Subscription(Generic[T]):
    """Iterator of ``(version, value)`` for every committed version, in order.

    Blocks in ``__next__`` until the next version is committed (``TimeoutError`` after *timeout*
    seconds, if given). :meth:`poll` is the non-blocking form.
    """

    def __init__(
        self,
        *,
        head: Callable[[], int],
        read: Callable[[int], tuple[T] | None],
        newest: Callable[[], tuple[T | None, int]],
        wait: Callable[[int, float | None], int],
        after_version: int | None,
        timeout: float | None,
    ) -> None:
        """Made by ``Store.subscribe``: *head* is the store's version, *read(v)* version *v* as a
        1-tuple if the ring still holds it, *newest()* the newest value and its version, and
        *wait(after, timeout)* blocks until the version passes *after*."""
        if after_version is not None and after_version < 0:
            raise ValueError(f"after_version must be >= 0, got {after_version}")
        self._head = head
        self._read = read
        self._newest = newest
        self._wait = wait
        self._timeout = timeout
        current = head()
        # Default: start with the current value, so a subscriber always has a starting state.
        start = max(current, 1) if after_version is None else after_version + 1
        self._next = start
        self._pending: tuple[int, T] | None = None
        self.missed = 0
        """Total number of versions this subscription has missed so far."""

    @property
    def next_version(self) -> int:
        """The version this subscription will yield next (unless it has been overwritten)."""
        return self._pending[0] if self._pending is not None else self._next

    def __iter__(self) -> Subscription[T]:
        return self

    def __next__(self) -> tuple[int, T]:
        while True:
            item = self.poll()
            if item is not None:
                return item
            self._wait(self._next - 1, self._timeout)

    def poll(self) -> tuple[int, T] | None:
        """The next ``(version, value)`` if it is committed already, else ``None``.

        Raises :class:`SubscriberLaggedError` if the writer overwrote it before we read it.
        """
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        wanted = self._next
        if wanted > self._head():
            return None
        value = self._read(wanted)
        if value is not None:
            self._next = wanted + 1
            return wanted, value[0]
        newest, version = self._newest()
        missed = version - wanted
        self.missed += missed
        self._next = version + 1
        assert newest is not None
        self._pending = (version, newest)
        raise SubscriberLaggedError(missed, version)

    def close(self) -> None:
        """Nothing to release today (the store handle owns the registry entry); kept so that
        subscriptions read like the resources they are."""

    def __enter__(self) -> Subscription[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
