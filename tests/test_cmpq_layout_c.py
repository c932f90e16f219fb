"""The C repack of channel_mixed tensors (kernels/spqr_cmpq_layout.c) produces the CMPQ chunk
layout and the tile table of spqr_cmpq_mm_* / spqr_cmpq_mv1_* bit for bit as codec/cmpq_layout.py
does, and refuses malformed sections with its error codes; spqr_cmpq_plan.h (the C launcher's
plan: paths, tiles, tensor-core tiles, groups, k-splits, geometry) equals the Python layer's
default plan (CPU only: built with the system C compiler; skipped without one)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from c_build import CC, build_shared
from hypothesis import given, settings
from hypothesis import strategies as st

from spqr_format.codec import channel_mixed as cm
from spqr_format.codec import cmpq_layout as CL
from spqr_format.gpu import _kernels as K
from spqr_format.gpu import synth

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")

OK, E_LIMIT, E_BAD_FIELD, E_BAD_OUTLIERS, E_BAD_PERMUTATION, E_NONFINITE = range(6)


class Sections(ctypes.Structure):  # spqr_cmpq_sections (spqr_gpu.h)
    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("perm", ctypes.c_void_p),
        ("oindex", ctypes.c_void_p),
        ("oents", ctypes.c_void_p),
        ("tables", ctypes.c_void_p),
        ("m", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("width_counts", ctypes.c_uint32 * 8),
        ("table_rows", ctypes.c_int64),
        ("outlier_entries", ctypes.c_int64),
    ]


SIZE_FIELDS = (
    "nruns codes_words table_blocks Lp table_entries np orows_words outliers file_code_words "
    "file_table_entries"
).split()


class Sizes(ctypes.Structure):  # spqr_cmpq_sizes
    _fields_ = [(k, ctypes.c_int64) for k in SIZE_FIELDS]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("cl") / "libspqr_cmpq_layout.so"
    so = build_shared(K.KERNEL_DIR / "spqr_cmpq_layout.c", out)
    so.spqr_cmpq_layout_sizes.restype = ctypes.c_int
    so.spqr_cmpq_repack.restype = ctypes.c_int
    so.spqr_cmpq_tiles.restype = ctypes.c_int64
    so.spqr_cmpq_tiles.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    so.spqr_cmpq_tiles.argtypes += [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    return so


def _ptr(a):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def _c_repack(lib, p: cm.PackedChannelMixed):
    """(code, layout dict) of spqr_cmpq_layout_sizes + spqr_cmpq_repack on p's sections."""
    m, n = p.shape
    keep = {
        "codes": np.ascontiguousarray(p.codes, np.uint32),
        "perm": np.ascontiguousarray(p.perm),
        "tables": np.ascontiguousarray(p.tables, np.uint16),
    }
    E = p.header.outlier_entry_count
    if p.outlier_index is not None:
        keep["oindex"] = np.ascontiguousarray(p.outlier_index, np.uint32)
        keep["oents"] = np.ascontiguousarray(p.outlier_entries, np.uint32)
    s = Sections(
        _ptr(keep["codes"]),
        _ptr(keep["perm"]),
        _ptr(keep.get("oindex")),
        _ptr(keep.get("oents")),
        _ptr(keep["tables"]),
        m,
        n,
        (ctypes.c_uint32 * 8)(*p.header.width_counts),
        p.header.table_rows,
        E,
    )
    z = Sizes()
    rc = lib.spqr_cmpq_layout_sizes(ctypes.byref(s), ctypes.byref(z))
    if rc != OK:
        return rc, None
    k = z.outliers
    out = {
        "runs": np.zeros((z.nruns, 8), np.int64),
        "codes": np.zeros(z.codes_words, np.uint32),
        "tables": np.zeros(z.table_entries, np.uint16),
        "pcol": np.zeros(z.np, np.uint32),
        "perm": np.zeros(n, np.uint32),
        "inv_perm": np.zeros(n, np.uint32),
        "orows": np.zeros(z.orows_words, np.uint32) if k else None,
        "ocol": np.zeros(k, np.uint32) if k else None,
        "ocolp": np.zeros(k, np.uint32) if k else None,
        "oval": np.zeros(k, np.uint16) if k else None,
        "ocorr": np.zeros(k, np.float32) if k else None,
    }
    rc = lib.spqr_cmpq_repack(ctypes.byref(s), ctypes.byref(z), *(_ptr(v) for v in out.values()))
    out["Lp"], out["np_"], out["T"] = z.Lp, z.np, z.table_blocks
    return rc, out


