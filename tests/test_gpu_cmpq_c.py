"""The C ABI of channel_mixed tensors (spqr_cmpq_layout.c + spqr_cmpq_host.cu) gives the same
bits as the Python layer (GpuCmpqTensor with no SPQR_GPU_PLAN override: the default plan, which
the C launcher always runs) for matmul and dequantize: per slice of <= 16 rows spqr_cmpq_mv1_b*
at batch 1, spqr_cmpq_tc_b*_nt* for f16 x with R % 16 == 0, and the first design
(spqr_cmpq_mm_nb*) for f32 / bf16 x and other R.

Needs nvcc, CuPy and a CUDA device (skipped otherwise; tests/test_kernels_compile.py compiles
the launcher and tests/test_cmpq_layout_c.py checks the C repack on CPU-only machines).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from gpu_env import cupy_or_skip

cp = cupy_or_skip()
NVCC = shutil.which("nvcc")
if NVCC is None:
    pytest.skip("nvcc not found", allow_module_level=True)

from test_cmpq_layout_c import OK, _c_repack  # noqa: E402

from spqr_format.codec import channel_mixed as cm  # noqa: E402
from spqr_format.gpu import _kernels as K  # noqa: E402
from spqr_format.gpu import plan as P  # noqa: E402
from spqr_format.gpu import synth  # noqa: E402
from spqr_format.gpu.cmpq import GpuCmpqTensor  # noqa: E402

pytestmark = pytest.mark.gpu
KDIR = K.KERNEL_DIR


ARRAYS = "runs codes tables pcol perm inv_perm orows ocol ocolp oval ocorr".split()


class Tensor(ctypes.Structure):  # spqr_cmpq_tensor (spqr_gpu.h)
    _fields_ = [(k, ctypes.c_void_p) for k in ("runs", "runs_host", *ARRAYS[1:])] + [
        (k, ctypes.c_int64) for k in "m n table_rows Lp np nruns".split()
    ]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cc = cp.cuda.Device().compute_capability
    out = tmp_path_factory.mktemp("cmpqc") / "libspqr_cmpq.so"
    cmd = [NVCC, "-O2", "-std=c++17", f"-arch=sm_{cc}", "-Xcompiler", "-fPIC,-ffp-contract=off"]
    cmd += ["-shared", "-I", str(KDIR), str(KDIR / "spqr_cmpq_host.cu")]
    cmd += [str(KDIR / "spqr_cmpq_layout.c"), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    so = ctypes.CDLL(str(out))
    for f in ("spqr_cmpq_layout_sizes", "spqr_cmpq_repack", "spqr_cmpq_matmul"):
        getattr(so, f).restype = ctypes.c_int
    so.spqr_cmpq_dequantize.restype = ctypes.c_int
    so.spqr_cmpq_workspace_bytes.restype = ctypes.c_size_t
    so.spqr_cmpq_matmul.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    so.spqr_cmpq_matmul.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    so.spqr_cmpq_matmul.argtypes += [ctypes.c_void_p, ctypes.c_void_p]
    so.spqr_cmpq_dequantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    so.spqr_cmpq_dequantize.argtypes += [ctypes.c_int, ctypes.c_void_p]
    return so


def _dev(a):
    return None if a is None else cp.asarray(a)


def _upload(lib, p):
    rc, L = _c_repack(lib, p)
    assert rc == OK
    d = {
        k: _dev(L[k])
        for k in "runs codes tables pcol perm inv_perm orows ocol ocolp oval ocorr".split()
    }
    m, n = p.shape

    def ptr(a):
        return None if a is None else a.data.ptr

    t = Tensor(
        ptr(d["runs"]), L["runs"].ctypes.data, *(ptr(d[k]) for k in
        "codes tables pcol perm inv_perm orows ocol ocolp oval ocorr".split()),
        m, n, p.header.table_rows, L["Lp"], L["np_"], L["runs"].shape[0],
    )  # fmt: skip
    return t, (L, d)  # keep the arrays alive


CODES = {0: np.float32, 1: np.float16}


BATCHES = [1, 3, 16, 17, 21, 40]  # 17: a tc slice then an mv1 slice (two tile tables)
ROWS = [(0, 0.0), (7, 0.02), (16, 0.3)]
CODES_IN_OUT = [(1, 1), (0, 0), (1, 2), (2, 1)]  # f32 / bf16 x at batch > 1: the first design


def _paths(batch, in_code, rows):
    return [K.cmpq_path(min(K.CMPQ_MAX_BATCH, batch - b0), in_code, rows)
            for b0 in range(0, batch, K.CMPQ_MAX_BATCH)]  # fmt: skip


def test_cases_cover_every_path(monkeypatch):
    monkeypatch.delenv(P.ENV, raising=False)
    got = {p for b in BATCHES for r, _ in ROWS for c, _ in CODES_IN_OUT for p in _paths(b, c, r)}
    assert got == {"mv1", "tc", "mm"}
    assert _paths(17, 1, 16) == ["tc", "mv1"] and _paths(21, 0, 0) == ["mm", "mm"]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("rows,density", ROWS)
@pytest.mark.parametrize("in_code,out_code", CODES_IN_OUT)
def test_c_matmul_equals_python(lib, batch, rows, density, in_code, out_code, monkeypatch):
    monkeypatch.delenv(P.ENV, raising=False)  # the default plan, the one the C launcher runs
    m, n = 300, 1000
    t = synth.random_channel_mixed_tensor(m, n, table_rows=rows, outlier_density=density, seed=7)
    p = cm.pack(t)
    g = GpuCmpqTensor.from_packed(p)
    ct, keep = _upload(lib, p)
    rng = np.random.default_rng(batch)
    x32 = rng.standard_normal((batch, n)).astype(np.float32)
    if in_code == 0:
        X = cp.asarray(x32)
    elif in_code == 1:
        X = cp.asarray(x32.astype(np.float16))
    else:  # bf16 bits: truncate f32
        X = cp.asarray((x32.view(np.uint32) >> 16).astype(np.uint16))
    ysz = np.float32 if out_code == 0 else np.uint16
    want = cp.zeros((batch, m), ysz)
    ws = cp.empty(max(1, g.workspace_bytes(batch, in_code) // 4), np.float32)
    g.matmul_into(X.data.ptr, n, in_code, want.data.ptr, m, out_code, batch, ws.data.ptr)
    got = cp.full((batch, m), 0x7FFF if out_code else np.nan, ysz)
    nbytes = lib.spqr_cmpq_workspace_bytes(ctypes.byref(ct), batch)
    assert nbytes > 0
    wsc = cp.empty(nbytes // 4 + 1, np.float32)
    stream = cp.cuda.get_current_stream().ptr
    rc = lib.spqr_cmpq_matmul(ctypes.byref(ct), X.data.ptr, n, in_code, got.data.ptr, m,
                              out_code, batch, wsc.data.ptr, stream)  # fmt: skip
    assert rc == 0
    cp.cuda.get_current_stream().synchronize()
    assert cp.array_equal(got.view(np.uint16 if out_code else np.uint32),
                          want.view(np.uint16 if out_code else np.uint32))  # fmt: skip
    del keep


@pytest.mark.parametrize("out_code,dtype", [(0, "float32"), (1, "float16"), (2, "bfloat16")])
@pytest.mark.parametrize("rows,density", [(0, 0.0), (7, 0.05)])
def test_c_dequantize_equals_python(lib, out_code, dtype, rows, density):
    m, n = 70, 333
    t = synth.random_channel_mixed_tensor(m, n, table_rows=rows, outlier_density=density, seed=3)
    p = cm.pack(t)
    want = GpuCmpqTensor.from_packed(p).dequantize(dtype)
    ct, keep = _upload(lib, p)
    got = cp.zeros((m, n), np.float32 if out_code == 0 else np.uint16)
    rc = lib.spqr_cmpq_dequantize(ctypes.byref(ct), got.data.ptr, n, out_code,
                                  cp.cuda.get_current_stream().ptr)  # fmt: skip
    assert rc == 0
    cp.cuda.get_current_stream().synchronize()
    w = cp.asarray(want)
    assert cp.array_equal(got.view(np.uint8), w.view(np.uint8))
    del keep
