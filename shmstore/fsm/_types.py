"""The FSM worker's snapshot types: msgspec Structs that behave as frozen dataclasses.

Snapshots are immutable: every change makes a new one (``add_transition``, ``next_snapshot``),
which is what lets the store hand the same decoded object to every reader of a version.
Timestamps are ``time.monotonic()`` (system-wide on Linux, so comparable across processes) and
``time.time()``.

Two paths make a snapshot, and they must cost different things
-------------------------------------------------------------
The worker's code was written against frozen ``@dataclass`` DTOs: it calls
``dataclasses.replace``/``asdict``/``fields`` on them, relies on ``FrozenInstanceError``, and
constructs them loosely (``history=None`` or a list, ``ts_mono=0.0`` meaning "now", an empty id
meaning "make one"). The store, on the other hand, *decodes* a snapshot -- up to 101 objects with
a full history -- on every changed read and on every ``set()``, in every process. Measured on the
reference VM, msgspec decodes a frozen dataclass 2.3-2.7x slower than a Struct, and 3.4x slower
with a normalising ``__post_init__``, which msgspec runs on every decode too.

So the types are Structs (the wire format and the decode path stay exactly as fast as before),
and the dataclass behaviour is added where it costs nothing on that path:

* **Normalisation runs on the Python construction path only.** The metaclass ``__call__`` rewrites
  the arguments and then calls msgspec's constructor. msgspec's decoder allocates instances in C
  without calling the metaclass, so decoded snapshots -- already normal, since only normalised
  snapshots are ever encoded -- pay nothing (``tests/test_fsm_types.py`` checks that decoding
  never reaches the normaliser).
* **The dataclass protocol is data.** What the stdlib functions need (CPython 3.11-3.13):
  ``is_dataclass`` checks that the type has ``__dataclass_fields__``; ``fields`` returns the
  ``Field`` objects in it whose private kind marker says "field"; ``replace`` reads each field with
  ``init=True`` off the instance and calls ``obj.__class__(**changes)`` -- the construction path,
  so it normalises too; ``asdict``/``astuple`` recurse through ``fields()`` and copy containers.
  So each class gets the fields of a shadow frozen dataclass with the original signature -- same
  names, order and defaults (``history=None``...) -- made by ``dataclasses.make_dataclass``:
  every ``Field`` is exactly what the stdlib builds, private marker included, without this module
  touching a private name. ``__dataclass_params__`` (``frozen=True``) and ``inspect.signature``
  come from the same shadow.
* **Assignment raises ``dataclasses.FrozenInstanceError``** (an ``AttributeError``, which is what
  msgspec's frozen Structs raise). msgspec installs its own ``tp_setattro`` when the class is
  created, so ``__setattr__``/``__delattr__`` are assigned after creation, which re-points the slot.

The Structs stay ``frozen=True`` (hashable like a frozen dataclass); ``TransitionDTO`` holds only
scalars and so is ``gc=False``, which makes decoding a long history cheaper.

Measured (``benchmarks/fsm.py``, against the previous plain Structs in the same run): encode,
decode, changed ``get()`` and ``set()`` at 8 and 100 transitions all at 0.91-1.00x. Construction
pays the normaliser, ~1 us per object: 1.5-1.6x the plain Structs, but 0.85x the original frozen
dataclasses with their ``__post_init__``.

Open questions: the protocol relies on how the stdlib functions read ``__dataclass_fields__``
(stable since 3.7, and the tests pin each function); a msgspec release that called the metaclass
on decode would make the read path pay again -- the decode test would then fail, not slow down
silently. Type checkers see the original signature through the ``TYPE_CHECKING`` ``__init__``.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar

import msgspec

__all__ = [
    "FsmSnapshotDTO",
    "FsmStateView",
    "FsmState",
    "TransitionDTO",
    "TransitionStatus",
    "create_transition",
    "initial_snapshot",
    "next_snapshot",
    "trimmed_history",
]


class FsmState(enum.IntEnum):
    UNSPECIFIED = 0
    BOOTING = 1
    IDLE = 2
    ACTIVE = 3
    ERROR_STATE = 4
    SHUTDOWN = 5


class TransitionStatus(enum.IntEnum):
    UNSPECIFIED = 0
    SUCCESS = 1
    FAILED = 2
    PENDING = 3


_S = TypeVar("_S")


_StructMeta: Any = type(msgspec.Struct)
_struct_call = _StructMeta.__call__  # msgspec's constructor, without the normaliser


class _Normalising(_StructMeta):  # type: ignore[misc]
    """Struct metaclass whose *construction* (not decoding) normalises the arguments first."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if args:
            # Positional arguments (pickle's reduce uses them too) become keywords, so that one
            # normaliser sees every field by name. Too many of them: msgspec's own error.
            fields = cls.__struct_fields__
            if len(args) > len(fields):
                return _struct_call(cls, *args, **kwargs)
            for name, value in zip(fields, args, strict=False):
                if name in kwargs:
                    raise TypeError(f"{cls.__name__}() got multiple values for argument {name!r}")
                kwargs[name] = value
        normalise = _NORMALISERS.get(cls)
        if normalise is None:  # a subclass: its nearest DTO base's rule
            normalise = next(_NORMALISERS[k] for k in cls.__mro__ if k in _NORMALISERS)
        normalise(kwargs)
        return _struct_call(cls, **kwargs)

    @property
    def __signature__(cls) -> inspect.Signature:
        """The original dataclass signature (``history=None``...), for ``inspect``."""
        return _SIGNATURES[cls]


