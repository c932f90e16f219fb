"""SPEC C-9.2: the order of the container checks decides the code of a file whose one fault
breaks several rules (the cases below each break two)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

import spqr_format
from spqr_format.errors import SpqrError


def _valid(tmp_path) -> bytes:
    path = tmp_path / "ok.spqr"
    spqr_format.save(path, {"w": spqr_format.RawTensor.from_array(np.ones(3, np.float32))})
    return path.read_bytes()


def _fix_crc(b: bytearray) -> bytearray:
    tc, sc, stl, ml = struct.unpack_from("<IIQQ", b, 24)
    hlen = 64 + 160 * tc + 32 * sc + stl + ml
    struct.pack_into("<I", b, 56, 0)
    struct.pack_into("<I", b, 56, zlib.crc32(bytes(b[:hlen])))
    return b


def _code(tmp_path, data: bytes) -> str:
    path = tmp_path / "case.spqr"
    path.write_bytes(bytes(data))
    with pytest.raises(SpqrError) as info:
        with spqr_format.open(path) as f:
            for name in f.names():
                f.decode(name)
    return info.value.code


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "E_TRUNCATED"),  # no byte contradicts the magic
        (b"\x89SP", "E_TRUNCATED"),  # a prefix of the magic, then too short
        (b"PK\x03\x04", "E_BAD_MAGIC"),  # short AND not the magic: the magic decides
        (b"hello world", "E_BAD_MAGIC"),
    ],
)
def test_short_files_are_judged_by_the_magic_first(tmp_path, data, code):
    assert _code(tmp_path, data) == code


def test_bad_magic_comes_before_the_version(tmp_path):
    b = bytearray(_valid(tmp_path))
    b[1] = ord("X")
    struct.pack_into("<H", b, 8, 7)
    assert _code(tmp_path, b) == "E_BAD_MAGIC"


def test_version_comes_before_the_header_crc(tmp_path):
    b = bytearray(_valid(tmp_path))
    struct.pack_into("<H", b, 8, 2)  # CRC now stale too
    assert _code(tmp_path, b) == "E_UNSUPPORTED_VERSION"


def test_alignment_comes_before_the_header_crc(tmp_path):
    b = bytearray(_valid(tmp_path))
    struct.pack_into("<I", b, 12, 48)  # not a power of two >= 64; CRC stale
    assert _code(tmp_path, b) == "E_BAD_FIELD"


def test_caps_come_before_truncation_and_crc(tmp_path):
    b = bytearray(_valid(tmp_path))
    struct.pack_into("<Q", b, 40, (64 << 20) + 1)  # metadata_length over its cap
    assert _code(tmp_path, b) == "E_LIMIT"


def test_header_crc_comes_before_required_features(tmp_path):
    b = bytearray(_valid(tmp_path))
    struct.pack_into("<Q", b, 16, 1)  # an unknown feature, CRC stale
    assert _code(tmp_path, b) == "E_HEADER_CRC"
    assert _code(tmp_path, _fix_crc(b)) == "E_UNKNOWN_FEATURE"
