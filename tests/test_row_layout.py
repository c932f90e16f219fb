"""The row layout the first-generation GPU kernels read (spqr_format.codec.row_layout) is a
faithful rearrangement of the file's dense sections, and its C twin (spqr_row_layout.c)
produces it bit for bit (CPU only; the C half is skipped without a C compiler)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from c_build import CC, build_shared
from hypothesis import given, settings
from strategies import bilevel_tensors, make_outliers, random_bilevel

from spqr_format.codec.bilevel import BilevelParams
from spqr_format.codec.outliers import decode_outlier_stream
from spqr_format.codec.packing import pack
from spqr_format.codec.row_layout import pack_padded_rows, row_words, to_row_layout
from spqr_format.gpu import _kernels as K


def _check_row_layout(t, r) -> None:
    m, n = t.shape
    prm = t.params
    assert r.codes.shape == (m, row_words(n, prm.bits))
    np.testing.assert_array_equal(r.codes, pack_padded_rows(t.codes, prm.bits))
    if prm.stats_bits:
        g = -(-n // prm.group_size)
        np.testing.assert_array_equal(
            r.stats, pack_padded_rows(t.stats.reshape(m, 2 * g), prm.stats_bits)
        )
    else:
        np.testing.assert_array_equal(r.stats.view(np.float16), t.stats)
    if t.perm is None:
        assert r.perm is None
    else:
        assert r.perm.dtype == np.uint32 and np.array_equal(r.perm, t.perm)
    k = 0 if t.outliers is None else len(t.outliers)
    if k == 0:
        assert r.outlier_rows is None and r.outlier_entries is None
        return
    # per-row stream: blocks of one row
    o = decode_outlier_stream(r.outlier_rows, r.outlier_entries, m, n, k, block_rows=1)
    for name in ("rows", "cols"):
        np.testing.assert_array_equal(getattr(o, name), getattr(t.outliers, name))
    np.testing.assert_array_equal(o.values.view(np.uint16), t.outliers.values.view(np.uint16))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(bilevel_tensors())
def test_row_layout_holds_every_code_statistic_and_outlier(t):
    _check_row_layout(t, to_row_layout(pack(t)))


def test_row_layout_of_wide_rows_with_skips():
    rng = np.random.default_rng(11)
    n = 70_001  # u32 perm entries in the file, odd width: rows are not whole words
    t = random_bilevel(rng, 3, n, BilevelParams(3, 16, 3, 2), True, 0.0)
    t.outliers = make_outliers([0, 0, 2], [3, 68_000, n - 1], [1.0, -2.0, 0.5])
    p = pack(t)
    assert p.perm.dtype == np.uint32
    _check_row_layout(t, to_row_layout(p))


# --- the C twin ----------------------------------------------------------------------------


class Sections(ctypes.Structure):  # spqr_bilevel_sections (spqr_gpu.h)
    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("stats", ctypes.c_void_p),
        ("stats2", ctypes.c_void_p),
        ("perm", ctypes.c_void_p),
        ("oindex", ctypes.c_void_p),
        ("oents", ctypes.c_void_p),
        ("m", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("bits", ctypes.c_int32),
        ("stats_bits", ctypes.c_int32),
        ("group_size", ctypes.c_int32),
        ("stats_group_size", ctypes.c_int32),
        ("outlier_count", ctypes.c_int64),
        ("outlier_entries", ctypes.c_int64),
    ]


class Sizes(ctypes.Structure):  # spqr_row_sizes
    _fields_ = [
        (k, ctypes.c_int64)
        for k in (
            "code_row_words",
            "stats_row_words",
            "codes_words",
            "stats_words",
            "perm_words",
            "orows_words",
            "oents_words",
        )
    ]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if CC is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("rl") / "libspqr_row_layout.so"
    so = build_shared(K.KERNEL_DIR / "spqr_row_layout.c", out)
    so.spqr_row_layout_sizes.restype = ctypes.c_int
    so.spqr_row_repack.restype = ctypes.c_int
    return so


def _ptr(a):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def _c_row_layout(lib, p):
    """Run spqr_row_layout_sizes + spqr_row_repack on the file-form sections of ``p``."""
    prm, h = p.params, p.header
    keep = [np.ascontiguousarray(a) if a is not None else None for a in
            (p.codes, p.stats, p.stats2, p.perm, p.outlier_index, p.outlier_entries)]  # fmt: skip
    s = Sections(*map(_ptr, keep), *p.shape, prm.bits, prm.stats_bits, prm.group_size,
                 prm.stats_group_size, h.outlier_count, h.outlier_entry_count)  # fmt: skip
    z = Sizes()
    if not lib.spqr_row_layout_sizes(ctypes.byref(s), ctypes.byref(z)):
        return None
    arrs = [np.zeros(max(int(w), 1), dtype=np.uint32) for w in
            (z.codes_words, z.stats_words, z.perm_words, z.orows_words, z.oents_words)]  # fmt: skip
    assert lib.spqr_row_repack(ctypes.byref(s), ctypes.byref(z), *map(_ptr, arrs)) == 1
    sizes = (z.codes_words, z.stats_words, z.perm_words, z.orows_words, z.oents_words)
    return [a[: int(w)] for a, w in zip(arrs, sizes, strict=True)]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(bilevel_tensors())
def test_c_row_repack_matches_python_bit_for_bit(lib, t):
    p = pack(t)
    r = to_row_layout(p)
    codes, stats, perm, orows, oents = _c_row_layout(lib, p)
    np.testing.assert_array_equal(codes, r.codes.reshape(-1))
    np.testing.assert_array_equal(stats, np.ascontiguousarray(r.stats).view(np.uint32).reshape(-1))
    np.testing.assert_array_equal(perm, np.zeros(0) if r.perm is None else r.perm)
    np.testing.assert_array_equal(orows, np.zeros(0) if r.outlier_rows is None else r.outlier_rows)
    np.testing.assert_array_equal(
        oents, np.zeros(0) if r.outlier_entries is None else r.outlier_entries
    )


def test_c_row_repack_of_wide_rows_with_skips(lib):
    rng = np.random.default_rng(12)
    n = 70_001
    t = random_bilevel(rng, 17, n, BilevelParams(3, 16, 3, 4), True, 0.0)
    t.outliers = make_outliers([0, 0, 5, 16], [3, 68_000, n - 1, 7], [1.0, -2.0, 0.5, 3.0])
    p = pack(t)
    r = to_row_layout(p)
    codes, _, perm, orows, oents = _c_row_layout(lib, p)
    np.testing.assert_array_equal(codes, r.codes.reshape(-1))
    np.testing.assert_array_equal(perm, r.perm)
    np.testing.assert_array_equal(orows, r.outlier_rows)
    np.testing.assert_array_equal(oents, r.outlier_entries)


@pytest.mark.parametrize(
    "index, entries, count",
    [
        ([1, 1], [0x3C000001], 1),  # index[0] != 0
        ([0, 2], [0x3C000001, 0x3C000000], 2),  # delta 0
        ([0, 2], [0x3C000001, 0xFFFFFFFF], 1),  # a skip ends the block
        ([0, 1], [0x3C000000 | 41], 1),  # cell 40 of a 2 x 20 block is past its end
        ([0, 1], [0x7E000001], 1),  # NaN value
        ([0, 1], [0x3C000001], 2),  # outlier_count disagrees
    ],
)
def test_c_row_repack_refuses_a_broken_outlier_stream(lib, index, entries, count):
    t = random_bilevel(np.random.default_rng(13), 2, 20, BilevelParams(3, 16), False, 0.1)
    p = pack(t)
    p.outlier_index = np.array(index, dtype=np.uint32)
    p.outlier_entries = np.array(entries, dtype=np.uint32)
    p.header = type(p.header)(p.params, False, True, count, len(entries))
    assert _c_row_layout(lib, p) is None
