"""GPTQ / SpQR solver in PyTorch: the algorithm of :mod:`gptq` on any torch device (GPU encoder).

The same solver as the numba reference (:func:`spqr_format.codec.gptq.encode_gptq`), returning
the same :class:`BilevelTensor`, so packing, writing and decoding are unchanged; only where the
arithmetic runs differs. Semantics kept from the reference (see its module doc):

- damping ``percdamp * mean(diag H)``, dead columns (``diag H == 0``: weights zeroed, diagonal
  set to 1), ``act_order`` (descending ``diag H``, stable), more damping with a warning when the
  Hessian is not positive definite;
- ``U`` the upper factor of ``H^-1`` from one float64 Cholesky of the reversed Hessian and one
  triangular inverse; the column solve runs in float32 with blocked lazy updates (per column
  inside a group's segment, one GEMM for the rest of the block, one GEMM per block for the rest
  of the matrix);
- per-group min-max statistics fitted on the current error-compensated weights, quantized to
  fp16 or bilevel exactly as :mod:`quantizer` does (same f32/f64 operations, so the stored
  statistics match the reference's for the same weights), and every weight's value is the
  *decoded* value of its nearest code, so the solver's reconstruction is what the normative
  decoder returns (bit for bit);
- SpQR outliers: ``T = tau * mean_j(Var_i W[i, j] / d_j^2)``, leave-one-out suspects at each
  group start (vectorised over rows and positions: only the row's minimum and maximum change
  the fit when left out), the per-column test ``((w - q) / d)^2 > T``, outliers stored as the
  fp16 of the current weight with the nearest dense code under them, the budget spent group by
  group (suspects first, then each column's largest errors, ties by row).

Not guaranteed bit-identical to the numba path (float32 GEMMs and sums in another order; on
torch's CPU the small test problems do come out identical), so a GPTQ decision can flip and
propagate; the layer output error ``tr((W-Q) H (W-Q)^T)`` stays within 2 % of the reference
(tests/test_gptq_torch.py).

GPU-minded: weights are kept transposed (``WT[n, m]``: a column is one contiguous vector), every
step works on all rows at once, nothing inside the column loop synchronises with the host (the
outlier budget is counted on the device), statistics for a group are a handful of vector ops.
The two steps that repeat (a group's fit, a segment's column solve) work on static buffers, so
on CUDA each is captured once per layer and width as a CUDA graph and replayed: one launch
instead of a few hundred small kernels (``SPQR_GPTQ_CUDA_GRAPHS=0`` runs them eagerly; the
result is the same).

torch is imported lazily (an optional extra): importing this module does not need it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings

import numpy as np

from spqr_format.codec.bilevel import BilevelTensor, Outliers
from spqr_format.codec.gptq import _cap, check_options
from spqr_format.codec.hessian import check_hessian, check_hessian_facts
from spqr_format.codec.quantizer import F16_MAX, ZERO_LIMIT, check_weight
from spqr_format.errors import BadInputError
from spqr_format.spec import DType

INSTALL_HINT = "pip install 'spqr-format[torch]'"
# Capture the solver's repeated steps as CUDA graphs (SPQR_GPTQ_CUDA_GRAPHS=0: eager kernels;
# the results are identical, only the launch overhead differs).
CUDA_GRAPHS = os.environ.get("SPQR_GPTQ_CUDA_GRAPHS", "1") != "0"
IMPLEMENTATION = "spqr_format.codec.gptq_torch"


def require_torch():
    try:
        import torch
    except ImportError:
        raise BadInputError(f"the torch encoder needs PyTorch ({INSTALL_HINT})") from None
    return torch


def resolve_device(device=None, like=None):
    """A ``torch.device`` for ``device`` (default: ``like``'s device if it is a tensor, else
    cpu). ``cuda`` without a usable GPU is a :class:`BadInputError` (one clear line)."""
    torch = require_torch()
    if device is None:
        device = like.device if isinstance(like, torch.Tensor) else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BadInputError(f"unknown device {device!r} (expected cpu or cuda[:N])") from None
    if dev.type not in ("cpu", "cuda"):
        raise BadInputError(f"unknown device {device!r} (expected cpu or cuda[:N])")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(
                f"--device {device}: CUDA is not available (torch {torch.__version__}, "
                f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'})",
                field="device",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadInputError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible",
                field="device",
            )
    return dev


@contextlib.contextmanager
def _ieee_float32(torch):
    """float32 GEMMs in full precision (no TF32) while the solver runs; restored afterwards."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def _sync(torch, dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _f32_floor(x: float) -> float:
    """The largest float32 <= ``x`` (inf stays inf): comparing a float32 tensor with it gives
    exactly ``value > x`` of the float64 comparison the reference makes."""
    if not math.isfinite(x):
        return x
    f = np.float32(x)
    if float(f) > x:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


# -- inputs --------------------------------------------------------------------------------


