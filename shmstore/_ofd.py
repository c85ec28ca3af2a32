"""Open-file-description byte locks (Linux ``F_OFD_SETLK``): the kernel's word on who is alive.

An OFD lock belongs to an open file description, not to a process or a PID: the kernel drops it
when the last descriptor of that description closes -- whatever killed the process -- and a PID
that gets reused cannot inherit it. Nor does it depend on which PID namespace the holder or the
asker is in, which is why every "is anyone still there?" question about a store is asked with
one of these locks and never with a PID (a PID recorded in another container means nothing
here). The locks are advisory and sit on bytes far past the data (see ``_registry``): they touch
nothing.

Byte map (offsets from the start of a store's segment file):

* ``LIVENESS_BASE + i`` -- write lock of the handle that owns registry entry *i* (``_registry``);
* ``REGISTRY_LOCK_BYTE = LIVENESS_BASE - 1`` -- the registry lock (``_registry``);
* ``ATTACHED_BYTE = LIVENESS_BASE - 2`` -- a read lock of every handle that has the store
  open (``_segment``): "somebody, in some namespace, has it open";
* ``MIRROR_BYTE = LIVENESS_BASE - 3`` -- a write lock of the mirroring process's handle, from
  its claim until it closes (``_replication``): "the mirror's process is alive".

Where OFD locks do not exist (macOS), :data:`OFD_SUPPORTED` is false and callers fall back.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Final

__all__ = [
    "ATTACHED_BYTE",
    "LIVENESS_BASE",
    "MIRROR_BYTE",
    "OFD_SUPPORTED",
    "REGISTRY_LOCK_BYTE",
    "byte_lock",
    "byte_locked",
]

OFD_SUPPORTED: Final = hasattr(fcntl, "F_OFD_SETLK")
LIVENESS_BASE: Final = 1 << 40  # far past the data: the locks are advisory and touch no bytes
REGISTRY_LOCK_BYTE: Final = LIVENESS_BASE - 1
ATTACHED_BYTE: Final = LIVENESS_BASE - 2
MIRROR_BYTE: Final = LIVENESS_BASE - 3

# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = struct.Struct("hhqqi4x")


def byte_lock(fd: int, offset: int, kind: int) -> bool:
    """Set (``F_WRLCK``, ``F_RDLCK``) or clear (``F_UNLCK``) this descriptor's OFD lock on
    byte *offset*. ``False`` if another description holds a conflicting one."""
    arg = _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def byte_locked(fd: int, offset: int) -> bool:
    """Whether another open file description holds any lock on byte *offset*. Only asks
    (``F_OFD_GETLK``): takes nothing, and works on a read-only descriptor too, where a
    ``F_WRLCK`` probe would fail with ``EBADF``."""
    arg = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, arg)
    return bool(_FLOCK.unpack(got)[0] != fcntl.F_UNLCK)
