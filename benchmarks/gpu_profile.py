"""Run one GPU matmul configuration a few times, for a profiler (ncu / nsys) to attach to.

    ncu --kernel-name regex:spqr_tc_b --launch-skip 2 --launch-count 1 \
        python benchmarks/gpu_profile.py --shape 28672x8192 --batch 1

Builds a random spqr-3bit-like tensor (benchmarks' defaults), uploads it, and calls
``GpuTensor.matmul_into`` ``--calls`` times on one stream (``--dequant``: ``dequantize_into``
to fp16 instead; ``--no-perm``: a tensor without a permutation; ``--encoding channel_mixed
--target-bits 2.5``: a random CMPQ tensor instead). The kernel path follows the launch plan;
``SPQR_GPU_PLAN`` (e.g. ``path=tc_split`` or ``cmpq_v2=0``) forces another for an experiment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import cupy as cp  # noqa: E402
except ImportError as _err:  # a benchmark of the CUDA kernels: say so and stop
    print(
        f"error: {__file__.rsplit('/', 1)[-1]} needs CuPy and a CUDA GPU ({_err})", file=sys.stderr
    )
    sys.exit(2)
import numpy as np  # noqa: E402

from spqr_format.gpu import GpuTensor  # noqa: E402
from spqr_format.gpu.synth import random_channel_mixed, random_packed  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="28672x8192")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--no-tc", action="store_true", help="SIMT kernels (SPEC layout)")
    ap.add_argument("--dequant", action="store_true", help="profile dequantize to fp16")
    ap.add_argument("--no-perm", action="store_true", help="tensor without a permutation")
    ap.add_argument("--encoding", choices=("bilevel", "channel_mixed"), default="bilevel")
    ap.add_argument("--target-bits", type=float, default=2.5,
                    help="channel_mixed: counted bits per weight")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        m, n = (int(v) for v in args.shape.split("x"))
    except ValueError:
        ap.error(f"--shape {args.shape!r}: expected ROWSxCOLS, e.g. 28672x8192")
    if args.encoding == "channel_mixed":
        p = random_channel_mixed(m, n, target_bits=args.target_bits, seed=m + n)
    else:
        p = random_packed(m, n, bits=args.bits, seed=m + n, perm=not args.no_perm)
    g = GpuTensor.from_packed(p, validate=False, tensor_cores=not args.no_tc)
    if args.dequant:
        w = cp.empty((m, n), dtype=cp.float16)
        for _ in range(args.calls):
            g.dequantize_into(w.data.ptr, n, 1)
        cp.cuda.Device().synchronize()
        print(f"dequantize w[0,:4]={cp.asnumpy(w[0, :4])}")
        return 0
    x = cp.asarray(np.random.default_rng(0).standard_normal((args.batch, n)), dtype=cp.float16)
    y = cp.empty((args.batch, m), dtype=cp.float16)
    ws = cp.empty(g.workspace_bytes(args.batch) // 4, dtype=cp.float32)
    for _ in range(args.calls):
        g.matmul_into(x.data.ptr, n, 1, y.data.ptr, m, 1, args.batch, ws.data.ptr)
    cp.cuda.Device().synchronize()
    kind = "tensor-core" if getattr(g, "tc", None) is not None else "simt"
    kind = args.encoding if args.encoding == "channel_mixed" else kind
    print(f"{kind} y[0,:4]={cp.asnumpy(y[0, :4])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