def _weight_on(torch, weight, dev, name):
    """The weight as a float32 ``[m, n]`` tensor on ``dev`` (always a copy), checked as
    :func:`quantizer.check_weight` checks numpy weights."""
    if isinstance(weight, np.ndarray):
        return torch.from_numpy(check_weight(weight, name)).to(dev)
    if not isinstance(weight, torch.Tensor):
        raise BadInputError(
            f"weight must be a numpy array or torch tensor, got {type(weight).__name__}",
            tensor=name,
        )
    if weight.ndim != 2:
        raise BadInputError(f"weight must be 2-D, got shape {tuple(weight.shape)}", tensor=name)
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise BadInputError(f"weight is empty (shape {tuple(weight.shape)})", tensor=name)
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise BadInputError(
            f"weight dtype must be float16/bfloat16/float32/float64, got {weight.dtype}",
            tensor=name,
        )
    w = weight.detach().to(device=dev, dtype=torch.float32, copy=True).contiguous()
    nonfinite, peak = torch.stack([(~torch.isfinite(w)).sum().float(), w.abs().max()]).tolist()
    if nonfinite:
        bad = tuple(int(i) for i in torch.nonzero(~torch.isfinite(w))[0].tolist())
        raise BadInputError(
            f"weight has {int(nonfinite)} non-finite values (first at {bad})", tensor=name
        )
    if peak > F16_MAX:
        raise BadInputError(
            f"weight magnitude {peak:g} exceeds the fp16 range used for statistics and outliers",
            tensor=name,
        )
    return w


