"""Benchmark of the fused SpQR matvec/matmul kernels against cuBLAS fp16 on the same GPU.

For each shape (out x in) and batch: the time of one call, measured as CUDA-graph replays of
back-to-back calls that rotate through >= --rotate-gib of weight copies (so L2, 60 MiB on an
H200, stays cold); GB/s of compressed bytes read; % of the streaming-read bandwidth measured
in the same run; speedup over cuBLAS fp16 (torch ``F.linear`` on fp16 weight copies, also
rotated and graphed). Also the dequantize kernel's bandwidth. Each row names the launch plan's
path and entry (``spqr_format/gpu/plan.py``) that ran; ``--compare-paths`` also times the fused
kernels (``SPQR_GPU_PLAN=dense_from=0``) and dequantize + cuBLAS (``path=dense``) at every
batch, the measurements the plan's crossovers come from; for ``channel_mixed`` it times both
fused kernel designs (``cmpq_v2=0`` / ``1``, with ``cmpq_dense_from=0``) and dequantize +
cuBLAS (``cmpq_dense_from=1``).
Every timed configuration is also checked once, eagerly, against an f32 reference product of
the dequantized weights: the row's ``check`` (and ``<variant>_check``) is the largest error
over the SPEC C-7.6 bound (f16 output), so a value above 1 is a wrong result; the benchmark
then exits with status 1 after writing its output. Writes JSON and, when matplotlib is
available, a plot of speedup over cuBLAS fp16 against batch per shape (solid: the plan's
choice; dotted / dashed: fused / dense when compared).

    python benchmarks/gpu_matvec.py --out results.json --plot speedup.png

``--encoding channel_mixed --target-bits 2.5`` benchmarks random CMPQ tensors (2- and 3-bit
columns meeting 2.5 counted bits per weight, one table per column, --cmpq-outliers) instead;
``--encoding channel_mixed,bilevel`` runs both, each row naming its encoding, against the same
cuBLAS baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import cupy as cp  # noqa: E402
except ImportError as _err:  # a benchmark of the CUDA kernels: say so and stop
    print(
        f"error: {__file__.rsplit('/', 1)[-1]} needs CuPy and a CUDA GPU ({_err})", file=sys.stderr
    )
    sys.exit(2)

from spqr_format.gpu import GpuTensor  # noqa: E402
from spqr_format.gpu import plan as P  # noqa: E402
from spqr_format.gpu.synth import random_channel_mixed, random_packed  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]
BATCHES = [1, 4, 8, 16, 32, 64, 128, 512, 2048]

_READ_SRC = r"""
extern "C" __global__ void stream_read(const uint4* __restrict__ p, long long n, unsigned* out) {
  unsigned acc = 0;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    uint4 v = __ldcs(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) out[0] = acc;  // keeps the loads alive
}
"""


def _time_graph(record, reps: int, stream) -> list[float]:
    """Capture ``record()`` into a graph on ``stream`` and time ``reps`` replays (ms each)."""
    with stream:
        record()  # warm-up outside capture (compilation, handles)
        stream.synchronize()
        stream.begin_capture()
        try:
            record()
        except BaseException:
            stream.end_capture()  # leave no capture open: later CUDA calls would all fail
            raise
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    times = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(stream)
        graph.launch(stream)
        b.record(stream)
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return times


def _time_eager(record, reps: int, stream) -> list[float]:
    """``reps`` back-to-back ``record()`` calls on ``stream``, timed by events (ms each): for
    what cannot be captured in a graph (launch overhead included, so an upper bound)."""
    with stream:
        record()
        stream.synchronize()
        times = []
        for _ in range(reps):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(stream)
            record()
            b.record(stream)
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b))
    return times


def streaming_read_gbs(gib: float, stream) -> float:
    n16 = int(gib * (1 << 30)) // 16
    buf = cp.random.randint(0, 2**31, size=n16 * 4, dtype=np.int32).view(np.uint32)
    out = cp.zeros(1, dtype=np.uint32)
    k = cp.RawKernel(_READ_SRC, "stream_read")
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]

    def rec():
        k((sms * 8,), (512,), (buf, np.int64(n16), out))

    t = statistics.median(_time_graph(rec, 30, stream))
    return n16 * 16 / (t * 1e-3) / 1e9


def _clone(g):
    """A deep copy of the device arrays of ``g`` (a GpuTensor or its TileLayout)."""
    import dataclasses

    def copy(v):
        if isinstance(v, cp.ndarray):
            return v.copy()
        if dataclasses.is_dataclass(v):
            return _clone(v)
        return v

    return type(g)(**{f.name: copy(getattr(g, f.name)) for f in dataclasses.fields(g) if f.init})


def _without_tc(g: GpuTensor) -> GpuTensor:
    import dataclasses

    return dataclasses.replace(g, tc=None)


def bench_shape(
    m, n, batches, rotate_bytes, reps, stream, torch, args, encoding="bilevel"
) -> list[dict]:
    t0 = time.time()
    if encoding == "channel_mixed":
        p = random_channel_mixed(
            m,
            n,
            target_bits=args.target_bits,
            outlier_fraction=args.cmpq_outliers,
            seed=m + n,
        )
    else:
        p = random_packed(
            m,
            n,
            bits=args.bits,
            group_size=args.group_size,
            stats_bits=args.stats_bits,
            stats_group_size=args.stats_group_size,
            outlier_fraction=args.outliers,
            seed=m + n,
        )
    cp.cuda.Device().synchronize()
    t_load = time.perf_counter()
    g0 = GpuTensor.from_packed(p, validate=False)
    cp.cuda.Device().synchronize()
    t_load = time.perf_counter() - t_load  # upload + tile-layout repack (+ kernel compile once)
    if encoding == "channel_mixed":
        from spqr_format.codec import channel_mixed as cm

        counted_bits = cm.bits_per_weight(p)
    else:
        counted_bits = None
    ncopy = max(2, math.ceil(rotate_bytes / g0.nbytes))
    copies = [g0] + [_clone(g0) for _ in range(ncopy - 1)]
    # the copies were made on CuPy's default stream; `stream` does not wait for it
    cp.cuda.Device().synchronize()
    comp_bytes = g0.nbytes
    rows = []
    # dequantize bandwidth (bytes read + fp16 written), rotating the compressed copies
    wout = cp.empty((m, n), dtype=cp.float16)

    def rec_deq():
        for c in copies:
            c.dequantize_into(wout.data.ptr, n, 1)

    td = statistics.median(_time_graph(rec_deq, reps, stream)) / ncopy
    deq_gbs = (comp_bytes + 2 * m * n) / (td * 1e-3) / 1e9

    wcopies = None
    if torch is not None:
        nw = max(2, math.ceil(rotate_bytes / (2 * m * n)))
        w_fp16 = torch.randn(m, n, device="cuda", dtype=torch.float16) * 0.02
        wcopies = [w_fp16] + [w_fp16.clone() for _ in range(nw - 1)]

    base_override = os.environ.get(P.ENV, "")
    variants = {"plan": base_override}
    sep = "," if base_override else ""
    if args.compare_paths and encoding == "bilevel":
        variants["fused"] = base_override + sep + "dense_from=0"
        variants["dense"] = base_override + sep + "path=dense"
    if args.compare_paths and encoding == "channel_mixed":
        variants["cmpq_v1"] = base_override + sep + "cmpq_v2=0,cmpq_dense_from=0"
        variants["cmpq_v2"] = base_override + sep + "cmpq_v2=1,cmpq_dense_from=0"
        variants["dense"] = base_override + sep + "cmpq_dense_from=1"
    # the correctness reference: the dequantized weights in f32 (dequantization is exact)
    w32 = cp.empty((m, n), dtype=cp.float32)
    g0.dequantize_into(w32.data.ptr, n, 0)
    w32_abs = cp.abs(w32)
    cp.cuda.Device().synchronize()

    def ws_bytes(batch):
        best = 0
        for ov in variants.values():
            os.environ[P.ENV] = ov
            best = max(best, g0.workspace_bytes(batch))
        os.environ[P.ENV] = base_override
        return best

    for batch in batches:
        x = cp.asarray(np.random.default_rng(batch).standard_normal((batch, n)), dtype=cp.float16)
        y = cp.empty((batch, m), dtype=cp.float16)
        ws = cp.empty(-(-ws_bytes(batch) // 4), dtype=cp.float32)
        cp.cuda.Device().synchronize()

        def rec(cs=copies, x=x, y=y, ws=ws, batch=batch):
            for c in cs:
                c.matmul_into(x.data.ptr, n, 1, y.data.ptr, m, 1, batch, ws.data.ptr)

        def timed(ov, cs=copies, rec=rec, batch=batch):
            """us per call with SPQR_GPU_PLAN=ov while recording (None + the error on failure)"""
            os.environ[P.ENV] = ov
            try:
                return statistics.median(_time_graph(lambda: rec(cs), reps, stream)) / ncopy, None
            except Exception as exc:  # noqa: BLE001 - report, then time it without a graph
                print(f"# {m}x{n} b{batch} {ov!r}: graph: {exc!r}; timing eagerly",
                      file=sys.stderr, flush=True)  # fmt: skip
                cp.cuda.Device().synchronize()
                try:
                    t = statistics.median(_time_eager(lambda: rec(cs), reps, stream)) / ncopy
                    return t, f"eager (graph capture failed: {exc!r})"
                except Exception as exc2:  # noqa: BLE001 - report and go on with the next case
                    print(f"# {m}x{n} b{batch} {ov!r}: {exc2!r}", file=sys.stderr, flush=True)
                    cp.cuda.Device().synchronize()
                    return float("nan"), repr(exc2)
            finally:
                os.environ[P.ENV] = base_override

        xf = x.astype(cp.float32)
        ref = xf @ w32.T
        bound = 2.0**-9 * (cp.abs(xf) @ w32_abs.T) + 2.0**-24 + 2.0**-11 * cp.abs(ref)

        def check(ov, x=x, y=y, ws=ws, batch=batch, ref=ref, bound=bound):
            """largest |y - ref| / bound of one eager call with SPQR_GPU_PLAN=ov (> 1: wrong)"""
            os.environ[P.ENV] = ov
            try:
                y.fill(0)
                g0.matmul_into(x.data.ptr, n, 1, y.data.ptr, m, 1, batch, ws.data.ptr)
                r = cp.abs(y.astype(cp.float32) - ref) / bound
                r = cp.where(cp.isfinite(r), r, cp.inf)
                return float(r.max())
            except Exception as exc:  # noqa: BLE001 - a failed launch is a failed check
                print(f"# {m}x{n} b{batch} {ov!r}: check: {exc!r}", file=sys.stderr, flush=True)
                cp.cuda.Device().synchronize()
                return float("inf")
            finally:
                os.environ[P.ENV] = base_override

        t, err = timed(base_override)
        hot, _ = timed(base_override, [g0] * ncopy)
        extra = {"check": check(base_override)}
        for name, ov in variants.items():
            if name != "plan":
                tv, e2 = timed(ov)
                extra[f"{name}_us"] = tv * 1e3
                extra[f"{name}_check"] = check(ov)
                if e2:
                    extra[f"{name}_error"] = e2
        bad = {k: v for k, v in extra.items() if k.endswith("check") and not v <= 1.0}
        if bad:
            print(f"# {encoding} {m}x{n} b{batch}: WRONG RESULT (error / C-7.6 bound): {bad}",
                  file=sys.stderr, flush=True)  # fmt: skip
        if encoding == "bilevel":
            d = g0.plan_for(batch, 1)
            extra.update(
                plan_path=d.path,
                plan_entry=d.entry,
                plan_reason=d.reason,
                plan_override=base_override,
            )
        if err:
            extra["error"] = err
        simt = None
        if args.compare_simt and getattr(g0, "tc", None) is not None:
            simt = (
                statistics.median(
                    _time_graph(lambda: rec([_without_tc(c) for c in copies]), reps, stream)
                )
                / ncopy
            )
        row = dict(
            encoding=encoding,
            shape=[m, n],
            batch=batch,
            path=(
                "cmpq"
                if encoding == "channel_mixed"
                else ("tensor-core" if g0.tc is not None else "simt")
            ),
            counted_bits_per_weight=counted_bits,
            load_s=t_load,
            simt_us=None if simt is None else simt * 1e3,
            tile_layout_bytes=None if getattr(g0, "tc", None) is None else g0.tc.nbytes,
            us=t * 1e3,
            us_l2_hot=hot * 1e3,
            compressed_bytes=comp_bytes,
            bits_per_weight=8 * comp_bytes / (m * n),
            gbs=comp_bytes / (t * 1e-3) / 1e9,
            copies=ncopy,
            dequant_us=td * 1e3,
            dequant_gbs=deq_gbs,
            **extra,
        )
        if wcopies is not None:
            xt = torch.randn(batch, n, device="cuda", dtype=torch.float16)
            for w in wcopies:  # warm-up (cuBLAS handle, heuristics)
                torch.nn.functional.linear(xt, w)
            torch.cuda.synchronize()
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                for w in wcopies:
                    torch.nn.functional.linear(xt, w)
            gr.replay()
            torch.cuda.synchronize()
            tt = []
            for _ in range(reps):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                gr.replay()
                b.record()
                b.synchronize()
                tt.append(a.elapsed_time(b))
            tc = statistics.median(tt) / len(wcopies)
            row["cublas_us"] = tc * 1e3
            row["cublas_gbs"] = 2 * m * n / (tc * 1e-3) / 1e9
            row["speedup"] = tc / t
            for name in ("fused", "dense", "cmpq_v1", "cmpq_v2"):
                if f"{name}_us" in row:
                    row[f"{name}_speedup"] = tc * 1e3 / row[f"{name}_us"]
            del gr
        rows.append(row)
    copies.clear()
    wcopies = w32 = w32_abs = None
    cp.get_default_memory_pool().free_all_blocks()
    if torch is not None:
        torch.cuda.empty_cache()
    print(
        f"# {encoding} shape {m}x{n} done in {time.time() - t0:.1f}s", file=sys.stderr, flush=True
    )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_matvec.json")
    ap.add_argument("--plot", default=None, help="PNG path (needs matplotlib)")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,8192x28672")
    ap.add_argument("--batches", default=None, help="e.g. 1,4,16,64")
    ap.add_argument("--rotate-gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--stats-bits", type=int, default=3)
    ap.add_argument("--stats-group-size", type=int, default=16)
    ap.add_argument("--outliers", type=float, default=0.01)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument(
        "--encoding",
        default="bilevel",
        help="bilevel, channel_mixed, or a comma list (e.g. channel_mixed,bilevel)",
    )
    ap.add_argument(
        "--target-bits",
        type=float,
        default=2.5,
        help="channel_mixed: counted bits per weight (2- and 3-bit columns)",
    )
    ap.add_argument("--cmpq-outliers", type=float, default=0.005,
                    help="channel_mixed: outlier fraction")  # fmt: skip
    ap.add_argument(
        "--compare-simt",
        action="store_true",
        help="also time the SIMT kernels (SPEC layout) where the tensor-core path is used",
    )
    ap.add_argument(
        "--compare-paths",
        action="store_true",
        help="also time the fused kernels and dequantize + cuBLAS at every batch "
        "(channel_mixed: both kernel designs)",
    )
    args = ap.parse_args(argv)
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else BATCHES
    torch = None
    if not args.no_torch:
        try:
            import torch  # noqa: F811
        except ImportError:
            print("# torch not available: no cuBLAS baseline", file=sys.stderr)
    stream = cp.cuda.Stream(non_blocking=False)
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    read_gbs = streaming_read_gbs(2.0, stream)
    rows = []
    encodings = [e.strip() for e in args.encoding.split(",") if e.strip()]
    for e in encodings:
        if e not in ("bilevel", "channel_mixed"):
            ap.error(f"unknown encoding {e!r}")
    for m, n in shapes:
        for e in encodings:
            rows += bench_shape(
                m, n, batches, args.rotate_gib * (1 << 30), args.reps, stream, torch, args, e
            )
    for r in rows:
        r["pct_stream_read"] = 100 * r["gbs"] / read_gbs
        r["dequant_pct_stream_read"] = 100 * r["dequant_gbs"] / read_gbs
    result = dict(
        device=props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        streaming_read_gbs=read_gbs,
        config=dict(
            bits=args.bits,
            group_size=args.group_size,
            stats_bits=args.stats_bits,
            stats_group_size=args.stats_group_size,
            outlier_fraction=args.outliers,
            encodings=encodings,
            cmpq_target_bits=args.target_bits,
            cmpq_outlier_fraction=args.cmpq_outliers,
            perm=True,
            rotate_gib=args.rotate_gib,
        ),
        plan_table=P.describe().splitlines(),
        results=rows,
    )
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"device {result['device']}, streaming read {read_gbs:.0f} GB/s")
    hdr = f"{'enc':>6} {'shape':>12} {'b':>4} {'us':>8} {'GB/s':>7} {'%read':>6}"
    hdr += f" {'cuBLAS us':>9} {'speedup':>7}"
    hdr += f" {'L2hot us':>8} {'deq us':>7} {'deq %':>6} {'simt us':>8}"
    hdr += f" {'path':>8} {'entry':>5} {'fused us':>8} {'dense us':>8}"
    print(hdr + f" {'v1 us':>7} {'v2 us':>7} {'check':>6}")
    nan = float("nan")
    for r in rows:
        print(
            f"{r['encoding'][:6]:>6} {r['shape'][0]:>5}x{r['shape'][1]:<6} {r['batch']:>4} "
            f"{r['us']:8.1f} "
            f"{r['gbs']:7.0f} {r['pct_stream_read']:6.1f} {r.get('cublas_us', float('nan')):9.1f} "
            f"{r.get('speedup', float('nan')):7.2f} {r['us_l2_hot']:8.1f} {r['dequant_us']:7.1f} "
            f"{r['dequant_pct_stream_read']:6.1f} {r['simt_us'] or nan:8.1f}"
            f" {r.get('plan_path', r['path']):>8} {r.get('plan_entry', -1):>5}"
            f" {r.get('fused_us', nan):8.1f} {r.get('dense_us', nan):8.1f}"
            f" {r.get('cmpq_v1_us', nan):7.1f}"
            f" {r.get('cmpq_v2_us', nan):7.1f}"
            f" {max(v for k, v in r.items() if k.endswith('check')):6.2f}"
        )
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("# matplotlib not available: no plot", file=sys.stderr)
        else:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for m, n in shapes:
                for e in encodings:
                    rs = [
                        r
                        for r in rows
                        if r["shape"] == [m, n] and "speedup" in r and r["encoding"] == e
                    ]
                    (line,) = ax.plot(
                        [r["batch"] for r in rs],
                        [r["speedup"] for r in rs],
                        "o-",
                        label=f"{e} {m}x{n} (plan)",
                    )
                    for name, style in (("fused", ":"), ("dense", "--")):
                        pts = [r for r in rs if f"{name}_speedup" in r]
                        if pts:
                            ax.plot(
                                [r["batch"] for r in pts],
                                [r[f"{name}_speedup"] for r in pts],
                                style,
                                color=line.get_color(),
                                lw=1,
                                label=f"{m}x{n} {name}",
                            )
            ax.set_xscale("log", base=2)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xlabel("batch")
            ax.set_yscale("log", base=2)
            ax.set_ylabel("speedup over cuBLAS fp16")
            ax.set_title(f"SpQR fused kernels, {result['device']}")
            ax.legend(fontsize=6, ncol=2)
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
    wrong = [
        (r["encoding"], r["shape"], r["batch"], k)
        for r in rows
        for k, v in r.items()
        if k.endswith("check") and not v <= 1.0
    ]
    if wrong:
        print(f"# {len(wrong)} configurations gave WRONG results: {wrong}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
