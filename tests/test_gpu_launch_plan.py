"""Every path of the launch plan on the GPU (needs CuPy and a CUDA device; skipped otherwise):
each within its stated bound (tests/test_gpu_kernels.py), the dense path's weights bit-exact,
the fallback to dequantize + cuBLAS at the plan's threshold, the launch-limit error."""

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
from spqr_format.codec.reference import decode_bilevel  # noqa: E402
from spqr_format.errors import BadInputError  # noqa: E402
from spqr_format.gpu import GpuTensor  # noqa: E402
from spqr_format.gpu import plan as P  # noqa: E402
from spqr_format.gpu.tensor import _gpu_class, _raise_smem_limit, function  # noqa: E402

pytestmark = pytest.mark.gpu
P3 = BilevelParams(3, 16, 3, 16)
BATCHES = (1, 2, 3, 8, 9, 17, 48, 49, 64, 65, 130)


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv(P.ENV, raising=False)


@pytest.mark.parametrize("layout", ["tc", "simt", "none"])
def test_every_plan_path_within_its_bound(monkeypatch, layout):
    """Each path the plan can give a layout, forced at every batch it can run (and the plan's
    own choice), f16 and bf16 inputs: within the path's stated bound."""
    rng = np.random.default_rng({"tc": 1, "simt": 2, "none": 3}[layout])
    params = P3 if layout != "none" else BilevelParams(5, 24, 0, 0)
    t = random_bilevel(rng, 100, 1000, params, True, 0.02)
    tc = layout == "tc"
    g = GpuTensor.from_packed(pack(t), tensor_cores=tc)
    assert (g.tc is not None) == tc
    for path in ("", *P.LAYOUT_PATHS[layout]):
        monkeypatch.setenv(P.ENV, f"path={path}" if path else "")
        for batch in BATCHES:
            for dtype, code in (("float16", 1), ("bfloat16", 2)):
                lay = P.layout_of(tc, layout != "none", code)
                if path and not P.can_run(path, lay, batch):
                    continue
                d = g.plan_for(batch, code)
                assert d.path == (path or d.path)
                _check_matmul(t, batch, dtype, rng, tensor_cores=tc)


