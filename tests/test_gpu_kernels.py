"""GPU kernels against the CPU reference (needs CuPy and a CUDA device; skipped otherwise).

* dequantize: GPU == ``reference.decode_bilevel`` bit for bit (uint16 / uint32 patterns), for
  every configuration (the generic kernel covers any bits / group size / statistics).
* matvec / matmul: within a stated bound of the f64 product of the decoded f32 ``W`` and ``x``
  (see :func:`_bound`).
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest
from gpu_env import cupy_or_skip

cp = cupy_or_skip()

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from strategies import bilevel_tensors, make_outliers, random_bilevel  # noqa: E402

from spqr_format.codec.bilevel import BilevelParams  # noqa: E402
from spqr_format.codec.packing import pack  # noqa: E402
from spqr_format.codec.reference import decode_bilevel  # noqa: E402
from spqr_format.gpu import GpuTensor  # noqa: E402
from spqr_format.gpu import _kernels as K  # noqa: E402
from spqr_format.gpu import plan as P  # noqa: E402
from spqr_format.spec import DType  # noqa: E402

pytestmark = pytest.mark.gpu
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False)
U = 2.0**-24


def _dequant_bits(t, dtype: DType) -> tuple[np.ndarray, np.ndarray]:
    p = pack(t)
    ref = decode_bilevel(p, dtype)
    g = GpuTensor.from_packed(p)
    name = {DType.FLOAT16: "float16", DType.BFLOAT16: "bfloat16", DType.FLOAT32: "float32"}
    got = cp.asnumpy(g.dequantize(name[dtype]))
    width = np.uint32 if dtype == DType.FLOAT32 else np.uint16
    return ref.view(width), got.view(width)


def _assert_same_bits(ref, got):
    assert ref.shape == got.shape
    bad = np.argwhere(ref != got)
    assert bad.size == 0, f"{len(bad)} mismatches, first at {bad[:5].tolist()}: " + str(
        [(int(ref[tuple(i)]), int(got[tuple(i)])) for i in bad[:5]]
    )


@settings(max_examples=150, **SETTINGS)
@given(
    t=bilevel_tensors(max_m=9, max_n=700),
    dtype=st.sampled_from([DType.FLOAT16, DType.BFLOAT16, DType.FLOAT32]),
)
def test_dequantize_bit_exact_random(t, dtype):
    _assert_same_bits(*_dequant_bits(t, dtype))


@pytest.mark.parametrize(
    "m,n,bits,g,sb,S,perm,frac,layout",
    [
        (1, 28672, 3, 16, 3, 16, True, 0.01, "uniform"),
        (3, 70000, 3, 16, 3, 16, True, 0.01, "uniform"),
        (5, 20000, 3, 16, 3, 16, True, 0.05, "full_rows"),  # two wide rows per 512-thread block
        (2, 70000, 4, 128, 0, 0, False, 0.0, "uniform"),
        (17, 4097, 2, 32, 3, 5, True, 0.5, "full_rows"),
        (33, 1000, 8, 64, 0, 0, True, 1.0, "uniform"),
        (5, 333, 5, 7, 2, 3, True, 0.02, "uniform"),
    ],
)
@pytest.mark.parametrize("dtype", [DType.FLOAT16, DType.BFLOAT16])
def test_dequantize_bit_exact_shapes(m, n, bits, g, sb, S, perm, frac, layout, dtype):
    rng = np.random.default_rng(m * 1000 + n)
    t = random_bilevel(
        rng, m, n, BilevelParams(bits, g, sb, S), perm, frac, regime="any", outlier_layout=layout
    )
    _assert_same_bits(*_dequant_bits(t, dtype))


@pytest.mark.parametrize("perm,gather", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("dtype", [DType.FLOAT16, DType.FLOAT32])
def test_dequantize_into_strided_unaligned(perm, gather, dtype):
    """Rows at odd offsets and pitch (some rows 16-byte aligned, some not): every row exact, and
    nothing written outside the m x n window. gather=False: without the inverse permutation
    (the C launcher's scatter path)."""
    rng = np.random.default_rng(11)
    m, n, pad, off = 7, 1000, 3, 1
    t = random_bilevel(rng, m, n, BilevelParams(3, 16, 3, 16), perm, 0.05)
    p = pack(t)
    ref = decode_bilevel(p, dtype)
    g = GpuTensor.from_packed(p)
    assert (g.inv_perm is not None) == perm
    if not gather:
        g.inv_perm = g.dq2_slots = None
    width = np.uint32 if dtype == DType.FLOAT32 else np.uint16
    ld = n + pad
    buf = cp.full(off + m * ld, 0xABCD, dtype=width)
    g.dequantize_into(buf.data.ptr + off * buf.itemsize, ld, 0 if dtype == DType.FLOAT32 else 1)
    host = cp.asnumpy(buf)
    got = host[off:].reshape(m, ld)
    _assert_same_bits(ref.view(width), got[:, :n])
    assert (got[:, n:] == 0xABCD).all() and host[0] == 0xABCD


def test_dequantize_no_perm_row_larger_than_shared_memory():
    """No permutation: rows go straight to global memory, so rows beyond shared memory (70,000
    f32 columns = 280 KB) use the same one-block-per-row kernel."""
    rng = np.random.default_rng(5)
    t = random_bilevel(rng, 2, 70000, BilevelParams(3, 16, 3, 16), False, 0.01)
    _assert_same_bits(*_dequant_bits(t, DType.FLOAT32))


@pytest.mark.parametrize(
    "m,n,bits,g,sb,S",
    [
        (5, 16390, 3, 16, 3, 5),  # odd rows, a column tail, 256-thread blocks
        (3, 20001, 2, 48, 3, 2),  # group size not a power of two, groups across warp steps
        (4, 17000, 8, 32, 0, 0),  # fp16 statistics, 8-bit codes (three words per octet)
        (1, 257, 4, 16, 3, 16),  # one row: the block's second row is absent
    ],
)
def test_dequantize_octet_kernel_shapes(m, n, bits, g, sb, S):
    """The no-permutation octet kernel (spqr_dequant_oct_*): tails in rows and columns, both
    block sizes, every statistics form."""
    assert K.dequant_oct_supported(bits, g, 1, n)
    rng = np.random.default_rng(m + n)
    t = random_bilevel(rng, m, n, BilevelParams(bits, g, sb, S), False, 0.03)
    _assert_same_bits(*_dequant_bits(t, DType.FLOAT16))
    _assert_same_bits(*_dequant_bits(t, DType.BFLOAT16))


def test_dequantize_identity_perm():
    rng = np.random.default_rng(7)
    t = random_bilevel(rng, 6, 300, BilevelParams(3, 16, 3, 16), False, 0.05)
    t.perm = np.arange(300, dtype=np.uint32)
    _assert_same_bits(*_dequant_bits(t, DType.FLOAT16))


# ---------------------------------------------------------------------------------------------
# matvec / matmul


def _stats_f32(t) -> tuple[np.ndarray, np.ndarray]:
    """Per (row, group) s and z in f32 (SPEC C-7.1; numpy f32 ops, no FMA)."""
    if t.params.stats_bits == 0:
        st32 = t.stats.astype(np.float32)
        return st32[..., 0], st32[..., 1]
    s2 = t.stats2.astype(np.float32)  # [T, G, 4]
    tile = np.arange(t.shape[0]) // t.params.stats_group_size
    r = s2[tile]  # [m, G, 4]
    s = r[..., 1] + r[..., 0] * t.stats[..., 0].astype(np.float32)
    z = r[..., 3] + r[..., 2] * t.stats[..., 1].astype(np.float32)
    return s, z


def _bound(t, w32: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Error bound of the GPU result before its final rounding, per (batch, row).

    The kernel forms, per 16-column half-block, D = sum q*x (16 products rounded once each and
    16 additions) and X = sum x, then s*(D - z*X), and adds the half-blocks sequentially per
    thread, then by a 5-level warp tree and a <= 8-term block sum. Every intermediate is bounded
    by A = sum_j |s|(|q| + |z|)|x_j| (+ the outlier corrections |o - w||x|), and the longest
    chain of roundings is < n/16 + 48, so |err| <= (n/16 + 48) * u * A with u = 2^-24
    (the standard gamma_k bound, first order).
    """
    m, n = t.shape
    s, z = _stats_f32(t)
    col_group = np.arange(n) // t.params.group_size
    sq = np.abs(s[:, col_group]).astype(np.float64) * (
        t.codes.astype(np.float64) + np.abs(z[:, col_group]).astype(np.float64)
    )  # [m, n] stored order
    xp = xs[:, t.perm] if t.perm is not None else xs  # stored order
    a = np.abs(xp) @ sq.T + np.abs(xs) @ np.abs(w32.astype(np.float64)).T * 2
    return (n / 16 + 48) * U * a


def _bound_tc(t, w32: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Error bound of the tensor-core path (f16 fragments, f32 accumulation), per (batch, row).

    Each weight enters the tensor cores as a = fl16(q * s~ + fl16(s~ * (-z~))) with s~, z~ the
    f16 results of one fused multiply-add each: |a - w| <= 5 * 2^-11 * |s|(|q| + |z|) (first
    order) plus f16-subnormal rounding, <= 2^-20 in absolute terms. spqr_tcg_* multiplies the
    codes and applies s~, z~ in f32, with the group sums of x in f32 (within the same bound),
    but feeds B = 3, 4 codes as f16 subnormals, which the tensor cores align at 2^-14: at most
    2^-15.8 * sum_group |x| in code units, measured on H200 (counted here as 2^-15 |s| sum|x|).
    Outliers add
    fl16(o - w) * x: relative error 2^-11 of |o - w|. The f32 sums (tensor-core accumulation
    over n / 16 tiles, k-split partial sums, outlier sum) are bounded as in :func:`_bound` with a
    chain length below n / 8 + 96 (the tensor cores' f32 accumulation is not guaranteed to round
    to nearest, so the chain is counted twice)."""
    m, n = t.shape
    s, z = _stats_f32(t)
    g = t.params.group_size
    col_group = np.arange(n) // g
    sq = np.abs(s[:, col_group]).astype(np.float64) * (
        t.codes.astype(np.float64) + np.abs(z[:, col_group]).astype(np.float64)
    )
    xp = xs[:, t.perm] if t.perm is not None else xs  # stored order
    a1 = np.abs(xp) @ sq.T
    corr = np.zeros((m, n))
    o = t.outliers
    if o is not None and len(o):
        r, c = o.rows.astype(np.int64), o.cols.astype(np.int64)
        k = c // g
        dense = s[r, k] * (t.codes[r, c].astype(np.float32) - z[r, k])
        corr[r, c] = np.abs(o.values.astype(np.float64) - dense.astype(np.float64))
    oc = np.abs(xp) @ corr.T
    acc = (n / 8 + 96) * U * (a1 + oc + np.abs(xs) @ np.abs(w32.astype(np.float64)).T * 2)
    sub = 2.0**-15 * (np.abs(xp) @ np.abs(s[:, col_group]).astype(np.float64).T)
    return 5 * 2.0**-11 * a1 + 2.0**-11 * oc + 2.0**-20 * np.abs(xp).sum(1)[:, None] + sub + acc


def _bound_dense(w32: np.ndarray, xs: np.ndarray, ulp: float) -> np.ndarray:
    """Error bound of the ``dense`` path (W dequantized bit-exactly into the input dtype, then
    cublasGemmEx with f32 accumulation), per (batch, row): each weight rounded once to the
    dtype (relative ``ulp``, plus half the smallest f16 subnormal, 2^-25, absolute), then an
    f32 sum of n products in any order cuBLAS picks (split-K included): (n + 64) * u * A with
    A = sum_j |W_ij x_j| (first-order gamma_k bound, chain length < n + 64)."""
    n = w32.shape[1]
    a = np.abs(xs) @ np.abs(w32.astype(np.float64)).T
    return ulp * a + 2.0**-25 * np.abs(xs).sum(1)[:, None] + (n + 64) * U * a * (1 + ulp)


def _check_matmul(t, batch: int, dtype: str, rng, tensor_cores=None):
    p = pack(t)
    m, n = t.shape
    w32 = decode_bilevel(p, DType.FLOAT32)
    x = rng.standard_normal((batch, n)).astype(np.float32)
    if dtype == "float16":
        x16 = x.astype(np.float16)
        x64 = x16.astype(np.float64)
        xd = cp.asarray(x16)
        ulp = 2.0**-11  # unit roundoff of f16 (half an ulp, relative)
    else:
        bits = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation: some bf16 values
        x64 = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        xd = cp.asarray(bits)
        ulp = 2.0**-8  # unit roundoff of bf16
    ref = x64 @ w32.astype(np.float64).T  # [batch, m]
    g = GpuTensor.from_packed(p, tensor_cores=tensor_cores)
    path = g.plan_for(batch, 1 if dtype == "float16" else 2).path
    out = g.matmul(xd) if batch > 1 or rng.integers(2) else g.matvec(xd[0]).reshape(1, -1)
    got = cp.asnumpy(out)
    got = (got.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else got
    got = got.astype(np.float64)
    if path == "dense":
        bound = _bound_dense(w32, x64, ulp)
    elif path in ("tcg", "tcv", "tc_split"):
        assert g.tc is not None and dtype == "float16"
        bound = _bound_tc(t, w32, x64)
    else:
        bound = _bound(t, w32, x64)
    # final rounding to f16/bf16: relative unit roundoff, plus half the smallest subnormal
    tol = (bound + np.abs(ref) * ulp) * (1 + 2 * ulp) + 2.0**-25 + 1e-30
    err = np.abs(got - ref)
    assert np.all(np.isfinite(got)), "non-finite output"
    worst = np.unravel_index(np.argmax(err / tol), err.shape)
    assert np.all(err <= tol), (
        f"max err/tol {float((err / tol)[worst]):.3g} at {worst}: got {got[worst]} ref "
        f"{ref[worst]} bound {bound[worst]}"
    )


MATVEC_PARAMS = st.builds(
    BilevelParams,
    bits=st.sampled_from([2, 3, 4, 8, 5, 1]),
    group_size=st.sampled_from([16, 32, 48, 64, 128, 7]),
    stats_bits=st.sampled_from([0, 3]),
    stats_group_size=st.just(0),
)


@settings(max_examples=80, **SETTINGS)
@given(
    m=st.sampled_from([1, 2, 3, 4, 5, 7, 64, 129]),
    n=st.sampled_from([1, 16, 31, 33, 100, 128, 513, 4096, 5000]),
    params=MATVEC_PARAMS,
    S=st.sampled_from([1, 3, 16]),
    perm=st.booleans(),
    outl=st.sampled_from([(0.0, "uniform"), (0.01, "uniform"), (0.3, "full_rows")]),
    batch=st.sampled_from([1, 1, 2, 3, 4, 5, 8, 9, 16, 33, 64]),
    dtype=st.sampled_from(["float16", "bfloat16"]),
    seed=st.integers(0, 2**31),
)
def test_matmul_random(m, n, params, S, perm, outl, batch, dtype, seed):
    if params.stats_bits:
        params = BilevelParams(params.bits, params.group_size, params.stats_bits, S)
    rng = np.random.default_rng(seed)
    t = random_bilevel(rng, m, n, params, perm, outl[0], outlier_layout=outl[1])
    _check_matmul(t, batch, dtype, rng)


@pytest.mark.parametrize(
    "m,n,bits,g,sb,perm,frac,batch",
    [
        (64, 28672, 3, 16, 3, True, 0.01, 1),
        (16, 70000, 3, 16, 3, True, 0.01, 1),
        (16, 70000, 4, 128, 0, True, 0.01, 4),
        (300, 4096, 3, 16, 3, True, 0.01, 16),
        (40, 4096, 2, 64, 0, False, 0.0, 64),
        (1, 8192, 8, 32, 3, True, 1.0, 1),
    ],
)
def test_matmul_shapes(m, n, bits, g, sb, perm, frac, batch):
    rng = np.random.default_rng(n + batch)
    t = random_bilevel(rng, m, n, BilevelParams(bits, g, sb, 16 if sb else 0), perm, frac)
    _check_matmul(t, batch, "float16", rng)


def test_matvec_on_other_stream_and_no_sync():
    rng = np.random.default_rng(3)
    t = random_bilevel(rng, 50, 1000, BilevelParams(3, 16, 3, 16), True, 0.01)
    g = GpuTensor.from_packed(pack(t))
    x = cp.asarray(rng.standard_normal(1000).astype(np.float16))
    y0 = g.matvec(x)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        y1 = g.matvec(x)
    s.synchronize()
    assert cp.array_equal(y0, y1)  # deterministic: no atomics


def test_fallback_logs(caplog):
    rng = np.random.default_rng(4)
    t = random_bilevel(rng, 9, 77, BilevelParams(5, 7, 0, 0), True, 0.02)
    with caplog.at_level("WARNING", logger="spqr_format.gpu"):
        _check_matmul(t, 3, "float16", rng)


# --- tensor-core path (tile layout) ------------------------------------------------------
TC_PARAMS = st.builds(
    BilevelParams,
    bits=st.sampled_from([2, 3, 4]),
    group_size=st.just(16),
    stats_bits=st.sampled_from([1, 2, 3, 4]),
    stats_group_size=st.sampled_from([16, 32]),
)


@settings(max_examples=60, **SETTINGS)
@given(
    m=st.sampled_from([1, 2, 15, 16, 17, 33, 100]),
    n=st.sampled_from([1, 15, 16, 17, 80, 81, 100, 513, 4096]),
    params=TC_PARAMS,
    perm=st.booleans(),
    outl=st.sampled_from(
        [(0.0, "uniform"), (0.01, "uniform"), (0.2, "uniform"), (0.3, "full_rows")]
    ),
    batch=st.sampled_from([1, 2, 3, 7, 8, 9, 16, 17, 32, 33, 64, 65]),
    tcg=st.sampled_from(["", "1"]),  # "1": path=tcg (spqr_tcg_* for batch <= 2)
    seed=st.integers(0, 2**31),
)
def test_tensor_core_matmul_random(m, n, params, perm, outl, batch, tcg, seed):
    rng = np.random.default_rng(seed)
    t = random_bilevel(rng, m, n, params, perm, outl[0], outlier_layout=outl[1])
    p = pack(t)
    assert GpuTensor.from_packed(p).tc is not None
    with mock.patch.dict(os.environ, {P.ENV: "path=tcg" if tcg else ""}):
        _check_matmul(t, batch, "float16", rng)


@pytest.mark.parametrize(
    "m,n,bits,sb,perm,frac,batch",
    [
        (64, 28672, 3, 3, True, 0.01, 1),
        (48, 28672, 3, 3, True, 0.01, 16),
        (16, 70000, 3, 3, True, 0.01, 1),
        (17, 70000, 4, 2, True, 0.02, 64),
        (300, 4096, 3, 3, True, 0.01, 100),
        (33, 1000, 2, 3, False, 1.0, 5),
    ],
)
def test_tensor_core_matmul_shapes(m, n, bits, sb, perm, frac, batch):
    rng = np.random.default_rng(n + batch + bits)
    t = random_bilevel(rng, m, n, BilevelParams(bits, 16, sb, 16), perm, frac)
    _check_matmul(t, batch, "float16", rng)


@pytest.mark.parametrize("ks", [1, 2, 4, 8])
@pytest.mark.parametrize("batch", [1, 2, 3, 8])
def test_tensor_core_small_batch_every_k_slicing(monkeypatch, ks, batch):
    """The batch <= 8 kernels (spqr_tcv_*, and spqr_tcg_* for batch <= 2) with each k-slicing
    of their row blocks: row blocks past the end inside a block, fewer chunks than slices,
    rows full of outliers."""
    rng = np.random.default_rng(ks * 10 + batch)
    for path in ("tcg", "tcv") if batch <= K.TCG_MAX_BATCH else ("tcv",):
        monkeypatch.setenv(P.ENV, f"tcv_ks={ks},path={path}")
        for m, n in ((100, 4096), (37, 700), (16, 64), (300, 64)):
            t = random_bilevel(rng, m, n, BilevelParams(3, 16, 3, 16), True, 0.05)
            assert GpuTensor.from_packed(pack(t)).plan_for(batch).path == path
            _check_matmul(t, batch, "float16", rng)


@pytest.mark.parametrize("batch", [5, 8, 9, 16, 33, 64])
def test_tensor_core_split_path_outlier_pass_every_batch_width(monkeypatch, batch):
    """The k-split kernel and its outlier pass (spqr_tc_finish_p*) at every batch width:
    rows full of outliers next to rows with none (in one warp's rows: the long ones go to the
    one-row-per-warp fallback), every row full (long rows on the lanes-per-row path), skip
    entries (70,000 columns), a row count that is not a multiple of 8."""
    rng = np.random.default_rng(1000 + batch)
    p3 = BilevelParams(3, 16, 3, 16)
    cases = ((37, 700, 0.3, "full_rows"), (203, 512, 0.05, "uniform"), (19, 300, 1.0, "uniform"))
    # pitch 8 and 16: every lanes-per-row scheme (small matrices would get one row per warp)
    for lanes in (4, 8, 16, 32) if 4 < K.tc_xt_pitch(batch) <= 16 else (0,):
        monkeypatch.setenv(P.ENV, "path=tc_split" + (f",finish_lanes={lanes}" if lanes else ""))
        for m, n, frac, layout in cases:
            t = random_bilevel(rng, m, n, p3, True, frac, outlier_layout=layout)
            _check_matmul(t, batch, "float16", rng)
    monkeypatch.setenv(P.ENV, "path=tc_split")
    # rows whose outliers are all past column 65,535 (skip entries first), some rows empty
    t = random_bilevel(rng, 21, 70000, p3, True, 0.0)
    rows = np.repeat(np.arange(0, 21, 2), 40)
    cols = np.concatenate(
        [np.sort(rng.choice(np.arange(65536, 70000), 40, False)) for _ in range(11)]
    )
    vals = (rng.standard_normal(rows.size) * 0.1).astype(np.float16)
    t.outliers = make_outliers(rows, cols, vals)
    _check_matmul(t, batch, "float16", rng)


def test_tensor_core_and_simt_paths_agree_closely():
    rng = np.random.default_rng(11)
    t = random_bilevel(rng, 128, 2048, BilevelParams(3, 16, 3, 16), True, 0.01)
    p = pack(t)
    a, b = GpuTensor.from_packed(p), GpuTensor.from_packed(p, tensor_cores=False)
    assert a.tc is not None and b.tc is None
    x = cp.asarray(rng.standard_normal((4, 2048)).astype(np.float16))
    ya, yb = cp.asnumpy(a.matmul(x)).astype(np.float64), cp.asnumpy(b.matmul(x)).astype(np.float64)
    assert np.max(np.abs(ya - yb)) <= 1e-2 * np.max(np.abs(yb))
    assert cp.array_equal(a.matmul(x), a.matmul(x))  # deterministic


_MMA_SRC = r"""
extern "C" __global__ void mma_one(const unsigned* A, const unsigned* B, float* D) {
  const int lane = threadIdx.x;
  A += blockIdx.x * 128; B += blockIdx.x * 64; D += blockIdx.x * 128;
  float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
               : "r"(A[4 * lane]), "r"(A[4 * lane + 1]), "r"(A[4 * lane + 2]),
                 "r"(A[4 * lane + 3]), "r"(B[2 * lane]), "r"(B[2 * lane + 1]));
  D[4 * lane] = d0; D[4 * lane + 1] = d1; D[4 * lane + 2] = d2; D[4 * lane + 3] = d3;
}
"""


@pytest.mark.parametrize("bits", [3, 4])
def test_tensor_cores_keep_f16_subnormal_codes(bits):
    """spqr_tcg_* relies on this (and its bound above counts it): mma.sync takes codes q at bit
    offset o of an f16 (the subnormal q * 2^(o - 24)) without flushing them, within
    2^-15 sum|x| of the exact product in code units (H200: 2^-15.8)."""
    rng = np.random.default_rng(bits)
    kern = cp.RawKernel(_MMA_SRC, "mma_one")
    lane = np.arange(32)
    g, t = lane >> 2, lane & 3
    n = 256
    for o in range(0, 11 - bits, bits):
        q = rng.integers(0, 1 << bits, size=(n, 16, 16)).astype(np.uint16)
        x = (rng.standard_normal((n, 16, 8)) * 4.0 ** rng.integers(-3, 4, (n, 1, 1))).astype(
            np.float16
        )
        a = (q << o).view(np.float16)
        af = np.stack([a[:, g, 2 * t], a[:, g, 2 * t + 1], a[:, g + 8, 2 * t],
                       a[:, g + 8, 2 * t + 1], a[:, g, 2 * t + 8], a[:, g, 2 * t + 9],
                       a[:, g + 8, 2 * t + 8], a[:, g + 8, 2 * t + 9]], -1)  # fmt: skip
        bf = np.stack([x[:, 2 * t, g], x[:, 2 * t + 1, g], x[:, 2 * t + 8, g],
                       x[:, 2 * t + 9, g]], -1)  # fmt: skip
        d = cp.zeros((n, 32, 4), cp.float32)
        kern((n,), (32,), (cp.asarray(af.view(np.uint32)), cp.asarray(bf.view(np.uint32)), d))
        d = cp.asnumpy(d).astype(np.float64) * 2.0 ** (24 - o)
        got = np.zeros((n, 16, 8))
        got[:, g, 2 * t], got[:, g, 2 * t + 1] = d[..., 0], d[..., 1]
        got[:, g + 8, 2 * t], got[:, g + 8, 2 * t + 1] = d[..., 2], d[..., 3]
        ref = q.astype(np.float64) @ x.astype(np.float64)
        err = np.abs(got - ref) / np.abs(x.astype(np.float64)).sum(1, keepdims=True)
        assert err.max() <= 2.0**-15, (o, err.max())
