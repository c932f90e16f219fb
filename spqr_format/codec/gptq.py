"""GPTQ solver with SpQR's bilevel statistics and outliers (CPU reference: numpy + numba).

Notation: ``W[m, n]`` (rows = outputs), ``H[n, n]`` the layer Hessian, ``U`` the upper Cholesky
factor of ``H^-1`` (``H^-1 = U^T U``), ``d = diag(U)``. Columns are processed in (possibly
permuted) order; quantizing column ``c`` to ``Q[:, c]`` leaves the error ``e = (W - Q)[:, c] / d_c``
which is fed back into the later columns, ``W[:, c+1:] -= e U[c, c+1:]`` (GPTQ). Updates are
lazy: inside a block of ``block_size`` columns they are applied per column (numba, row-parallel),
to the rest of the matrix once per block as one GEMM.

Statistics of a group of ``g`` columns are fitted on the *current* (error-compensated) weights
when the solver reaches the group's first column, then quantized (fp16 or bilevel) with the
shared :mod:`quantizer`, and every code is chosen against the exact decoded statistics, so the
solver's reconstruction is bit-identical to the decoder's (SPEC C-7).

SpQR outliers (``outlier_threshold = tau``): ``T = tau * mean_j(Var_i W[i, j] / d_j^2)``
(SpQR's layer-relative scale, computed after permutation and dead-column handling).

1. At each group start a leave-one-out estimate marks *suspects*: for every row and position
   ``k``, the Hessian-weighted error of a plain ``b``-bit min-max fit of the group is compared
   with the error of a fit without weight ``k`` (weight ``k`` then costs nothing); a reduction
   above ``T`` marks a suspect. Statistics are fitted without suspects.
2. The final test is per column: weights whose normalised error ``((w - q) / d_c)^2`` exceeds
   ``T`` become fp16 outliers holding the current error-compensated weight; the stored dense
   code there is the code nearest that value (SPEC section 6). The error fed back for an outlier
   is only its fp16 rounding.

``outlier_budget = p`` (a fraction) caps the outliers at ``floor(p * m * n)``; the cap is spent
group by group (at most ``floor(p * m * e)`` outliers in the columns before the group's end ``e``,
taking the largest normalised errors first; leave-one-out suspects are limited to the same
allowance), so one pass suffices. With a budget and no ``tau`` every
column spends its share on its largest errors.

Differences from SpQR's reference code, on purpose: statistics are stored and used in fp16 (the
format's), not fp32; codes are chosen after statistics are quantized; the dense code under an
outlier is the nearest code, not the code of 0; LOO uses the same degenerate-group rule as the
real fit.
"""

from __future__ import annotations

import math
import os
import time
import warnings

import numba
import numpy as np

from spqr_format.codec.bilevel import BilevelTensor, Outliers
from spqr_format.codec.hessian import check_hessian
from spqr_format.codec.quantizer import (
    STATS_SEARCHES,
    ZERO_LIMIT,
    check_params,
    check_weight,
    clipped_stats,
    code_scalar,
    f16_round_scalar,
    minmax_stats,
    quantize_stats,
    refine_second_level,
)
from spqr_format.codec.rtn import select_top
from spqr_format.errors import BadInputError
from spqr_format.spec import DType

PERM_ORDERS = ("identity", "act_order")
OUTLIER_SELECTS = ("column", "impact")
# stats_search "mse" with bilevel statistics also picks the second-level codes by error
# (quantizer.refine_second_level); SPQR_REFINE2=0 turns that off for measurements.
_REFINE2 = os.environ.get("SPQR_REFINE2", "1") != "0"
# Columns a numba kernel call handles before its errors go to the rest of the block by GEMM
# (two-level lazy updates); 0 = numba updates the whole block itself, BLAS is then called only
# once per block. SPQR_GPTQ_SEGMENT overrides it for benchmarking.
_SEGMENT = int(os.environ.get("SPQR_GPTQ_SEGMENT", "32"))
# numba threads during the solve. OpenBLAS worker threads spin for a while after every call, so
# numba threads started between BLAS calls fight them for the cores: measured on 2 pinned cores
# (4096^2 spqr-3bit), 1 numba thread + 2 BLAS threads takes 4.1 s, 2 + 2 takes 5.5-6.9 s.
# SPQR_GPTQ_NUMBA_THREADS overrides it (capped at numba's configured maximum).
_NUMBA_THREADS = int(os.environ.get("SPQR_GPTQ_NUMBA_THREADS", "1"))


