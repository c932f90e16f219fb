"""Fast random ``PackedBilevel`` tensors built directly in packed form (numpy only).

For benchmarks and large GPU tests: no encoder, no per-element packing loop. The result is a
valid tensor (zero padding, sorted unique outliers, finite statistics); values are random.
"""

from __future__ import annotations

import numpy as np

from spqr_format import spec
from spqr_format.codec.bilevel import (
    BilevelGeometry,
    BilevelHeader,
    BilevelParams,
    Outliers,
    PackedBilevel,
)
from spqr_format.codec.outliers import encode_outlier_stream


def _random_stream(rng: np.random.Generator, count: int, bits: int) -> np.ndarray:
    """A random packed stream (C-5.2) of ``count`` elements, padding bits zero."""
    words = spec.packed_stream_words(count, bits)
    out = rng.integers(0, 1 << 32, size=words, dtype=np.uint64).astype(np.uint32)
    rem = (count * bits) % 32  # bits in use in the last word
    if rem:
        out[-1] &= np.uint32((1 << rem) - 1)
    return out


def random_packed(
    m: int,
    n: int,
    *,
    bits: int = 3,
    group_size: int = 16,
    stats_bits: int = 3,
    stats_group_size: int = 16,
    perm: bool = True,
    outlier_fraction: float = 0.01,
    seed: int = 0,
) -> PackedBilevel:
    """A random ``spqr-3bit``-like tensor by default (b=3, g=16, 3-bit stats in 16-row tiles,
    permutation, 1% outliers spread evenly over the rows)."""
    rng = np.random.default_rng(seed)
    params = BilevelParams(bits, group_size, stats_bits, stats_group_size if stats_bits else 0)
    params.validate()
    geo = BilevelGeometry.of((m, n), params)
    codes = _random_stream(rng, m * n, bits)
    if stats_bits == 0:
        st = np.empty((m, geo.groups, 2), dtype=np.float16)
        st[..., 0] = rng.uniform(0.001, 0.05, size=(m, geo.groups))
        st[..., 1] = rng.uniform(0, (1 << bits) - 1, size=(m, geo.groups))
        stats, stats2 = st.view(np.uint16), None
    else:
        stats = _random_stream(rng, m * 2 * geo.groups, stats_bits)
        top = (1 << stats_bits) - 1 or 1
        s2 = np.stack(
            [
                rng.uniform(0.001, 0.05, size=(geo.tiles, geo.groups)) / top,
                rng.uniform(0.0, 0.01, size=(geo.tiles, geo.groups)),
                rng.uniform(0.0, (1 << bits) - 1, size=(geo.tiles, geo.groups)) / top,
                rng.uniform(-0.5, 0.5, size=(geo.tiles, geo.groups)),
            ],
            axis=-1,
        ).astype(np.float16)
        stats2 = s2.view(np.uint16)
    p = rng.permutation(n).astype(geo.perm_dtype) if perm else None
    orows = oents = None
    k = min(int(round(outlier_fraction * n)), n)
    count = entries = 0
    if k > 0:
        # k strictly increasing columns per row: sorted draws from [0, n-k] plus 0..k-1.
        cols = np.sort(rng.integers(0, n - k + 1, size=(m, k)), axis=1) + np.arange(k)
        outliers = Outliers(
            rows=np.repeat(np.arange(m, dtype=np.uint32), k),
            cols=cols.reshape(-1).astype(np.uint32),
            values=(rng.standard_normal(m * k) * 0.2).astype(np.float16),
        )
        orows, oents, count = encode_outlier_stream(outliers, m, n)
        entries = len(oents)
    header = BilevelHeader(params, perm, k > 0, count, entries)
    return PackedBilevel(
        shape=(m, n),
        header=header,
        codes=codes,
        stats=stats,
        stats2=stats2,
        perm=p,
        outlier_index=orows,
        outlier_entries=oents,
    )