def test_dense_workspace_holds_the_bit_exact_weights():
    """The dense path dequantizes into the caller's workspace: afterwards it holds the CPU
    reference decoder's f16 weights bit for bit, and y is the GEMM of exactly those."""
    rng = np.random.default_rng(5)
    t = random_bilevel(rng, 64, 512, P3, True, 0.01)
    p = pack(t)
    g = GpuTensor.from_packed(p)
    batch = 200
    assert g.plan_for(batch).path == "dense"
    assert g.workspace_bytes(batch) == g.dense_workspace_bytes(1) >= 64 * 512 * 2
    x = cp.asarray(rng.standard_normal((batch, 512)).astype(np.float16))
    y = cp.empty((batch, 64), dtype=cp.float16)
    ws = cp.zeros(g.workspace_bytes(batch) // 2, dtype=cp.uint16)
    g.matmul_into(x.data.ptr, 512, 1, y.data.ptr, 64, 1, batch, ws.data.ptr)
    w16 = decode_bilevel(p, "float16")
    assert np.array_equal(cp.asnumpy(ws[: 64 * 512]).reshape(64, 512), w16.view(np.uint16))
    ref = cp.asnumpy(x).astype(np.float64) @ w16.astype(np.float64).T
    a = np.abs(cp.asnumpy(x).astype(np.float64)) @ np.abs(w16.astype(np.float64)).T
    err = np.abs(cp.asnumpy(y).astype(np.float64) - ref)
    assert np.all(err <= (512 + 64) * 2.0**-24 * a + 2.0**-11 * np.abs(ref) + 2.0**-24)


@pytest.mark.parametrize("in_code,out_code", [(1, 2), (2, 1), (1, 0)])
def test_dense_path_writes_every_output_dtype(in_code, out_code):
    """cuBLAS writes only f32 or x's dtype; other outputs (f16 x -> bf16 y, bf16 -> f16) take
    an f32 product rounded once: y equals the f32 result rounded to nearest even."""
    rng = np.random.default_rng(in_code * 3 + out_code)
    t = random_bilevel(rng, 64, 512, P3, True, 0.01)
    g = GpuTensor.from_packed(pack(t))
    batch = 200
    assert g.plan_for(batch, in_code).path == "dense"
    x16 = rng.standard_normal((batch, 512)).astype(np.float16)
    x = x16 if in_code == 1 else (x16.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    xg = cp.asarray(x)
    ws = cp.empty(g.workspace_bytes(batch, in_code) // 4 + 1, dtype=cp.float32)
    y32 = cp.empty((batch, 64), dtype=cp.float32)
    g.matmul_into(xg.data.ptr, 512, in_code, y32.data.ptr, 64, 0, batch, ws.data.ptr)
    y = cp.empty((batch, 64), dtype=cp.float32 if out_code == 0 else cp.uint16)
    g.matmul_into(xg.data.ptr, 512, in_code, y.data.ptr, 64, out_code, batch, ws.data.ptr)
    f = cp.asnumpy(y32)
    if out_code == 0:
        want = f.view(np.uint32)
    elif out_code == 1:
        want = f.astype(np.float16).view(np.uint16)
    else:
        u = f.view(np.uint32).astype(np.uint64)
        want = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    got = cp.asnumpy(y)
    assert np.array_equal(got.view(want.dtype), want)


def test_fallback_triggers_at_the_plan_threshold(caplog):
    """Below the plan's dense threshold the fused kernels run, from it on dequantize + cuBLAS,
    the reason logged once per tensor."""
    rng = np.random.default_rng(6)
    t = random_bilevel(rng, 64, 512, P3, True, 0.01)
    g = GpuTensor.from_packed(pack(t), name="blk.0.w")
    first = P.dense_from(_gpu_class(), "tc", 64, 512)
    assert first == (49 if P.shape_class(64, 512) == "small" else 65)
    assert g.plan_for(first - 1).path == "tc_split" and g.plan_for(first).path == "dense"
    x = cp.asarray(rng.standard_normal((first + 1, 512)).astype(np.float16))
    with caplog.at_level(logging.INFO, logger="spqr_format.gpu"):
        g.matmul(x[: first - 1])
        cp.cuda.Device().synchronize()
        assert not [r for r in caplog.records if "cuBLAS" in r.getMessage()]
        g.matmul(x[:first])
        g.matmul(x[: first + 1])
        cp.cuda.Device().synchronize()
    msgs = [r.getMessage() for r in caplog.records if "cuBLAS" in r.getMessage()]
    assert len(msgs) == 1 and "blk.0.w" in msgs[0] and "launch plan" in msgs[0], msgs
    for batch in (first - 1, first, first + 1):
        _check_matmul(t, batch, "float16", rng)


def test_override_dense_from(monkeypatch):
    rng = np.random.default_rng(7)
    t = random_bilevel(rng, 40, 700, P3, True, 0.05)
    g = GpuTensor.from_packed(pack(t))
    monkeypatch.setenv(P.ENV, "dense_from=5")
    assert [g.plan_for(b).path for b in (4, 5)] == ["tcv", "dense"]
    for batch in (4, 5):
        _check_matmul(t, batch, "float16", rng)
    monkeypatch.setenv(P.ENV, "dense_from=0")
    assert g.plan_for(2048).path == "tc_split"
    monkeypatch.setenv(P.ENV, "dense_from=x")
    with pytest.raises(P.PlanError, match=P.ENV):
        g.plan_for(1)


def test_launch_that_cannot_fit_names_tensor_and_limit():
    fn = function("spqr_tc_finish_p8")
    with pytest.raises(BadInputError, match=r"spqr_tc_finish_p8.*allows \d+") as ei:
        _raise_smem_limit(fn, 10**7, "model.layers.0.mlp", "spqr_tc_finish_p8")
    assert "model.layers.0.mlp" in str(ei.value)


def test_spqr_linear_prefill_uses_dense_on_torch_stream():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    from spqr_format.gpu.nn import SpQRLinear

    rng = np.random.default_rng(8)
    t = random_bilevel(rng, 96, 1000, P3, True, 0.01)
    p = pack(t)
    lin = SpQRLinear(GpuTensor.from_packed(p))
    w = torch.from_numpy(decode_bilevel(p, "float32").astype(np.float64))
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(3, 100, 1000, device="cuda", dtype=dtype)  # 300 rows: dense
        code = 1 if dtype == torch.float16 else 2
        assert lin.weight_gpu.plan_for(300, code).path == "dense"
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            y = lin(x)
        s.synchronize()
        ref = x.double().cpu().reshape(-1, 1000) @ w.T
        err = (y.double().cpu().reshape(-1, 96) - ref).abs().max().item()
        assert err <= (4e-3 if dtype == torch.float16 else 2e-2) * ref.abs().max().item()
