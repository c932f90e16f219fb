"""GPU kernels for ``channel_mixed`` (spqr_cmpq.cu through GpuCmpqTensor): dequantize bit-exact
with the numba decoder, matvec / matmul for batch 1..16 (and a 2-slice batch) within the SPEC
C-7.6 tolerance on every path (K.cmpq_path: spqr_cmpq_mv1_b* at batch 1, spqr_cmpq_tc_b*_nt*
at 2-16 with f16 x, spqr_cmpq_mm_* for f32 / bf16 x, R not a multiple of 16 or cmpq_v2=0),
SpQRLinear forward, file upload. The second design (mv1, tc) is the default; this module sets
cmpq_v2=1 for every test anyway, so that it tests that design under any SPQR_GPU_PLAN the
caller has set. Skipped without CuPy and a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_env import cupy_or_skip
from hypothesis import given, settings
from hypothesis import strategies as st

cp = cupy_or_skip()

from spqr_format.codec import channel_mixed as cm  # noqa: E402
from spqr_format.codec import channel_mixed_ref as ref  # noqa: E402
from spqr_format.gpu import _kernels as K  # noqa: E402
from spqr_format.gpu import plan as P  # noqa: E402
from spqr_format.gpu import synth  # noqa: E402
from spqr_format.gpu.cmpq import GpuCmpqTensor  # noqa: E402
from spqr_format.gpu.tensor import GpuTensor  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _second_design():
    """The module tests the second design (cmpq_v2=1: mv1 / tensor-core kernels, with
    the first design wherever that one does not apply); tests that compare designs set the
    override themselves."""
    import os

    old = os.environ.get(P.ENV)
    os.environ[P.ENV] = "cmpq_v2=1"
    yield
    if old is None:
        os.environ.pop(P.ENV, None)
    else:
        os.environ[P.ENV] = old


def _tensor(m, n, rows=0, density=0.0, seed=0, widths=None):
    return cm.pack(
        synth.random_channel_mixed_tensor(
            m, n, table_rows=rows, outlier_density=density, seed=seed, widths=widths
        )
    )


def _bound(w32: np.ndarray, x: np.ndarray, out_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(f64 reference, tolerance) of C-7.6, plus the rounding of y to its output dtype."""
    w = w32.astype(np.float64)
    xd = x.astype(np.float64)
    exact = xd @ w.T
    tol = 2.0**-9 * (np.abs(xd) @ np.abs(w).T) + 2.0**-24
    out_ulp = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 0.0}[out_dtype]
    return exact, tol + out_ulp * np.abs(exact)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 300),
    n=st.integers(1, 200),
    rows=st.sampled_from([0, 1, 7, 16, 64, 256]),
    density=st.sampled_from([0.0, 0.02, 0.3]),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    seed=st.integers(0, 2**16),
)
def test_dequantize_is_bit_exact_with_numba(m, n, rows, density, dtype, seed):
    p = _tensor(m, n, rows, density, seed)
    want = ref.decode_channel_mixed(p, dtype)
    g = GpuTensor.from_packed(p)
    assert isinstance(g, GpuCmpqTensor)
    got = cp.asnumpy(g.dequantize(dtype))
    assert got.shape == want.shape
    assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8))


@pytest.mark.parametrize("bits", range(1, 9))
def test_dequantize_every_single_width(bits):
    p = _tensor(37, 301, 0, 0.05, bits, widths=np.full(301, bits, np.uint8))
    want = ref.decode_channel_mixed(p, "float32")
    got = cp.asnumpy(GpuTensor.from_packed(p).dequantize("float32"))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 600),
    n=st.integers(1, 300),
    rows=st.sampled_from([0, 1, 16, 300]),
    density=st.sampled_from([0.0, 0.02, 0.3]),
    batch=st.integers(1, 16),
    in_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    seed=st.integers(0, 2**16),
)
def test_matmul_within_the_spec_tolerance(m, n, rows, density, batch, in_dtype, seed):
    """Whichever path the slice takes. The tensor-core path (f16 x only) multiplies the f16
    weights by x exactly as given, so the bound is C-7.6's, unchanged."""
    p = _tensor(m, n, rows, density, seed)
    w = ref.decode_channel_mixed(p, "float32")
    x, xg = _x(np.random.default_rng(seed), batch, n, in_dtype)
    y = _y(GpuTensor.from_packed(p).matmul(xg), in_dtype)
    exact, tol = _bound(w, x, in_dtype)
    assert np.all(np.abs(y - exact) <= tol)


