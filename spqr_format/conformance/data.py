"""Deterministic test data for the vector builders: integers only, from NumPy's legacy
``RandomState`` (whose streams NumPy keeps frozen, NEP 19), so every platform and NumPy
version builds the same bytes. Floats are made from integer bit patterns or exact integer
ratios, never from transcendental functions whose last bit may differ between libms.
"""

from __future__ import annotations

import zlib

import numpy as np

from spqr_format.codec.bilevel import BilevelParams, BilevelTensor, Outliers
from spqr_format.spec import DType


def rng(key: str) -> np.random.RandomState:
    return np.random.RandomState(zlib.crc32(key.encode("utf-8")))


def f16_bits(r: np.random.RandomState, shape, exp_lo: int, exp_hi: int, signed: bool = True):
    """Random f16 bit patterns with biased exponent field in [exp_lo, exp_hi] (0 = subnormal,
    30 = largest finite), any mantissa, random sign when ``signed``."""
    shape = tuple(np.atleast_1d(shape)) if not isinstance(shape, tuple) else shape
    e = r.randint(exp_lo, exp_hi + 1, size=shape).astype(np.uint16)
    mant = r.randint(0, 1024, size=shape).astype(np.uint16)
    sign = (r.randint(0, 2, size=shape).astype(np.uint16) << 15) if signed else 0
    return (sign | (e << 10) | mant).astype(np.uint16)


def finite_f16_bits(r: np.random.RandomState, shape):
    """Any finite f16 (every exponent 0..30, both signs)."""
    return f16_bits(r, shape, 0, 30)


