"""The C repack (kernels/spqr_tile_layout.c) produces the tile layout bit for bit as
tile_layout.py does (CPU only: built with the system C compiler; skipped without one)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from c_build import CC, build_shared
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import random_bilevel

from spqr_format.codec.bilevel import BilevelParams
from spqr_format.codec.packing import pack
from spqr_format.codec.row_layout import to_row_layout
from spqr_format.gpu import _kernels as K
from spqr_format.gpu import tile_layout as TL

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")


class Bilevel(ctypes.Structure):  # spqr_bilevel (spqr_gpu.h)
    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("stats", ctypes.c_void_p),
        ("stats2", ctypes.c_void_p),
        ("perm", ctypes.c_void_p),
        ("orows", ctypes.c_void_p),
        ("oents", ctypes.c_void_p),
        ("m", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("bits", ctypes.c_int32),
        ("stats_bits", ctypes.c_int32),
        ("group_size", ctypes.c_int32),
        ("stats_group_size", ctypes.c_int32),
    ]


class Dims(ctypes.Structure):  # spqr_tile_dims
    _fields_ = [(k, ctypes.c_int64) for k in ("RB", "NC", "R", "MPC", "KT", "SLABS", "SWL", "M16")]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("tl") / "libspqr_tile_layout.so"
    so = build_shared(K.KERNEL_DIR / "spqr_tile_layout.c", out)
    so.spqr_tile_dims_of.restype = ctypes.c_int
    so.spqr_tile_repack.restype = ctypes.c_int
    return so


def _ptr(a):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def _c_repack(lib, p):
    prm = p.params
    m, n = p.shape
    d = Dims()
    ok = lib.spqr_tile_dims_of(
        ctypes.c_int64(m),
        ctypes.c_int64(n),
        prm.bits,
        prm.stats_bits,
        prm.group_size,
        prm.stats_group_size,
        ctypes.byref(d),
    )
    if not ok:
        return None
    arrs = {
        "codes": np.ascontiguousarray(p.codes, dtype=np.uint32),
        "stats": np.ascontiguousarray(p.stats, dtype=np.uint32),
        "stats2": np.ascontiguousarray(np.asarray(p.stats2).view(np.uint16)),
    }
    has_out = p.outlier_entries is not None
    if has_out:
        arrs["orows"] = np.ascontiguousarray(p.outlier_rows, dtype=np.uint32)
        arrs["oents"] = np.ascontiguousarray(p.outlier_entries, dtype=np.uint32)
    t = Bilevel(
        _ptr(arrs["codes"]),
        _ptr(arrs["stats"]),
        _ptr(arrs["stats2"]),
        None,
        _ptr(arrs.get("orows")),
        _ptr(arrs.get("oents")),
        m,
        n,
        prm.bits,
        prm.stats_bits,
        prm.group_size,
        prm.stats_group_size,
    )
    codes = np.zeros(d.RB * d.NC * d.SLABS * 32 * 4, dtype=np.uint32)
    stats = np.zeros(d.RB * d.NC * 32 * d.SWL, dtype=np.uint32)
    stats2 = np.zeros(d.RB * d.KT * 2, dtype=np.uint32)
    oents = np.zeros(arrs["oents"].size, dtype=np.uint32) if has_out else None
    ok = lib.spqr_tile_repack(ctypes.byref(t), _ptr(codes), _ptr(stats), _ptr(stats2), _ptr(oents))
    return (codes, stats, stats2, oents) if ok else None


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    m=st.sampled_from([1, 5, 16, 17, 40]),
    n=st.sampled_from([1, 16, 33, 100, 333]),
    bits=st.sampled_from([2, 3, 4]),
    sb=st.sampled_from([1, 2, 3, 4]),
    S=st.sampled_from([16, 32]),
    frac=st.sampled_from([0.0, 0.05, 1.0]),
    seed=st.integers(0, 999),
)
def test_c_repack_equals_python(lib, m, n, bits, sb, S, frac, seed):
    rng = np.random.default_rng(seed)
    t = random_bilevel(rng, m, n, BilevelParams(bits, 16, sb, S), True, frac)
    p = to_row_layout(pack(t))
    got = _c_repack(lib, p)
    assert got is not None
    codes = TL.repack_codes(np, p.codes, m, n, bits)
    stats, stats2 = TL.repack_stats(np, p.stats, p.stats2, m, n, bits, sb, S)
    assert np.array_equal(got[0], codes.reshape(-1))
    assert np.array_equal(got[1], stats.reshape(-1))
    assert np.array_equal(got[2], stats2.reshape(-1))
    oents, _ = TL.outlier_corrections(p)
    if oents is None:
        assert got[3] is None
    else:
        assert np.array_equal(got[3], oents)


def test_c_repack_refuses_what_python_refuses(lib):
    rng = np.random.default_rng(3)
    for params in (
        BilevelParams(8, 16, 3, 16),
        BilevelParams(3, 128, 3, 16),
        BilevelParams(3, 16, 0, 0),
    ):
        p = to_row_layout(pack(random_bilevel(rng, 20, 64, params, False, 0.0)))
        assert TL.ineligible_reason(p) is not None
        assert _c_repack(lib, p) is None


def test_c_repack_long_rows_with_skip_entries(lib):
    rng = np.random.default_rng(4)
    t = random_bilevel(rng, 3, 70000, BilevelParams(3, 16, 3, 16), True, 0.0005)
    p = to_row_layout(pack(t))
    got = _c_repack(lib, p)
    oents, _ = TL.outlier_corrections(p)
    assert np.array_equal(got[3], oents)
    assert np.array_equal(got[0], TL.repack_codes(np, p.codes, 3, 70000, 3).reshape(-1))
