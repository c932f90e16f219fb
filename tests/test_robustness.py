"""The reader against damaged files: every flipped byte and every truncation is refused.

For each damaged copy of a small valid file, opening it and reading every section with CRC
checks must raise a subclass of SpqrError and nothing else, must not allocate much more than
the file's size (tracemalloc). (No wall-clock bounds here: timing belongs in benchmarks/,
a loaded machine must not fail the suite.) A single flipped byte must always be
detected: the header CRC (C-2.3) covers the header, the padding is checked to be zero
(C-1.5), the section CRCs (C-2.8a) cover the data.
"""

from __future__ import annotations

import hashlib
import random
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from spqr_format.container import ContainerReader, ContainerWriter
from spqr_format.errors import SpqrError


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> bytes:
    rng = np.random.default_rng(1234)
    path = tmp_path_factory.mktemp("robust") / "valid.spqr"
    tensors = [
        ("model.layers.0.mlp.w", 2, (3, 5), [(2, 37), (3, 64), (4, 0), (6, 9), (7, 20)]),
        ("model.embed", 1, (4, 4), [(1, 64)]),
        ("tête", 1, (0, 3), [(1, 0)]),
    ]
    with ContainerWriter(path, metadata={"model.arch": "llama", "user.x": [1, {"y": None}]}) as w:
        for name, enc, shape, secs in tensors:
            sections = [(role, rng.integers(0, 256, n, dtype=np.uint8)) for role, n in secs]
            w.add_tensor(
                name,
                encoding=enc,
                encoding_version=1,
                dtype=2,
                shape=shape,
                params=bytes(40),
                sections=sections,
                digest=hashlib.sha256(name.encode()).digest(),
            )
    return path.read_bytes()


def read_all(path) -> list[bytes]:
    with ContainerReader(path) as r:
        return [bytes(r.section_bytes(t, s.role)) for t in r.tensors for s in t.sections]


class Attempts:
    """Runs read_all on damaged bytes under tracemalloc, checking the allocation bound."""

    def __init__(self, path, size: int) -> None:
        self.path = path
        self.limit = 64 * size + (1 << 20)

    def __call__(self, data: bytes) -> str:
        self.path.write_bytes(data)
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        try:
            read_all(self.path)
            result = "OK"
        except SpqrError as exc:
            result = exc.code
        # Any other exception propagates and fails the test.
        peak = tracemalloc.get_traced_memory()[1] - base
        assert peak < self.limit, f"{peak} bytes allocated for a {len(data)}-byte file"
        return result


@pytest.fixture
def attempt(tmp_path, valid):
    tracemalloc.start()
    try:
        yield Attempts(tmp_path / "damaged.spqr", len(valid))
    finally:
        tracemalloc.stop()


def data_offset(buf: bytes) -> int:
    return struct.unpack_from("<Q", buf, 48)[0]


def test_the_valid_file_reads(tmp_path, valid, attempt):
    assert attempt(valid) == "OK"
    assert len(valid) > 600 and data_offset(valid) % 64 == 0


def test_every_single_byte_flip_is_detected(valid, attempt):
    doff = data_offset(valid)
    for pos in range(len(valid)):
        damaged = bytearray(valid)
        damaged[pos] ^= 0xFF
        code = attempt(bytes(damaged))
        if pos < doff:  # fixed header, records, names, metadata, header padding
            assert code != "OK", f"flip at {pos} (header) went unnoticed"
        else:  # a section byte or the zero padding between sections
            assert code in ("E_SECTION_CRC", "E_BAD_LAYOUT"), f"flip at {pos}: {code}"


def test_every_truncation_is_refused(valid, attempt):
    for length in range(len(valid)):
        assert attempt(valid[:length]) == "E_TRUNCATED", f"truncated to {length}"


def _recrc(buf: bytearray) -> None:
    t, s = struct.unpack_from("<II", buf, 24)
    st_len, md_len = struct.unpack_from("<QQ", buf, 32)
    hlen = min(64 + 160 * t + 32 * s + st_len + md_len, len(buf))
    crc = zlib.crc32(bytes(buf[:56]) + b"\0\0\0\0" + bytes(buf[60:hlen]))
    struct.pack_into("<I", buf, 56, crc)


def test_header_flips_behind_a_valid_crc_never_crash(valid, attempt):
    """With the CRC fixed up, each flip reaches the structural checks behind it."""
    seen = set()
    for pos in range(data_offset(valid)):
        if 56 <= pos < 60:
            continue
        damaged = bytearray(valid)
        damaged[pos] ^= 0xFF
        _recrc(damaged)
        seen.add(attempt(bytes(damaged)))
    # Digests, params and encoding ids are opaque here; everything else is refused somehow.
    assert {"E_BAD_FIELD", "E_BAD_LAYOUT", "E_LIMIT", "E_BAD_METADATA", "E_BAD_NAME"} <= seen


def test_random_overwrites_never_crash(valid, attempt):
    """Seeded random multi-byte damage, half of it behind a recomputed header CRC."""
    rng = random.Random(20261122)
    for trial in range(400):
        damaged = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(valid))
            damaged[pos : pos + rng.randint(1, 16)] = rng.randbytes(rng.randint(1, 16))
        if trial % 2:
            _recrc(damaged)
        attempt(bytes(damaged))
