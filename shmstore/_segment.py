"""One POSIX shared-memory segment: create, open, map, close, unlink.

Only ``posix_ipc`` objects are used, never the stdlib resource tracker, which unlinks a segment
when any process that attached to it exits. ``close()`` is about this process; ``unlink`` removes
the name for everyone.

The full size is reserved with ``posix_fallocate`` at create: tmpfs is sparse, and the first
touch of a page that an over-committed ``/dev/shm`` cannot back kills the process with SIGBUS
instead of raising an error. Reserving up front turns that into a clear error at create time.

Read-only handles. A segment opened ``readonly`` (or opened by a user the OS grants only read
access: ``O_RDWR`` fails with ``EACCES`` and the open falls back to ``O_RDONLY``) is mapped
``PROT_READ``: not one byte of it can change through this process, whatever the code above does
-- a store through it raises ``TypeError`` at the first attempted store, before the kernel would.

A segment's *group* can be set at create (``chown`` before the segment is sized and long before
its magic is written), so that group-based sharing never has a window in which a reader sees the
store with the creator's group. Only a member of the group (or root) may give it; for a *mode*
that grants the group nothing beyond what everyone gets (``0o666``, ``0o600``), the group does
not matter and a refused ``chown`` is ignored -- which lets an "other" writer of a ``0o666`` store
create the rings the store grows into (``_growth``), which get the store's mode and group.

"Somebody has it open." Every handle's descriptor holds a shared OFD lock on ``ATTACHED_BYTE``
(``_ofd``) for as long as it is open; the kernel drops it with the descriptor, however the
process ends. :func:`attached_elsewhere` asks for it, so ``shmstore gc`` can tell that a store is
in use by a process it cannot see -- one in another PID namespace (a container), whose
``/proc/<pid>/maps`` it cannot read -- without trusting any PID.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import mmap
import os
import time

import posix_ipc

from ._errors import StateStoreError, StoreExistsError, StoreNotFoundError, StorePermissionError
from ._names import segment_name
from ._ofd import ATTACHED_BYTE, OFD_SUPPORTED, byte_lock, byte_locked

__all__ = [
    "Segment",
    "UnsizedSegmentError",
    "attached_elsewhere",
    "resolve_group",
    "unlink_segment",
]

# Where Linux keeps POSIX shared memory as files (elsewhere, None: names are opened to compare).
_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None

_UNMAP_PATIENCE = 10.0  # seconds a close() waits for in-place decodes to let go of the mapping
_UNMAP_POLL = 100e-6


class Segment:
    """A mapped segment and this process's descriptor for it.

    The descriptor also carries the writer lock (``flock``) and the registry's liveness locks
    (open-file-description byte locks), which is why :meth:`reopen` exists: after ``fork()`` the
    child must not share the parent's open file description, or it would share its locks.
    """

    __slots__ = ("fd", "map", "name", "named", "os_name", "readonly", "size")

    def __init__(
        self,
        name: str,
        fd: int,
        size: int,
        os_name: str | None = None,
        *,
        readonly: bool = False,
        named: bool = True,
    ) -> None:
        self.name = name
        self.os_name = segment_name(name) if os_name is None else os_name
        self.fd = fd
        self.size = size
        self.readonly = readonly
        self.named = named  # False for an anonymous (memfd) segment: it has no name to lose
        self.map = mmap.mmap(fd, size, access=mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE)
        if named:
            _hold_attached(fd)

    @classmethod
    def create(
        cls,
        name: str,
        size: int,
        mode: int,
        group: int | None = None,
        *,
        os_name: str | None = None,
    ) -> Segment:
        """Create and size *name*'s segment (or the one named *os_name*: a generation of the
        store) with permission bits *mode* and, if given, group id *group* (the creator's group
        otherwise)."""
        os_name = segment_name(name) if os_name is None else os_name
        try:
            shm = posix_ipc.SharedMemory(os_name, posix_ipc.O_CREX, mode=mode, size=0)
        except posix_ipc.ExistentialError as exc:
            raise StoreExistsError(errno.EEXIST, f"store {name!r} already exists") from exc
        except posix_ipc.PermissionsError as exc:
            raise StorePermissionError(
                errno.EACCES, f"cannot create store {name!r}: {exc}"
            ) from exc
        fd = shm.fd
        try:
            if group is not None and os.fstat(fd).st_gid != group:
                _chgrp(fd, group, name, mode)
            os.fchmod(fd, mode)  # shm_open applies the umask; the caller's mode is what counts
            os.posix_fallocate(fd, 0, size)
            return cls(name, fd, size, os_name)
        except StorePermissionError:
            os.close(fd)
            _unlink_quietly(os_name)
            raise
        except OSError as exc:
            os.close(fd)
            _unlink_quietly(os_name)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise StateStoreError(
                    f"cannot create store {name!r}: {size} bytes do not fit in shared memory "
                    f"({os.strerror(exc.errno)}); free space in /dev/shm or make the store smaller"
                ) from exc
            raise StateStoreError(f"cannot create store {name!r}: {exc}") from exc
        except BaseException:
            os.close(fd)
            _unlink_quietly(os_name)
            raise

    @classmethod
    def anonymous(cls, label: str, size: int) -> Segment:
        """A segment with no name anywhere (Linux ``memfd_create``): nothing can ever be left in
        ``/dev/shm``, and only this process and its forked children can map it. Elsewhere, a
        named segment unlinked right after creation."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create(f"shmstore-{label}", os.MFD_CLOEXEC)
            try:
                os.posix_fallocate(fd, 0, size)
                return cls(label, fd, size, named=False)
            except BaseException:
                os.close(fd)
                raise
        segment = cls.create(label, size, 0o600)
        unlink_segment(label)
        segment.named = False
        return segment

    @classmethod
    def open(
        cls, name: str, *, readonly: bool | None = None, os_name: str | None = None
    ) -> Segment:
        """Open and map *name*'s segment (or the one named *os_name*): read-write with
        ``readonly=False`` (:class:`StorePermissionError` if the OS grants only read access),
        read-only with ``True``, and with ``None`` read-write if the OS allows it, else
        read-only."""
        fd, readonly = _open_fd(name, readonly, os_name)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                # Created but not yet sized: the creator is between shm_open and fallocate.
                raise UnsizedSegmentError(f"store {name!r} is still being created")
            return cls(name, fd, size, os_name, readonly=readonly)
        except BaseException:
            os.close(fd)
            raise

    def reopen(self) -> None:
        """Give this process its own open file description (after ``fork()``)."""
        old = self.fd
        self.fd, _ = _open_fd(self.name, self.readonly, self.os_name)
        os.close(old)
        if self.named:
            _hold_attached(self.fd)

    def removed(self) -> bool:
        """Whether this segment is no longer the one the store's name points to: the name was
        removed (``unlink``/``shmstore rm``), or removed and taken by a new store. Handles of
        such a segment keep a private, orphaned store. Always ``False`` for an anonymous one."""
        if not self.named:
            return False
        mine = os.fstat(self.fd)
        if mine.st_nlink == 0:
            return True  # Linux: the tmpfs file has no name left
        if _SHM_DIR is not None:  # Linux: the name is a file; one stat, no open
            try:
                now = os.stat(os.path.join(_SHM_DIR, self.os_name.lstrip("/")))
            except FileNotFoundError:
                return True
            except OSError:
                return False  # not ours to look at: assume the name is still this segment
        else:
            try:
                fd, _ = _open_fd(self.name, True, self.os_name)
            except StoreNotFoundError:
                return True
            except StorePermissionError:
                return False
            try:
                now = os.fstat(fd)
            finally:
                os.close(fd)
        return (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino)

    def owner_uid(self) -> int:
        return os.fstat(self.fd).st_uid

    def mode(self) -> int:
        return os.fstat(self.fd).st_mode & 0o777

    def group(self) -> int:
        return os.fstat(self.fd).st_gid

    def close(self) -> None:
        try:
            deadline = time.monotonic() + _UNMAP_PATIENCE
            while True:
                try:
                    self.map.close()
                    break
                except BufferError as exc:
                    # Another thread is decoding a value in place from the mapping (``_ring``);
                    # it lets go of its view within one decode. Anything longer is a bug.
                    if time.monotonic() > deadline:
                        raise StateStoreError(
                            f"cannot unmap store {self.name!r}: a view into it is still in use"
                        ) from exc
                    time.sleep(_UNMAP_POLL)
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class UnsizedSegmentError(StateStoreError):
    """The segment exists but has no size yet: a create in progress."""