@numba.njit(cache=True, parallel=True)
def _solve_rows(wb, eb, ub, d, j0, j1, kend, s, z, maxq, thr, col0, codes, omask):  # noqa: E501  # pragma: no cover
    """Quantize block-local columns ``j0..j1`` of ``wb`` (all sharing statistics ``s, z``).

    ``wb[m, B]`` current block weights (column ``j`` is overwritten with its reconstruction),
    ``eb[m, B]`` normalised errors out, ``ub[B, B]`` the block of ``U``, ``d`` its diagonal,
    ``thr`` the outlier threshold (inf = off), ``col0`` the global index of block column 0.
    Rows are independent here, so each thread runs whole rows: one parallel region per call
    (per-column regions stall badly when the cores are shared). Columns ``< kend`` get the
    per-column updates; the caller applies the errors to columns ``>= kend`` as a GEMM.
    """
    m, B = wb.shape
    for i in numba.prange(m):
        si = s[i]
        zi = z[i]
        for j in range(j0, j1):
            x = wb[i, j]
            q = code_scalar(x, si, zi, maxq)
            v = si * (np.float32(q) - zi)
            r = (x - v) / d[j]
            if r * r > thr:
                omask[i, col0 + j] = True
                v = f16_round_scalar(x)
                q = code_scalar(v, si, zi, maxq)
            codes[i, col0 + j] = q
            wb[i, j] = v
            e = (x - v) / d[j]
            eb[i, j] = e
            for k in range(j + 1, kend):
                wb[i, k] -= e * ub[j, k]


@numba.njit(cache=True)
def _solve_columns(
    wb, eb, ub, d, j0, j1, kend, s, z, maxq, thr, cap, col0, used, codes, omask, ne2, qb, vb
):  # pragma: no cover - compiled
    """:func:`_solve_rows` under an outlier budget (serial: columns couple the rows).

    ``cap``: the most outliers allowed in total up to the end of this group; ``used``: outliers
    so far (budget-mode suspects are pre-marked in ``omask`` and already counted). Each column
    takes its largest normalised errors above ``thr`` while the cap allows. Returns ``used``.
    """
    m, B = wb.shape
    for j in range(j0, j1):
        dj = d[j]
        gj = col0 + j
        for i in range(m):
            x = wb[i, j]
            q = code_scalar(x, s[i], z[i], maxq)
            v = s[i] * (np.float32(q) - z[i])
            r = (x - v) / dj
            ne2[i] = r * r
            qb[i] = q
            vb[i] = v
        cnt = 0
        for i in range(m):
            if ne2[i] > thr and not omask[i, gj]:
                cnt += 1
        allowed = min(cnt, max(cap - used, 0))
        if allowed == cnt:
            for i in range(m):
                if ne2[i] > thr:
                    omask[i, gj] = True
        elif allowed > 0:
            cand = np.empty(cnt, dtype=np.int64)
            c = 0
            for i in range(m):
                if ne2[i] > thr and not omask[i, gj]:
                    cand[c] = i
                    c += 1
            key = np.empty(cnt, dtype=np.float32)
            for c in range(cnt):
                key[c] = -ne2[cand[c]]
            order = np.argsort(key, kind="mergesort")  # stable: ties by row
            for c in range(allowed):
                omask[cand[order[c]], gj] = True
        used += allowed
        for i in range(m):
            x = wb[i, j]
            if omask[i, gj]:
                v = f16_round_scalar(x)
                q = code_scalar(v, s[i], z[i], maxq)
            else:
                v = vb[i]
                q = qb[i]
            codes[i, gj] = q
            wb[i, j] = v
            e = (x - v) / dj
            eb[i, j] = e
            for k in range(j + 1, kend):
                wb[i, k] -= e * ub[j, k]
    return used