def _x(rng, batch, n, dtype):
    """(x as f32 on the host, x on the device in ``dtype``; bf16 as uint16 bits)."""
    x16 = rng.standard_normal((batch, n)).astype(np.float16)
    if dtype == "bfloat16":
        xb = (x16.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return (xb.astype(np.uint32) << 16).view(np.float32), cp.asarray(xb)
    if dtype == "float32":  # values an f16 cannot hold: a rounding to f16 would show
        x = (x16.astype(np.float32) * (1 + 2.0**-15)).astype(np.float32)
        return x, cp.asarray(x)
    return x16.astype(np.float32), cp.asarray(x16)


def _y(yg, dtype) -> np.ndarray:
    y = cp.asnumpy(yg)
    if dtype == "bfloat16":
        y = (y.astype(np.uint32) << 16).view(np.float32)
    return y.astype(np.float64)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("rows", [0, 16, 7])
@pytest.mark.parametrize("batch", [1, 2, 8, 9, 16])
def test_every_width_on_every_path(bits, rows, batch):
    """Single-width tensors (so each per-width kernel runs alone, its tile sizes at both ends:
    b = 1..4 the 16-chunk tensor-core tiles, b = 8 one chunk), m not a multiple of 16 or 128,
    n not of 32; rows = 7 sends batch 2-16 to spqr_cmpq_mm_*."""
    p = _tensor(301, 1000, rows, 0.01, bits, widths=np.full(1000, bits, np.uint8))
    w = ref.decode_channel_mixed(p, "float32")
    x, xg = _x(np.random.default_rng(bits), batch, 1000, "float16")
    y = _y(GpuTensor.from_packed(p).matmul(xg), "float16")
    exact, tol = _bound(w, x, "float16")
    assert np.all(np.abs(y - exact) <= tol)


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_both_designs_meet_the_tolerance_and_repeat_bit_exactly(monkeypatch, batch):
    """cmpq_v2=0 (spqr_cmpq_mm_*) and cmpq_v2=1 (second design) both meet C-7.6 and each is
    deterministic (same bits on a second call)."""
    p = synth.random_channel_mixed(512, 3000, target_bits=2.5, outlier_fraction=0.005, seed=7)
    w = ref.decode_channel_mixed(p, "float32")
    x, xg = _x(np.random.default_rng(batch), batch, 3000, "float16")
    exact, tol = _bound(w, x, "float32")
    g = GpuTensor.from_packed(p)
    for v2 in ("1", "0"):
        monkeypatch.setenv(P.ENV, f"cmpq_v2={v2}")
        want = K.cmpq_path(batch, 1, 0)
        assert want == ("mm" if v2 == "0" else "mv1" if batch == 1 else "tc")
        y32 = cp.empty((batch, 512), cp.float32)
        ws = cp.empty(g.workspace_bytes(batch, 1) // 4 + 1, cp.float32)
        runs = []
        for _ in range(2):
            g.matmul_into(xg.data.ptr, 3000, 1, y32.data.ptr, 512, 0, batch, ws.data.ptr)
            runs.append(cp.asnumpy(y32))
        assert np.array_equal(runs[0].view(np.uint32), runs[1].view(np.uint32))
        assert np.all(np.abs(runs[0] - exact) <= tol)


def test_workspace_bytes_per_path():
    """x' f32, x' f16 in fragment order (tensor-core path only), the partial sums of every
    width's launches: what matmul_into carves out of the workspace."""
    p = synth.random_channel_mixed(256, 1000, target_bits=2.5, seed=1)
    g = GpuTensor.from_packed(p)
    for batch, code, path in ((1, 2, "mv1"), (5, 1, "tc"), (5, 0, "mm"), (16, 1, "tc")):
        got_path, nb, nbp = g._slice(batch, code)
        assert got_path == path
        plan = g._plan(path, nb)
        assert plan.splits == sum(grp[3] for grp in plan.groups)
        xf = 2 * g.np_ * nb if path == "tc" else 0
        assert g.workspace_bytes(batch, code) == 4 * nbp * (g._ldxs() + plan.splits * g.m) + xf


@pytest.mark.parametrize("rows,density", [(0, 0.0), (16, 0.02), (7, 0.3)])
@pytest.mark.parametrize("batch", [17, 40])
def test_dense_path_from_the_threshold(monkeypatch, rows, density, batch):
    """From cmpq_dense_from rows of f16 x on: W dequantized bit-exactly into the caller's
    workspace, then cuBLAS; within C-7.6 for every output dtype (f16 x -> bf16 y goes through
    an f32 product rounded once); bf16 x keeps the fused slices."""
    monkeypatch.setenv(P.ENV, "cmpq_dense_from=17")
    m, n = 300, 700
    p = _tensor(m, n, rows, density, seed=batch)
    w = ref.decode_channel_mixed(p, "float32")
    g = GpuTensor.from_packed(p)
    assert g.workspace_bytes(batch, 1) == g.dense_workspace_bytes(1) >= m * n * 2
    assert not K.cmpq_dense(batch, 2)  # bf16 x: fused slices
    x, xg = _x(np.random.default_rng(batch), batch, n, "float16")
    for out_code, out_dtype in ((1, "float16"), (0, "float32"), (2, "bfloat16")):
        y = cp.empty((batch, m), cp.float32 if out_code == 0 else cp.uint16)
        ws = cp.full(g.workspace_bytes(batch, 1) // 2, 0x7C01, cp.uint16)  # NaN patterns
        g.matmul_into(xg.data.ptr, n, 1, y.data.ptr, m, out_code, batch, ws.data.ptr)
        got = cp.asnumpy(ws[: m * n]).view(np.float16).reshape(m, n)
        assert np.array_equal(got.view(np.uint16), w.astype(np.float16).view(np.uint16))
        yy = cp.asnumpy(y)
        if out_code == 1:
            yy = yy.view(np.float16)
        yh = _y(cp.asarray(yy), out_dtype)
        exact, tol = _bound(w, x, out_dtype)
        assert np.all(np.abs(yh - exact) <= tol), out_dtype