def _c_tiles(lib, runs: np.ndarray, m: int, nb: int, min_tiles: int):
    runs = np.ascontiguousarray(runs, np.int64)
    smem = ctypes.c_int64(0)
    count = lib.spqr_cmpq_tiles(_ptr(runs), runs.shape[0], m, nb, min_tiles, None, None)
    tl = np.zeros((count, 8), np.int64)
    got = lib.spqr_cmpq_tiles(_ptr(runs), runs.shape[0], m, nb, min_tiles, _ptr(tl),
                              ctypes.byref(smem))  # fmt: skip
    assert got == count
    return tl, smem.value


def _assert_same(got: dict, L: CL.CmpqLayout) -> None:
    assert got["Lp"] == L.Lp and got["np_"] == L.np_ and got["T"] == L.table_blocks
    for name in ("runs", "codes", "tables", "pcol", "perm", "inv_perm"):
        want = getattr(L, name)
        assert got[name].dtype == want.dtype, name
        assert np.array_equal(got[name].reshape(-1), want.reshape(-1)), name
    for name in ("orows", "ocol", "ocolp", "oval", "ocorr"):
        want = getattr(L, name)
        if want is None:
            assert got[name] is None, name
        else:
            assert got[name].dtype == want.dtype, name
            # bits, not values: ocorr's f32 rounding must match
            assert np.array_equal(got[name].view(np.uint8), want.view(np.uint8)), name


@st.composite
def widths_of(draw, n: int):
    present = draw(st.lists(st.integers(1, 8), min_size=1, max_size=8, unique=True))
    w = np.asarray([present[i % len(present)] for i in range(n)], np.uint8)
    return np.sort(w)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    m=st.sampled_from([1, 5, 16, 17, 40, 70]),
    n=st.sampled_from([1, 3, 31, 32, 33, 100, 130]),
    rows=st.sampled_from([0, 7, 16]),
    density=st.sampled_from([0.0, 0.03, 0.5]),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_c_repack_equals_python(lib, m, n, rows, density, data, seed):
    widths = data.draw(widths_of(n))
    t = synth.random_channel_mixed_tensor(
        m, n, widths=widths, table_rows=rows, outlier_density=density, seed=seed
    )
    p = cm.pack(t)
    rc, got = _c_repack(lib, p)
    assert rc == OK
    L = CL.to_cmpq_layout(p)
    _assert_same(got, L)
    for nb in (1, 2, 4, 8, 16):
        for min_tiles in (1, 3, 1000):
            tl, smem = _c_tiles(lib, L.runs, m, nb, min_tiles)
            want, wsmem = CL.tiles(L, nb, min_tiles)
            assert np.array_equal(tl, want) and smem == wsmem, (nb, min_tiles)


def test_every_width_alone_and_all_together(lib):
    for b in range(1, 9):
        for n in (1, 33, 64):
            t = synth.random_channel_mixed_tensor(
                19, n, widths=np.full(n, b, np.uint8), table_rows=7, outlier_density=0.2, seed=b
            )
            p = cm.pack(t)
            rc, got = _c_repack(lib, p)
            assert rc == OK
            _assert_same(got, CL.to_cmpq_layout(p))
    w = np.repeat(np.arange(1, 9, dtype=np.uint8), 5)
    p = cm.pack(synth.random_channel_mixed_tensor(33, 40, widths=w, outlier_density=0.1, seed=2))
    rc, got = _c_repack(lib, p)
    assert rc == OK
    _assert_same(got, CL.to_cmpq_layout(p))


def test_u32_permutation_and_skip_entries(lib):
    # n > 65536: u32 perm entries; sparse outliers over 16 x 70000 cells need skip entries
    from spqr_format.codec.outliers import Outliers

    w = np.repeat(np.arange(1, 4, dtype=np.uint8), [30000, 30000, 10000])
    t = synth.random_channel_mixed_tensor(3, 70000, widths=w, seed=5)
    vals = np.array([1.5, -2.0, 7.0, 0.25], np.float16)
    t.outliers = Outliers(np.array([0, 0, 2, 2], np.uint32),
                          np.array([5, 69000, 3, 69999], np.uint32), vals)  # fmt: skip
    p = cm.pack(t)
    assert p.perm.dtype == np.uint32
    assert np.any((np.asarray(p.outlier_entries) >> 16) == 0xFFFF)
    rc, got = _c_repack(lib, p)
    assert rc == OK
    _assert_same(got, CL.to_cmpq_layout(p))