@numba.njit(cache=True, parallel=True)
def _loo_scores(w, d, maxq, errs):  # pragma: no cover - compiled
    """SpQR's leave-one-out outlier estimate for one group ``w[m, g]`` with ``d[g]``.

    For each weight: the drop in Hessian-weighted squared error of a plain min-max fit of the
    row's group when the weight is left out of the fit (and costs nothing). ``errs[m, g]`` is
    scratch (allocating inside the parallel loop is slow).
    """
    m, g = w.shape
    out = np.zeros((m, g), dtype=np.float64)
    if g < 2:
        return out
    fq = np.float32(maxq)
    for i in numba.prange(m):
        # Smallest two and largest two values: the fit without k uses the others' extremes.
        lo1 = np.inf
        lo2 = np.inf
        hi1 = -np.inf
        hi2 = -np.inf
        ilo = 0
        ihi = 0
        for j in range(g):
            x = np.float64(w[i, j])
            if x < lo1:
                lo2 = lo1
                lo1 = x
                ilo = j
            elif x < lo2:
                lo2 = x
            if x > hi1:
                hi2 = hi1
                hi1 = x
                ihi = j
            elif x > hi2:
                hi2 = x
        base = 0.0
        if hi1 > lo1:
            s = (hi1 - lo1) / fq
            z = -lo1 / s
            for j in range(g):
                x = np.float64(w[i, j])
                q = min(max(np.floor(x / s + z + 0.5), 0.0), fq)
                r = (s * (q - z) - x) / d[j]
                errs[i, j] = r * r
                base += r * r
        else:
            for j in range(g):
                errs[i, j] = 0.0
        for k in range(g):
            lo = lo2 if k == ilo else lo1
            hi = hi2 if k == ihi else hi1
            if not (hi > lo):
                loo = 0.0
            elif lo == lo1 and hi == hi1:
                loo = base - errs[i, k]  # same fit: only k's own error disappears
            else:
                s = (hi - lo) / fq
                z = -lo / s
                loo = 0.0
                for j in range(g):
                    if j != k:
                        x = np.float64(w[i, j])
                        q = min(max(np.floor(x / s + z + 0.5), 0.0), fq)
                        r = (s * (q - z) - x) / d[j]
                        loo += r * r
            out[i, k] = base - loo
    return out


def _cap(budget: float, m: int, n: int, end: int) -> int:
    """Outliers allowed in columns ``0..end-1`` under a budget (a fraction of all weights).

    Spent group by group in proportion to the columns reached, so the whole tensor never
    exceeds ``floor(budget * m * n)`` and early groups cannot starve later ones.
    """
    return int(math.floor(budget * m * end + 1e-9))


