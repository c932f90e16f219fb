"""CMPQ encoder (channel-wise mixed precision, issue 19): CPU reference, produces ``channel_mixed``.

For a weight ``W[m, n]`` (rows = output features, columns = input channels) and the Hessian
``H = X^T X`` of its inputs:

1. statistic ``s_j = sqrt(H_jj)``, the L2 norm of input channel ``j`` over the calibration
   tokens;
2. *activation outliers*: the ``act_outliers`` fraction (default 0.45 %) of weights with the
   largest ``|W_ij| * s_j``, kept in f16 (SPEC section 6);
3. width per column from ``widths`` (default {2, 3, 4}) so that the tensor's bits per weight,
   counted from its sections (codes, tables, permutation, outlier entries and index: SPEC
   C-12.9) is at most ``target_bits`` and as close to it as the allocation allows:
   ``allocator="norm"`` gives wider codes to the columns with larger ``s_j`` (CMPQ),
   ``allocator="rd"`` upgrades, greedily, the column whose next width removes the most
   ``H_jj * ||W_j - Q(W_j)||^2`` per extra bit (a rate-distortion allocator);
4. one lookup table of ``2**b_j`` f16 values per column from 1-D k-means (Lloyd, on sorted
   values with prefix sums, so one iteration is O(2**b log m)), outliers excluded, optionally
   weighted per element (``weights``; the diagonal Hessian is constant within a column, so
   by default the k-means is unweighted);
5. *quantization-sensitive outliers*: the ``sens_outliers`` fraction (default 0.05 %) of the
   remaining weights with the largest ``H_jj * (W_ij - Q(W_ij))^2``; then the tables are
   refitted without them;
6. ``fill_outliers``: the bits left below the target (less than one column upgrade) buy more
   outliers (32 bits each), by the same error score, so the target is met to within 32 bits
   of the tensor (plus skip entries, counted).

7. ``solver="gptq"`` (the default): with the widths and every outlier of steps 2-6 fixed (so
   the counted bits do not change), the tables and codes are solved again with GPTQ's error
   feedback: columns in act order (descending ``H_jj``; ``act_order=False``: input order; the
   solve order is not stored), each column's table(s) fitted by the same k-means
   on the column's *current* values without its outliers, codes the nearest entries, outliers
   keeping their current (error-updated) value in f16; the error ``(w_j - q_j) / U_jj`` updates
   the later columns by ``U[j, later]`` (``U`` the upper Cholesky factor of ``(H + percdamp *
   mean(diag H) I)^-1``, dead columns decoupled: :func:`gptq.damped_inverse_factor`), lazily
   per block of columns. ``solver="kmeans"`` stops after step 6 (no error feedback; the tables
   of step 5 are fitted before the fill outliers of step 6 are known).

One table per column (not per column per row block): measured in ``benchmarks/cmpq_tables.py``
(SPEC C-12.5 states the choice).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from spqr_format import spec
from spqr_format.codec import channel_mixed as cm
from spqr_format.codec.bilevel import Outliers
from spqr_format.codec.gptq import damped_inverse_factor
from spqr_format.codec.hessian import check_hessian
from spqr_format.codec.outliers import encode_outlier_stream
from spqr_format.codec.quantizer import f16_round_scalar
from spqr_format.errors import BadInputError
from spqr_format.spec import DType

CONFIG_VERSION = 1
ALLOCATORS = ("norm", "rd")
SOLVERS = ("gptq", "kmeans")
# Columns per block of the GPTQ solver's lazy updates (inside a segment per column, to the rest
# of the block once per segment and to the rest of the matrix once per block, as GEMMs).
GPTQ_BLOCK = 128
GPTQ_SEGMENT = 32


@dataclass(frozen=True)
class CmpqConfig:
    """Every knob of the CMPQ encoder (JSON-able through :meth:`to_dict`)."""

    target_bits: float = 2.5
    widths: tuple[int, ...] = (2, 3, 4)
    allocator: str = "norm"
    act_outliers: float = 0.0045
    sens_outliers: float = 0.0005
    fill_outliers: bool = True
    kmeans_iters: int = 50
    table_rows: int = 0
    solver: str = "gptq"
    percdamp: float = 0.1
    act_order: bool = True
    method: str = "cmpq"
    preset: str | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        def bad(field: str, msg: str) -> BadInputError:
            return BadInputError(f"cmpq config: {field} {msg}", field=f"config.{field}")

        object.__setattr__(self, "widths", tuple(sorted(set(int(w) for w in self.widths))))
        if self.version != CONFIG_VERSION:
            raise bad("version", f"must be {CONFIG_VERSION}, got {self.version!r}")
        if self.method != "cmpq":
            raise bad("method", f"must be 'cmpq', got {self.method!r}")
        t = self.target_bits
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise bad("target_bits", f"must be a finite number > 0, got {t!r}")
        if not self.widths or not all(spec.MIN_BITS <= w <= spec.MAX_BITS for w in self.widths):
            raise bad("widths", f"must be widths in 1..8, got {self.widths!r}")
        if self.allocator not in ALLOCATORS:
            raise bad("allocator", f"must be one of {ALLOCATORS}, got {self.allocator!r}")
        for f in ("act_outliers", "sens_outliers"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 0.5:
                raise bad(f, f"must be a fraction in [0, 0.5), got {v!r}")
        if not isinstance(self.fill_outliers, bool):
            raise bad("fill_outliers", "must be true or false")
        k = self.kmeans_iters
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise bad("kmeans_iters", f"must be a positive integer, got {k!r}")
        r = self.table_rows
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= spec.MAX_GROUP_SIZE:
            raise bad("table_rows", f"must be 0 (one table per column) or 1..2**24, got {r!r}")
        if self.solver not in SOLVERS:
            raise bad("solver", f"must be one of {SOLVERS}, got {self.solver!r}")
        p = self.percdamp
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
            raise bad("percdamp", f"must be a finite number >= 0, got {p!r}")
        if not isinstance(self.act_order, bool):
            raise bad("act_order", "must be true or false")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CmpqConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - known
        if extra:
            raise BadInputError(f"cmpq config: unknown keys {sorted(extra)}")
        # a config recorded before the solver existed describes a k-means encode
        return cls(**{"solver": "kmeans", **d})

    def with_overrides(self, **kw) -> CmpqConfig:
        return dataclasses.replace(self, **kw)


# --------------------------------------------------------------------------------------------
# 1-D k-means on sorted values


@njit(cache=True)
def _kmeans_sorted(xs, cw, cwx, k, iters):
    """Weighted Lloyd on sorted ``xs`` (prefix sums ``cw``, ``cwx`` of length N + 1): ``k``
    sorted centroids, initialised at the weighted quantiles (c + 1/2) / k."""
    nn = xs.shape[0]
    cent = np.zeros(k, np.float64)
    if nn == 0:
        return cent
    total = cw[nn]
    for c in range(k):
        if total > 0:
            target = (c + 0.5) / k * total
            idx = np.searchsorted(cw, target) - 1
        else:
            idx = int((c + 0.5) / k * nn)
        idx = min(max(idx, 0), nn - 1)
        cent[c] = xs[idx]
    bounds = np.empty(k + 1, np.int64)
    for _ in range(iters):
        bounds[0] = 0
        bounds[k] = nn
        for c in range(k - 1):
            mid = 0.5 * (cent[c] + cent[c + 1])
            bounds[c + 1] = np.searchsorted(xs, mid)  # x < mid goes left
        changed = False
        for c in range(k):
            lo, hi = bounds[c], bounds[c + 1]
            wsum = cw[hi] - cw[lo]
            if hi > lo and wsum > 0:
                v = (cwx[hi] - cwx[lo]) / wsum
                if v != cent[c]:
                    changed = True
                    cent[c] = v
        # keep the centroids sorted (Lloyd in 1-D keeps them so up to rounding)
        for c in range(1, k):
            if cent[c] < cent[c - 1]:
                cent[c] = cent[c - 1]
        if not changed:
            break
    return cent


@njit(cache=True)
def _kmeans_column(w, excl, wts, a, b, k, iters):
    """:func:`_kmeans_sorted` of the elements ``a..b-1`` of one column ``w`` that ``excl``
    does not exclude (outliers), weighted by ``wts``: ``k`` sorted centroids."""
    cnt = 0
    for i in range(a, b):
        if not excl[i]:
            cnt += 1
    vals = np.empty(cnt, np.float64)
    ww = np.empty(cnt, np.float64)
    p = 0
    for i in range(a, b):
        if not excl[i]:
            vals[p] = w[i]
            ww[p] = wts[i]
            p += 1
    order = np.argsort(vals, kind="mergesort")
    xs = vals[order]
    ws = ww[order]
    cw = np.zeros(cnt + 1, np.float64)
    cwx = np.zeros(cnt + 1, np.float64)
    for i in range(cnt):
        cw[i + 1] = cw[i] + ws[i]
        cwx[i + 1] = cwx[i] + ws[i] * xs[i]
    return _kmeans_sorted(xs, cw, cwx, k, iters)


@njit(cache=True)
def _midpoints(tab):
    """Decision boundaries of a sorted table: ``searchsorted(mids, x)`` is x's nearest entry."""
    k = tab.shape[0]
    mids = np.empty(max(k - 1, 0), np.float64)
    for t in range(k - 1):
        mids[t] = 0.5 * (tab[t] + tab[t + 1])
    return mids


