"""Bits per weight of real .spqr files against SpQR's own accounting, per layer width.

    python benchmarks/file_bits.py [--outliers 0.01] [--json PATH]

For each shape, writes a spqr-3bit tensor (b=3, g=16, 3-bit statistics in 16-row tiles, a
permutation, the given share of outliers at random positions) to a real file with
``spqr_format.save``, reads it back, and prints the file's bits per weight (what ``spqr info``
shows: section bytes x 8 / weights) next to:

- SpQR's formula, ``b + 2*sb/g + 64/(g*S) + 32 * outliers / weights``;
- the same tensor in the layout of the v1.0 draft (every packed row padded to 128 elements, u32
  permutation entries, one u32 outlier offset per row), computed from that draft's SPEC
  section 8, to show what the final layout saves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import numpy as np

import spqr_format
from spqr_format.codec.bilevel import BilevelParams, BilevelTensor, Outliers
from spqr_format.spec import DType

SHAPES = [(384, 384), (576, 576), (896, 896), (4096, 4096), (4096, 11008), (11008, 4096)]
B, G_SIZE, SB, S = 3, 16, 3, 16


def spqr3_tensor(m: int, n: int, fraction: float, seed: int = 0) -> BilevelTensor:
    rng = np.random.default_rng(seed)
    groups, tiles = -(-n // G_SIZE), -(-m // S)
    k = int(round(fraction * m * n))
    flat = np.sort(rng.choice(m * n, size=k, replace=False))
    return BilevelTensor(
        shape=(m, n),
        params=BilevelParams(B, G_SIZE, SB, S),
        codes=rng.integers(0, 1 << B, size=(m, n), dtype=np.uint8),
        stats=rng.integers(0, 1 << SB, size=(m, groups, 2), dtype=np.uint8),
        stats2=rng.uniform(0.01, 1.0, size=(tiles, groups, 4)).astype(np.float16),
        perm=rng.permutation(n).astype(np.uint32),
        outliers=Outliers(
            rows=(flat // n).astype(np.uint32),
            cols=(flat % n).astype(np.uint32),
            values=rng.standard_normal(k).astype(np.float16),
        ),
        dtype=DType.FLOAT16,
    )


def draft_bits(m: int, n: int, entries: int) -> int:
    """Section bits of the v1.0 draft layout (its SPEC section 8)."""
    groups, tiles = -(-n // G_SIZE), -(-m // S)
    codes = 32 * m * math.ceil(n / 128) * 4 * B
    stats = 32 * m * math.ceil(2 * groups / 128) * 4 * SB
    return codes + stats + 64 * tiles * groups + 32 * n + 32 * entries + 32 * (m + 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outliers", type=float, default=0.01, help="share of weights (0.01)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    rows = []
    print(f"spqr-3bit (b=3, g=16, sb=3, S=16, permutation), {args.outliers:.2%} outliers")
    head = f"{'W (out x in)':>14s} {'file bpw':>9s} {'draft bpw':>10s} {'SpQR formula':>13s}"
    print(head + f" {'file - formula':>15s}")
    with tempfile.TemporaryDirectory() as tmp:
        for m, n in SHAPES:
            t = spqr3_tensor(m, n, args.outliers)
            path = os.path.join(tmp, f"{m}x{n}.spqr")
            spqr_format.save(path, {"w": t})
            with spqr_format.open(path) as f:
                info = f.info("w")
                entries = info.params["outlier_entries"]
            k = len(t.outliers)
            formula = B + 2 * SB / G_SIZE + 64 / (G_SIZE * S) + 32 * k / (m * n)
            draft = draft_bits(m, n, k) / (m * n)  # the draft had per-row skips: k ~ entries
            rows.append(
                {
                    "shape": [m, n],
                    "file_bpw": info.bits_per_weight,
                    "draft_bpw": draft,
                    "spqr_formula_bpw": formula,
                    "outliers": k,
                    "outlier_entries": entries,
                }
            )
            print(
                f"{f'{m}x{n}':>14s} {info.bits_per_weight:9.3f} {draft:10.3f} {formula:13.3f}"
                f" {info.bits_per_weight - formula:15.3f}"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"outlier_fraction": args.outliers, "results": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