def _hold_attached(fd: int) -> None:
    """Mark this descriptor's description as attached (see the module essay). A shared lock
    conflicts with nobody's (probes only ask), so it is always granted; where OFD locks are
    missing, or the kernel is out of lock records, the mark is simply absent."""
    if OFD_SUPPORTED:
        with contextlib.suppress(OSError):
            byte_lock(fd, ATTACHED_BYTE, fcntl.F_RDLCK)


def attached_elsewhere(name: str) -> bool | None:
    """Whether some open handle of store *name*, in any process and any PID namespace, holds the
    segment open -- asked through a fresh descriptor, so this process's own handles count too.
    ``None`` where OFD locks do not exist; ``StoreNotFoundError`` if there is no such store."""
    if not OFD_SUPPORTED:
        return None
    fd, _ = _open_fd(name, True)
    try:
        return byte_locked(fd, ATTACHED_BYTE)
    finally:
        os.close(fd)


def _open_fd(name: str, readonly: bool | None, os_name: str | None = None) -> tuple[int, bool]:
    """``(fd, readonly)``; see :meth:`Segment.open` for *readonly*."""
    os_name = segment_name(name) if os_name is None else os_name
    try:
        try:
            shm = posix_ipc.SharedMemory(os_name, read_only=bool(readonly))
        except posix_ipc.PermissionsError:
            if readonly is not None:
                raise
            readonly = True  # read is all we may do, if that
            shm = posix_ipc.SharedMemory(os_name, read_only=True)
    except posix_ipc.ExistentialError as exc:
        raise StoreNotFoundError(errno.ENOENT, f"no store named {name!r}") from exc
    except posix_ipc.PermissionsError as exc:
        wanted = "read" if readonly else "write"
        raise StorePermissionError(
            errno.EACCES, f"cannot open store {name!r} to {wanted}: {exc}"
        ) from exc
    fd: int = shm.fd
    return fd, bool(readonly)