@njit(cache=True, parallel=True)
def _fit_columns(wt, excl, wts, widths, iters, out_cent):
    """k-means per column: ``wt[j]`` the column's values, ``excl[j]`` True where excluded
    (outliers), ``wts[j]`` element weights; ``out_cent[j, :2**widths[j]]``."""
    n, m = wt.shape
    for j in prange(n):
        k = 1 << widths[j]
        c = _kmeans_column(wt[j], excl[j], wts[j], 0, m, k, iters)
        for t in range(k):
            out_cent[j, t] = c[t]


@njit(cache=True, parallel=True)
def _assign_columns(wt, widths, tables, codes_t, err_t):
    """Nearest table entry (tables sorted, f16 values as f64) for every element; the
    squared error in ``err_t``."""
    n, m = wt.shape
    for j in prange(n):
        k = 1 << widths[j]
        tab = tables[j, :k]
        mids = _midpoints(tab)
        for i in range(m):
            x = wt[j, i]
            q = np.searchsorted(mids, x)
            codes_t[j, i] = q
            d = x - tab[q]
            err_t[j, i] = d * d


@njit(cache=True)
def _gptq_block(wb, xb, ewb, wid, ub, d, rb, iters, tabs, codes, eb):  # pragma: no cover
    """The GPTQ solve of one block of columns (rows of ``wb``, in solve order), serial.

    ``wb[B, m]`` the columns' current (error-updated) values, f32; each is replaced by its
    reconstruction when quantized. Per column ``j`` and row block ``rb[t]..rb[t + 1]``: a table
    of ``2**wid[j]`` entries by weighted k-means on the values not excluded by ``xb`` (weights
    ``ewb``), rounded to f16 into ``tabs[j, t]``; every code the nearest entry (``codes``);
    an excluded value (an outlier) is kept, rounded to f16. ``eb[j] = (w_j - q_j) / d[j]`` is
    fed into the later columns of the block through ``ub`` (the block of ``U``); the caller
    applies it to the columns after the block. Returns False if a table entry or an outlier
    left the f16 range."""
    nb, m = wb.shape
    ok = True
    for j in range(nb):
        k = 1 << wid[j]
        dj = d[j]
        for t in range(rb.shape[0] - 1):
            a = rb[t]
            b = rb[t + 1]
            c = _kmeans_column(wb[j], xb[j], ewb[j], a, b, k, iters)
            tab = np.empty(k, np.float64)
            for e in range(k):
                if abs(c[e]) > 65504.0:
                    ok = False
                tab[e] = f16_round_scalar(c[e])
                tabs[j, t, e] = tab[e]
            mids = _midpoints(tab)
            for i in range(a, b):
                x = np.float64(wb[j, i])
                q = np.searchsorted(mids, x)
                codes[j, i] = q
                if xb[j, i]:
                    if abs(x) > 65504.0:
                        ok = False
                    v = np.float64(f16_round_scalar(x))
                else:
                    v = tab[q]
                wb[j, i] = v
                eb[j, i] = (x - v) / dj
        for kk in range(j + 1, nb):
            u = ub[j, kk]
            if u != 0.0:
                for i in range(m):
                    wb[kk, i] -= eb[j, i] * u
    return ok


