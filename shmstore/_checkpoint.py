"""Checkpoint files: the newest value of a store, its version and schema, written atomically.

Format (little-endian)::

    off  size  field
      0     8  magic b"SHMCKPT1"
      8     4  format version (u32) = 2 (1: no schema record; still read)
     12     4  CRC32 of everything after this field (u32)
     16    16  schema fingerprint of the store's type
     32     8  version of the value (u64)
     40     8  written, ns since the epoch (u64)
     48     8  payload length (u64)
     56    64  type name, UTF-8, NUL padded
    120     8  schema record length (u64; format 2)
    128     -  payload: the value exactly as the store holds it (MessagePack)
     ...    -  the store's schema record (``_schemarecord``, JSON): every type it has had, so a
               checkpoint taken before an evolution restores into a store of a successor type

Writing goes to a temporary file in the same directory, is flushed and ``fsync``\\ ed, then renamed
over the target, and the directory is ``fsync``\\ ed: a process killed at any point leaves either
the previous checkpoint or the new one, never a mix. Temporary files of killed writers are removed
by the next write. One process should own a checkpoint path: two processes writing the same path
at once each leave a valid file, but the older version may be the one that stays.

Whose temporary file is whose: a writer holds an exclusive ``flock`` on its temporary file from
just after creating it until after the rename, and the next write removes only temporary files
whose lock it can take. The kernel drops the lock when its holder dies, and the answer holds
across PID namespaces -- a checkpoint directory shared by containers -- where the PID in the
file's name may name nobody, or somebody else (it stays in the name, for people). A cleaner can
take the lock in the instant between a writer's create and its lock; it then removes the file
while holding the lock, and the writer, whose lock waits for the cleaner's, finds its file
unlinked (no links left) and starts again under a new name.

Reading checks magic, format, length and CRC before anything else, so a truncated or damaged file
is a clear :class:`CheckpointError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from ._errors import CheckpointError
from ._layout import decode_name_field, name_field

__all__ = ["Checkpoint", "read_checkpoint", "write_checkpoint"]

MAGIC = b"SHMCKPT1"
FORMAT = 2
_HEADER = struct.Struct("<8sII16sQQQ64s")
_SCHEMA_LENGTH = struct.Struct("<Q")  # after the header, in format 2
_CRC_FROM = 16  # the CRC covers the header after its own field, and the payload


@dataclass(frozen=True, slots=True)
class Checkpoint:
    fingerprint: bytes
    type_name: str
    version: int
    written_ns: int
    payload: bytes
    schema_record: bytes = b""  # the store's recorded types (format 2), JSON


def write_checkpoint(
    path: str | os.PathLike[str],
    *,
    fingerprint: bytes,
    type_name: str,
    version: int,
    payload: bytes | memoryview,
    schema_record: bytes = b"",
) -> None:
    target = Path(path)
    body = _HEADER.pack(
        MAGIC,
        FORMAT,
        0,
        fingerprint,
        version,
        time.time_ns(),
        len(payload),
        name_field(type_name),
    ) + _SCHEMA_LENGTH.pack(len(schema_record))
    crc = zlib.crc32(schema_record, zlib.crc32(payload, zlib.crc32(body[_CRC_FROM:])))
    header = body[:12] + crc.to_bytes(4, "little") + body[_CRC_FROM:]
    fd, tmp = _create_locked(target)
    try:
        os.write(fd, header)
        for part in (payload, schema_record):
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.replace(tmp, target)  # still locked: never taken for a dead writer's file
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    _remove_dead_writers_files(target)


def _create_locked(target: Path) -> tuple[int, Path]:
    """A new temporary file beside *target*, open for writing and locked (see the module)."""
    while True:
        tmp = target.with_name(f".{target.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only for a cleaner that took it first
            if os.fstat(fd).st_nlink:
                return fd, tmp
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        os.close(fd)  # a cleaner removed it before our lock: a new name


def _remove_dead_writers_files(target: Path) -> None:
    """Temporary files of checkpoint writers that died before their rename: those whose lock
    can be taken (a live writer holds its file's lock until after its rename)."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        try:
            fd = os.open(stale, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already, or not ours to open
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer is alive
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()  # under the lock: a writer racing for it starts again
        finally:
            os.close(fd)


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc.strerror}") from exc
    if len(raw) < _HEADER.size:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated: {len(raw)} bytes, "
            f"shorter than its {_HEADER.size}-byte header"
        )
    magic, fmt, crc, fingerprint, version, written, length, type_name = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CheckpointError(f"{str(path)!r} is not a shmstore checkpoint (magic {magic!r})")
    if fmt not in (1, FORMAT):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {fmt}; this reads 1 and {FORMAT}"
        )
    header_size = _HEADER.size
    schema_length = 0
    if fmt == FORMAT:
        if len(raw) < header_size + _SCHEMA_LENGTH.size:
            raise CheckpointError(f"checkpoint {str(path)!r} is truncated: no schema length")
        (schema_length,) = _SCHEMA_LENGTH.unpack_from(raw, header_size)
        header_size += _SCHEMA_LENGTH.size
    if length + schema_length != len(raw) - header_size:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or padded: header says {length} payload "
            f"bytes and {schema_length} schema bytes, file has {len(raw) - header_size}"
        )
    if zlib.crc32(raw[_CRC_FROM:]) != crc:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: CRC mismatch")
    if version < 1:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds version {version}: nothing to restore"
        )
    return Checkpoint(
        fingerprint=fingerprint,
        type_name=decode_name_field(type_name),
        version=version,
        written_ns=written,
        payload=raw[header_size : header_size + length],
        schema_record=raw[header_size + length :],
    )