def _packed(density=0.3, seed=1):
    t = synth.random_channel_mixed_tensor(20, 40, table_rows=16, outlier_density=density, seed=seed)
    return cm.pack(t)


def _with(p, **kw):
    from dataclasses import replace

    return replace(p, **kw)


def test_refuses_malformed_sections(lib):
    p = _packed()
    assert _c_repack(lib, p)[0] == OK
    h = p.header
    # width counts that do not sum to n
    bad = cm.ChannelMixedHeader((*h.width_counts[:7], h.width_counts[7] + 1), h.table_rows,
                                h.outlier_entry_count)  # fmt: skip
    assert _c_repack(lib, _with(p, header=bad))[0] == E_BAD_FIELD
    bad = cm.ChannelMixedHeader(h.width_counts, 2**24 + 1, h.outlier_entry_count)
    assert _c_repack(lib, _with(p, header=bad))[0] == E_BAD_FIELD
    # not a permutation: a repeated entry, an entry out of range
    perm = np.array(p.perm)
    perm[1] = perm[0]
    assert _c_repack(lib, _with(p, perm=perm))[0] == E_BAD_PERMUTATION
    perm = np.array(p.perm)
    perm[3] = 40
    assert _c_repack(lib, _with(p, perm=perm))[0] == E_BAD_PERMUTATION
    # a non-finite table entry
    tables = np.array(p.tables)
    tables[5] = 0x7C00
    assert _c_repack(lib, _with(p, tables=tables))[0] == E_NONFINITE
    # broken outlier streams
    idx, ent = np.asarray(p.outlier_index), np.asarray(p.outlier_entries)
    assert ent.size > 4

    def outl(i=idx, e=ent):
        i, e = np.array(i, np.uint32), np.array(e, np.uint32)
        return _with(p, outlier_index=i, outlier_entries=e)

    i2 = idx.copy()
    i2[0] = 1
    assert _c_repack(lib, outl(i=i2))[0] == E_BAD_OUTLIERS  # index[0] != 0
    i2 = idx.copy()
    i2[-1] -= 1
    assert _c_repack(lib, outl(i=i2))[0] == E_BAD_OUTLIERS  # index[B] != E
    i2 = idx.copy()
    i2[1] = ent.size + 5
    assert _c_repack(lib, outl(i=i2))[0] == E_BAD_OUTLIERS  # past E (then decreasing)
    e2 = ent.copy()
    e2[1] &= 0xFFFF0000
    assert _c_repack(lib, outl(e=e2))[0] == E_BAD_OUTLIERS  # delta 0
    e2 = ent.copy()
    e2[1] = (0xFFFF << 16) | 3
    assert _c_repack(lib, outl(e=e2))[0] == E_BAD_OUTLIERS  # skip with delta != 65535
    e2 = ent.copy()
    e2[1] = (0x7E00 << 16) | (e2[1] & 0xFFFF)
    assert _c_repack(lib, outl(e=e2))[0] == E_BAD_OUTLIERS  # NaN value
    e2 = ent.copy()
    e2[idx[1] - 1] = (e2[idx[1] - 1] & 0xFFFF0000) | 0xFFFE
    assert _c_repack(lib, outl(e=e2))[0] == E_BAD_OUTLIERS  # position past its block
    e2 = ent.copy()
    e2[idx[1] - 1] = 0xFFFFFFFF
    assert _c_repack(lib, outl(e=e2))[0] == E_BAD_OUTLIERS  # block ending in a skip
    # E > 0 with no outlier sections
    assert _c_repack(lib, _with(p, outlier_index=None, outlier_entries=None))[0] == E_BAD_OUTLIERS


def test_refuses_what_python_validation_refuses(lib):
    """Every malformed tensor above is also refused by to_cmpq_layout(validate=True)."""
    from spqr_format.errors import SpqrError

    p = _packed()
    perm = np.array(p.perm)
    perm[1] = perm[0]
    with pytest.raises(SpqrError):
        CL.to_cmpq_layout(_with(p, perm=perm))
    e2 = np.array(p.outlier_entries)
    e2[1] &= 0xFFFF0000
    with pytest.raises(SpqrError):
        CL.to_cmpq_layout(_with(p, outlier_entries=e2))