def _solve_gptq(wt, hs, excl, ew, widths, config, name=None):
    """CMPQ's GPTQ pass: the columns in solve order (act order: descending ``diag(H)``), each
    column's tables fitted on its current values without the outliers ``excl``, the error fed
    back through ``U`` (GPTQ, damped by ``config.percdamp``). ``wt`` is ``W^T`` ``[n, m]``.

    Returns ``(tabs [T, n, 2**max width], codes [n, m], recon [n, m])`` in the original
    column order; ``recon`` is the reconstruction (at outliers: the f16 value stored)."""
    n, m = wt.shape
    perm = np.argsort(-np.diagonal(hs), kind="stable") if config.act_order else None
    u64, _, _, _ = damped_inverse_factor(hs, perm, config.percdamp, name)
    u = np.ascontiguousarray(u64, dtype=np.float32)
    d = np.diagonal(u64).copy()
    del u64
    idx = np.arange(n) if perm is None else perm
    cur = np.ascontiguousarray(wt[idx], dtype=np.float32)
    blocks = _row_blocks(m, config.table_rows)
    rb = np.array([a for a, _ in blocks] + [m], np.int64)
    kmax = 1 << int(widths.max())
    tabs = np.zeros((n, len(blocks), kmax), np.float64)
    codes = np.empty((n, m), np.uint8)
    wid = widths.astype(np.int64)[idx]
    for b0 in range(0, n, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, n)
        eb = np.empty((b1 - b0, m), np.float32)
        # segments of GPTQ_SEGMENT columns: per-column updates inside the segment (numba), to
        # the rest of the block as one GEMM (two-level lazy updates, as gptq.py)
        for s0 in range(b0, b1, GPTQ_SEGMENT):
            s1 = min(s0 + GPTQ_SEGMENT, b1)
            cols = idx[s0:s1]
            ok = _gptq_block(
                cur[s0:s1], np.ascontiguousarray(excl[cols]), np.ascontiguousarray(ew[cols]),
                wid[s0:s1], np.ascontiguousarray(u[s0:s1, s0:s1]), d[s0:s1], rb,
                config.kmeans_iters, tabs[s0:s1], codes[s0:s1], eb[s0 - b0 : s1 - b0],
            )  # fmt: skip
            if not ok:
                raise BadInputError(
                    "a lookup table value or an outlier exceeds the float16 range", tensor=name
                )
            if s1 < b1:
                cur[s1:b1] -= u[s0:s1, s1:b1].T @ eb[s0 - b0 : s1 - b0]
        for c0 in range(b1, n, 1024):  # lazy update of the later columns, in chunks
            c1 = min(c0 + 1024, n)
            cur[c0:c1] -= u[b0:b1, c0:c1].T @ eb
    out_tabs = np.zeros((len(blocks), n, kmax), np.float64)
    out_tabs[:, idx] = tabs.transpose(1, 0, 2)
    out_codes = np.empty_like(codes)
    out_codes[idx] = codes
    recon = np.empty_like(cur)
    recon[idx] = cur
    return out_tabs, out_codes, recon


