"""Can the dense path's dequantization overlap its cuBLAS GEMM? (issue 20, prefill; a probe)

    python benchmarks/gpu_dense_overlap.py

W in S column slices (stored order, no permutation: what a column-range dequantizer would
produce, here made of S independent random tensors), slice i + 1 dequantized on a second stream
while the GEMM of slice i accumulates into an f32 Y; compared in the same process with cuBLAS
fp16 on dense W, the production dense path (dequantize the whole permuted W, one GEMM) and the
same slices one after the other on one stream. Measured on an H100 (session 17,
benchmarks/results/gpu-h100-2026-12-07.md): no overlap; the GEMM fills the GPU.
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import cupy as cp
    from cupy_backends.cuda.libs import cublas
except ImportError as _err:  # a GPU benchmark: say so and stop
    print(f"error: gpu_dense_overlap.py needs CuPy and a CUDA GPU ({_err})", file=sys.stderr)
    sys.exit(2)
import numpy as np  # noqa: E402
from gpu_matvec import _time_eager  # noqa: E402  (this script's directory is on sys.path)

from spqr_format.gpu import GpuTensor  # noqa: E402
from spqr_format.gpu.synth import random_packed  # noqa: E402

ONE = np.ones(1, dtype=np.float32)
ZERO = np.zeros(1, dtype=np.float32)
F16, F32 = 2, 0  # cudaDataType: CUDA_R_16F = 2, CUDA_R_32F = 0


def gemm(handle, stream, x_ptr, ldx, w_ptr, ldw, y_ptr, ldy, ytype, batch, m, k, beta):
    cublas.setStream(handle, stream.ptr)
    cublas.gemmEx(
        handle,
        cublas.CUBLAS_OP_T,
        cublas.CUBLAS_OP_N,
        m,
        batch,
        k,
        ONE.ctypes.data,
        w_ptr,
        F16,
        ldw,
        x_ptr,
        F16,
        ldx,
        beta.ctypes.data,
        y_ptr,
        ytype,
        ldy,
        68,
        -1,
    )


def timeit(fn, reps=7) -> float:
    """Median us of ``reps`` back-to-back eager calls on the null stream (gpu_matvec's timer)."""
    return statistics.median(_time_eager(fn, reps, cp.cuda.Stream.null)) * 1e3


def measure(handle, s_dq, full, parts, wd, wbuf, bufs, m, n, batch) -> str:
    """One (shape, slice count, batch) case: the four variants' median times, as a line."""
    s0 = cp.cuda.Stream.null
    S, ns = len(parts), n // len(parts)
    x = cp.random.standard_normal((batch, n), dtype=cp.float32).astype(cp.float16)
    y16 = cp.empty((batch, m), dtype=cp.float16)
    y32 = cp.empty((batch, m), dtype=cp.float32)

    def cublas_only():
        gemm(handle, s0, x.data.ptr, n, wd.data.ptr, n, y16.data.ptr, m, F16, batch, m, n, ZERO)

    def dense_path():
        full.dequantize_into(wbuf.data.ptr, n, 1)
        gemm(handle, s0, x.data.ptr, n, wbuf.data.ptr, n, y16.data.ptr, m, F16, batch, m, n, ZERO)

    def slice_gemm(i):
        beta = ZERO if i == 0 else ONE
        xp, wp = x.data.ptr + 2 * i * ns, bufs[i % 2].data.ptr
        gemm(handle, s0, xp, n, wp, ns, y32.data.ptr, m, F32, batch, m, ns, beta)

    def slices_serial():
        for i, t in enumerate(parts):
            t.dequantize_into(bufs[i % 2].data.ptr, ns, 1)
            slice_gemm(i)
        y16[...] = y32.astype(cp.float16)

    def slices_overlap():
        start = cp.cuda.Event()
        start.record(s0)
        s_dq.wait_event(start)
        mm_done = []
        for i, t in enumerate(parts):
            if i >= 2:
                s_dq.wait_event(mm_done[i - 2])  # buffer i % 2 is free again
            with s_dq:
                t.dequantize_into(bufs[i % 2].data.ptr, ns, 1)
            e = cp.cuda.Event()
            e.record(s_dq)
            s0.wait_event(e)
            slice_gemm(i)
            f = cp.cuda.Event()
            f.record(s0)
            mm_done.append(f)
        y16[...] = y32.astype(cp.float16)

    tc, td = timeit(cublas_only), timeit(dense_path)
    tsr, tov = timeit(slices_serial), timeit(slices_overlap)
    dq1 = timeit(lambda: parts[0].dequantize_into(bufs[0].data.ptr, ns, 1))
    return (
        f"{m}x{n} S={S} batch {batch}: cuBLAS {tc:.1f} us | dense path {td:.1f} "
        f"({td / tc:.2f}x) | slices serial {tsr:.1f} ({tsr / tc:.2f}x) | slices overlapped "
        f"{tov:.1f} ({tov / tc:.2f}x) | one slice's dequantize {dq1:.1f} x {S}"
    )


def main():
    handle = cp.cuda.device.get_cublas_handle()
    s_dq = cp.cuda.Stream(non_blocking=False)
    for m, n in ((8192, 28672), (28672, 8192)):
        full = GpuTensor.from_packed(random_packed(m, n, seed=1), tensor_cores=False)
        wd = cp.random.standard_normal((m, n), dtype=cp.float32).astype(cp.float16) * 0.02
        wbuf = cp.empty((m, n), dtype=cp.float16)
        for S in (4, 8):
            ns = n // S
            parts = [
                GpuTensor.from_packed(
                    random_packed(m, ns, perm=False, seed=10 + i), tensor_cores=False
                )
                for i in range(S)
            ]
            bufs = [cp.empty((m, ns), dtype=cp.float16) for _ in range(2)]
            for batch in (512, 2048):
                line = measure(handle, s_dq, full, parts, wd, wbuf, bufs, m, n, batch)
                print(line, flush=True)
            cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
