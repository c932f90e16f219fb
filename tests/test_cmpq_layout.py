"""The CMPQ chunk layout (codec/cmpq_layout.py) that the channel_mixed GPU kernels read: decoded
from the layout alone it gives the reference decoder's bits, and a numpy emulation of the
matmul kernel's tiling (spqr_cmpq_mm_* + spqr_cmpq_finish_*: tiles, k-splits, table blocks,
outlier corrections) meets the SPEC C-7.6 tolerance. CPU only (the GPU tests are
test_gpu_cmpq.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from spqr_format.codec import channel_mixed as cm
from spqr_format.codec import channel_mixed_ref as ref
from spqr_format.codec import cmpq_layout as CL
from spqr_format.gpu import synth


def _finish(L: CL.CmpqLayout, y: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """What spqr_cmpq_finish_nb* adds to the summed partials ``y[nb, m]``: each outlier's
    correction times its padded column of x' (``xs[nb, np_]``)."""
    if L.has_outliers:
        orow = np.repeat(np.arange(L.shape[0]), np.diff(L.orows.astype(np.int64)))
        for bb in range(y.shape[0]):
            np.add.at(y[bb], orow, L.ocorr.astype(np.float64) * xs[bb, L.ocolp])
    return y


def emulate_matmul(L: CL.CmpqLayout, x: np.ndarray, nb: int, min_tiles: int, splits: int):
    """What spqr_cmpq_prepare_x, spqr_cmpq_mm_nb{nb} and spqr_cmpq_finish_nb{nb} compute,
    block by block (f64 here: this checks indexing, not rounding)."""
    m, n = L.shape
    batch = x.shape[0]
    tl, _ = CL.tiles(L, nb, min_tiles)
    splits = max(1, min(splits, tl.shape[0]))
    xs = np.zeros((nb, L.np_))
    ok = L.pcol != CL.NO_COLUMN
    xs[:batch, ok] = x[:, L.pcol[ok]]
    tabs = L.tables.reshape(L.table_blocks, L.Lp).view(np.float16).astype(np.float64)
    part = np.zeros((splits, nb, m))
    R = L.table_rows
    for r0 in range(0, m, CL.MATMUL_ROWS):
        rows_all = np.arange(r0, min(r0 + CL.MATMUL_ROWS, m))
        for s in range(splits):
            for ti in range(s, tl.shape[0], splits):
                b, nch, code_off, tab_off, pc0 = (int(v) for v in tl[ti, :5])
                ncols = nch * CL.CHUNK
                t_of = rows_all // R if R else np.zeros(rows_all.size, np.int64)
                for t in np.unique(t_of):
                    rows = rows_all[t_of == t]
                    widx = (np.arange(nch)[:, None, None] * b + np.arange(b)[None, :, None]) * m
                    cw = L.codes[code_off + widx + rows[None, None, :]]  # [nch, b, rows]
                    q = CL._unpack_chunks(np.ascontiguousarray(cw), b)  # [rows, ncols]
                    tab = tabs[t, tab_off : tab_off + (ncols << b)].reshape(ncols, 1 << b)
                    v = tab[np.arange(ncols)[None, :], q.astype(np.int64)]
                    part[s][:, rows] += xs[:, pc0 : pc0 + ncols] @ v.T
    return _finish(L, part.sum(0), xs)[:batch]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 300),
    n=st.integers(1, 120),
    rows=st.sampled_from([0, 1, 7, 16, 64, 256, 300]),
    density=st.sampled_from([0.0, 0.03, 0.5]),
    batch=st.integers(1, 16),
    min_tiles=st.sampled_from([1, 3, 1000]),
    splits=st.sampled_from([1, 2, 5]),
    seed=st.integers(0, 2**16),
)
def test_layout_decodes_and_multiplies_like_the_reference(
    m, n, rows, density, batch, min_tiles, splits, seed
):
    t = synth.random_channel_mixed_tensor(m, n, table_rows=rows, outlier_density=density, seed=seed)
    p = cm.pack(t)
    want = ref.decode_channel_mixed(p, "float32")
    L = CL.to_cmpq_layout(p)
    assert np.array_equal(CL.dense_from_layout(L).view(np.uint32), want.view(np.uint32))
    x = np.random.default_rng(seed).standard_normal((batch, n))
    nb = next(v for v in (1, 2, 4, 8, 16) if batch <= v)
    y = emulate_matmul(L, x, nb, min_tiles, splits)
    exact = x @ want.astype(np.float64).T
    bound = 2.0**-9 * (np.abs(x) @ np.abs(want.astype(np.float64)).T) + 2.0**-24
    assert np.all(np.abs(y - exact) <= bound)


def test_synthetic_tensor_meets_its_target_and_has_a_valid_layout():
    p = synth.random_channel_mixed(1024, 1000, target_bits=2.5, outlier_fraction=0.01)
    bpw = cm.bits_per_weight(p)
    assert 2.45 < bpw <= 2.5
    cm.check_data(p)
    L = CL.to_cmpq_layout(p)
    want = ref.decode_channel_mixed(p, "float32")
    assert np.array_equal(CL.dense_from_layout(L).view(np.uint32), want.view(np.uint32))