def _row_blocks(m: int, rows: int) -> list[tuple[int, int]]:
    if rows == 0 or rows >= m:
        return [(0, m)]
    return [(a, min(a + rows, m)) for a in range(0, m, rows)]


def _fit(wt, excl, wts, widths, iters, rows=0):
    """Tables (f16-rounded, sorted, as f64 ``[T, n, 2**max width]``), codes ``[n, m]`` and
    squared errors ``[n, m]`` for the given widths, one table per column per block of
    ``rows`` rows (0: per column); ``wt`` is ``W^T`` (f64, contiguous)."""
    n, m = wt.shape
    kmax = 1 << int(widths.max())
    wid = widths.astype(np.int64)
    blocks = _row_blocks(m, rows)
    tabs = np.zeros((len(blocks), n, kmax), np.float64)
    codes = np.empty((n, m), np.uint8)
    err = np.empty((n, m), np.float64)
    for t, (a, b) in enumerate(blocks):
        sub = wt if len(blocks) == 1 else np.ascontiguousarray(wt[:, a:b])
        sx = excl if len(blocks) == 1 else np.ascontiguousarray(excl[:, a:b])
        sw = wts if len(blocks) == 1 else np.ascontiguousarray(wts[:, a:b])
        cent = np.zeros((n, kmax), np.float64)
        _fit_columns(sub, sx, sw, wid, iters, cent)
        with np.errstate(over="ignore"):
            tab = cent.astype(np.float16).astype(np.float64)
        if not np.isfinite(tab).all():
            raise BadInputError("a lookup table value exceeds the float16 range")
        c = np.empty((n, b - a), np.uint8)
        e = np.empty((n, b - a), np.float64)
        _assign_columns(sub, wid, tab, c, e)
        codes[:, a:b] = c
        err[:, a:b] = e
        tabs[t] = tab
    return tabs, codes, err


