"""Shared quantization arithmetic of the encoders: min-max statistics, bilevel statistics, codes.

One implementation, used by RTN (:mod:`rtn`) and by the GPTQ/SpQR solver (:mod:`gptq`); the two
differ only in *which* weights they hand in and when. Everything here is consistent with the
normative decode arithmetic of SPEC C-7:

- first-level statistics are min-max: ``s = (max - min) / (2^b - 1)``, ``z = -min / s`` in code
  units (not rounded, as SpQR);
- statistics are quantized *first* (fp16, or the second level of C-7.1), and codes are then
  chosen against the exact decoded ``s`` and ``z`` computed with the decoder's f32 operations, so
  the encoder's reconstruction equals the decoder's bit for bit.

All arrays are numpy; f32 arithmetic is done with numpy f32 operations, which are single IEEE
operations with round-to-nearest-even and are never fused, exactly as C-7 requires.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numba
import numpy as np

from spqr_format.codec.bilevel import BilevelParams

F16_MAX = 65504.0
# Largest |zero| (in code units) we let a first-level fit produce. fp16 spacing at 1024 is 1 code
# unit, so the zero's rounding error is at most half a code step, i.e. ~2^-11 of the group's
# magnitude: as precise as an fp16 weight. Groups whose range is narrower than that relative to
# their offset (near-constant groups far from 0) are widened; without this, z = -min/s overflows
# fp16 for a group like [1.0, 1.0001].
ZERO_LIMIT = 1024.0


def minmax_stats(
    w: np.ndarray, bits: int, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """First-level min-max statistics over the last axis of ``w`` (``[..., g]``).

    ``mask`` (same shape, True = take part) excludes weights (outliers) from the fit. Returns f32
    ``(scale, zero)`` of shape ``w.shape[:-1]``. Degenerate groups (no weights, or all equal to
    ``c``) get a range that includes 0 and ``c``, so ``c`` and 0 are both exactly representable
    up to the fp16 rounding of the scale; an all-zero group gets ``s = 0, z = 0`` (decodes to 0).
    """
    w = np.asarray(w, dtype=np.float32)
    if mask is None:
        lo = w.min(axis=-1)
        hi = w.max(axis=-1)
    else:
        lo = np.where(mask, w, np.inf).min(axis=-1)
        hi = np.where(mask, w, -np.inf).max(axis=-1)
        empty = ~mask.any(axis=-1)
        lo = np.where(empty, 0.0, lo)
        hi = np.where(empty, 0.0, hi)
    return range_stats(lo, hi, bits)


def range_stats(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """First-level statistics of the grid spanning ``[lo, hi]`` (arrays of one shape).

    The rules of :func:`minmax_stats` (which is this function applied to each group's min and
    max): a degenerate range is widened to include 0, a narrow range far from 0 is widened until
    ``|z| <= ZERO_LIMIT``. Used by clipping searches, which pick a ``[lo, hi]`` inside the
    group's min-max range.
    """
    maxq = float((1 << bits) - 1)
    lo = np.asarray(lo).astype(np.float64)
    hi = np.asarray(hi).astype(np.float64)
    # Degenerate range: include 0 so the constant is the top or bottom of the grid.
    deg = hi <= lo
    lo = np.where(deg, np.minimum(lo, 0.0), lo)
    hi = np.where(deg, np.maximum(hi, 0.0), hi)
    # Narrow range far from zero: widen symmetrically until |z| <= ZERO_LIMIT (see above).
    rng = hi - lo
    need = np.maximum(np.abs(lo), np.abs(hi)) * maxq / ZERO_LIMIT
    pad = np.where(rng < need, (need - rng) / 2.0, 0.0)
    lo = lo - pad
    hi = hi + pad
    rng = hi - lo
    scale = rng / maxq
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.where(scale > 0, -lo / np.where(scale > 0, scale, 1.0), 0.0)
    scale = np.minimum(scale, F16_MAX)
    return scale.astype(np.float32), zero.astype(np.float32)


# Clipping grid of the "mse" statistics search: each end of the range moves towards the point
# of [lo, hi] nearest 0 by these factors (1 = min-max); 8 common factors, then 4 one-sided
# trials, 12 error evaluations per group (encoder speed, issue 18: within 1.5x of min-max).
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65)
# One-sided trials reach this many grid steps either side of the best common factor.
CLIP_REACH = int(os.environ.get("SPQR_CLIP_REACH", "1"))
STATS_SEARCHES = ("minmax", "mse")


@numba.njit(cache=True)
def _grid_error(w, wt, keep, r, lo, hi, fq, best):  # pragma: no cover - compiled
    """:func:`_row_error` of row ``r`` with the min-max statistics of ``[lo, hi]`` (hi > lo)."""
    s = (hi - lo) / fq
    return _row_error(w, wt, keep, r, s, -lo * (1.0 / s), fq, best)


@numba.njit(cache=True, parallel=True)
def _clip_search(w, wt, keep, maxq, grid, reach, lo_out, hi_out):  # pragma: no cover
    """Per row of ``w[R, g]``: the ``[lo, hi]`` with the least ``sum_j wt[j] (w - deq)^2`` over
    the kept weights, among the min-max range shrunk by ``grid`` (both ends by one factor, then
    each end alone to the best factor's grid neighbours). Rows with no range get their min-max
    (or 0, 0)."""
    R, g = w.shape
    fq = np.float64(maxq)
    K = grid.shape[0]
    for r in numba.prange(R):
        lo = np.inf
        hi = -np.inf
        for j in range(g):
            if keep[r, j]:
                x = np.float64(w[r, j])
                lo = min(lo, x)
                hi = max(hi, x)
        if lo > hi:
            lo = 0.0
            hi = 0.0
        lo_out[r] = lo
        hi_out[r] = hi
        if not hi > lo:
            continue
        c = min(max(0.0, lo), hi)
        best = np.inf
        bk = 0
        for k in range(K):
            p = grid[k]
            e = _grid_error(w, wt, keep, r, c + p * (lo - c), c + p * (hi - c), fq, best)
            if e < best:
                best = e
                bk = k
        blo = c + grid[bk] * (lo - c)
        bhi = c + grid[bk] * (hi - c)
        # one end at a time, to the grid neighbours of the best common shrink
        for k in range(bk - reach, bk + reach + 1):
            if k != bk and 0 <= k < K:
                a = c + grid[k] * (lo - c)
                if a < bhi:
                    e = _grid_error(w, wt, keep, r, a, bhi, fq, best)
                    if e < best:
                        best = e
                        blo = a
        for k in range(bk - reach, bk + reach + 1):
            if k != bk and 0 <= k < K:
                b = c + grid[k] * (hi - c)
                if b > blo:
                    e = _grid_error(w, wt, keep, r, blo, b, fq, best)
                    if e < best:
                        best = e
                        bhi = b
        lo_out[r] = blo
        hi_out[r] = bhi


def clipped_stats(
    w: np.ndarray,
    bits: int,
    weight: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    grid=CLIP_GRID,
) -> tuple[np.ndarray, np.ndarray]:
    """Error-minimising first-level statistics over the last axis of ``w`` (``[..., g]``).

    Like :func:`minmax_stats`, but the range is the clipped ``[lo, hi]`` (searched over
    ``grid``, see :data:`CLIP_GRID`) with the least weighted squared error
    ``sum_j weight[j] (w_j - deq_j)^2`` over the weights in ``mask`` (default all; ``weight``
    default 1, one value per position of the last axis: GPTQ passes ``1 / d_j^2``, the cost of an
    error in column ``j``). Weights outside the range are clamped to its ends (or become
    outliers). Returns f32 ``(scale, zero)`` through :func:`range_stats`.
    """
    w = np.asarray(w, dtype=np.float32)
    lead, g = w.shape[:-1], w.shape[-1]
    w2 = np.ascontiguousarray(w.reshape(-1, g))
    if mask is None:
        k2 = np.ones(w2.shape, dtype=np.bool_)
    else:
        k2 = np.ascontiguousarray(np.broadcast_to(mask, w.shape).reshape(-1, g), dtype=np.bool_)
    wt = np.ones(g) if weight is None else np.ascontiguousarray(weight, dtype=np.float64)
    lo = np.empty(w2.shape[0])
    hi = np.empty(w2.shape[0])
    grid = np.asarray(grid, dtype=np.float64)
    _clip_search(w2, wt, k2, (1 << bits) - 1, grid, CLIP_REACH, lo, hi)
    return range_stats(lo.reshape(lead), hi.reshape(lead), bits)


def f16_round(x: np.ndarray) -> np.ndarray:
    """Round to fp16 (nearest-even), clipping to the finite range so statistics stay finite."""
    return np.clip(np.asarray(x, dtype=np.float32), -F16_MAX, F16_MAX).astype(np.float16)


@dataclass
class QuantizedStats:
    """Statistics of some (row, group) cells after quantization.

    ``scale``, ``zero``: decoded f32 values (exactly what a decoder computes, C-7.1).
    ``stats``: what :class:`BilevelTensor` stores (fp16 pairs or uint8 code pairs), ``[m, K, 2]``.
    ``stats2``: ``[T, K, 4]`` fp16 second-level records, or None with fp16 statistics.
    """

    scale: np.ndarray
    zero: np.ndarray
    stats: np.ndarray
    stats2: np.ndarray | None


def _second_level(
    x: np.ndarray, sbits: int, tile: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``x[m, K]`` (f32) in tiles of ``tile`` rows with ``sbits`` bits (C-7.1).

    Returns ``(codes uint8 [m, K], step f16 [T, K], base f16 [T, K])``. base = min, step =
    (max - min)/(2^sb - 1), both rounded to fp16 first; codes are then the nearest in *decoded*
    value ``base + step * q`` (f32 product, then f32 sum).
    """
    m, k = x.shape
    t = -(-m // tile)
    pad = t * tile - m
    # Pad the last, shorter tile with copies of its own first row: min/max are unchanged.
    xp = (
        x
        if pad == 0
        else np.concatenate([x, np.repeat(x[(t - 1) * tile : (t - 1) * tile + 1], pad, 0)])
    )
    xt = xp.reshape(t, tile, k)
    lo = xt.min(axis=1)
    hi = xt.max(axis=1)
    qmax = float((1 << sbits) - 1)
    base = f16_round(lo)
    step = f16_round((hi.astype(np.float64) - lo.astype(np.float64)) / qmax)
    base32 = np.repeat(base.astype(np.float32), tile, axis=0)[:m]
    step32 = np.repeat(step.astype(np.float32), tile, axis=0)[:m]
    codes = nearest_code(x, base32, step32, int(qmax))
    return codes, step, base


def nearest_code(x: np.ndarray, base: np.ndarray, step: np.ndarray, qmax: int) -> np.ndarray:
    """The code ``q`` in ``0..qmax`` whose decoded ``base + step*q`` (f32) is nearest to ``x``.

    Ties go to the lower code, so the choice is deterministic. ``step == 0`` gives code 0.
    """
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q0 = np.rint((x - base) / np.where(step > 0, step, np.float32(1)))
    q0 = np.where(step > 0, q0, 0)
    q0 = np.clip(q0, 0, qmax).astype(np.int32)
    best_q = q0
    best_d = np.abs((base + step * q0.astype(np.float32)) - x)
    # Division and rounding can be one code off the nearest decoded value; check both neighbours.
    for off in (-1, 1):
        q = np.clip(q0 + off, 0, qmax)
        d = np.abs((base + step * q.astype(np.float32)) - x)
        better = (d < best_d) | ((d == best_d) & (q < best_q))
        best_q = np.where(better, q, best_q)
        best_d = np.where(better, d, best_d)
    return best_q.astype(np.uint8)


def quantize_stats(scale: np.ndarray, zero: np.ndarray, params: BilevelParams) -> QuantizedStats:
    """Quantize first-level statistics ``scale, zero [m, K]`` (f32) per ``params``.

    With ``stats_bits == 0`` they are rounded to fp16; otherwise each (tile of S rows, group) is
    min-max quantized with ``stats_bits`` bits (C-7.1), scales and zeros independently (as SpQR).
    """
    scale = np.asarray(scale, dtype=np.float32)
    zero = np.asarray(zero, dtype=np.float32)
    if params.stats_bits == 0:
        s16 = f16_round(scale)
        z16 = f16_round(zero)
        return QuantizedStats(
            scale=s16.astype(np.float32),
            zero=z16.astype(np.float32),
            stats=np.stack([s16, z16], axis=-1),
            stats2=None,
        )
    sb, tile = params.stats_bits, params.stats_group_size
    qs, s_step, s_base = _second_level(scale, sb, tile)
    qz, z_step, z_base = _second_level(zero, sb, tile)
    m = scale.shape[0]

    def rows(a: np.ndarray) -> np.ndarray:
        return np.repeat(a.astype(np.float32), tile, axis=0)[:m]

    # C-7.1 exactly: product rounded to f32, then sum rounded to f32.
    dec_s = rows(s_base) + rows(s_step) * qs.astype(np.float32)
    dec_z = rows(z_base) + rows(z_step) * qz.astype(np.float32)
    return QuantizedStats(
        scale=dec_s,
        zero=dec_z,
        stats=np.stack([qs, qz], axis=-1),
        stats2=np.stack([s_step, s_base, z_step, z_base], axis=-1),
    )


@numba.njit(cache=True)
def _row_error(w, wt, keep, i, s, z, maxq, best):  # pragma: no cover - compiled
    err = 0.0
    s64 = np.float64(s)
    z64 = np.float64(z)
    fq = np.float64(maxq)
    inv = 1.0 / s64 if s64 > 0 else 0.0
    for j in range(w.shape[1]):
        if keep[i, j]:
            # the fast code (round of x/s + z): off the exact nearest only at rounding ties,
            # which is harmless for choosing statistics; the solver picks the exact codes
            x = np.float64(w[i, j])
            q = min(max(np.floor(x * inv + z64 + 0.5), 0.0), fq)
            e = s64 * (q - z64) - x
            err += e * e * wt[j]
            if err >= best:
                return err
    return err


@numba.njit(cache=True, parallel=True)
def _refine_codes(w, wt, keep, cs, cz, s_step, s_base, z_step, z_base, tile, sqmax, maxq):
    # pragma: no cover - compiled
    """Per row of ``w[m, g]``: the second-level codes of scale (then zero) within one code of
    the nearest ones with the least weighted error of the row's codes (decoded C-7.1)."""
    m = w.shape[0]
    for i in numba.prange(m):
        t = i // tile
        sb = np.float32(s_base[t])
        ss = np.float32(s_step[t])
        zb = np.float32(z_base[t])
        zs = np.float32(z_step[t])
        a0 = np.int64(cs[i])
        b0 = np.int64(cz[i])
        z = zb + zs * np.float32(b0)
        best = _row_error(w, wt, keep, i, sb + ss * np.float32(a0), z, maxq, np.inf)
        ba = a0
        for a in (a0 - 1, a0 + 1):
            if 0 <= a <= sqmax:
                e = _row_error(w, wt, keep, i, sb + ss * np.float32(a), z, maxq, best)
                if e < best:
                    best = e
                    ba = a
        s = sb + ss * np.float32(ba)
        bb = b0
        for b in (b0 - 1, b0 + 1):
            if 0 <= b <= sqmax:
                e = _row_error(w, wt, keep, i, s, zb + zs * np.float32(b), maxq, best)
                if e < best:
                    best = e
                    bb = b
        cs[i] = ba
        cz[i] = bb


def refine_second_level(
    w: np.ndarray,
    qs: QuantizedStats,
    params: BilevelParams,
    weight: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> QuantizedStats:
    """Second-level codes chosen by error instead of by nearness: for one group ``w[m, g]``
    whose statistics ``qs`` (one group: ``[m, 1]``) were quantized with ``stats_bits > 0``,
    each row's scale code, then zero code, moves by one step where that lowers
    ``sum_j weight[j] (w_j - deq_j)^2`` over the weights in ``mask`` (codes chosen against the
    decoded statistics). The second-level records (``stats2``) are unchanged; fp16 statistics
    are returned as they are."""
    if params.stats_bits == 0:
        return qs
    w = np.ascontiguousarray(w, dtype=np.float32)
    m, g = w.shape
    keep = (
        np.ones((m, g), np.bool_)
        if mask is None
        else np.ascontiguousarray(np.broadcast_to(mask, (m, g)), dtype=np.bool_)
    )
    wt = np.ones(g) if weight is None else np.ascontiguousarray(weight, dtype=np.float64)
    cs = qs.stats[:, 0, 0].astype(np.int64)
    cz = qs.stats[:, 0, 1].astype(np.int64)
    st2 = qs.stats2[:, 0, :]
    _refine_codes(
        w, wt, keep, cs, cz, st2[:, 0].astype(np.float32), st2[:, 1].astype(np.float32),
        st2[:, 2].astype(np.float32), st2[:, 3].astype(np.float32), params.stats_group_size,
        (1 << params.stats_bits) - 1, (1 << params.bits) - 1,
    )  # fmt: skip
    tile = params.stats_group_size

    def rows(a: np.ndarray) -> np.ndarray:
        return np.repeat(a.astype(np.float32), tile, axis=0)[:m]

    dec_s = rows(st2[:, 1]) + rows(st2[:, 0]) * cs.astype(np.float32)
    dec_z = rows(st2[:, 3]) + rows(st2[:, 2]) * cz.astype(np.float32)
    stats = np.stack([cs.astype(np.uint8), cz.astype(np.uint8)], axis=-1)[:, None, :]
    return QuantizedStats(scale=dec_s[:, None], zero=dec_z[:, None], stats=stats, stats2=qs.stats2)


def dequant(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Decoded dense value ``s * (f32(q) - z)`` (C-7.2); ``scale``/``zero`` broadcast against q."""
    return scale * (q.astype(np.float32) - zero)


@numba.njit(cache=True, inline="always")
def f16_round_scalar(x):  # pragma: no cover - compiled
    """f32 ``x`` rounded to the nearest fp16 value (ties to even), clipped to the finite range."""
    ax = abs(np.float64(x))
    if ax >= 65504.0:
        return np.float32(65504.0) if x > 0 else np.float32(-65504.0)
    if ax < 6.103515625e-05:  # below 2^-14: fp16 subnormals, spacing 2^-24
        ulp = 5.960464477539063e-08
    else:
        _, e = math.frexp(ax)
        ulp = math.ldexp(1.0, e - 11)
    return np.float32(np.rint(np.float64(x) / ulp) * ulp)


@numba.njit(cache=True, inline="always")
def code_scalar(x, s, z, maxq):  # pragma: no cover - compiled
    """Nearest code in decoded value ``s * (q - z)`` (f32, C-7.2); ties to the lower code."""
    if s > np.float32(0):
        t = x / s + z
    else:
        t = z
    t = min(max(t, np.float32(0)), np.float32(maxq))
    q0 = int(np.floor(t + np.float32(0.5)))
    best = 0
    bd = np.float32(np.inf)
    for q in range(max(q0 - 1, 0), min(q0 + 1, maxq) + 1):
        d = abs(s * (np.float32(q) - z) - x)
        if d < bd:
            bd = d
            best = q
    return best


@numba.njit(cache=True, parallel=True)
def _codes_rows(w, s, z, maxq):  # pragma: no cover - compiled
    # w [R, C] f32; s, z [R] f32.
    R, C = w.shape
    out = np.empty((R, C), dtype=np.uint8)
    for r in numba.prange(R):
        for c in range(C):
            out[r, c] = code_scalar(w[r, c], s[r], z[r], maxq)
    return out


def choose_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """The code nearest in *decoded* value to each weight, given decoded f32 ``scale, zero``.

    ``w`` is ``[..., C]``; ``scale``/``zero`` have shape ``w.shape[:-1]`` (one pair per row of
    ``C`` weights). Starts from ``clamp(round(w/s + z))`` and checks the neighbouring codes,
    because the f32 decode ``s*(q - z)`` can make a neighbour nearer; ties go to the lower code.
    With ``s == 0`` every code decodes to 0 and the code nearest ``z`` is stored.
    """
    w = np.asarray(w, dtype=np.float32)
    lead = w.shape[:-1]
    w2 = np.ascontiguousarray(w.reshape(-1, w.shape[-1]))
    s = np.ascontiguousarray(np.broadcast_to(scale, lead), dtype=np.float32).reshape(-1)
    z = np.ascontiguousarray(np.broadcast_to(zero, lead), dtype=np.float32).reshape(-1)
    return _codes_rows(w2, s, z, (1 << bits) - 1).reshape(w.shape)


def check_weight(weight: object, name: str | None) -> np.ndarray:
    """Validate an encoder's weight input and return it as a C-contiguous f32 copy.

    2-D, non-empty, floating point (f16, f32, f64; bf16 weights arrive widened to f32), every
    value finite and within the fp16 range (outliers and statistics are stored in fp16).
    """
    from spqr_format.errors import BadInputError

    if not isinstance(weight, np.ndarray):
        raise BadInputError(
            f"weight must be a numpy array, got {type(weight).__name__}", tensor=name
        )
    if weight.ndim != 2:
        raise BadInputError(f"weight must be 2-D, got shape {weight.shape}", tensor=name)
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise BadInputError(f"weight is empty (shape {weight.shape})", tensor=name)
    if weight.dtype not in (np.float16, np.float32, np.float64):
        raise BadInputError(
            f"weight dtype must be float16/float32/float64, got {weight.dtype}", tensor=name
        )
    # Always a copy: the solver updates its weights in place and must not touch the caller's.
    w = np.array(weight, dtype=np.float32, order="C", copy=True)
    finite = np.isfinite(w)
    if not finite.all():
        bad = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise BadInputError(
            f"weight has {int((~finite).sum())} non-finite values (first at {bad})",
            tensor=name,
        )
    peak = float(np.abs(w).max())
    if peak > F16_MAX:
        raise BadInputError(
            f"weight magnitude {peak:g} exceeds the fp16 range used for statistics and outliers",
            tensor=name,
        )
    return w


def check_params(
    bits: int, group_size: int, stats_bits: int, stats_group_size: int, name: str | None
) -> BilevelParams:
    """Build and validate :class:`BilevelParams`, reporting problems as BadInputError."""
    from spqr_format.errors import BadInputError, SpqrError

    for label, v in (
        ("bits", bits),
        ("group_size", group_size),
        ("stats_bits", stats_bits),
        ("stats_group_size", stats_group_size),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise BadInputError(f"{label} must be an integer, got {v!r}", tensor=name)
    params = BilevelParams(int(bits), int(group_size), int(stats_bits), int(stats_group_size))
    try:
        params.validate()
    except SpqrError as e:
        raise BadInputError(e.message, tensor=name, field=e.field) from None
    return params