def _hessian_on(torch, h, n, dev, name):
    """The Hessian as a float64 ``[n, n]`` tensor on ``dev`` (not copied when it already is
    one; only read), checked as :func:`hessian.check_hessian` checks numpy Hessians."""
    if isinstance(h, np.ndarray):
        check_hessian(h, n, name=name)
        return torch.from_numpy(np.asarray(h, dtype=np.float64)).to(dev)
    if not isinstance(h, torch.Tensor):
        raise BadInputError(
            f"Hessian must be a numpy array or torch tensor, got {type(h).__name__}", tensor=name
        )
    if tuple(h.shape) != (n, n):
        raise BadInputError(
            f"Hessian shape {tuple(h.shape)} does not match the weight's {n} input columns",
            tensor=name,
        )
    if not h.is_floating_point():
        raise BadInputError(f"Hessian dtype must be floating point, got {h.dtype}", tensor=name)
    h = h.detach().to(device=dev, dtype=torch.float64)
    finite = bool(torch.isfinite(h).all())
    if not finite:
        raise BadInputError("Hessian has non-finite values", tensor=name)
    scale = float(h.abs().max())
    asym = 0.0
    step = max(1, (64 << 20) // (8 * n))
    for i0 in range(0, n, step):
        asym = max(asym, float((h[i0 : i0 + step] - h[:, i0 : i0 + step].T).abs().max()))
    check_hessian_facts(asym, scale, bool((torch.diagonal(h) < 0).any()), name)
    return h


# -- the shared quantizer arithmetic, in torch (mirrors codec/quantizer.py) ---------------


def minmax_stats_t(torch, cur, bits: int, keep=None):
    """:func:`quantizer.minmax_stats` over dim 0 of ``cur[g, m]`` (a group, transposed):
    float32 ``(scale, zero)`` of shape ``[m]``; ``keep`` (same shape) excludes weights."""
    maxq = float((1 << bits) - 1)
    if keep is None:
        lo = cur.amin(0)
        hi = cur.amax(0)
    else:
        lo = torch.where(keep, cur, math.inf).amin(0)
        hi = torch.where(keep, cur, -math.inf).amax(0)
        empty = ~keep.any(0)
        lo = torch.where(empty, 0.0, lo)
        hi = torch.where(empty, 0.0, hi)
    lo = lo.double()
    hi = hi.double()
    deg = hi <= lo
    lo = torch.where(deg, lo.clamp(max=0.0), lo)
    hi = torch.where(deg, hi.clamp(min=0.0), hi)
    rng = hi - lo
    need = torch.maximum(lo.abs(), hi.abs()) * maxq / ZERO_LIMIT
    pad = torch.where(rng < need, (need - rng) / 2.0, 0.0)
    lo = lo - pad
    hi = hi + pad
    rng = hi - lo
    scale = rng / maxq
    pos = scale > 0
    zero = torch.where(pos, -lo / torch.where(pos, scale, 1.0), 0.0)
    scale = scale.clamp(max=F16_MAX)
    return scale.float(), zero.float()


def _f16(x):
    """:func:`quantizer.f16_round` of a float32 tensor."""
    return x.clamp(-F16_MAX, F16_MAX).half()


def nearest_code_t(torch, x, base, step, qmax: int):
    """:func:`quantizer.nearest_code` (float32 decoded values, ties to the lower code)."""
    pos = step > 0
    q0 = torch.round((x - base) / torch.where(pos, step, 1.0))
    q0 = torch.where(pos, q0, 0.0).clamp_(0, qmax)
    best_q = q0
    best_d = ((base + step * q0) - x).abs()
    for off in (-1.0, 1.0):
        q = (q0 + off).clamp_(0, qmax)
        d = ((base + step * q) - x).abs()
        better = (d < best_d) | ((d == best_d) & (q < best_q))
        best_q = torch.where(better, q, best_q)
        best_d = torch.where(better, d, best_d)
    return best_q


def _second_level_t(torch, x, sbits: int, tile: int):
    """:func:`quantizer._second_level` for one group (``x[m]`` float32): codes (float32
    values), step and base (fp16 ``[T]``), and their decoded float32 value per row."""
    m = x.shape[0]
    t = -(-m // tile)
    pad = t * tile - m
    xp = x if pad == 0 else torch.cat([x, x[(t - 1) * tile].expand(pad)])
    xt = xp.view(t, tile)
    lo = xt.amin(1)
    hi = xt.amax(1)
    qmax = float((1 << sbits) - 1)
    base = _f16(lo)
    step = _f16(((hi.double() - lo.double()) / qmax).float())
    base32 = base.float().view(t, 1).expand(t, tile).reshape(-1)[:m]
    step32 = step.float().view(t, 1).expand(t, tile).reshape(-1)[:m]
    codes = nearest_code_t(torch, x, base32, step32, int(qmax))
    # C-7.1 exactly: product rounded to f32, then sum rounded to f32.
    dec = base32 + step32 * codes
    return codes, step, base, dec


def quantize_stats_t(torch, scale, zero, params):
    """:func:`quantizer.quantize_stats` for one group: decoded ``(scale, zero)`` float32
    ``[m]``, the stored statistics ``[m, 2]`` (fp16, or uint8 codes) and the second-level
    record ``[T, 4]`` fp16 (None with fp16 statistics)."""
    if params.stats_bits == 0:
        s16 = _f16(scale)
        z16 = _f16(zero)
        return s16.float(), z16.float(), torch.stack([s16, z16], -1), None
    sb, tile = params.stats_bits, params.stats_group_size
    qs, s_step, s_base, dec_s = _second_level_t(torch, scale, sb, tile)
    qz, z_step, z_base, dec_z = _second_level_t(torch, zero, sb, tile)
    stored = torch.stack([qs, qz], -1).to(torch.uint8)
    return dec_s, dec_z, stored, torch.stack([s_step, s_base, z_step, z_base], -1)


def _choose(torch, x, s, z, a, maxq: int, offs):
    """Nearest code in *decoded* value to each entry of ``x[..., m]`` (row statistics ``s, z``
    ``[m]``, ``a = 1/s`` or 0): the candidates around ``round(x/s + z)``, their decoded f32
    values ``s * (q - z)`` and the index of the nearest (ties to the lower code, as
    :func:`quantizer.code_scalar`). The seed may be one code off; the search corrects it."""
    t = torch.addcmul(z, x, a).clamp_(0, maxq).add_(0.5).floor_()
    cand = (t.unsqueeze(0) + offs).clamp_(0, maxq)
    dec = (cand - z).mul_(s)
    k = (dec - x).abs_().argmin(0, keepdim=True)
    return cand, dec, k


def _loo(torch, cur, d, maxq: int):
    """SpQR's leave-one-out estimate (:func:`gptq._loo_scores`) for a group ``cur[g, m]``
    (transposed) with ``d[g]`` float64: ``score[k, i]`` = the drop in the Hessian-weighted
    error of a plain ``b``-bit min-max fit of row ``i``'s group when weight ``k`` is left out.

    Leaving out a weight changes the fit only when it is the row's (first) minimum or maximum,
    so three fits per row suffice: the full one and the two without an extreme."""
    g, m = cur.shape
    if g < 2:
        return torch.zeros((g, m), dtype=torch.float64, device=cur.device)
    x = cur.double()
    fq = float(maxq)
    dd = d.view(g, 1)
    srt = x.sort(0).values
    lo1, lo2, hi2, hi1 = srt[0], srt[1], srt[-2], srt[-1]
    ilo = x.argmin(0)  # first index of the minimum, as the reference's strict scan
    ihi = x.argmax(0)
    pos = torch.arange(g, device=cur.device).view(g, 1)
    at_lo = pos == ilo
    at_hi = (pos == ihi) & ~at_lo

    def fit(lo, hi):
        ok = hi > lo
        s = torch.where(ok, (hi - lo) / fq, 1.0)
        z = -lo / s
        q = torch.floor(x / s + z + 0.5).clamp_(0.0, fq)
        r = (s * (q - z) - x) / dd
        return r * r, ok

    e0, ok0 = fit(lo1, hi1)
    e0 = torch.where(ok0, e0, 0.0)
    base = e0.sum(0)
    same = base - e0  # the fit is unchanged: only k's own error disappears
    one = ilo == ihi
    lo_a = lo2
    hi_a = torch.where(one, hi2, hi1)
    e_a, ok_a = fit(lo_a, hi_a)
    loo_a = torch.where(pos == ilo, 0.0, e_a).sum(0)
    keep_a = (lo_a == lo1) & (hi_a == hi1)
    lo_b = torch.where(one, lo2, lo1)
    hi_b = hi2
    e_b, ok_b = fit(lo_b, hi_b)
    loo_b = torch.where(pos == ihi, 0.0, e_b).sum(0)
    keep_b = (lo_b == lo1) & (hi_b == hi1)
    at_a = torch.where(ok_a, torch.where(keep_a, same, loo_a), 0.0)
    at_b = torch.where(ok_b, torch.where(keep_b, same, loo_b), 0.0)
    loo = torch.where(at_lo, at_a, torch.where(at_hi, at_b, same))
    return base - loo


def _rank_desc(torch, key):
    """Position of each entry of the 1-D ``key`` in descending order, ties by index."""
    order = torch.sort(key, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(0, order, torch.arange(key.numel(), device=key.device))
    return rank


# -- the solver -----------------------------------------------------------------------------


def encode_gptq_torch(
    weight,
    hessian,
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
    dtype: DType = DType.FLOAT16,
    name: str | None = None,
    info: dict | None = None,
    device=None,
) -> BilevelTensor:
    """:func:`spqr_format.codec.gptq.encode_gptq` in torch, on ``device`` (default: the
    weight's device if it is a tensor, else cpu).

    ``weight`` and ``hessian`` are numpy arrays or torch tensors (on any device; copied to
    ``device``). Same options, checks and result; ``info`` also receives
    ``reconstruction_permuted`` and ``reconstruction`` (the solver's reconstruction, stored and
    original column order: float32 torch tensors on ``device``, equal to the decoded tensor),
    ``device`` and ``implementation``.
    """
    torch = require_torch()
    t_start = time.perf_counter()
    dev = resolve_device(device, weight)
    with _ieee_float32(torch), torch.no_grad():
        w = _weight_on(torch, weight, dev, name)
        m, n = w.shape
        params, tau, budget, dtype = check_options(
            bits, group_size, stats_bits, stats_group_size, perm_order, percdamp, block_size,
            outlier_threshold, outlier_budget, dtype, name,
        )  # fmt: skip
        h = _hessian_on(torch, hessian, n, dev, name)
        times: dict[str, float] = {}
        _sync(torch, dev)
        t0 = time.perf_counter()
        times["validate"] = t0 - t_start

        diag = torch.diagonal(h).clone()
        perm = None
        if perm_order == "act_order":
            perm = torch.sort(-diag, stable=True).indices
            diag = diag[perm]
            wt = w.t()[perm].contiguous()  # [n, m]: stored column j is row j
        else:
            wt = w.t().contiguous()
        del w
        dead = diag == 0
        mean_diag = float(diag.mean())
        damp = percdamp * mean_diag
        wt.masked_fill_(dead.view(n, 1), 0.0)
        n_dead = int(dead.sum())
        _sync(torch, dev)
        t1 = time.perf_counter()
        times["permute"] = t1 - t0

        u32, d64, extra = _upper_inverse_factor(torch, h, perm, dead, damp, mean_diag, name)
        del h
        _sync(torch, dev)
        t2 = time.perf_counter()
        times["cholesky"] = t2 - t1

        t, thr, graphs_error = _solve(torch, wt, u32, d64, params, perm, tau, budget,
                                      leave_one_out, block_size, dtype, CUDA_GRAPHS)  # fmt: skip
        if graphs_error is not None:
            warnings.warn(
                f"CUDA graph capture failed ({graphs_error}); the GPU encoder ran eager "
                "kernels (same result, slower)",
                RuntimeWarning,
                stacklevel=2,
            )
        _sync(torch, dev)
        t3 = time.perf_counter()
        times["solve"] = t3 - t2
        times["total"] = t3 - t_start
        if info is not None:
            rec_p = wt.t()
            if perm is None:
                rec = rec_p.contiguous()
            else:
                rec = torch.empty((m, n), dtype=torch.float32, device=dev)
                rec.index_copy_(1, perm, rec_p)
            info.update(
                times=times,
                damping=damp,
                extra_damping=extra,
                dead_columns=n_dead,
                outlier_threshold=None if not math.isfinite(thr) else thr,
                zero_limit=ZERO_LIMIT,
                reconstruction_permuted=rec_p,
                reconstruction=rec,
                device=str(dev),
                implementation=IMPLEMENTATION,
                cuda_graphs=dev.type == "cuda" and CUDA_GRAPHS and graphs_error is None,
                cuda_graphs_error=graphs_error,
            )
    return t


def _upper_inverse_factor(torch, h, perm, dead, damp, mean_diag, name):
    """``U`` (upper, ``U^T U = H^-1``; float32) and ``diag(U)`` (float64) of the permuted,
    damped Hessian, and the extra damping needed (as :func:`gptq._upper_inverse_factor`): one
    float64 Cholesky of the reversed matrix ``J H J = L L^T`` and one triangular inverse,
    ``U = J L^-1 J``."""
    n = h.shape[0]
    dev = h.device
    ro = perm.flip(0) if perm is not None else torch.arange(n - 1, -1, -1, device=dev)
    dead_rev = dead.flip(0)
    mean_diag = mean_diag or 1.0
    extra = 0.0
    for _attempt in range(14):
        rev = h.index_select(0, ro).index_select(1, ro)
        dg = rev.diagonal()
        dg.add_(damp)
        dg.copy_(torch.where(dead_rev, 1.0, dg))
        if extra:
            dg.add_(extra)
        low, status = torch.linalg.cholesky_ex(rev)
        del rev
        if int(status) == 0:
            break
        extra = mean_diag * 1e-6 if extra == 0 else extra * 10
    else:
        raise BadInputError("Hessian is not positive definite even after damping", tensor=name)
    if extra:
        warnings.warn(
            f"Hessian of {name or 'tensor'} is not positive definite; added damping "
            f"{extra / mean_diag:.3g} x mean diagonal",
            RuntimeWarning,
            stacklevel=3,
        )
    eye = torch.eye(n, dtype=torch.float64, device=dev)
    linv = torch.linalg.solve_triangular(low, eye, upper=False)
    del low, eye
    d64 = linv.diagonal().flip(0).clone()
    u32 = linv.float().flip(0, 1)  # J L^-1 J
    return u32, d64, extra


class _Steps:
    """Runs a step function that reads and writes only its own static buffers: eagerly, or on
    CUDA captured once per key as a CUDA graph and replayed (one launch instead of hundreds of
    small kernels). The first call of a key runs eagerly (on a side stream, as capture wants a
    warm-up) and its results are used; later calls replay. If capture fails, everything runs
    eagerly from then on (``error`` says why); the results are the same either way."""

    def __init__(self, torch, dev, enabled: bool) -> None:
        self.torch = torch
        self.dev = dev
        self.enabled = enabled and dev.type == "cuda"
        self.graphs: dict = {}
        self.error: str | None = None
        self.side = torch.cuda.Stream(dev) if self.enabled else None

    def run(self, key, fn) -> None:
        if not self.enabled:
            fn()
            return
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        torch = self.torch
        cur = torch.cuda.current_stream(self.dev)
        self.side.wait_stream(cur)
        # capture_begin/end rather than torch.cuda.graph(): that one synchronises, collects
        # garbage and empties the allocator's cache at every capture.
        with torch.cuda.stream(self.side):
            fn()  # the warm-up is this step's real run
            graph = torch.cuda.CUDAGraph()
            try:
                graph.capture_begin()
                try:
                    fn()  # recorded, not run
                finally:
                    graph.capture_end()
            except Exception as err:  # pragma: no cover - depends on the torch/CUDA build
                self.enabled = False
                self.error = f"{type(err).__name__}: {err}"
                self.graphs.clear()
                graph = None
        cur.wait_stream(self.side)
        if graph is None:  # pragma: no cover
            torch.cuda.synchronize(self.dev)
            return
        self.graphs[key] = graph


def _solve(torch, wt, u, d64, params, perm, tau, budget, leave_one_out, block_size, dtype,
           use_graphs):  # fmt: skip
    """The column loop (``wt[n, m]``: permuted, dead columns zeroed; overwritten with the
    reconstruction). Returns ``(tensor, threshold, graphs error or None)``.

    Two steps repeat: the *fit* at every group start (leave-one-out suspects, statistics, their
    quantization) and the *segment* solve (the columns of one group inside one block, one at a
    time, with per-column updates inside the segment). Both read and write only static buffers
    (copied in and out around them), so on CUDA each is captured once per width and replayed.
    """
    n, m = wt.shape
    dev = wt.device
    thr = math.inf
    if tau is not None:
        if m > 1:
            var = torch.empty(n, dtype=torch.float64, device=dev)
            step = max(1, (64 << 20) // (8 * m))
            for c0 in range(0, n, step):
                var[c0 : c0 + step] = wt[c0 : c0 + step].double().var(dim=1, correction=1)
            scale = float((var / d64**2).mean())
        else:
            scale = 0.0
        # Identical rows: no scale to measure errors against (see the reference).
        thr = float(tau * scale) if scale > 0 else math.inf
    elif budget is not None:
        thr = 0.0
    thr32 = _f32_floor(thr)
    use_loo = leave_one_out and tau is not None
    outliers_on = math.isfinite(thr)
    premark = use_loo and budget is not None  # suspects become outliers at the group start
    bits = params.bits
    maxq = (1 << bits) - 1
    g = params.group_size
    G = -(-n // g)
    sb = params.stats_bits
    T = -(-m // params.stats_group_size) if sb else 0
    stat_dt = torch.float16 if sb == 0 else torch.uint8
    qt = torch.zeros((n, m), dtype=torch.uint8, device=dev)
    om = torch.zeros((n, m), dtype=torch.bool, device=dev) if outliers_on else None
    st = torch.zeros((G, m, 2), dtype=stat_dt, device=dev)
    st2 = None if sb == 0 else torch.zeros((G, T, 4), dtype=torch.float16, device=dev)
    d32 = d64.float()
    caps = None
    if budget is not None:
        ends = [min((k + 1) * g, n) for k in range(G)]
        caps = torch.tensor([_cap(budget, m, n, e) for e in ends], dtype=torch.int64, device=dev)
    bmax = min(block_size, n)
    et = torch.empty((bmax, m), dtype=torch.float32, device=dev)

    # Static state shared by the steps.
    f32 = dict(dtype=torch.float32, device=dev)
    s_buf = torch.zeros(m, **f32)
    z_buf = torch.zeros(m, **f32)
    a_buf = torch.zeros(m, **f32)
    used = torch.zeros((), dtype=torch.int64, device=dev)
    cap_buf = torch.zeros((), dtype=torch.int64, device=dev)
    offs = torch.tensor([-1.0, 0.0, 1.0], **f32).view(3, 1)
    offs2 = offs.view(3, 1, 1)
    fit_bufs: dict = {}
    seg_bufs: dict = {}

    def fit_buffers(gw):
        if gw not in fit_bufs:
            fit_bufs[gw] = dict(
                cur=torch.empty((gw, m), **f32),
                dg=torch.empty(gw, dtype=torch.float64, device=dev),
                stored=torch.empty((m, 2), dtype=stat_dt, device=dev),
                rec2=torch.empty((T, 4), dtype=torch.float16, device=dev) if sb else None,
                sus=torch.zeros((gw, m), dtype=torch.bool, device=dev) if premark else None,
            )
        return fit_bufs[gw]

    def seg_buffers(w):
        if w not in seg_bufs:
            seg_bufs[w] = dict(
                ws=torch.empty((w, m), **f32),
                es=torch.empty((w, m), **f32),
                us=torch.empty((w, w), **f32),
                ds=torch.empty(w, **f32),
                oms=torch.zeros((w, m), dtype=torch.bool, device=dev) if outliers_on else None,
                qs=torch.empty((w, m), dtype=torch.uint8, device=dev),
            )
        return seg_bufs[w]

    def fit_step(cur, dg, stored, rec2, sus):
        keep = None
        if use_loo:
            score = _loo(torch, cur, dg, maxq)
            su = score > thr
            if budget is not None:
                # Under a budget, suspects become outliers outright, limited to the allowance
                # left at the group's end (ties by row-major position, as select_top).
                left = (cap_buf - used).clamp_(min=0)
                flat = torch.where(su, score, -math.inf).t().reshape(-1)
                su = su & (_rank_desc(torch, flat) < left).view(m, -1).t()
                used.add_(su.sum())
                sus.copy_(su)
            keep = ~su
        s1, z1 = minmax_stats_t(torch, cur, bits, keep)
        sd, zd, sto, r2 = quantize_stats_t(torch, s1, z1, params)
        s_buf.copy_(sd)
        z_buf.copy_(zd)
        a_buf.copy_(torch.where(sd > 0, 1.0 / sd, 0.0))
        stored.copy_(sto)
        if r2 is not None:
            rec2.copy_(r2)

    def seg_step(ws, es, us, ds, oms, qs):
        w = ws.shape[0]
        for c in range(w):
            x = ws[c]
            e = es[c]
            _cand, dec, kk = _choose(torch, x, s_buf, z_buf, a_buf, maxq, offs)
            v = dec.gather(0, kk).squeeze(0)
            torch.sub(x, v, out=e)
            e.div_(ds[c])
            if outliers_on:
                ne2 = e * e
                if budget is None:
                    o = ne2 > thr32
                else:
                    # The column's largest errors above the threshold, while the cap allows
                    # (pre-marked suspects are outliers already and counted).
                    cand = (ne2 > thr32) & ~oms[c]
                    allowed = torch.minimum(cand.sum(), (cap_buf - used).clamp_(min=0))
                    rank = _rank_desc(torch, torch.where(cand, ne2, -math.inf))
                    o = oms[c] | (cand & (rank < allowed))
                    used.add_(allowed)
                oms[c] = o
                v = torch.where(o, _f16(x).float(), v)
                torch.sub(x, v, out=e)
                e.div_(ds[c])
            x.copy_(v)
            if c + 1 < w:
                ws[c + 1 :].addcmul_(us[c, c + 1 :].view(-1, 1), e.view(1, -1), value=-1.0)
        # The codes, chosen against the reconstruction: the decoded value of the nearest code
        # (that code) or, under an outlier, the code nearest the outlier's value.
        cand, _dec, kk = _choose(torch, ws, s_buf, z_buf, a_buf, maxq, offs2)
        qs.copy_(cand.gather(0, kk).squeeze(0))

    steps = _Steps(torch, dev, use_graphs)
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        j = b0
        while j < b1:
            k = j // g
            if budget is not None:
                cap_buf.copy_(caps[k])
            if j % g == 0:  # a group starts: fit its statistics on the current weights
                ge = min(j + g, n)
                fb = fit_buffers(ge - j)
                if ge > b1:  # columns past the block still owe this block's pending updates
                    fb["cur"][: b1 - j].copy_(wt[j:b1])
                    torch.sub(wt[b1:ge], u[b0:j, b1:ge].t() @ et[: j - b0],
                              out=fb["cur"][b1 - j :])  # fmt: skip
                else:
                    fb["cur"].copy_(wt[j:ge])
                fb["dg"].copy_(d64[j:ge])
                steps.run(("fit", ge - j), lambda fb=fb: fit_step(**fb))
                st[k] = fb["stored"]
                if st2 is not None:
                    st2[k] = fb["rec2"]
                if premark:
                    om[j:ge] = fb["sus"]
            je = min(b1, (k + 1) * g)
            sg = seg_buffers(je - j)
            sg["ws"].copy_(wt[j:je])
            sg["us"].copy_(u[j:je, j:je])
            sg["ds"].copy_(d32[j:je])
            if outliers_on:
                sg["oms"].copy_(om[j:je])
            steps.run(("seg", je - j), lambda sg=sg: seg_step(**sg))
            wt[j:je] = sg["ws"]
            et[j - b0 : je - b0] = sg["es"]
            qt[j:je] = sg["qs"]
            if outliers_on:
                om[j:je] = sg["oms"]
            if je < b1:
                wt[je:b1].addmm_(u[j:je, je:b1].t(), sg["es"], alpha=-1.0)
            j = je
        if b1 < n:
            # Lazy update of the rest, in row chunks to bound the temporary.
            step = max(1, (256 << 20) // (4 * m))
            for c0 in range(b1, n, step):
                c1 = min(c0 + step, n)
                wt[c0:c1].addmm_(u[b0:b1, c0:c1].t(), et[: b1 - b0], alpha=-1.0)
    graphs_error = steps.error
    del steps  # the graphs and their memory
    outliers = None
    if outliers_on and bool(om.any()):
        idx = om.t().nonzero()
        rows, cols = idx[:, 0], idx[:, 1]
        outliers = Outliers(
            rows=rows.cpu().numpy().astype(np.uint32),
            cols=cols.cpu().numpy().astype(np.uint32),
            values=wt[cols, rows].half().cpu().numpy(),
        )
    t = BilevelTensor(
        shape=(m, n),
        params=params,
        codes=qt.t().contiguous().cpu().numpy(),
        stats=st.permute(1, 0, 2).contiguous().cpu().numpy(),
        stats2=None if st2 is None else st2.permute(1, 0, 2).contiguous().cpu().numpy(),
        perm=None if perm is None else perm.cpu().numpy().astype(np.uint32),
        outliers=outliers,
        dtype=dtype,
    )
    return t, thr, graphs_error


# -- one tensor with a configuration, and Hessians, on a torch device ---------------------


def _default_dtype_t(torch, weight) -> DType:
    dt = getattr(weight, "dtype", None)
    if dt in (np.float16, torch.float16):
        return DType.FLOAT16
    if dt == torch.bfloat16:
        return DType.BFLOAT16
    return DType.FLOAT32


def output_errors(torch, w, q, h) -> tuple[float, float | None]:
    """``(|Q - W| / |W|, tr((W-Q) H (W-Q)^T) / tr(W H W^T))`` on the tensors' device, as
    :func:`presets.encode_tensor` reports them (float32 GEMMs in row chunks, float64 sums;
    the second is None without ``h``)."""
    d = q - w
    wn = float(torch.linalg.vector_norm(w, dtype=torch.float64))
    dn = float(torch.linalg.vector_norm(d, dtype=torch.float64))
    rel_w = dn / wn if wn > 0 else (0.0 if dn == 0 else math.inf)
    if h is None:
        return rel_w, None
    h32 = h.to(dtype=torch.float32)
    m, n = w.shape
    step = max(1, (256 << 20) // (4 * max(n, 1)))
    num = torch.zeros((), dtype=torch.float64, device=w.device)
    den = torch.zeros((), dtype=torch.float64, device=w.device)
    for r0 in range(0, m, step):
        wc, dc = w[r0 : r0 + step], d[r0 : r0 + step]
        num += ((dc @ h32) * dc).sum(dtype=torch.float64)
        den += ((wc @ h32) * wc).sum(dtype=torch.float64)
    num, den = float(num), float(den)
    return rel_w, (num / den if den > 0 else (0.0 if num == 0 else math.inf))


def encode_tensor_torch(
    weight,
    config,
    hessian=None,
    name: str | None = None,
    *,
    dtype: DType | None = None,
    info: dict | None = None,
    device=None,
):
    """:func:`spqr_format.codec.presets.encode_tensor` with the torch solver on ``device``.

    ``weight`` / ``hessian``: numpy arrays or torch tensors. Returns ``(tensor, report)`` with
    the same report keys (errors measured on ``device`` against the solver's reconstruction,
    which equals the decoded tensor). ``info`` receives the solver's facts plus ``packed`` (the
    packed tensor) and ``reconstruction`` (decoded float32 ``[m, n]`` on ``device``). An
    ``rtn`` configuration runs the CPU RTN encoder (it has no solve) and is measured here.
    """
    torch = require_torch()
    from spqr_format.codec.packing import pack
    from spqr_format.codec.presets import (
        _LATE_DEFAULTS,
        check_encoder_config,
        encoder_plan,
        make_report,
    )
    from spqr_format.codec.reference import decode_bilevel_f32
    from spqr_format.codec.rtn import encode_rtn

    check_encoder_config(config, name)
    unsupported = [f"{k}={getattr(config, k)!r}" for k, v in _LATE_DEFAULTS.items()
                   if getattr(config, k, v) != v]  # fmt: skip
    if unsupported:
        raise BadInputError(
            f"the torch encoder implements min-max statistics and tau/column-budget outliers; "
            f"{', '.join(unsupported)} runs on the CPU encoder (presets.encode_tensor)",
            tensor=name,
        )
    dev = resolve_device(device, weight)
    dt = _default_dtype_t(torch, weight) if dtype is None else dtype
    method, warning, common = encoder_plan(config, hessian, name, dt)
    solver: dict = {}
    with torch.no_grad(), _ieee_float32(torch):
        w = _weight_on(torch, weight, dev, name)
        hs = None if hessian is None else _hessian_on(torch, hessian, w.shape[1], dev, name)
        if method == "rtn":
            t = encode_rtn(w.cpu().numpy(), outlier_fraction=config.outlier_budget or 0.0,
                           **common)  # fmt: skip
            packed = pack(t)
            rec = torch.from_numpy(decode_bilevel_f32(packed, validate=False)).to(dev)
        else:
            t = encode_gptq_torch(
                w,
                hs,
                perm_order=config.perm_order,
                percdamp=config.percdamp,
                block_size=config.block_size,
                outlier_threshold=config.outlier_threshold,
                outlier_budget=config.outlier_budget,
                leave_one_out=config.leave_one_out,
                info=solver,
                device=dev,
                **common,
            )
            packed = pack(t)
            rec = solver["reconstruction"]
        rel_w, rel_out = output_errors(torch, w, rec, hs)
    report = make_report(t, packed, config, method, warning, rel_w, rel_out)
    if info is not None:
        info.update(solver)
        info.update(packed=packed, reconstruction=rec, device=str(dev),
                    implementation=IMPLEMENTATION)  # fmt: skip
    return t, report


class SharedProducts:
    """The last input batch of a forward and its ``x^T x`` chunks, for the layers fed the very
    same tensor (see :meth:`HessianAccumulatorTorch.add`); holds the tensor until replaced."""

    def __init__(self) -> None:
        self.source = None
        self.products: list = []
        self.finite = None
        self.device = None

    def clear(self) -> None:
        self.__init__()


class HessianAccumulatorTorch:
    """:class:`spqr_format.codec.hessian.HessianAccumulator` on a torch device: the plain
    float64 sum ``sum_t x_t x_t^T`` (one GEMM per chunk of tokens), divided once, mirrored from
    the lower triangle so it is exactly symmetric. Nothing synchronises with the host until
    :meth:`hessian` (the finiteness check is accumulated on the device)."""

    def __init__(self, in_features: int, *, device, name: str | None = None) -> None:
        self.torch = require_torch()
        self.name = name
        self.in_features = int(in_features)
        self.device = self.torch.device(device)
        self._sum = None
        self._finite = None
        self.tokens = 0

    def add(self, batch, shared: SharedProducts | None = None) -> None:
        """Add a batch ``[..., in_features]``. With ``shared``, a batch that is the very
        tensor the previous ``add`` through ``shared`` got (layers fed one input, e.g. q/k/v)
        reuses its ``x^T x`` instead of recomputing it; the sums are the same either way."""
        torch = self.torch
        x = batch.detach()
        n = self.in_features
        if x.ndim < 1 or x.shape[-1] != n:
            raise BadInputError(
                f"activation batch has shape {tuple(x.shape)}, expected [..., {n}]",
                tensor=self.name,
            )
        if not x.is_floating_point():
            raise BadInputError(
                f"activations must be floating point, got {x.dtype}", tensor=self.name
            )
        if self._sum is None:
            self._sum = torch.zeros((n, n), dtype=torch.float64, device=self.device)
            self._finite = torch.ones((), dtype=torch.bool, device=self.device)
        if shared is not None and shared.source is batch and shared.device == self.device:
            prods, finite = shared.products, shared.finite
        else:
            x = x.reshape(-1, n)
            rows = max(1, (256 << 20) // (8 * n))
            prods = []
            finite = torch.ones((), dtype=torch.bool, device=self.device)
            for i in range(0, x.shape[0], rows):
                xc = x[i : i + rows].to(device=self.device, dtype=torch.float64)
                finite &= torch.isfinite(xc).all()
                prods.append(xc.t() @ xc)
            if shared is not None:
                shared.source, shared.products, shared.finite = batch, prods, finite
                shared.device = self.device
        for p in prods:
            self._sum += p
        self._finite &= finite
        self.tokens += batch.numel() // n

    def merge(self, partial_sum, tokens: int) -> None:
        """Add another accumulator's plain sum (``sum x x^T`` over ``tokens`` rows): how the
        chunk sums are folded in a fixed order (:mod:`spqr_format.models.distributed`), as
        :meth:`spqr_format.codec.hessian.HessianAccumulator.merge` does on the CPU."""
        if partial_sum is None or tokens == 0:
            return
        self.merge_rows(partial_sum, 0)
        self.tokens += int(tokens)

    def merge_rows(self, rows, i0: int) -> None:
        """Add a block of rows ``[i0, i0 + len(rows))`` of another sum (tokens are counted
        by the caller); non-finite values mark the Hessian non-finite, as :meth:`add` does."""
        torch = self.torch
        n = self.in_features
        if self._sum is None:
            self._sum = torch.zeros((n, n), dtype=torch.float64, device=self.device)
            self._finite = torch.ones((), dtype=torch.bool, device=self.device)
        r = rows.to(device=self.device, dtype=torch.float64)
        self._sum[i0 : i0 + r.shape[0]] += r
        self._finite &= torch.isfinite(r).all()

    def hessian(self):
        """``(2/N) * sum x x^T`` as a float64 ``[n, n]`` tensor on the device."""
        torch = self.torch
        if self._sum is None or self.tokens == 0:
            raise BadInputError("no activations were added to the Hessian", tensor=self.name)
        if not bool(self._finite):
            raise BadInputError("activation batch has non-finite values", tensor=self.name)
        h = torch.tril(self._sum) * (2.0 / self.tokens)
        return h + torch.tril(h, -1).t()