_NORMALISERS: dict[type, Callable[[dict[str, Any]], None]] = {}
"""Each DTO class's construction-time normaliser, applied to the keyword arguments in place."""
_SIGNATURES: dict[type, inspect.Signature] = {}


def _frozen_setattr(self: object, name: str, value: object) -> NoReturn:
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: object, name: str) -> NoReturn:
    raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")


def _as_dataclass(defaults: dict[str, Any]) -> Callable[[type[_S]], type[_S]]:
    """Give a Struct class the frozen-dataclass protocol, with *defaults* as the signature's
    defaults (fields not named there are required)."""

    def apply(cls: type[_S]) -> type[_S]:
        annotations = cls.__annotations__
        spec = [
            (name, annotations[name], dataclasses.field(default=defaults[name]))
            if name in defaults
            else (name, annotations[name])
            for name in cls.__struct_fields__  # type: ignore[attr-defined]
        ]
        shadow = dataclasses.make_dataclass(cls.__name__, spec, frozen=True)
        type.__setattr__(cls, "__dataclass_fields__", shadow.__dataclass_fields__)  # type: ignore[attr-defined]
        type.__setattr__(cls, "__dataclass_params__", shadow.__dataclass_params__)  # type: ignore[attr-defined]
        _SIGNATURES[cls] = inspect.signature(shadow)
        type.__setattr__(cls, "__setattr__", _frozen_setattr)
        type.__setattr__(cls, "__delattr__", _frozen_delattr)
        return cls

    return apply


def _new_id() -> str:
    return str(uuid.uuid4())


_TRANSITION_DEFAULTS: dict[str, Any] = {
    "status": TransitionStatus.SUCCESS,
    "error_message": "",
    "ts_mono": 0.0,
    "ts_wall": 0.0,
}


@_as_dataclass(_TRANSITION_DEFAULTS)
class TransitionDTO(msgspec.Struct, frozen=True, gc=False, metaclass=_Normalising):
    """One state change of the FSM. A ``ts_mono``/``ts_wall`` of ``0.0`` becomes "now"."""

    from_state: FsmState
    to_state: FsmState
    trigger_event: str
    status: TransitionStatus = TransitionStatus.SUCCESS
    error_message: str = ""
    ts_mono: float = 0.0
    ts_wall: float = 0.0

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    if TYPE_CHECKING:

        def __init__(  # noqa: PLR0917 (the original positional signature)
            self,
            from_state: FsmState,
            to_state: FsmState,
            trigger_event: str,
            status: TransitionStatus = TransitionStatus.SUCCESS,
            error_message: str = "",
            ts_mono: float = 0.0,
            ts_wall: float = 0.0,
        ) -> None: ...


def _normalise_transition(kw: dict[str, Any]) -> None:
    if not kw.get("ts_mono"):
        kw["ts_mono"] = time.monotonic()
    if not kw.get("ts_wall"):
        kw["ts_wall"] = time.time()


_NORMALISERS[TransitionDTO] = _normalise_transition


_SNAPSHOT_DEFAULTS: dict[str, Any] = {
    "reason": "",
    "ts_mono": 0.0,
    "ts_wall": 0.0,
    "snapshot_id": "",
    "prev_state": None,
    "fsm_instance_id": "",
    "source_module": "fsm_handler",
    "attempt_count": 0,
    "history": None,
    "context_data": None,
    "state_metadata": None,
}


@_as_dataclass(_SNAPSHOT_DEFAULTS)
class FsmSnapshotDTO(msgspec.Struct, frozen=True, metaclass=_Normalising):
    """A versioned, immutable snapshot of the FSM.

    Construction normalises: ``history`` None -> ``()`` and any iterable -> tuple (``TypeError``
    if it is not iterable); ``context_data``/``state_metadata`` None -> ``{}``; a ``ts_mono``/
    ``ts_wall`` of ``0.0`` -> now; an empty ``snapshot_id``/``fsm_instance_id`` -> a new UUID4.

    ``context_data`` is the application's: the store sees "any value" there and cannot check
    its shape, so evolve it by convention -- add keys and read them with a default, remove a
    key only once every reader has a default for it, never change a key's type -- or convert it
    to a Struct with defaults on read (``msgspec.convert``). The snapshot's own fields and the
    ``FsmState`` values are not the application's to change. See docs/evolution.md.
    """

    version: int
    state: FsmState
    reason: str = ""
    ts_mono: float = 0.0
    ts_wall: float = 0.0
    snapshot_id: str = ""
    prev_state: FsmState | None = None
    fsm_instance_id: str = ""
    source_module: str = "fsm_handler"
    attempt_count: int = 0
    history: tuple[TransitionDTO, ...] = ()
    context_data: dict[str, Any] = msgspec.field(default_factory=dict)
    state_metadata: dict[str, Any] = msgspec.field(default_factory=dict)

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    if TYPE_CHECKING:

        def __init__(  # noqa: PLR0917 (the original positional signature)
            self,
            version: int,
            state: FsmState,
            reason: str = "",
            ts_mono: float = 0.0,
            ts_wall: float = 0.0,
            snapshot_id: str = "",
            prev_state: FsmState | None = None,
            fsm_instance_id: str = "",
            source_module: str = "fsm_handler",
            attempt_count: int = 0,
            history: Iterable[TransitionDTO] | None = None,
            context_data: dict[str, Any] | None = None,
            state_metadata: dict[str, Any] | None = None,
        ) -> None: ...

    def add_transition(
        self, transition: TransitionDTO, max_history: int | None = None
    ) -> FsmSnapshotDTO:
        """A copy with *transition* appended to the history. A positive *max_history* keeps only
        the newest that many transitions; ``None`` or ``<= 0`` never trims."""
        return msgspec.structs.replace(
            self, history=trimmed_history((*self.history, transition), max_history)
        )


