"""CPU decode benchmark of the reference codec (numba) against a plain vectorized numpy decode.

Tensor: 4096 x 4096, 3-bit codes, group 16, 3-bit statistics in 16-row tiles, a random
permutation and 1 % outliers (the SpQR 3-bit configuration of SPEC section 8), decoded to
fp16. The numba kernels run on ONE thread (``numba.set_num_threads(1)``) so that the figure
is per core and comparable with the single-threaded numpy baseline; matvec too.

Timing: one warm-up call (numba compilation / cache load excluded), then the median of
``--repeat`` runs with ``time.perf_counter``. Prints a table; ``--json PATH`` saves it.

    python benchmarks/decode_cpu.py [--repeat 7] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numba
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from strategies import random_bilevel  # noqa: E402

from spqr_format.codec.bilevel import BilevelParams, PackedBilevel  # noqa: E402
from spqr_format.codec.packing import pack, unpack_stream  # noqa: E402
from spqr_format.codec.reference import (  # noqa: E402
    decode_bilevel,
    matvec_bilevel,
    validate_packed,
)
from spqr_format.spec import DType  # noqa: E402


def numpy_decode_f16(p: PackedBilevel) -> np.ndarray:
    """Straightforward vectorized numpy decode (SPEC section 7), the baseline."""
    m, n = p.shape
    prm = p.params
    geo = p.geometry

    # codes: numpy bit unpacking vectorized over all 32-element blocks (packing.unpack_stream)
    q = unpack_stream(p.codes, prm.bits, m * n).reshape(m, n).astype(np.float32)
    sq = unpack_stream(p.stats, prm.stats_bits, m * 2 * geo.groups).astype(np.float32)
    sq = sq.reshape(m, 2 * geo.groups)
    s2 = p.stats2.view(np.float16).astype(np.float32)[np.arange(m) // prm.stats_group_size]
    s = s2[..., 1] + s2[..., 0] * sq[:, 0::2]
    z = s2[..., 3] + s2[..., 2] * sq[:, 1::2]
    # broadcast the per-(row, group) statistics over the g columns of each group
    g, G = prm.group_size, geo.groups
    qg = np.zeros((m, G * g), np.float32)
    qg[:, :n] = q
    v = (s[:, :, None] * (qg.reshape(m, G, g) - z[:, :, None])).reshape(m, G * g)[:, :n]
    v = np.ascontiguousarray(v)
    # outliers: running cells by a per-block prefix sum of the deltas (blocks of 16 rows)
    r = p.outlier_index.astype(np.int64)
    ent = p.outlier_entries
    blocks = np.repeat(np.arange(r.shape[0] - 1), np.diff(r))
    cs = np.cumsum(ent & 0xFFFF, dtype=np.int64)
    cell = cs - np.concatenate(([0], cs))[r[:-1]][blocks] - 1
    rows, col = 16 * blocks + cell // n, cell % n
    val = (ent >> 16).astype(np.uint16)
    real = val != 0xFFFF
    v[rows[real], col[real]] = val[real].view(np.float16).astype(np.float32)
    inv = np.empty(n, np.int64)
    inv[p.perm] = np.arange(n)  # W[:, perm[j]] = v[:, j] as a gather: W[:, c] = v[:, inv[c]]
    return np.take(v.astype(np.float16), inv, axis=1)


def median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", metavar="PATH", help="save the results as JSON")
    args = ap.parse_args(argv)

    numba.set_num_threads(1)  # per-core figures; the kernels are prange-parallel otherwise
    m, n = args.m, args.n
    params = BilevelParams(bits=3, group_size=16, stats_bits=3, stats_group_size=16)
    t = random_bilevel(np.random.default_rng(0), m, n, params, True, 0.01)
    p = pack(t)
    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    weights = m * n

    ref = decode_bilevel(p, DType.FLOAT16)
    assert np.array_equal(ref.view(np.uint16), numpy_decode_f16(p).view(np.uint16))

    rows = []

    def add(name, seconds):
        rows.append({"name": name, "seconds": seconds, "weights_per_s": weights / seconds})

    add("numba decode -> fp16 (validated)", median_time(lambda: decode_bilevel(p), args.repeat))
    add(
        "numba decode -> fp16 (validate=False)",
        median_time(lambda: decode_bilevel(p, validate=False), args.repeat),
    )
    add(
        "numba decode -> fp32 (validate=False)",
        median_time(lambda: decode_bilevel(p, DType.FLOAT32, validate=False), args.repeat),
    )
    add("validate_packed only", median_time(lambda: validate_packed(p), args.repeat))
    add("numpy decode -> fp16", median_time(lambda: numpy_decode_f16(p), max(3, args.repeat // 2)))
    add(
        "numba matvec (validate=False)",
        median_time(lambda: matvec_bilevel(p, x, validate=False), args.repeat),
    )
    base = next(r["seconds"] for r in rows if r["name"] == "numpy decode -> fp16")

    print(
        f"bilevel {m}x{n}, b=3 g=16 sb=3 S=16, perm, 1% outliers "
        f"({p.header.outlier_count} outliers); numba threads = {numba.get_num_threads()}"
    )
    print(f"{'':40s} {'ms':>9s} {'Mweights/s':>11s} {'vs numpy':>9s}")
    for r in rows:
        print(
            f"{r['name']:40s} {r['seconds'] * 1e3:9.2f} {r['weights_per_s'] / 1e6:11.1f} "
            f"{base / r['seconds']:8.1f}x"
        )
    if args.json:
        info = {
            "shape": [m, n],
            "params": {"bits": 3, "group_size": 16, "stats_bits": 3, "stats_group_size": 16},
            "outliers": p.header.outlier_count,
            "threads": numba.get_num_threads(),
            "numpy": np.__version__,
            "numba": numba.__version__,
            "machine": platform.processor() or platform.machine(),
            "repeat": args.repeat,
            "results": rows,
        }
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