# --------------------------------------------------------------------------------------------
# bits accounting (SPEC C-12.9)


def _outlier_stream_bits(rows: np.ndarray, cols: np.ndarray, m: int, n: int) -> int:
    """Bits of outlier_index + outlier_entries for outliers at (rows, cols) (sorted)."""
    if rows.size == 0:
        return 0
    o = Outliers(rows.astype(np.uint32), cols.astype(np.uint32), np.zeros(rows.size, np.float16))
    _, entries, _ = encode_outlier_stream(o, m, n)
    return 32 * int(entries.shape[0]) + 32 * (spec.outlier_blocks(m) + 1)


def _dense_bits(m: int, n: int, counts: tuple[int, ...], rows: int = 0) -> int:
    """Bits of codes + tables + perm for width counts ``counts`` (C-12.9)."""
    geo = cm.ChannelMixedGeometry.of((m, n), counts, rows)
    return (
        32 * geo.code_words + 16 * geo.total_table_entries + 8 * spec.perm_entry_size(n) * n
    )


def _counts_of(widths: np.ndarray) -> tuple[int, ...]:
    return tuple(int(np.count_nonzero(widths == b)) for b in cm.WIDTHS)


def _col_cost(m: int, b: int, blocks: int = 1) -> int:
    return m * b + 16 * (1 << b) * blocks


# --------------------------------------------------------------------------------------------
# allocation


def _allocate_norm(
    stat: np.ndarray, m: int, cands: tuple[int, ...], budget: int, blocks: int = 1
) -> np.ndarray:
    """Two adjacent widths: every column at the widest level all columns can afford, the
    ``budget``-limited top of the ranking by ``stat`` one level up."""
    n = stat.shape[0]
    order = np.argsort(-stat, kind="stable")  # largest statistic first
    widths = np.full(n, cands[0], np.int64)
    left = budget - n * _col_cost(m, cands[0], blocks)
    for lo, hi in zip(cands[:-1], cands[1:], strict=False):
        step = _col_cost(m, hi, blocks) - _col_cost(m, lo, blocks)
        if n * step <= left:
            widths[:] = hi
            left -= n * step
            continue
        count = left // step
        widths[order[:count]] = hi
        break
    return widths


def _allocate_rd(
    dist: np.ndarray, m: int, cands: tuple[int, ...], budget: int, blocks: int = 1
) -> np.ndarray:
    """Greedy rate-distortion: ``dist[j, l]`` the distortion of column j at width cands[l];
    repeatedly take the step with the largest distortion reduction per bit that fits."""
    n = dist.shape[0]
    level = np.zeros(n, np.int64)

    def cost(b):
        return _col_cost(m, b, blocks)

    left = budget - n * cost(cands[0])
    heap = []
    if len(cands) > 1:
        step = cost(cands[1]) - cost(cands[0])
        for j in range(n):
            heap.append((-(dist[j, 0] - dist[j, 1]) / step, j))
        heapq.heapify(heap)
    while heap:
        _, j = heapq.heappop(heap)
        lv = level[j]
        step = cost(cands[lv + 1]) - cost(cands[lv])
        if step > left:
            continue
        level[j] = lv + 1
        left -= step
        if lv + 2 < len(cands):
            nxt = cost(cands[lv + 2]) - cost(cands[lv + 1])
            heapq.heappush(heap, (-(dist[j, lv + 1] - dist[j, lv + 2]) / nxt, j))
    return np.asarray(cands, np.int64)[level]


