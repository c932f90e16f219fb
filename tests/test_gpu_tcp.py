"""The pipelined tensor-core path ``tcp`` (``spqr_tcp_*``, forced by ``SPQR_GPU_PLAN=path=tcp``)
against the f64 product of the CPU reference's decoded weights, within the tensor-core bound
of tests/test_gpu_kernels.py (``_bound_tc``: the same f16 weights enter the tensor cores as on
the k-split path). Needs CuPy and a CUDA device (skipped otherwise)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from gpu_env import cupy_or_skip

cp = cupy_or_skip()

from strategies import random_bilevel  # noqa: E402
from test_gpu_kernels import _check_matmul  # noqa: E402

from spqr_format.codec.bilevel import BilevelParams  # noqa: E402
from spqr_format.codec.packing import pack  # noqa: E402
from spqr_format.gpu import GpuTensor  # noqa: E402
from spqr_format.gpu import _kernels as K  # noqa: E402
from spqr_format.gpu import plan as P  # noqa: E402
from spqr_format.gpu import tensor as T  # noqa: E402

pytestmark = pytest.mark.gpu
P3 = BilevelParams(3, 16, 3, 16)
# batches 9..128 (and past one slice): n-tile counts 2, 4, 8, 16, non-multiples of 8 and 16
BATCHES = (9, 13, 16, 17, 31, 32, 33, 47, 64, 65, 100, 127, 128, 129)


@pytest.fixture(autouse=True)
def _force_tcp(monkeypatch):
    monkeypatch.setenv(P.ENV, "path=tcp")


@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("outl", [(0.0, "uniform"), (0.01, "uniform"), (0.05, "uniform")])
@pytest.mark.parametrize("m,n", [(37, 700), (300, 4096), (129, 513), (16, 64)])
def test_tcp_matches_reference_f16(m, n, perm, outl):
    """m, n not multiples of the tiles (16 rows, 64-320 columns per chunk, 64/128 rows per
    block), permutation on/off, 0 % / 1 % / 5 % outliers, every batch width."""
    rng = np.random.default_rng(m * 7 + n + int(perm) + int(100 * outl[0]))
    t = random_bilevel(rng, m, n, P3, perm, outl[0], outlier_layout=outl[1])
    g = GpuTensor.from_packed(pack(t))
    assert g.tc is not None
    for batch in BATCHES:
        assert g.plan_for(batch).path == "tcp"
        _check_matmul(t, batch, "float16", rng)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sb", [1, 2, 3, 4])
def test_tcp_every_bits_and_stats_bits(bits, sb):
    """Every (bits, stats_bits) module (each its own NVRTC compile), rows full of outliers."""
    rng = np.random.default_rng(bits * 10 + sb)
    S = 32 if sb % 2 else 16
    params = BilevelParams(bits, 16, sb, S)
    t = random_bilevel(rng, 203, 1000, params, True, 0.3, outlier_layout="full_rows")
    for batch in (9, 40, 100):
        _check_matmul(t, batch, "float16", rng)


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_tcp_every_k_split(monkeypatch, splits):
    """Forced k-splits (partial sums of several blocks along k, summed by the finish kernel),
    fewer chunks than stages, a ring that wraps many times (70,000 columns)."""
    monkeypatch.setenv(P.ENV, f"path=tcp,tc_splits={splits}")
    rng = np.random.default_rng(splits)
    for m, n in ((100, 4096), (50, 300), (33, 70000)):
        t = random_bilevel(rng, m, n, P3, True, 0.02)
        for batch in (16, 72):
            _check_matmul(t, batch, "float16", rng)


def test_tcp_out_dtypes_and_determinism():
    """Bit-identical reruns (no atomics); f32, f16 and bf16 outputs are one result rounded."""
    rng = np.random.default_rng(3)
    t = random_bilevel(rng, 150, 2000, P3, True, 0.01)
    g = GpuTensor.from_packed(pack(t))
    x = cp.asarray(rng.standard_normal((48, 2000)).astype(np.float16))
    y16 = g.matmul(x)
    assert cp.array_equal(y16, g.matmul(x))
    ws = cp.empty(-(-g.workspace_bytes(48) // 4), dtype=cp.float32)
    y32 = cp.empty((48, 150), dtype=cp.float32)
    yb = cp.empty((48, 150), dtype=cp.uint16)
    g.matmul_into(x.data.ptr, 2000, 1, y32.data.ptr, 150, 0, 48, ws.data.ptr)
    g.matmul_into(x.data.ptr, 2000, 1, yb.data.ptr, 150, 2, 48, ws.data.ptr)
    f32 = cp.asnumpy(y32)
    assert np.array_equal(f32.astype(np.float16), cp.asnumpy(y16))
    bits = f32.view(np.uint32)
    rne = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    assert np.array_equal(rne.astype(np.uint16), cp.asnumpy(yb))


def test_tcp_agrees_with_the_k_split_path(monkeypatch):
    """Same f16 weights into the tensor cores: the two paths differ only by f32 summation
    order (and the final rounding)."""
    rng = np.random.default_rng(4)
    t = random_bilevel(rng, 256, 4096, P3, True, 0.01)
    g = GpuTensor.from_packed(pack(t))
    x = cp.asarray(rng.standard_normal((64, 4096)).astype(np.float16))
    a = cp.asnumpy(g.matmul(x)).astype(np.float64)
    monkeypatch.setenv(P.ENV, "path=tc_split")
    b = cp.asnumpy(g.matmul(x)).astype(np.float64)
    assert np.max(np.abs(a - b)) <= 4e-3 * np.max(np.abs(b))


def test_tcp_falls_back_when_the_ring_does_not_fit(monkeypatch, caplog):
    """A device whose shared memory holds the k-split kernel's buffers (40 KiB at 32 columns)
    but not the stage ring (77 KiB for bits 3): the k-split path, logged once per tensor."""
    rng = np.random.default_rng(5)
    t = random_bilevel(rng, 64, 1000, P3, True, 0.02)
    assert K.tcp_geometry(3, 3, 2)["SMEM"] > 61 * 1024 >= K.tc_smem_bytes(4, 20)
    monkeypatch.setattr(T, "_smem_optin", lambda: 60 * 1024)
    for batch in (16, 17, 32):
        _check_matmul(t, batch, "float16", rng)
    g = GpuTensor.from_packed(pack(t), name="blk.1.w")
    x = cp.asarray(rng.standard_normal((20, 1000)).astype(np.float16))
    with caplog.at_level(logging.WARNING, logger="spqr_format.gpu"):
        y0 = g.matmul(x)
        y1 = g.matmul(x)
    msgs = [r.getMessage() for r in caplog.records if "blk.1.w" in r.getMessage()]
    assert len(msgs) == 1 and "tc_split" in msgs[0] and "shared memory" in msgs[0], msgs
    monkeypatch.setenv(P.ENV, "path=tc_split")
    assert cp.array_equal(y0, y1) and cp.array_equal(y0, g.matmul(x))


def test_tcp_launch_geometry_matches_the_kernel():
    """A direct launch with the ring _kernels.tcp_geometry plans (the kernel traps when given
    less than its TcpGeo::SMEM, so this also checks that the two agree): x' = 0 gives 0."""
    rng = np.random.default_rng(6)
    t = random_bilevel(rng, 64, 640, P3, False, 0.0)
    g = GpuTensor.from_packed(pack(t))
    tc = g.tc
    nt = 2
    geo = K.tcp_geometry(3, 3, nt)
    fn = T.function(K.tcp_name(3, 3, nt))
    T._raise_smem_limit(fn, geo["SMEM"], None, "tcp")
    part = cp.zeros(16 * nt * 8 * tc.RB, dtype=cp.float32)
    xfrag = cp.zeros(nt * tc.KT * 32 * 2, dtype=cp.uint32)
    args = (tc.codes, tc.stats, tc.stats2, xfrag, part, np.int32(tc.RB), np.int32(tc.NC),
            np.int32(tc.NC), np.int64(16 * tc.RB), np.int32(16))  # fmt: skip
    grid = (-(-tc.RB // geo["RBB"]), 1)
    fn(grid, (32 * K.TCP_WARPS,), args, shared_mem=geo["SMEM"])
    cp.cuda.Device().synchronize()
    assert float(cp.abs(part).max()) == 0.0  # x' = 0