def _normalise_snapshot(kw: dict[str, Any]) -> None:
    history = kw.get("history")
    if history is None:
        kw["history"] = ()
    elif type(history) is not tuple:
        try:
            kw["history"] = tuple(history)
        except TypeError as exc:
            # The original's message was tuple()'s own ("'int' object is not iterable"), which
            # its callers' tests match: keep it, after saying what was wanted.
            raise TypeError(
                f"history must be an iterable of TransitionDTO, got {type(history).__name__}: {exc}"
            ) from None
    if kw.get("context_data") is None:
        kw["context_data"] = {}
    if kw.get("state_metadata") is None:
        kw["state_metadata"] = {}
    if not kw.get("ts_mono"):
        kw["ts_mono"] = time.monotonic()
    if not kw.get("ts_wall"):
        kw["ts_wall"] = time.time()
    if not kw.get("snapshot_id"):
        kw["snapshot_id"] = _new_id()
    if not kw.get("fsm_instance_id"):
        kw["fsm_instance_id"] = _new_id()


_NORMALISERS[FsmSnapshotDTO] = _normalise_snapshot


def trimmed_history(
    history: tuple[TransitionDTO, ...], max_history: int | None
) -> tuple[TransitionDTO, ...]:
    """*history* without its oldest entries beyond a positive *max_history* (``None`` or ``<= 0``:
    unchanged). The one trimming rule of the package: ``add_transition`` and the store use it."""
    if max_history is None or max_history <= 0 or len(history) <= max_history:
        return history
    return history[-max_history:]


class FsmStateView(msgspec.Struct, frozen=True):
    """The head of a snapshot, for readers that only need the state: a projection of
    :class:`FsmSnapshotDTO` (``Store.projection``), decoded without building -- or, for a big
    snapshot, even parsing -- the history. At 100 history entries a changed read costs about a
    seventh to a fifth of a full snapshot's decode (``benchmarks/core.py``)."""

    version: int
    state: FsmState
    reason: str = ""
    ts_wall: float = 0.0
    prev_state: FsmState | None = None


def initial_snapshot() -> FsmSnapshotDTO:
    """The cold-start snapshot: version 0, BOOTING, reason ``COLD_START``, timestamps now."""
    return FsmSnapshotDTO(
        version=0,
        state=FsmState.BOOTING,
        reason="COLD_START",
        prev_state=None,
        source_module="initial_boot",
        attempt_count=0,
    )


def create_transition(
    from_state: FsmState,
    to_state: FsmState,
    trigger: str,
    status: TransitionStatus = TransitionStatus.SUCCESS,
    error_msg: str = "",
) -> TransitionDTO:
    """A :class:`TransitionDTO` from *from_state* to *to_state* caused by *trigger*, stamped now."""
    return TransitionDTO(
        from_state=from_state,
        to_state=to_state,
        trigger_event=trigger,
        status=status,
        error_message=error_msg,
    )


def next_snapshot(
    current: FsmSnapshotDTO,
    new_state: FsmState,
    reason: str,
    transition: TransitionDTO | None = None,
) -> FsmSnapshotDTO:
    """The snapshot after moving *current* to *new_state*, with a new id and timestamps.

    Only a change of state moves ``version`` and ``attempt_count`` up by one and makes
    ``prev_state`` the old state (else ``prev_state`` is kept). The instance id and source module
    are kept, *transition* (if any) is appended to the history untrimmed, and the context and
    metadata are copied, so that the new snapshot shares nothing mutable with the old one.
    """
    changed = new_state != current.state
    history = current.history if transition is None else (*current.history, transition)
    return FsmSnapshotDTO(
        version=current.version + 1 if changed else current.version,
        state=new_state,
        reason=reason,
        prev_state=current.state if changed else current.prev_state,
        fsm_instance_id=current.fsm_instance_id,
        source_module=current.source_module,
        attempt_count=current.attempt_count + 1 if changed else current.attempt_count,
        history=history,
        context_data=dict(current.context_data),
        state_metadata=dict(current.state_metadata),
    )
