"""Benchmark of the GPU dequantizer (f16 output) with and without a permutation, next to the
bandwidth ceilings of a write-heavy kernel measured in the same process.

Ceilings: a streaming read (as in gpu_matvec.py), a streaming write and a copy (read + write
counted), 1 GiB each. Dequantize: each shape's compressed tensor is copied until the copies
exceed 1 GiB and a CUDA graph dequantizes them all into one f16 buffer; the time of one call
is the graph's median replay time over the copies. GB/s counts the compressed bytes read plus
the f16 bytes written; %read is against the streaming read (the issue's yardstick), %copy
against the copy, the ceiling of a kernel that reads and writes (both directions counted).

    python benchmarks/gpu_dequant.py --out dequant.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    import cupy as cp  # noqa: E402
except ImportError as _err:  # a benchmark of the CUDA kernels: say so and stop
    print(
        f"error: {__file__.rsplit('/', 1)[-1]} needs CuPy and a CUDA GPU ({_err})", file=sys.stderr
    )
    sys.exit(2)
from gpu_matvec import SHAPES, _clone, _time_graph, streaming_read_gbs  # noqa: E402

from spqr_format.gpu import GpuTensor  # noqa: E402
from spqr_format.gpu.synth import random_packed  # noqa: E402

_SRC = r"""
extern "C" __global__ void stream_write(uint4* __restrict__ p, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) p[i] = make_uint4(i, 0, 0, 0);
}
extern "C" __global__ void stream_copy(const uint4* __restrict__ a, uint4* __restrict__ b,
                                       long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) b[i] = __ldcs(a + i);
}
"""


def ceilings(stream) -> dict:
    """GB/s of a streaming read, a streaming write and a copy (both directions counted)."""
    out = {"read": streaming_read_gbs(1.0, stream)}
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    n16 = (1 << 30) // 16
    a = cp.zeros(n16 * 4, dtype=cp.uint32)
    b = cp.zeros_like(a)
    write = cp.RawKernel(_SRC, "stream_write")
    copy = cp.RawKernel(_SRC, "stream_copy")
    grid = (sms * 16,)
    t = statistics.median(_time_graph(lambda: write(grid, (512,), (b, np.int64(n16))), 20, stream))
    out["write"] = n16 * 16 / (t * 1e-3) / 1e9
    t = statistics.median(
        _time_graph(lambda: copy(grid, (512,), (a, b, np.int64(n16))), 20, stream)
    )
    out["copy"] = 2 * n16 * 16 / (t * 1e-3) / 1e9
    return out


def bench(m: int, n: int, perm: bool, bw: dict, stream, reps: int) -> dict:
    g0 = GpuTensor.from_packed(random_packed(m, n, perm=perm, seed=m + n), validate=False)
    ncopy = max(2, math.ceil((1 << 30) / g0.nbytes))
    copies = [g0] + [_clone(g0) for _ in range(ncopy - 1)]
    cp.cuda.Device().synchronize()
    w = cp.empty((m, n), dtype=cp.float16)

    def record():
        for c in copies:
            c.dequantize_into(w.data.ptr, n, 1)

    t = statistics.median(_time_graph(record, reps, stream)) / ncopy
    gbs = (g0.nbytes + 2 * m * n) / (t * 1e-3) / 1e9
    return dict(
        shape=[m, n],
        perm=perm,
        us=t * 1e3,
        gbs=gbs,
        pct_read=100 * gbs / bw["read"],
        pct_copy=100 * gbs / bw["copy"],
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_dequant.json")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,8192x28672")
    ap.add_argument("--perm", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    shapes = (
        [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        if args.shapes
        else SHAPES
    )
    perms = {"both": [True, False], "yes": [True], "no": [False]}[args.perm]
    stream = cp.cuda.Stream(non_blocking=True)
    bw = ceilings(stream)
    print(
        f"device {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: streaming read "
        f"{bw['read']:.0f} GB/s, write {bw['write']:.0f}, copy {bw['copy']:.0f}"
    )
    print(f"{'shape':>12} {'perm':>5} {'us':>8} {'GB/s':>7} {'%read':>6} {'%copy':>6}")
    rows = []
    for m, n in shapes:
        for perm in perms:
            r = bench(m, n, perm, bw, stream, args.reps)
            rows.append(r)
            shape = f"{m}x{n}"
            print(
                f"{shape:>12} {str(perm):>5} {r['us']:8.1f} {r['gbs']:7.0f} "
                f"{r['pct_read']:6.1f} {r['pct_copy']:6.1f}"
            )
            cp.get_default_memory_pool().free_all_blocks()
    Path(args.out).write_text(json.dumps(dict(ceilings_gbs=bw, results=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
