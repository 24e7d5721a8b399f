"""TFRecord framing, the one definition of how event files hold their records.

A record is ``length (uint64 LE) | masked_crc32c(length) (uint32 LE) | data | masked_crc32c(data)
(uint32 LE)``. The writer (`graddiag.events`) frames with `frame`; the reader (`graddiag.reader`)
finds the intact records of a buffer with `scan`, then decodes their events.
"""

from __future__ import annotations

import struct

import crc32c as _crc32c

__all__ = ["HEADER_SIZE", "FOOTER_SIZE", "frame", "masked_crc32c", "scan"]

_MASK_DELTA = 0xA282EAD8
_LENGTH = struct.Struct("<Q")
_HEADER = struct.Struct("<QI")
_U32 = struct.Struct("<I")
#: bytes before a record's data (length and its CRC) and after it (the data's CRC)
HEADER_SIZE = _HEADER.size
FOOTER_SIZE = _U32.size


def masked_crc32c(data) -> int:
    """TFRecord's masked CRC-32C of `data` (any bytes-like object).

    The CRC is rotated right by 15 bits and offset by a constant, so that a CRC stored inside the
    data it covers does not checksum to a fixed value.
    """
    crc = _crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """`data` as one framed record."""
    length = _LENGTH.pack(len(data))
    return length + _U32.pack(masked_crc32c(length)) + data + _U32.pack(masked_crc32c(data))


def scan(buf: bytes, resyncing: bool = False) -> tuple[list[tuple[int, int]], int, int, bool]:
    """Find the intact records in `buf`, checking both CRCs of each.

    A record whose data CRC fails is skipped and counted as corrupt. A header whose length CRC fails
    means the framing is lost: the scan moves on one byte at a time until a header checks out again,
    counting the whole stretch as one corrupt record.

    Args:
        buf: bytes starting at a record boundary (or inside a stretch being resynchronized).
        resyncing: whether the previous buffer of the same file ended while resynchronizing.

    Returns:
        ``(records, end, corrupt, resyncing)``: ``(start, stop)`` of each intact record's data;
        the offset where the first incomplete record starts (the caller keeps ``buf[end:]`` for
        the next read; at the end of a file it is a truncated tail); the number of corrupt records;
        and whether the scan ended while resynchronizing.
    """
    mv = memoryview(buf)
    n = len(buf)
    pos = 0
    corrupt = 0
    records: list[tuple[int, int]] = []
    append = records.append
    crc = masked_crc32c
    unpack_header = _HEADER.unpack_from
    unpack_u32 = _U32.unpack_from
    while pos + 12 <= n:
        length, hcrc = unpack_header(buf, pos)
        if crc(mv[pos : pos + 8]) != hcrc:
            if not resyncing:
                corrupt += 1
                resyncing = True
            pos += 1
            continue
        resyncing = False
        end = pos + 12 + length
        if end + 4 > n:
            break
        if crc(mv[pos + 12 : end]) != unpack_u32(buf, end)[0]:
            corrupt += 1
        else:
            append((pos + 12, end))
        pos = end + 4
    return records, pos, corrupt, resyncing
