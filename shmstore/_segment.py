"""One POSIX shared-memory segment: create, open, map, close, unlink.

Only ``posix_ipc`` objects are used, never the stdlib resource tracker, which unlinks a segment
when any process that attached to it exits. ``close()`` is about this process; ``unlink`` removes
the name for everyone.

The full size is reserved with ``posix_fallocate`` at create: tmpfs is sparse, and the first
touch of a page that an over-committed ``/dev/shm`` cannot back kills the process with SIGBUS
instead of raising an error. Reserving up front turns that into a clear error at create time.
"""

from __future__ import annotations

import errno
import mmap
import os
import time

import posix_ipc

from ._errors import StateStoreError, StoreExistsError, StoreNotFoundError, StorePermissionError
from ._names import segment_name

__all__ = ["Segment", "UnsizedSegmentError", "unlink_segment"]

_UNMAP_PATIENCE = 10.0  # seconds a close() waits for in-place decodes to let go of the mapping
_UNMAP_POLL = 100e-6


class Segment:
    """A mapped segment and this process's descriptor for it.

    The descriptor also carries the writer lock (``flock``) and the registry's liveness locks
    (open-file-description byte locks), which is why :meth:`reopen` exists: after ``fork()`` the
    child must not share the parent's open file description, or it would share its locks.
    """

    __slots__ = ("fd", "map", "name", "os_name", "size")

    def __init__(self, name: str, fd: int, size: int, os_name: str | None = None) -> None:
        self.name = name
        self.os_name = segment_name(name) if os_name is None else os_name
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size)

    @classmethod
    def create(cls, name: str, size: int, mode: int, *, os_name: str | None = None) -> Segment:
        """Create *name*'s segment (or the one named *os_name*: a generation of the store)."""
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
            os.fchmod(fd, mode)  # shm_open applies the umask; the caller's mode is what counts
            os.posix_fallocate(fd, 0, size)
            return cls(name, fd, size, os_name)
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
                return cls(label, fd, size)
            except BaseException:
                os.close(fd)
                raise
        segment = cls.create(label, size, 0o600)
        unlink_segment(label)
        return segment

    @classmethod
    def open(cls, name: str, *, os_name: str | None = None) -> Segment:
        fd = _open_fd(name, os_name)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                # Created but not yet sized: the creator is between shm_open and fallocate.
                raise UnsizedSegmentError(f"store {name!r} is still being created")
            return cls(name, fd, size, os_name)
        except BaseException:
            os.close(fd)
            raise

    def reopen(self) -> None:
        """Give this process its own open file description (after ``fork()``)."""
        old = self.fd
        self.fd = _open_fd(self.name, self.os_name)
        os.close(old)

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


def _open_fd(name: str, os_name: str | None = None) -> int:
    try:
        shm = posix_ipc.SharedMemory(segment_name(name) if os_name is None else os_name)
    except posix_ipc.ExistentialError as exc:
        raise StoreNotFoundError(errno.ENOENT, f"no store named {name!r}") from exc
    except posix_ipc.PermissionsError as exc:
        raise StorePermissionError(errno.EACCES, f"cannot open store {name!r}: {exc}") from exc
    fd: int = shm.fd
    return fd


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
