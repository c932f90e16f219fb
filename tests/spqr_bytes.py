"""Byte-level helpers for tests that alter valid .spqr files: patch a tensor record or a
section, then fix up the header CRC (C-2.3) and the section CRCs (C-2.8a) so that the change
reaches the checks behind them. Written from SPEC section 2 (offsets of the fixed header, the
160-byte tensor records and the 32-byte section records), independently of the reader.
"""

from __future__ import annotations

import struct
import zlib

FIXED = 64
TREC = 160
SREC = 32


def counts(buf) -> tuple[int, int, int, int]:
    """(tensor_count, section_count, string_table_length, metadata_length)."""
    t, s = struct.unpack_from("<II", buf, 24)
    st_len, md_len = struct.unpack_from("<QQ", buf, 32)
    return t, s, st_len, md_len


def header_length(buf) -> int:
    t, s, st_len, md_len = counts(buf)
    return FIXED + TREC * t + SREC * s + st_len + md_len


def fix_header_crc(buf: bytearray) -> bytearray:
    """Recompute the header CRC over min(header_length, len(buf)) bytes."""
    hlen = min(header_length(buf), len(buf))
    if hlen < 60:
        return buf
    crc = zlib.crc32(bytes(buf[:56]) + b"\0\0\0\0" + bytes(buf[60:hlen]))
    struct.pack_into("<I", buf, 56, crc)
    return buf


def section_records(buf) -> list[tuple[int, int, int, int]]:
    """[(record offset, data offset, length, role)] for every section record in the file."""
    t, s, _, _ = counts(buf)
    base = FIXED + TREC * t
    out = []
    for j in range(s):
        rec = base + SREC * j
        if rec + SREC > len(buf):
            break
        off, length, _crc, role = struct.unpack_from("<QQIH", buf, rec)
        out.append((rec, off, length, role))
    return out


def fix_section_crcs(buf: bytearray) -> bytearray:
    """Recompute every section CRC whose section lies inside the file (then the header CRC)."""
    for rec, off, length, _ in section_records(buf):
        if off + length <= len(buf):
            struct.pack_into("<I", buf, rec + 16, zlib.crc32(bytes(buf[off : off + length])))
    return fix_header_crc(buf)


def fix_all(buf: bytearray) -> bytearray:
    return fix_section_crcs(buf)


def tensor_record(i: int) -> int:
    return FIXED + TREC * i


# Field offsets inside a tensor record (C-2.4).
REC_ENCODING = 8  # u16
REC_ENCODING_VERSION = 10  # u16
REC_DTYPE = 12  # u8
REC_NDIM = 13  # u8
REC_DIMS = 24  # 8 x u64
REC_DIGEST = 88  # 32 bytes
REC_PARAMS = 120  # 40 bytes


def patch_record(buf: bytearray, i: int, fmt: str, field_offset: int, *values) -> bytearray:
    struct.pack_into(fmt, buf, tensor_record(i) + field_offset, *values)
    return fix_header_crc(buf)


def section_of(buf, i: int, role: int) -> tuple[int, int]:
    """(data offset, length) of tensor i's section of ``role``."""
    first, nsec = struct.unpack_from("<II", buf, tensor_record(i) + 16)
    for _rec, off, length, r in section_records(buf)[first : first + nsec]:
        if r == role:
            return off, length
    raise KeyError(role)
