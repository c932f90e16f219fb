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
    y = part.sum(0)
    if L.has_outliers:
        orow = np.repeat(np.arange(m), np.diff(L.orows.astype(np.int64)))
        for bb in range(nb):
            np.add.at(y[bb], orow, L.ocorr.astype(np.float64) * xs[bb, L.ocolp])
    return y[:batch]


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