def resolve_group(group: int | str) -> int:
    """A group id from a gid or a group name; ``ValueError`` for an unknown name."""
    if isinstance(group, bool) or not isinstance(group, (int, str)):
        raise TypeError(f"group must be a gid or a group name, got {type(group).__name__}")
    if isinstance(group, int):
        if group < 0:
            raise ValueError(f"group must be a gid (>= 0), got {group}")
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no group named {group!r}") from None


def _chgrp(fd: int, gid: int, name: str, mode: int) -> None:
    try:
        os.fchown(fd, -1, gid)
    except PermissionError as exc:
        if not (mode >> 3) & ~mode & 0o7:
            return  # the group is granted nothing that everyone else is not: it does not matter
        raise StorePermissionError(
            errno.EPERM,
            f"cannot give store {name!r} group {gid}: only a member of that group (or root) can",
        ) from exc


def _unlink_quietly(os_name: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(os_name)
    except posix_ipc.ExistentialError:
        return False
    except posix_ipc.PermissionsError as exc:
        raise StorePermissionError(
            errno.EPERM, f"cannot remove {os_name}: it belongs to another user ({exc})"
        ) from exc
    return True


def unlink_segment(name: str, *, os_name: str | None = None) -> bool:
    """Remove the segment name of store *name* (or *os_name*); ``False`` if it did not exist."""
    return _unlink_quietly(segment_name(name) if os_name is None else os_name)
