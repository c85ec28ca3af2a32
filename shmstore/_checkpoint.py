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

Reading checks magic, format, length and CRC before anything else, so a truncated or damaged file
is a clear :class:`CheckpointError`.
"""

from __future__ import annotations

import contextlib
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
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, header)
            for part in (payload, schema_record):
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    _remove_dead_writers_files(target)


def _remove_dead_writers_files(target: Path) -> None:
    """Temporary files of checkpoint writers that were killed before their rename."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        pid_text = stale.name[len(target.name) + 2 : -len(".tmp")].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        except PermissionError:
            pass  # alive, someone else's


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
