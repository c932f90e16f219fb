"""CMPQ table granularity: one lookup table per column, or one per column per block of R rows?

At equal counted bits (codes + tables, SPEC C-12.9; no outliers, norm-ranked widths), the
relative output error ``tr(D H D^T) / tr(W H W^T)`` of both choices on the synthetic layer of
``benchmarks/encoder_quality.py`` (Student-t weights with log-normal per-row scales, correlated
activations with hot channels). Per-row-block tables cost ``16 * 2**b * m / R`` bits per column
instead of ``16 * 2**b``; the bits they take are bits the allocator cannot spend on wider codes.

Run: ``python benchmarks/cmpq_tables.py [--size 1024]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from encoder_quality import synthetic_layers  # noqa: E402

from spqr_format.codec import cmpq  # noqa: E402


def run(w, h, target, rows_per_table):
    m, n = w.shape
    stat = np.sqrt(np.diagonal(h))
    blocks = m // rows_per_table
    cands = (2, 3, 4)

    def cost(b):
        return m * b + 16 * (1 << b) * blocks

    budget = int(target * m * n) - 16 * n  # perm
    # norm allocation with this column cost
    order = np.argsort(-stat, kind="stable")
    widths = np.full(n, cands[0])
    left = budget - n * cost(cands[0])
    if left < 0:
        return None, None
    for lo, hi in zip(cands[:-1], cands[1:], strict=False):
        step = cost(hi) - cost(lo)
        if n * step <= left:
            widths[:] = hi
            left -= n * step
            continue
        widths[order[: left // step]] = hi
        break
    # k-means per (column, row block): treat every block of a column as a column of R rows
    wt = np.ascontiguousarray(w.T.astype(np.float64)).reshape(n * blocks, rows_per_table)
    bw = np.repeat(widths, blocks)
    excl = np.zeros(wt.shape, bool)
    tab, codes, err = cmpq._fit(wt, excl, np.ones(wt.shape), bw, 50)
    q = np.take_along_axis(tab, codes.astype(np.int64), axis=1).reshape(n, m).T
    d = w.astype(np.float64) - q
    rel = np.einsum("ij,jk,ik->", d, h, d) / np.einsum("ij,jk,ik->", w, h, w)
    bits = (n * 16 + sum(cost(int(b)) for b in widths)) / (m * n)
    return rel, bits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args(argv)
    (_, w, h, _), = synthetic_layers(args.size, 8192)
    w = w.astype(np.float64)
    print("| target bits | rows per table R | counted bits | rel. output err |")
    print("|---|---|---|---|")
    for target in (2.2, 2.5, 3.0, 3.5):
        for r in (args.size, args.size // 2, args.size // 4, args.size // 8, args.size // 16):
            rel, bits = run(w, h, target, r)
            label = f"{r} (per column)" if r == args.size else str(r)
            if rel is None:
                print(f"| {target} | {label} | unreachable | - |")
            else:
                print(f"| {target} | {label} | {bits:.4f} | {rel:.5f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