def prepare_xf(L: CL.CmpqLayout, x16: np.ndarray, nb: int) -> np.ndarray:
    """spqr_cmpq_prepare_xf's xf (f16 bits in mma B-fragment order), element by element as the
    kernel writes it."""
    jp = np.arange(L.np_)
    xf = np.zeros(L.np_ * nb, np.uint16)
    ok = L.pcol != CL.NO_COLUMN
    for b in range(nb):
        h = np.zeros(L.np_, np.uint16)
        if b < x16.shape[0]:
            h[ok] = x16.view(np.uint16)[b, L.pcol[ok]]
        lane = (b & 7) * 4 + ((jp >> 3) & 3)
        xf[(((jp >> 5) * (nb // 8) + (b >> 3)) * 32 + lane) * 8 + (jp & 7)] = h
    return xf


def emulate_tc(L: CL.CmpqLayout, x16: np.ndarray, min_tiles: int, target: int):
    """spqr_cmpq_prepare_xf + one spqr_cmpq_tc_b*_nt* launch per width group + the finish
    kernel, with the kernels' operand indexing: A(row, kk) of mma step s read by lane quad tig
    is column 8*tig + 4*s + (kk & 1) + 2*(kk >= 8) of the chunk, B(kk, n) comes from xf at the
    tile's chunk, n-tile and lane (f64 here: this checks indexing, not rounding)."""
    m, _ = L.shape
    batch = x16.shape[0]
    nb = 8 * -(-batch // 8)
    nt = nb // 8
    tl, smem = CL.tiles(L, nb, min_tiles, tc=True)
    assert smem <= 48 * 1024  # every width's tile fits the default limit
    xf = prepare_xf(L, x16, nb).view(np.float16).astype(np.float64)
    W = CL.dense_from_layout(L).astype(np.float64)  # outliers re-added below, as corrections
    if L.has_outliers:
        rows = np.repeat(np.arange(m), np.diff(L.orows.astype(np.int64)))
        W[rows, L.perm[L.ocol]] -= L.ocorr.astype(np.float64)
    Wp = np.zeros((m, L.np_))
    ok = L.pcol != CL.NO_COLUMN
    Wp[:, ok] = W[:, L.pcol[ok]]
    groups = CL.width_groups(tl)
    assert [g[0] for g in groups] == sorted({g[0] for g in groups})  # runs by width
    assert sum(g[2] for g in groups) == tl.shape[0]
    parts = []
    kk = np.arange(16)
    for b, first, count in groups:
        assert set(tl[first : first + count, 0].tolist()) == {b}
        splits = max(1, min(count, target))
        part = np.zeros((splits, nb, m))
        for s in range(splits):
            for ti in range(first + s, first + count, splits):
                nch, pc0 = int(tl[ti, 1]), int(tl[ti, 4])
                for k in range(nch):
                    kg = pc0 // 32 + k
                    for step in range(2):
                        for tig in range(4):
                            sel = kk[((kk & 7) >> 1) == tig]  # the quad's k indices
                            col = 32 * kg + 8 * tig + 4 * step + (sel & 1) + 2 * (sel >= 8)
                            for n in range(nb):
                                lane = (n & 7) * 4 + tig
                                base = ((kg * nt + (n >> 3)) * 32 + lane) * 8
                                # b0 = halves 4*step, +1; b1 = halves 4*step + 2, +3
                                h = 4 * step + (sel & 1) + 2 * (sel >= 8)
                                xb = xf[base + h]
                                part[s, n] += Wp[:, col] @ xb
        parts.append(part)
    xs = np.zeros((nb, L.np_))
    xs[:batch, ok] = x16.astype(np.float64)[:, L.pcol[ok]]
    return _finish(L, np.concatenate(parts).sum(0), xs)[:batch]


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 200),
    n=st.integers(1, 150),
    rows=st.sampled_from([0, 16, 48]),
    density=st.sampled_from([0.0, 0.05]),
    batch=st.integers(2, 16),
    min_tiles=st.sampled_from([1, 4, 1000]),
    target=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_tensor_core_plan_and_fragment_order(m, n, rows, density, batch, min_tiles, target, seed):
    t = synth.random_channel_mixed_tensor(m, n, table_rows=rows, outlier_density=density, seed=seed)
    p = cm.pack(t)
    want = ref.decode_channel_mixed(p, "float32").astype(np.float64)
    L = CL.to_cmpq_layout(p)
    x16 = np.random.default_rng(seed).standard_normal((batch, n)).astype(np.float16)
    y = emulate_tc(L, x16, min_tiles, target)
    x = x16.astype(np.float64)
    exact = x @ want.T
    bound = 2.0**-9 * (np.abs(x) @ np.abs(want).T) + 2.0**-24
    assert np.all(np.abs(y - exact) <= bound)


def test_tc_tiles_and_width_groups():
    t = synth.random_channel_mixed_tensor(64, 2000, seed=5)
    L = CL.to_cmpq_layout(cm.pack(t))
    tl, smem = CL.tiles(L, 16, tc=True)
    widths = L.runs[:, 2].tolist()
    assert [g[0] for g in CL.width_groups(tl)] == widths
    for b, nch in tl[:, :2].tolist():
        assert nch <= CL.tc_tile_chunks(b)
    # per width: tables (36 slots per 32 columns, f16, 16-byte aligned) + x' (512 B/chunk/n-tile)
    assert CL.tc_tile_smem(16, 2, 2) == 16 * 36 * 4 * 2 + 16 * 2 * 512
    assert CL.tc_tile_smem(1, 8, 1) == 36 * 256 * 2 + 512
    assert smem == max(CL.tc_tile_smem(nch, b, 2) for b, nch in tl[:, :2].tolist())
    assert max(CL.tc_tile_smem(CL.tc_tile_chunks(b), b, 2) for b in range(1, 9)) <= 48 * 1024
    assert CL.width_groups(np.zeros((0, 8), np.int64)) == []