def _upper_inverse_factor(build_rev, n: int, mean_diag: float, name: str | None,
                          stacklevel: int = 3):  # fmt: skip
    """``U`` (upper, ``U^T U = H^-1``, float64 view) and the extra damping that was needed.

    ``build_rev()`` returns a fresh C-order float64 ``J H J`` (``J`` the reversal) that may be
    overwritten. With ``J H J = L L^T``, ``H = M M^T`` for the upper ``M = J L J``, so
    ``H^-1 = M^-T M^-1`` and ``U = M^-1 = J L^-1 J``: one Cholesky and one triangular inverse,
    both in place in one n x n buffer (GPTQ's cholesky, cholesky_inverse, cholesky takes three
    n^3 steps and three buffers). LAPACK reads one triangle only, so an H that is symmetric only
    to rounding is used as exactly symmetric. If H is not positive definite, extra damping grows
    tenfold from 1e-6 of the mean diagonal, with a warning.
    """
    try:
        from scipy.linalg import lapack
    except ImportError:  # pragma: no cover - scipy is optional
        lapack = None
    mean_diag = mean_diag or 1.0
    extra = 0.0
    for _attempt in range(14):
        rev = build_rev()
        if extra:
            rev[np.diag_indices(n)] += extra
        if lapack is not None:
            # rev.T is the Fortran view of the same buffer: the upper factor R of rev^T = rev is
            # written in place, and seen back in C order it is L = R^T.
            r, info = lapack.dpotrf(rev.T, lower=0, clean=1, overwrite_a=1)
            ok = info == 0
        else:  # pragma: no cover
            try:
                r = np.linalg.cholesky(rev).T
                ok = True
            except np.linalg.LinAlgError:
                ok = False
        if ok:
            break
        del rev
        extra = mean_diag * 1e-6 if extra == 0 else extra * 10
    else:
        raise BadInputError("Hessian is not positive definite even after damping", tensor=name)
    if extra:
        warnings.warn(
            f"Hessian of {name or 'tensor'} is not positive definite; added damping "
            f"{extra / mean_diag:.3g} x mean diagonal",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    if lapack is not None:
        rinv, info = lapack.dtrtri(r, lower=0, overwrite_c=1)
        if info != 0:  # pragma: no cover - a Cholesky factor has a positive diagonal
            raise BadInputError("triangular inverse failed", tensor=name)
    else:  # pragma: no cover
        rinv = np.linalg.inv(r)
    return rinv.T[::-1, ::-1], extra  # L^-1 = (R^-1)^T, then U = J L^-1 J


def inverse_cholesky_upper(h: np.ndarray, *, name: str | None = None) -> tuple[np.ndarray, float]:
    """Upper ``U`` with ``U^T U = h^-1`` (float64) and the extra damping used (see above)."""
    n = h.shape[0]
    return _upper_inverse_factor(
        lambda: np.array(h[::-1, ::-1], dtype=np.float64, order="C"),
        n,
        float(np.mean(np.diagonal(h))),
        name,
    )


def damped_inverse_factor(hs: np.ndarray, perm: np.ndarray | None, percdamp: float,
                          name: str | None = None):  # fmt: skip
    """GPTQ's factor of a checked Hessian ``hs``, in the solve order ``perm`` (None: identity).

    ``P^T H P`` gets ``percdamp * mean(diag H)`` added to its diagonal, and every dead column
    (``diag H == 0``) a diagonal of 1 (so it neither receives nor sends error feedback); returns
    ``(U, dead, damp, extra)``: ``U`` upper with ``U^T U`` the inverse of that matrix (float64,
    :func:`_upper_inverse_factor`), ``dead`` (bool, permuted order), the damping added and the
    extra damping a non-positive-definite Hessian needed."""
    n = hs.shape[0]
    diag = np.diagonal(hs).astype(np.float64)
    if perm is not None:
        diag = diag[perm]
    dead = diag == 0
    damp = percdamp * float(np.mean(diag))
    rev_dead = np.flatnonzero(dead[::-1])

    def build_rev() -> np.ndarray:
        # J P^T H P J in one gather (P the permutation, J the reversal), damped, dead -> 1.
        if perm is None:
            rev = np.array(hs[::-1, ::-1], dtype=np.float64, order="C")
        else:
            ro = perm[::-1]
            rev = hs[np.ix_(ro, ro)]
            if rev.dtype != np.float64:
                rev = rev.astype(np.float64)
        rev[np.diag_indices(n)] += damp
        rev[rev_dead, rev_dead] = 1.0
        return rev

    u64, extra = _upper_inverse_factor(build_rev, n, float(np.mean(diag)), name, stacklevel=4)
    return u64, dead, damp, extra


def check_options(
    bits, group_size, stats_bits, stats_group_size, perm_order, percdamp, block_size,
    outlier_threshold, outlier_budget, dtype, name,
):  # fmt: skip
    """Validate the solver's options (shared by this solver and :mod:`gptq_torch`).

    Returns ``(params, tau, budget, dtype)`` with the normalisations of :func:`encode_gptq`:
    ``tau = inf`` means no threshold, ``budget == 0`` turns outliers off.
    """
    params = check_params(bits, group_size, stats_bits, stats_group_size, name)
    if perm_order not in PERM_ORDERS:
        raise BadInputError(
            f"perm_order must be one of {PERM_ORDERS}, got {perm_order!r}", tensor=name
        )
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise BadInputError(f"percdamp must be finite and >= 0, got {percdamp!r}", tensor=name)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise BadInputError(
            f"block_size must be a positive integer, got {block_size!r}", tensor=name
        )
    tau = outlier_threshold
    if tau is not None and (not isinstance(tau, (int, float)) or not tau > 0 or math.isnan(tau)):
        raise BadInputError(f"outlier_threshold must be > 0, got {tau!r}", tensor=name)
    if tau is not None and math.isinf(tau):
        tau = None
    budget = outlier_budget
    if budget is not None and (not isinstance(budget, (int, float)) or not 0 <= budget < 1):
        raise BadInputError(f"outlier_budget must be in [0, 1), got {budget!r}", tensor=name)
    if budget == 0:
        tau, budget = None, None
    try:
        dtype = DType(dtype)
    except ValueError:
        raise BadInputError(f"unknown dtype {dtype!r}", tensor=name) from None
    return params, tau, budget, dtype


def encode_gptq(
    weight: np.ndarray,
    hessian: np.ndarray,
    *,
    bits: int,
    group_size: int,
    stats_bits: int = 0,
    stats_group_size: int = 0,
    perm_order: str = "identity",
    percdamp: float = 0.01,
    block_size: int = 128,
    outlier_threshold: float | None = None,
    outlier_budget: float | None = None,
    leave_one_out: bool = True,
    stats_search: str = "minmax",
    outlier_select: str = "column",
    dtype: DType = DType.FLOAT16,
    name: str | None = None,
    info: dict | None = None,
) -> BilevelTensor:
    """GPTQ / SpQR encoding of ``weight[m, n]`` with Hessian ``hessian[n, n]``.

    ``perm_order``: ``identity`` or ``act_order`` (descending ``diag(H)``; stored as ``perm``).
    ``percdamp``: damping added to the diagonal, relative to its mean (SpQR uses 1.0).
    ``outlier_threshold``: SpQR's tau (None = no outliers); ``outlier_budget``: cap as a fraction
    of weights; ``leave_one_out``: fit statistics without LOO suspects (SpQR's default).
    ``stats_search``: ``minmax`` (SpQR) or ``mse`` (clipping grid minimising the GPTQ-weighted
    error of each group, :func:`~spqr_format.codec.quantizer.clipped_stats`).
    ``outlier_select``: ``column`` (the rules above) or ``impact``: with a budget and no tau, the
    threshold is the budget's quantile of the leave-one-out error reductions of the input
    weights, so the budget goes to the weights whose removal lowers the layer's error most.
    ``info``, if given, receives timings per stage and solver facts (damping, dead columns).
    """
    t_start = time.perf_counter()
    w = check_weight(weight, name)
    m, n = w.shape
    params, tau, budget, dtype = check_options(
        bits, group_size, stats_bits, stats_group_size, perm_order, percdamp, block_size,
        outlier_threshold, outlier_budget, dtype, name,
    )  # fmt: skip
    if stats_search not in STATS_SEARCHES:
        raise BadInputError(
            f"stats_search must be one of {STATS_SEARCHES}, got {stats_search!r}", tensor=name
        )
    if outlier_select not in OUTLIER_SELECTS:
        raise BadInputError(
            f"outlier_select must be one of {OUTLIER_SELECTS}, got {outlier_select!r}", tensor=name
        )
    if outlier_select == "impact" and tau is not None:
        raise BadInputError(
            "outlier_select 'impact' sets its own threshold from outlier_budget; "
            "outlier_threshold must be None",
            tensor=name,
        )
    hs = check_hessian(hessian, n, name=name)  # not copied: only read below
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    times["validate"] = t0 - t_start

    perm = None
    if perm_order == "act_order":
        perm = np.argsort(-np.diagonal(hs), kind="stable")
        w = np.ascontiguousarray(w[:, perm])
    t1 = time.perf_counter()
    times["permute"] = t1 - t0
    u64, dead, damp, extra = damped_inverse_factor(hs, perm, percdamp, name)
    w[:, dead] = 0.0
    u = np.ascontiguousarray(u64, dtype=np.float32)
    d64 = np.diagonal(u64).copy()
    del u64
    t2 = time.perf_counter()
    times["cholesky"] = t2 - t1

    prev_threads = numba.get_num_threads()
    numba.set_num_threads(max(1, min(_NUMBA_THREADS, numba.config.NUMBA_NUM_THREADS)))
    try:
        t, thr = _solve(
            w, u, d64, params, perm, tau, budget, leave_one_out, block_size, dtype, times,
            stats_search, outlier_select,
        )  # fmt: skip
    finally:
        numba.set_num_threads(prev_threads)
    t3 = time.perf_counter()
    times["solve"] = t3 - t2
    times["total"] = t3 - t_start
    if info is not None:
        info.update(
            times=times,
            damping=damp,
            extra_damping=extra,
            dead_columns=int(dead.sum()),
            outlier_threshold=None if not math.isfinite(thr) else thr,
            zero_limit=ZERO_LIMIT,
        )
        # The solver's reconstruction (permuted column order), identical to the decoded tensor.
        info["reconstruction_permuted"] = w
    return t


def _impact_threshold(w, d64, maxq, g, budget) -> float:
    """The ``floor(budget * m * n)``-th largest leave-one-out error reduction of ``w`` (min-max
    groups of ``g`` columns, errors normalised by ``d``): the outlier threshold that spends the
    budget on the weights of most impact (measured before the solve, on the input weights;
    estimated from a sample of rows on large layers)."""
    m, n = w.shape
    k = int(math.floor(budget * m * n + 1e-9))
    if k <= 0:
        return np.inf
    # A quantile needs no census: at most ~2^20 scores, from evenly spaced rows (all columns,
    # so the few hot columns that take most outliers are always seen).
    stride = max(1, (m * n) >> 20)
    rows = np.arange(0, m, stride)
    ws = w[rows] if stride > 1 else w
    ms = len(rows)
    scores = np.empty((ms, n), np.float32)
    scratch = np.empty((ms, g))
    for c0 in range(0, n, g):
        c1 = min(c0 + g, n)
        scores[:, c0:c1] = _loo_scores(
            np.ascontiguousarray(ws[:, c0:c1]), d64[c0:c1], maxq, scratch[:, : c1 - c0]
        )
    flat = scores.ravel()
    ks = max(1, int(round(k * flat.size / (m * n))))
    kth = float(np.partition(flat, flat.size - ks)[flat.size - ks])
    # Errors of exactly representable weights (0) never need an outlier.
    return max(kth, float(np.finfo(np.float32).tiny))


def _solve(
    w, u, d64, params, perm, tau, budget, leave_one_out, block_size, dtype, times,
    stats_search="minmax", outlier_select="column",
):  # fmt: skip
    """The column loop of :func:`encode_gptq` (``w`` permuted, dead columns zeroed, in place)."""
    m, n = w.shape
    thr = np.inf
    use_loo = leave_one_out and tau is not None
    if outlier_select == "impact" and budget is not None:
        ti = time.perf_counter()
        thr = _impact_threshold(w, d64, (1 << params.bits) - 1, params.group_size, budget)
        use_loo = leave_one_out
        times["impact"] = time.perf_counter() - ti
    elif tau is not None:
        var = np.zeros(n)
        if m > 1:  # in column chunks: no m x n float64 temporary
            for c0 in range(0, n, 256):
                var[c0 : c0 + 256] = w[:, c0 : c0 + 256].astype(np.float64).var(axis=0, ddof=1)
        scale = float(np.mean(var / d64**2))
        # A layer whose columns have no variance (identical rows) gives no scale to measure
        # errors against: tau * 0 would make every imperfect weight an outlier.
        thr = float(tau * scale) if scale > 0 else np.inf
    elif budget is not None:
        thr = 0.0
    # Under "impact" the threshold already spends the budget where it matters (often a few hot
    # columns): the cap is the whole budget from the first column on, not a share per group.
    whole_cap = outlier_select == "impact"
    wt_all = 1.0 / d64**2 if stats_search == "mse" else None
    refine2 = _REFINE2
    maxq = (1 << params.bits) - 1
    g = params.group_size
    G = -(-n // g)
    codes = np.zeros((m, n), dtype=np.uint8)
    omask = np.zeros((m, n), dtype=np.bool_)
    sb = params.stats_bits
    stats = np.zeros((m, G, 2), dtype=np.float16 if sb == 0 else np.uint8)
    stats2 = None if sb == 0 else np.zeros((-(-m // params.stats_group_size), G, 4), np.float16)
    ne2 = np.empty(m, np.float32)
    qb = np.empty(m, np.int64)
    vb = np.empty(m, np.float32)
    d32 = d64.astype(np.float32)
    used = 0
    t_loo = t_stats = t_cols = t_gemm = 0.0
    s_cur = z_cur = None
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        wb = np.ascontiguousarray(w[:, b0:b1])
        eb = np.zeros_like(wb)
        ub = np.ascontiguousarray(u[b0:b1, b0:b1])
        j = b0
        while j < b1:
            if j % g == 0:  # a group starts: fit its statistics on the current weights
                ta = time.perf_counter()
                ge = min(j + g, n)
                cur = np.empty((m, ge - j), np.float32)
                inb = min(ge, b1)
                cur[:, : inb - j] = wb[:, j - b0 : inb - b0]
                if ge > b1:  # columns past the block still owe this block's pending updates
                    cur[:, b1 - j :] = w[:, b1:ge] - eb[:, : j - b0] @ u[b0:j, b1:ge]
                keep = None
                if use_loo:
                    tl = time.perf_counter()
                    score = _loo_scores(cur, d64[j:ge], maxq, np.empty(cur.shape))
                    sus = score > thr
                    if budget is not None:
                        # Under a budget, suspects become outliers outright (a suspect left out
                        # of the fit but refused as an outlier would be clamped badly), so
                        # they are limited to the allowance left at the group's end.
                        left = max(_cap(budget, m, n, n if whole_cap else ge) - used, 0)
                        if int(sus.sum()) > left:
                            sus = select_top(np.where(sus, score, -np.inf), left)
                        omask[:, j:ge] = sus
                        used += int(sus.sum())
                    keep = ~sus
                    t_loo += time.perf_counter() - tl
                if wt_all is not None:
                    s1, z1 = clipped_stats(cur, params.bits, wt_all[j:ge], mask=keep)
                else:
                    s1, z1 = minmax_stats(cur, params.bits, mask=keep)
                qs = quantize_stats(s1[:, None], z1[:, None], params)
                if wt_all is not None and refine2:
                    qs = refine_second_level(cur, qs, params, wt_all[j:ge], keep)
                k = j // g
                stats[:, k, :] = qs.stats[:, 0, :]
                if stats2 is not None:
                    stats2[:, k, :] = qs.stats2[:, 0, :]
                s_cur = np.ascontiguousarray(qs.scale[:, 0])
                z_cur = np.ascontiguousarray(qs.zero[:, 0])
                t_stats += time.perf_counter() - ta
            # Segments of at most _SEGMENT columns: per-column updates stay inside the segment
            # (numba), the rest of the block gets them as one GEMM (BLAS), two-level lazy.
            je = min(b1, (j // g + 1) * g, j + _SEGMENT) if _SEGMENT else min(b1, (j // g + 1) * g)
            kend = je - b0 if _SEGMENT else b1 - b0
            tc = time.perf_counter()
            if budget is None:
                _solve_rows(
                    wb, eb, ub, d32[b0:b1], j - b0, je - b0, kend, s_cur, z_cur, maxq, thr, b0,
                    codes, omask,
                )  # fmt: skip
            else:
                cap = _cap(budget, m, n, n if whole_cap else min(j // g * g + g, n))
                used = _solve_columns(
                    wb, eb, ub, d32[b0:b1], j - b0, je - b0, kend, s_cur, z_cur, maxq, thr,
                    cap, b0, used, codes, omask, ne2, qb, vb,
                )  # fmt: skip
            if kend < b1 - b0:
                wb[:, je - b0 :] -= eb[:, j - b0 : je - b0] @ ub[j - b0 : je - b0, je - b0 :]
            t_cols += time.perf_counter() - tc
            j = je
        w[:, b0:b1] = wb
        tg = time.perf_counter()
        # Lazy update of the rest, in column chunks to bound the temporary (m x 1024 f32).
        for c0 in range(b1, n, 1024):
            c1 = min(c0 + 1024, n)
            w[:, c0:c1] -= eb @ u[b0:b1, c0:c1]
        t_gemm += time.perf_counter() - tg
    times.update(loo=t_loo, stats=t_stats - t_loo, columns=t_cols, gemm=t_gemm)
    outliers = None
    if omask.any():
        rows, cols = np.nonzero(omask)
        outliers = Outliers(
            rows=rows.astype(np.uint32),
            cols=cols.astype(np.uint32),
            values=w[rows, cols].astype(np.float16),
        )
    t = BilevelTensor(
        shape=(m, n),
        params=params,
        codes=codes,
        stats=stats,
        stats2=stats2,
        perm=None if perm is None else perm.astype(np.uint32),
        outliers=outliers,
        dtype=dtype,
    )
    return t, thr
