"""SpqrFile.decode keeps SPEC's decoder contract: digests checked unless asked not to (C-2.12),
and conversions of raw tensors to another dtype round as C-7.5 says, NaNs included."""

from __future__ import annotations

import numpy as np
import pytest
from strategies import random_bilevel

import spqr_format
from spqr_format.codec.bilevel import BilevelParams
from spqr_format.container.layout import TENSOR_RECORD
from spqr_format.errors import DigestMismatchError
from spqr_format.spec import DType


def _corrupt_digest(path) -> None:
    """Flip one digest byte of tensor 0 and fix the header CRC (the file stays valid)."""
    import struct
    import zlib

    b = bytearray(path.read_bytes())
    b[64 + 88] ^= 0x01  # tensor record 0, digest (C-2.4: offset 88)
    tc, sc, stl, ml = struct.unpack_from("<IIQQ", b, 24)
    hlen = 64 + TENSOR_RECORD.size * tc + 32 * sc + stl + ml
    struct.pack_into("<I", b, 56, 0)
    struct.pack_into("<I", b, 56, zlib.crc32(bytes(b[:hlen])))
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
def test_decode_checks_the_digest_by_default(tmp_path, dtype):
    t = random_bilevel(np.random.default_rng(0), 20, 48, BilevelParams(3, 16, 3, 16), True, 0.05)
    path = tmp_path / "w.spqr"
    spqr_format.save(path, {"w": t})
    with spqr_format.open(path) as f:
        good = f.decode("w", dtype)
    _corrupt_digest(path)
    with spqr_format.open(path) as f:
        with pytest.raises(DigestMismatchError):
            f.decode("w", dtype)
        # the explicit opt-out of C-2.12 still decodes, to the same values
        np.testing.assert_array_equal(f.decode("w", dtype, verify_digest=False), good)


def test_bilevel_decoded_to_another_dtype_is_the_rounded_f32_decode(tmp_path):
    t = random_bilevel(np.random.default_rng(1), 9, 40, BilevelParams(4, 8), True, 0.1)
    t.dtype = DType.FLOAT16
    path = tmp_path / "w.spqr"
    spqr_format.save(path, {"w": t})
    with spqr_format.open(path) as f:
        v = f.decode("w", "float32")
        np.testing.assert_array_equal(
            f.decode("w").view(np.uint16), v.astype(np.float16).view(np.uint16)
        )


def test_raw_nan_narrowing_gives_quiet_nans_with_the_top_payload_bits(tmp_path):
    bits = np.array([0x7F800001, 0x7FC00001, 0xFFA00000, 0x7F802000, 0x3F800000], np.uint32)
    path = tmp_path / "r.spqr"
    spqr_format.save(path, {"r": spqr_format.RawTensor.from_array(bits.view(np.float32))})
    with spqr_format.open(path) as f:
        h = f.decode("r", "float16").view(np.uint16)
        b = f.decode("r", "bfloat16").view(np.uint16)
        w = f.decode("r")  # own dtype: bit for bit (C-4.1)
    assert h.tolist() == [0x7E00, 0x7E00, 0xFF00, 0x7E01, 0x3C00]
    assert b.tolist() == [0x7FC0, 0x7FC0, 0xFFE0, 0x7FC0, 0x3F80]
    assert w.view(np.uint32).tolist() == bits.tolist()