PLAN_WRAPPER = """
#include "spqr_cmpq_plan.h"
int w_nb(int b) { return spqr_cmpq_nb(b); }
int64_t w_target(int64_t m, int sms) { return spqr_cmpq_target_tiles(m, sms); }
int64_t w_target_rows(int64_t m, int sms, int64_t rows) {
  return spqr_cmpq_target_tiles_rows(m, sms, rows);
}
int64_t w_splits(int64_t m, int64_t nt, int sms) { return spqr_cmpq_splits(m, nt, sms); }
int64_t w_chunks(int b, int nb) { return spqr_cmpq_tile_chunks(b, nb); }
int64_t w_tc_chunks(int b) { return spqr_cmpq_tc_tile_chunks(b); }
int64_t w_tc_smem(int64_t nch, int b, int nt) { return spqr_cmpq_tc_tile_smem(nch, b, nt); }
int w_path(int batch, int in_dtype, int64_t R) { return spqr_cmpq_path(batch, in_dtype, R); }
int64_t w_dq_rows(int64_t m) { return spqr_cmpq_dq_rows_per_block(m); }
/* the plan of a slice as i64 [11 + 5 * 8]: path, nb, nbp, rows, threads, target, cap, ntiles,
   smem, splits, ngroups, then per group bits, first, count, splits, split0; and, with tiles,
   its tile table [ntiles][8] */
int w_slice(const int64_t *runs, int64_t nruns, int64_t m, int sms, int batch, int in_dtype,
            int64_t R, int64_t *out, int64_t *tiles) {
  spqr_cmpq_slice_plan p;
  if (spqr_cmpq_plan_slice(runs, nruns, m, sms, batch, in_dtype, R, &p)) return -1;
  const int64_t head[11] = {p.path, p.nb, p.nbp, p.rows, p.threads, p.target, p.cap, p.ntiles,
                            p.smem, p.splits, p.ngroups};
  for (int k = 0; k < 11; ++k) out[k] = head[k];
  for (int k = 0; k < p.ngroups; ++k) {
    const spqr_cmpq_group *g = &p.groups[k];
    const int64_t v[5] = {g->bits, g->first, g->count, g->splits, g->split0};
    for (int j = 0; j < 5; ++j) out[11 + 5 * k + j] = v[j];
  }
  if (tiles)
    for (int64_t t = 0; t < p.ntiles; ++t)
      if (!spqr_cmpq_tile_at(runs, nruns, m, p.nb, p.path == SPQR_CMPQ_PATH_TC, p.cap, t,
                             tiles + 8 * t))
        return -2;
  return 0;
}
"""

C_PATHS = ("mm", "mv1", "tc")  # SPQR_CMPQ_PATH_* order


