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


# --- channel_mixed ------------------------------------------------------------------------


def random_channel_mixed_tensor(
    m: int,
    n: int,
    *,
    widths=None,
    table_rows: int = 0,
    outlier_density: float = 0.0,
    dtype=None,
    seed: int = 0,
):
    """A random logical :class:`ChannelMixedTensor` (small tensors, tests): random sorted
    widths (or ``widths``, a uint8[n] non-decreasing array), random permutation, codes, f16
    tables (normal), outliers at each position with probability ``outlier_density``."""
    from spqr_format.codec import channel_mixed as cm
    from spqr_format.spec import DType

    rng = np.random.default_rng(seed)
    if widths is None:
        widths = np.sort(rng.integers(1, 9, n)).astype(np.uint8)
    widths = np.asarray(widths, np.uint8)
    perm = rng.permutation(n).astype(np.uint32)
    codes = (rng.integers(0, 256, (m, n)) % (1 << widths.astype(np.int64))).astype(np.uint8)
    counts = tuple(int((widths == b).sum()) for b in cm.WIDTHS)
    geo = cm.ChannelMixedGeometry.of((m, n), counts, table_rows)
    tables = rng.standard_normal((geo.table_blocks, geo.table_entries)).astype(np.float16)
    mask = rng.random((m, n)) < outlier_density
    r, c = np.nonzero(mask)
    out = None
    if r.size:
        vals = (rng.standard_normal(r.size) * 4).astype(np.float16)
        out = Outliers(r.astype(np.uint32), c.astype(np.uint32), vals)
    return cm.ChannelMixedTensor(
        (m, n), widths, perm, codes, tables, out, DType(dtype or DType.FLOAT16), table_rows
    )


def channel_mixed_counts(
    m: int, n: int, target_bits: float, low: int = 2, high: int = 3, outlier_fraction: float = 0.0
) -> tuple[int, ...]:
    """Width counts (c_1..c_8) of ``low``/``high``-bit columns whose counted bits per weight
    (SPEC C-12.9: codes, one table per column, perm, outliers) come closest to ``target_bits``
    from below."""
    from spqr_format import spec

    nb = spec.outlier_blocks(m)
    e = int(round(outlier_fraction * n)) * m

    def bpw(ch: int) -> float:
        cl = n - ch
        words = spec.packed_stream_words(m * cl, low) + spec.packed_stream_words(m * ch, high)
        bits = 32 * words + 16 * (cl * (1 << low) + ch * (1 << high))
        bits += 16 * n if n <= 65536 else 32 * n
        if e:
            bits += 32 * e + 32 * (nb + 1)
        return bits / (m * n)

    lo, hi = 0, n
    while lo < hi:  # largest ch with bpw(ch) <= target
        mid = (lo + hi + 1) // 2
        if bpw(mid) <= target_bits:
            lo = mid
        else:
            hi = mid - 1
    counts = [0] * 8
    counts[low - 1] += n - lo
    counts[high - 1] += lo
    return tuple(counts)


def random_channel_mixed(
    m: int,
    n: int,
    *,
    target_bits: float = 2.5,
    low: int = 2,
    high: int = 3,
    outlier_fraction: float = 0.005,
    seed: int = 0,
):
    """A random :class:`PackedChannelMixed` built directly in packed form (benchmarks, large
    GPU tests): ``low``/``high``-bit columns meeting ``target_bits`` counted bits per weight,
    one table per column (sorted normal f16 centroids), random permutation, ``outlier_fraction``
    outliers per row spread evenly."""
    from spqr_format.codec import channel_mixed as cm
    from spqr_format.codec.outliers import encode_outlier_stream

    rng = np.random.default_rng(seed)
    counts = channel_mixed_counts(m, n, target_bits, low, high, outlier_fraction)
    k = min(int(round(outlier_fraction * n)), n)
    header0 = cm.ChannelMixedHeader(counts, 0, 0)
    geo = cm.ChannelMixedGeometry.of((m, n), counts, 0)
    codes = np.concatenate([_random_stream(rng, m * r.count, r.bits) for r in geo.runs])
    tab = np.sort(rng.standard_normal(geo.table_entries) * 0.02).astype(np.float16)
    perm = rng.permutation(n).astype(geo.perm_dtype)
    index = entries = None
    if k > 0:
        cols = np.sort(rng.integers(0, n - k + 1, size=(m, k)), axis=1) + np.arange(k)
        outliers = Outliers(
            rows=np.repeat(np.arange(m, dtype=np.uint32), k),
            cols=cols.reshape(-1).astype(np.uint32),
            values=(rng.standard_normal(m * k) * 0.2).astype(np.float16),
        )
        index, entries, _ = encode_outlier_stream(outliers, m, n)
    header = cm.ChannelMixedHeader(counts, 0, 0 if entries is None else int(len(entries)))
    del header0
    return cm.PackedChannelMixed(
        shape=(m, n),
        header=header,
        codes=codes.astype(np.uint32),
        perm=perm,
        outlier_index=index,
        outlier_entries=entries,
        tables=tab.view(np.uint16),
    )