# --------------------------------------------------------------------------------------------
# the encoder


def _top(score: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the ``k`` largest scores (ties by index), sorted ascending."""
    score = score.reshape(-1)
    k = int(min(max(k, 0), score.size))
    if k == 0:
        return np.zeros(0, np.int64)
    idx = np.argpartition(-score, k - 1)[:k] if k < score.size else np.arange(score.size)
    return np.sort(idx)


def hessian_statistic(hessian, n: int, name: str | None = None) -> np.ndarray:
    """``sqrt(diag(H))`` after the checks of issue 19's bad input: a Hessian is needed, of
    shape ``[n, n]``, finite, symmetric, with a non-negative and not all-zero diagonal
    (BadInputError naming the tensor)."""
    if hessian is None:
        raise BadInputError(
            "cmpq needs a Hessian (activation statistics) for every quantized tensor; "
            "none was given (spqr calibrate, then --hessians)",
            tensor=name,
        )
    h = np.asarray(hessian) if not isinstance(hessian, np.ndarray) else hessian
    if h.ndim != 2 or h.shape != (n, n):
        raise BadInputError(
            f"Hessian shape {tuple(h.shape)} does not match the weight's {n} input columns "
            f"(expected ({n}, {n}))",
            tensor=name,
        )
    d = np.diagonal(h).astype(np.float64)
    if np.isfinite(d).all() and not (d > 0).any():
        raise BadInputError(
            "activation statistic is all zero (Hessian diagonal all zero: no input was ever "
            "active); cmpq cannot rank the columns",
            tensor=name,
        )
    check_hessian(h, n, name=name)
    return np.sqrt(np.maximum(d, 0.0))


def reachable_bits(m: int, n: int, config: CmpqConfig) -> tuple[float, float]:
    """(lowest, highest) bits per weight ``config`` can meet for an ``m x n`` tensor: every
    column at the narrowest / widest candidate, with the configured outliers (their index
    and entries counted, no skips)."""
    k = round(config.act_outliers * m * n) + round(config.sens_outliers * m * n)
    k = min(k, m * n)
    ob = (32 * k + 32 * (spec.outlier_blocks(m) + 1)) if k else 0
    r = config.table_rows
    lo = _dense_bits(m, n, _counts_of(np.full(n, config.widths[0])), r)
    hi = _dense_bits(m, n, _counts_of(np.full(n, config.widths[-1])), r)
    return (lo + ob) / (m * n), (hi + ob) / (m * n)


def encode_cmpq(
    weight: np.ndarray,
    hessian: np.ndarray | None,
    config: CmpqConfig,
    *,
    name: str | None = None,
    dtype: DType = DType.FLOAT16,
    weights: np.ndarray | None = None,
) -> tuple[cm.ChannelMixedTensor, dict]:
    """Encode ``weight[m, n]`` with CMPQ; returns the tensor and a small report of the
    allocation (``width_counts``, ``target_bits``, ``bits_per_weight``, outlier counts).
    ``weights``: optional per-element k-means weights ``[m, n]`` (e.g. Fisher)."""
    if not isinstance(config, CmpqConfig):
        raise BadInputError(f"config must be a CmpqConfig, got {type(config).__name__}",
                            tensor=name)  # fmt: skip
    w = np.asarray(weight)
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise BadInputError(f"weight must be 2-D with m, n >= 1, got shape {w.shape}",
                            tensor=name)  # fmt: skip
    m, n = (int(v) for v in w.shape)
    w = w.astype(np.float64)
    if not np.isfinite(w).all():
        raise BadInputError("weight has non-finite values", tensor=name)
    if np.abs(w).max() > 65504:
        raise BadInputError("weight values exceed the float16 range of tables and outliers",
                            tensor=name)  # fmt: skip
    stat = hessian_statistic(hessian, n, name)
    hdiag = stat * stat
    total = m * n
    budget = math.floor(config.target_bits * total + 1e-9)
    lo, hi = reachable_bits(m, n, config)
    if budget < lo * total:
        raise BadInputError(
            f"target {config.target_bits} bits/weight is unreachable: with widths "
            f"{list(config.widths)} and {100 * (config.act_outliers + config.sens_outliers):.2f}% "
            f"outliers this {m}x{n} tensor needs at least {lo:.4f} (every bit counted)",
            tensor=name,
        )
    if config.target_bits > hi + 1e-9:
        raise BadInputError(
            f"target {config.target_bits} bits/weight is unreachable: widths "
            f"{list(config.widths)} reach at most {hi:.4f} on this {m}x{n} tensor",
            tensor=name,
        )
    wt = np.ascontiguousarray(w.T)  # [n, m]: one column per row
    if weights is not None:
        ew = np.asarray(weights, np.float64)
        if ew.shape != (m, n) or not np.isfinite(ew).all() or (ew < 0).any():
            raise BadInputError("k-means weights must be finite, >= 0, of the weight's shape",
                                tensor=name)  # fmt: skip
        ew = np.ascontiguousarray(ew.T)
    else:
        ew = np.ones((n, m), np.float64)

    # 2. activation outliers: largest |W_ij| * s_j (flat indices into W^T)
    n_act = round(config.act_outliers * total)
    n_sens = round(config.sens_outliers * total)
    act = _top(np.abs(wt) * stat[:, None], n_act)
    excl = np.zeros((n, m), np.bool_)
    excl.reshape(-1)[act] = True

    # 3. allocation against the budget left after perm, outliers, run padding
    planned = n_act + n_sens
    ob = (32 * planned + 32 * (spec.outlier_blocks(m) + 1)) if planned else 0
    perm_bits = 8 * spec.perm_entry_size(n) * n
    pad = 32 * len(config.widths)
    col_budget = budget - ob - perm_bits - pad
    cands = config.widths
    rows = config.table_rows
    nblk = len(_row_blocks(m, rows))
    if config.allocator == "norm":
        widths_orig = _allocate_norm(stat, m, cands, col_budget, nblk)
    else:
        dist = np.empty((n, len(cands)))
        for li, b in enumerate(cands):
            _, _, err = _fit(wt, excl, ew, np.full(n, b), config.kmeans_iters, rows)
            err[excl] = 0.0
            dist[:, li] = hdiag * err.sum(axis=1)
        widths_orig = _allocate_rd(dist, m, cands, col_budget, nblk)

    # 4. tables, 5. sensitive outliers and refit
    tab, codes, err = _fit(wt, excl, ew, widths_orig, config.kmeans_iters, rows)
    score = err * hdiag[:, None]
    score[excl] = -1.0
    sens = _top(score, n_sens)
    sens = sens[score.reshape(-1)[sens] > 0] if sens.size else sens
    if sens.size:
        excl.reshape(-1)[sens] = True
        tab, codes, err = _fit(wt, excl, ew, widths_orig, config.kmeans_iters, rows)
        score = err * hdiag[:, None]
    score[excl] = -1.0

    # 6. exact accounting; fill (or trim) outliers to the budget
    counts = _counts_of(widths_orig)
    dense = _dense_bits(m, n, counts, rows)

    def positions(mask_t):
        flat = np.flatnonzero(mask_t.T.reshape(-1))  # row-major over W (original columns)
        return flat // n, flat % n

    def stored_bits(mask_t):
        r, c = positions(mask_t)
        cs = inv[c]
        o = np.lexsort((cs, r))
        return _outlier_stream_bits(r[o], cs[o], m, n)

    order = np.lexsort((np.arange(n), widths_orig))  # stored order: by width, then column
    inv = np.empty(n, np.int64)
    inv[order] = np.arange(n)
    used = dense + stored_bits(excl)
    if config.fill_outliers and used < budget:
        cand = np.argsort(-score.reshape(-1), kind="stable")
        cand = cand[score.reshape(-1)[cand] > 0]
        extra = min((budget - used) // 32, cand.size)
        while extra > 0:
            trial = excl.copy()
            trial.reshape(-1)[cand[:extra]] = True
            tb = dense + stored_bits(trial)
            if tb <= budget:
                excl = trial
                used = tb
                break
            extra -= max(1, (tb - budget + 31) // 32)
    if used > budget:  # skip entries pushed it over: drop the outliers of least error
        sc = np.where(excl, err * hdiag[:, None], np.inf)
        drop = np.argsort(sc.reshape(-1), kind="stable")
        k = 0
        while used > budget and k < drop.size and excl.reshape(-1)[drop[k]]:
            step = max(1, (used - budget + 31) // 32)
            excl.reshape(-1)[drop[k : k + step]] = False
            k += step
            used = dense + stored_bits(excl)

    # 7. GPTQ: the same widths and outliers, tables and codes solved with error feedback
    recon = None
    if config.solver == "gptq":
        h = hessian if isinstance(hessian, np.ndarray) else np.asarray(hessian)
        tab, codes, recon = _solve_gptq(wt, h, excl, ew, widths_orig, config, name)

    # assemble the logical tensor in stored order
    widths_st = widths_orig[order].astype(np.uint8)
    codes_st = np.ascontiguousarray(codes[order].T)  # [m, n]
    tables = np.stack(
        [np.concatenate([tb[j, : 1 << int(widths_orig[j])] for j in order]) for tb in tab]
    )
    r, c = positions(excl)
    cs = inv[c]
    o = np.lexsort((cs, r))
    r, c, cs = r[o], c[o], cs[o]
    # outliers keep the value their column had when it was quantized (GPTQ: error-updated)
    vals = (w[r, c] if recon is None else recon[c, r]).astype(np.float16)
    outl = Outliers(r.astype(np.uint32), cs.astype(np.uint32), vals) if r.size else None
    t = cm.ChannelMixedTensor(
        shape=(m, n),
        widths=widths_st,
        perm=order.astype(np.uint32),
        codes=codes_st,
        tables=tables.astype(np.float16),
        outliers=outl,
        dtype=dtype,
        table_rows=rows,
    )
    report = {
        "target_bits": config.target_bits,
        "allocator": config.allocator,
        "solver": config.solver,
        "table_rows": rows,
        "width_counts": {str(b): c_ for b, c_ in zip(cm.WIDTHS, counts, strict=False) if c_},
        "activation_outliers": int(act.size),
        "sensitive_outliers": int(sens.size),
        "fill_outliers": int(r.size - act.size - sens.size),
        "counted_bits": int(used),
    }
    return t, report


def encode_cmpq_tensor(
    weight: np.ndarray,
    config: CmpqConfig,
    hessian: np.ndarray | None,
    name: str | None = None,
    *,
    dtype: DType | None = None,
) -> tuple[cm.ChannelMixedTensor, dict]:
    """:func:`encode_cmpq` with the per-tensor report every encoder writes (the keys of
    ``presets.encode_tensor``'s report, measured on the packed tensor, plus the allocation)."""
    from spqr_format.codec.channel_mixed_ref import decode_channel_mixed_f32
    from spqr_format.codec.presets import relative_output_error

    w = np.asarray(weight, dtype=np.float32)
    if dtype is None:
        dtype = DType.FLOAT16 if getattr(weight, "dtype", None) == np.float16 else DType.FLOAT32
    t, alloc = encode_cmpq(w, hessian, config, name=name, dtype=dtype)
    packed = cm.pack(t)
    q = decode_channel_mixed_f32(packed, validate=False)
    d = q - w
    wn = float(np.sqrt(np.einsum("ij,ij->", w, w, dtype=np.float64)))
    dn = float(np.sqrt(np.einsum("ij,ij->", d, d, dtype=np.float64)))
    k = len(t.outliers) if t.outliers is not None else 0
    report = {
        "method": "cmpq",
        "preset": config.preset,
        "fallback": False,
        "warning": None,
        "shape": list(t.shape),
        "bits_per_weight": cm.bits_per_weight(packed),
        "outliers": k,
        "outlier_percent": 100.0 * k / (t.shape[0] * t.shape[1]),
        "relative_weight_error": dn / wn if wn > 0 else (0.0 if dn == 0 else math.inf),
        "relative_output_error": relative_output_error(w, q, hessian),
        **alloc,
    }
    return t, report