@pytest.fixture(scope="module")
def plan_lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    src = d / "plan.c"
    src.write_text(PLAN_WRAPPER)
    so = build_shared(src, d / "libplan.so")
    i64 = ctypes.c_int64
    for f in ("w_target", "w_target_rows", "w_splits", "w_chunks", "w_tc_chunks", "w_tc_smem",
              "w_dq_rows"):  # fmt: skip
        getattr(so, f).restype = i64
    so.w_dq_rows.argtypes = [i64]
    so.w_target.argtypes = [i64, ctypes.c_int]
    so.w_target_rows.argtypes = [i64, ctypes.c_int, i64]
    so.w_splits.argtypes = [i64, i64, ctypes.c_int]
    so.w_tc_smem.argtypes = [i64, ctypes.c_int, ctypes.c_int]
    so.w_path.argtypes = [ctypes.c_int, ctypes.c_int, i64]
    so.w_slice.argtypes = [ctypes.c_void_p, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    so.w_slice.argtypes += [i64, ctypes.c_void_p, ctypes.c_void_p]
    return so


def test_plan_header_matches_python(plan_lib, monkeypatch):
    """spqr_cmpq_plan.h (the C launcher's batch columns, path, target tiles, k-splits, tile
    widths and shared memory) agrees with _kernels.py / cmpq_layout.py (default plan)."""
    from spqr_format.gpu import plan as P

    monkeypatch.delenv(P.ENV, raising=False)
    so = plan_lib
    for b in range(1, 17):
        assert so.w_nb(b) == K.cmpq_nb(b)
        for code in (0, 1, 2):
            for R in (0, 1, 7, 16, 32, 48, 100, 300):
                assert C_PATHS[so.w_path(b, code, R)] == K.cmpq_path(b, code, R), (b, code, R)
    for bits in range(1, 9):
        assert so.w_tc_chunks(bits) == CL.tc_tile_chunks(bits)
        for nb in K.CMPQ_NB:
            assert so.w_chunks(bits, nb) == CL.tile_chunks(bits, nb)
        for nch in (1, 2, 3, 8, 15, 16):
            for nt in (1, 2):
                assert so.w_tc_smem(nch, bits, nt) == CL.tc_tile_smem(nch, bits, nt)
    assert K.CMPQ_TC_ROWS == CL.TC_ROWS == 128
    for m in (1, 31, 32, 33, 65535 * 32, 65535 * 32 + 1, 65535 * 33 - 1, 3 * 10**9):
        rpb = so.w_dq_rows(m)
        assert rpb == K.cmpq_dq_rows_per_block(m)
        assert rpb % K.CMPQ_DQ_ROWS == 0 and -(-m // rpb) <= 65535
        assert rpb == K.CMPQ_DQ_ROWS or -(-m // (rpb - K.CMPQ_DQ_ROWS)) > 65535
    for m in (1, 127, 128, 129, 255, 256, 257, 4096, 11008, 70000):
        for sms in (1, 108, 132):
            assert so.w_target(m, sms) == K.cmpq_target_tiles(m, sms)
            for rows in (K.CMPQ_ROWS, K.CMPQ_TC_ROWS):
                assert so.w_target_rows(m, sms, rows) == K.cmpq_target_tiles(m, sms, rows)
            for nt in (1, 7, 500):
                assert so.w_splits(m, nt, sms) == K.cmpq_splits(m, nt, sms)


def _c_slice(so, runs, m, sms, batch, in_code, R):
    runs = np.ascontiguousarray(runs, np.int64)
    out = np.zeros(11 + 5 * 8, np.int64)
    assert so.w_slice(_ptr(runs), runs.shape[0], m, sms, batch, in_code, R, _ptr(out), None) == 0
    tl = np.zeros((int(out[7]), 8), np.int64)
    assert so.w_slice(_ptr(runs), runs.shape[0], m, sms, batch, in_code, R, _ptr(out),
                      _ptr(tl)) == 0  # fmt: skip
    return out, tl


def _layouts():
    """Chunk layouts of a few width mixes: every width, one width, the 2/3-bit mix of the
    benchmarks, long runs (many tiles per width)."""
    out = []
    for n, widths, seed in (
        (100, None, 1),
        (40, np.repeat(np.arange(1, 9, dtype=np.uint8), 5), 2),
        (64, np.full(64, 3, np.uint8), 3),
        (3000, np.repeat(np.array([2, 3], np.uint8), [1500, 1500]), 4),
        (9000, np.repeat(np.arange(1, 9, dtype=np.uint8), 1125), 5),
    ):
        t = synth.random_channel_mixed_tensor(5, n, widths=widths, seed=seed)
        out.append(CL.to_cmpq_layout(cm.pack(t)))
    return out


def test_slice_plan_matches_python(plan_lib, monkeypatch):
    """spqr_cmpq_plan_slice (what spqr_cmpq_matmul launches per slice) equals the Python
    layer's default plan, _kernels.cmpq_slice + cmpq_launches (GpuCmpqTensor._slice / _plan):
    path, batch columns, rows and threads per block, tile table, shared memory, launch groups
    (kernel width, first tile, tiles, k-splits, first split) and total splits."""
    from spqr_format.gpu import plan as P

    monkeypatch.delenv(P.ENV, raising=False)
    seen = set()
    for L in _layouts():
        for m in (5, 300, 4096, 28672):  # m only scales code offsets and the row blocks
            for sms in (1, 108, 132):
                for batch in range(1, 17):
                    for code in (0, 1, 2):
                        for R in (0, 7, 16):
                            out, tl = _c_slice(plan_lib, L.runs, m, sms, batch, code, R)
                            path, nb, nbp = K.cmpq_slice(batch, code, R)
                            seen.add(path)
                            wtl, groups, smem, total, rows = K.cmpq_launches(
                                m, L.runs, path, nb, sms
                            )
                            threads = 128 if path == "tc" else K.CMPQ_ROWS
                            target = K.cmpq_target_tiles(m, sms, rows)
                            want = [C_PATHS.index(path), nb, nbp, rows, threads, target]
                            assert out[:6].tolist() == want
                            assert out[7:11].tolist() == [len(wtl), smem, total, len(groups)]
                            assert np.array_equal(tl, wtl)
                            for k, (name, first, count, splits, s0) in enumerate(groups):
                                bits, *rest = out[11 + 5 * k : 16 + 5 * k].tolist()
                                kname = (
                                    f"spqr_cmpq_mm_nb{nb}" if path == "mm"
                                    else K.cmpq_mv1_name(bits) if path == "mv1"
                                    else K.cmpq_tc_name(bits, nb // 8)
                                )  # fmt: skip
                                assert kname == name
                                assert rest == [first, count, splits, s0]
    assert seen == {"mm", "mv1", "tc"}