def as_f16(bits: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(bits, dtype=np.uint16).view(np.float16)


def make_stats(r, m: int, groups: int, bits: int, kind: str = "normal") -> np.ndarray:
    """fp16 statistics [m, G, 2] = (scale, zero)."""
    if kind == "randbits":
        return as_f16(finite_f16_bits(r, (m, groups, 2)))
    scale = as_f16(f16_bits(r, (m, groups), 9, 15, signed=False))  # ~2^-6 .. 2^0
    # zero: a multiple of 1/4 in [0, 2^bits): exact in f16
    zero = (r.randint(0, 4 << bits, size=(m, groups)) / 4.0).astype(np.float16)
    return np.stack([scale, zero], axis=-1)


def make_stats2(r, tiles: int, groups: int, bits: int, sbits: int, kind: str = "normal"):
    """Second-level statistics [T, G, 4] = (scale_step, scale_base, zero_step, zero_base)."""
    if kind == "randbits":
        return as_f16(finite_f16_bits(r, (tiles, groups, 4)))
    ss = as_f16(f16_bits(r, (tiles, groups), 6, 10, signed=False))  # ~2^-9 .. 2^-5
    sbase = as_f16(f16_bits(r, (tiles, groups), 8, 12, signed=False))
    top = (1 << bits) - 1
    zs = np.full((tiles, groups), top / ((1 << sbits) - 1) if sbits else 1.0).astype(np.float16)
    zbase = (r.randint(-8, 9, size=(tiles, groups)) / 8.0).astype(np.float16)
    return np.stack([ss, sbase, zs.astype(np.float16), zbase], axis=-1).astype(np.float16)


def make_outliers(r, m: int, n: int, where) -> Outliers | None:
    """``where``: None, a density in (0, 1], "rows" (rows 0, m//2, m-1 entirely, no others),
    "all", or an explicit list of (row, stored col)."""
    if where is None:
        return None
    if isinstance(where, float):
        mask = r.randint(0, 1 << 20, size=(m, n)) < int(where * (1 << 20))
    elif where == "rows":
        mask = np.zeros((m, n), bool)
        mask[sorted({0, m // 2, m - 1})] = True
    elif where == "all":
        mask = np.ones((m, n), bool)
    else:
        mask = np.zeros((m, n), bool)
        for i, j in where:
            mask[i, j] = True
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    vals = as_f16(f16_bits(r, rows.shape, 12, 20))  # ~2^-3 .. 2^5, both signs
    return Outliers(rows.astype(np.uint32), cols.astype(np.uint32), vals)


def make_bilevel(
    key: str,
    m: int,
    n: int,
    bits: int,
    g: int,
    sb: int = 0,
    S: int = 0,
    *,
    perm=None,
    outliers=None,
    dtype: DType = DType.FLOAT16,
    stats_kind: str = "normal",
) -> BilevelTensor:
    """A random valid logical bilevel tensor. ``perm``: None, "random", "identity", "reverse"
    or an array."""
    r = rng(key)
    groups = -(-n // g)
    codes = r.randint(0, 1 << bits, size=(m, n)).astype(np.uint8)
    if sb == 0:
        stats = make_stats(r, m, groups, bits, stats_kind)
        stats2 = None
    else:
        tiles = -(-m // S)
        stats = r.randint(0, 1 << sb, size=(m, groups, 2)).astype(np.uint8)
        stats2 = make_stats2(r, tiles, groups, bits, sb, stats_kind)
    if isinstance(perm, str):
        perm = {
            "random": lambda: r.permutation(n),
            "identity": lambda: np.arange(n),
            "reverse": lambda: np.arange(n)[::-1],
        }[perm]()
    if perm is not None:
        perm = np.ascontiguousarray(perm, dtype=np.uint32)
    return BilevelTensor(
        shape=(m, n),
        params=BilevelParams(bits=bits, group_size=g, stats_bits=sb, stats_group_size=S),
        codes=codes,
        stats=stats,
        stats2=stats2,
        perm=perm,
        outliers=make_outliers(r, m, n, outliers),
        dtype=dtype,
    )


def matvec_x(key: str, n: int) -> np.ndarray:
    """x for a matvec vector: float32 values k/256, |k| <= 255 (about 1 in 16 zero), exactly
    representable in float16 and bfloat16, so a kernel taking x in either loses nothing."""
    r = rng(key + "/x")
    k = r.randint(-255, 256, size=n)
    k[r.randint(0, 16, size=n) == 0] = 0
    return (k / 256.0).astype(np.float32)


# --- an independent model of SPEC section 7 on the logical form (numpy, elementwise f32) ----


def logical_decode_f32(t: BilevelTensor) -> np.ndarray:
    """W[m, n] in float32 straight from the logical arrays (SPEC C-7.1 .. C-7.4), with numpy's
    elementwise float32 operations (one IEEE rounding each, no FMA). The generator checks the
    reference decoder's output of every file against this."""
    m, n = t.shape
    p = t.params
    k = np.arange(n) // p.group_size
    if p.stats_bits == 0:
        s = t.stats[:, k, 0].astype(np.float32)
        z = t.stats[:, k, 1].astype(np.float32)
    else:
        tiles = np.arange(m) // p.stats_group_size
        s2 = t.stats2.astype(np.float32)[tiles][:, k]  # [m, n, 4]
        qs = t.stats[:, k, 0].astype(np.float32)
        qz = t.stats[:, k, 1].astype(np.float32)
        s = s2[..., 1] + (s2[..., 0] * qs)
        z = s2[..., 3] + (s2[..., 2] * qz)
    v = s * (t.codes.astype(np.float32) - z)
    if t.outliers is not None and len(t.outliers):
        v[t.outliers.rows.astype(np.int64), t.outliers.cols.astype(np.int64)] = (
            t.outliers.values.astype(np.float32)
        )
    if t.perm is None:
        return v
    w = np.empty_like(v)
    w[:, t.perm.astype(np.int64)] = v
    return w


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (finite inputs; decoded bilevel values
    are finite)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def convert_f32(v: np.ndarray, dtype: DType) -> np.ndarray:
    if dtype == DType.FLOAT32:
        return v
    if dtype == DType.FLOAT16:
        with np.errstate(over="ignore"):
            return v.astype(np.float16)
    return f32_to_bf16_bits(v)


def channel_mixed_model_f32(t) -> np.ndarray:
    """SPEC C-12.7 written out with numpy on the logical form (no packing involved):
    ``v[i, j] = tables[t(i), o_j + q[i, j]]``, outliers replace, ``W[:, perm[j]] = v[:, j]``."""
    m, n = t.shape
    widths = np.asarray(t.widths).astype(np.int64)
    sizes = np.left_shift(1, widths)
    offs = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    blk = np.zeros(m, np.int64) if t.table_rows == 0 else np.arange(m) // t.table_rows
    v = np.asarray(t.tables)[blk[:, None], offs[None, :] + t.codes].astype(np.float32)
    o = t.outliers
    if o is not None and len(o):
        v[o.rows.astype(np.int64), o.cols.astype(np.int64)] = o.values.astype(np.float32)
    w = np.empty_like(v)
    w[:, np.asarray(t.perm).astype(np.int64)] = v
    return w
