"""One bit budget for many tensors: rate-distortion allocation of encoder configurations.

``--target-bits B`` asks that the quantized tensors of a file take ``B`` bits per weight in
total, counted as ``spqr info`` counts ``bits_per_weight_quantized``: the bytes of every section
of every bilevel tensor (SPEC section 8) over their weights. The allocator

1. encodes every tensor with every candidate configuration (:data:`DEFAULT_CANDIDATES`: bits
   2/3/4/8, group sizes 16 (bilevel statistics) and 64/128 (fp16 statistics), outlier budgets)
   and records the exact bits and the output error: by default (objective ``relative``)
   ``tr((W-Q) H (W-Q)^T) / tr(W H W^T)``, the layer's output error relative to its output, so
   every layer counts alike (on the small model of benchmarks/model_quality.py this allocation
   beat the uniform presets on perplexity, while the absolute error ``tr((W-Q) H (W-Q)^T)``,
   which lets the layers with large activations take the bits, lost to them); times an
   optional importance weight per tensor;
2. keeps each tensor's lower convex hull of (bits, error) and spends the budget greedily on the
   upgrade with the largest error reduction per bit that still fits (the Lagrangian solution,
   completed by a knapsack fill);
3. fills what is left of the budget with extra outliers on the tensors whose chosen
   configuration selects outliers by impact (the one continuous knob: about 33 bits each),
   re-measuring exactly, so the total lands within :data:`TOLERANCE` below the target.

Everything here is numpy + the encoder; the model pipeline and ``spqr encode`` call it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from spqr_format.codec.bilevel import BilevelTensor
from spqr_format.codec.packing import pack
from spqr_format.codec.presets import EncoderConfig, bits_per_weight, encode_tensor
from spqr_format.errors import BadInputError

TOLERANCE = 0.01
# What the allocator minimises: "absolute" = sum over tensors of tr((W-Q) H (W-Q)^T) (the
# squared output error of every layer, as it adds up in the model's residual stream);
# "relative" = sum of tr((W-Q) H (W-Q)^T) / tr(W H W^T) (every layer counts alike).
# SPQR_ALLOC_OBJECTIVE overrides the default (for measurements).
OBJECTIVES = ("absolute", "relative")
DEFAULT_OBJECTIVE = os.environ.get("SPQR_ALLOC_OBJECTIVE", "relative")
# Largest outlier budget the fill step gives one tensor.
MAX_FILL_BUDGET = 0.05

_NEW = dict(method="gptq", perm_order="act_order", percdamp=0.01, stats_search="mse",
            outlier_threshold=None, leave_one_out=True)  # fmt: skip


def _cand(bits: int, g: int, bilevel: bool, budget: float | None) -> EncoderConfig:
    return EncoderConfig(
        **_NEW,
        bits=bits,
        group_size=g,
        stats_bits=3 if bilevel else 0,
        stats_group_size=16 if bilevel else 0,
        outlier_budget=budget,
        outlier_select="impact" if budget else "column",
    )


DEFAULT_CANDIDATES: tuple[EncoderConfig, ...] = (
    _cand(2, 128, False, None),
    _cand(2, 64, False, 0.002),
    _cand(2, 16, True, 0.005),
    _cand(3, 128, False, 0.002),
    _cand(3, 16, True, 0.005),
    _cand(4, 128, False, 0.002),
    _cand(4, 16, True, 0.003),
    _cand(8, 128, False, None),
)


@dataclass
class Measurement:
    """One tensor at one candidate: exact file bits and (weighted) absolute output error."""

    config: EncoderConfig
    bits: int
    error: float


@dataclass
class Allocation:
    """The configuration chosen per tensor and what the plan costs."""

    target_bits: float
    choice: dict[str, EncoderConfig]
    bits: dict[str, int]
    error: dict[str, float]
    weights: dict[str, int]  # elements per tensor
    candidates: list[EncoderConfig] = field(default_factory=list)
    objective: str = "absolute"

    @property
    def bits_per_weight(self) -> float:
        return sum(self.bits.values()) / max(sum(self.weights.values()), 1)

    def to_metadata(self) -> dict:
        """JSON for the file's ``encoder.allocation`` metadata (shown by ``spqr report``)."""
        return {
            "target_bits": self.target_bits,
            "bits_per_weight": self.bits_per_weight,
            "objective": self.objective,
            "candidates": [c.to_dict() for c in self.candidates],
            "tensors": {
                name: {
                    "label": config_label(cfg),
                    "bits_per_weight": self.bits[name] / self.weights[name],
                    "output_error": self.error[name],
                    "settings": cfg.to_dict(),
                }
                for name, cfg in self.choice.items()
            },
        }


def config_label(cfg: EncoderConfig) -> str:
    """Short name of a configuration, e.g. ``3b g16/s3 o0.5% mse``."""
    s = f"{cfg.bits}b g{cfg.group_size}" + (f"/s{cfg.stats_bits}" if cfg.stats_bits else "")
    if cfg.outlier_budget:
        s += f" o{100 * cfg.outlier_budget:.2g}%"
    elif cfg.outlier_threshold:
        s += f" tau{cfg.outlier_threshold:g}"
    if cfg.stats_search != "minmax":
        s += f" {cfg.stats_search}"
    return s


# ---- checks before any work -----------------------------------------------------------------


def _no_outlier_bits(shape: tuple[int, int], cfg: EncoderConfig) -> int:
    """Exact bits of a tensor of ``shape`` under ``cfg`` without outliers (its fixed part)."""
    m, n = shape
    p = cfg.with_overrides(outlier_budget=None, outlier_threshold=None, outlier_select="column")
    from spqr_format.codec.quantizer import check_params

    params = check_params(p.bits, p.group_size, p.stats_bits, p.stats_group_size, None)
    G = -(-n // params.group_size)
    t = BilevelTensor(
        shape=(m, n),
        params=params,
        codes=np.zeros((m, n), np.uint8),
        stats=np.zeros((m, G, 2), np.float16 if params.stats_bits == 0 else np.uint8),
        stats2=None
        if params.stats_bits == 0
        else np.zeros((-(-m // params.stats_group_size), G, 4), np.float16),
        perm=np.arange(n, dtype=np.uint32) if p.perm_order == "act_order" else None,
        outliers=None,
    )
    return int(round(bits_per_weight(pack(t)) * m * n))


def _outlier_bits_bound(shape, cfg: EncoderConfig) -> float:
    m, n = shape
    k = math.floor((cfg.outlier_budget or 0.0) * m * n)
    return 32.0 * k + 32.0 * (m + 1) + (64.0 * k if k else 0.0)  # entries, index, skips (loose)


def check_target(
    target_bits: object,
    shapes: dict[str, tuple[int, int]],
    candidates: Sequence[EncoderConfig] = DEFAULT_CANDIDATES,
) -> float:
    """Validate ``target_bits`` against what ``candidates`` can reach for tensors of ``shapes``
    (before anything is encoded); returns it as a float. Raises BadInputError naming the setting
    and, where one tensor decides it, the tensor."""
    if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)):
        raise BadInputError(f"--target-bits must be a number, got {target_bits!r}",
                            field="target_bits")  # fmt: skip
    t = float(target_bits)
    if not math.isfinite(t) or t <= 0:
        raise BadInputError(f"--target-bits must be a finite number > 0, got {target_bits!r}",
                            field="target_bits")  # fmt: skip
    if not candidates:
        raise BadInputError("no candidate configurations", field="candidates")
    if not shapes:
        raise BadInputError("--target-bits: no tensor to quantize", field="target_bits")
    total = sum(m * n for m, n in shapes.values())
    lo = hi = 0.0
    worst_name, worst_min = None, -1.0
    for name, shape in shapes.items():
        fixed = [_no_outlier_bits(shape, c) for c in candidates]
        mn = min(fixed)
        lo += mn
        hi += max(f + _outlier_bits_bound(shape, c) for f, c in zip(fixed, candidates, strict=True))
        if mn / (shape[0] * shape[1]) > worst_min:
            worst_name, worst_min = name, mn / (shape[0] * shape[1])
    lo /= total
    hi /= total
    if t < lo - 1e-12:
        raise BadInputError(
            f"--target-bits {t:g} is below the smallest reachable {lo:.3f} bits/weight (the "
            f"cheapest candidate of every tensor; tensor {worst_name} alone needs at least "
            f"{worst_min:.3f})",
            field="target_bits",
            tensor=worst_name,
        )
    if t > hi:
        raise BadInputError(
            f"--target-bits {t:g} is above the largest reachable {hi:.3f} bits/weight "
            "(every tensor at its most expensive candidate)",
            field="target_bits",
        )
    return t


# ---- measurement and allocation --------------------------------------------------------------


def output_error(w: np.ndarray, t: BilevelTensor, h: np.ndarray) -> tuple[int, float]:
    """Exact bits of ``t`` and the absolute output error ``tr((W-Q) H (W-Q)^T)``."""
    from spqr_format.codec.reference import decode_bilevel_f32

    packed = pack(t)
    q = decode_bilevel_f32(packed, validate=False)
    d = np.asarray(w, dtype=np.float32) - q
    err = float(np.einsum("ij,ij->", d @ np.asarray(h, dtype=np.float32), d, dtype=np.float64))
    m, n = t.shape
    return int(round(bits_per_weight(packed) * m * n)), err


def measure(
    weight: np.ndarray,
    hessian: np.ndarray,
    candidates: Sequence[EncoderConfig] = DEFAULT_CANDIDATES,
    name: str | None = None,
    importance: float = 1.0,
    objective: str = "absolute",
) -> list[Measurement]:
    """Encode ``weight`` with each candidate; exact bits and weighted output error of each."""
    out = []
    if objective == "relative":
        w32 = np.asarray(weight, dtype=np.float32)
        den = float(np.einsum("ij,ij->", w32 @ np.asarray(hessian, np.float32), w32,
                              dtype=np.float64))  # fmt: skip
        importance = importance / den if den > 0 else importance
    for cfg in candidates:
        t, _ = encode_tensor(weight, cfg, hessian, name)
        bits, err = output_error(weight, t, hessian)
        out.append(Measurement(cfg, bits, importance * err))
    return out


def _hull(ms: list[Measurement]) -> list[Measurement]:
    """Lower convex hull of (bits, error), cheapest first (Pareto points only)."""
    pts = sorted(ms, key=lambda x: (x.bits, x.error))
    pareto: list[Measurement] = []
    for p in pts:
        if not pareto or p.error < pareto[-1].error:
            if pareto and p.bits == pareto[-1].bits:
                pareto[-1] = p
            else:
                pareto.append(p)
    hull: list[Measurement] = []
    for p in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> p
            if (b.error - a.error) * (p.bits - a.bits) >= (p.error - a.error) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(
    measurements: dict[str, list[Measurement]],
    elements: dict[str, int],
    target_bits: float,
) -> Allocation:
    """Greedy rate-distortion allocation (see the module doc, steps 2): the plan's bits never
    exceed ``target_bits * sum(elements)``; raises BadInputError if even the cheapest do."""
    budget = target_bits * sum(elements.values())
    frontier = {n: sorted(ms, key=lambda x: (x.bits, x.error)) for n, ms in measurements.items()}
    cur = {n: fr[0] for n, fr in frontier.items()}
    # the cheapest point of each tensor, among those with the lowest bits the least error
    spent = sum(c.bits for c in cur.values())
    if spent > budget:
        raise BadInputError(
            f"--target-bits {target_bits:g}: the cheapest configurations already take "
            f"{spent / sum(elements.values()):.3f} bits/weight",
            field="target_bits",
        )
    hulls = {n: _hull(ms) for n, ms in measurements.items()}
    pos = {n: 0 for n in hulls}
    cur = {n: h[0] for n, h in hulls.items()}
    spent = sum(c.bits for c in cur.values())
    while True:
        best = None
        for n, h in hulls.items():
            i = pos[n]
            # the next hull point that fits (skipping ones too expensive for what is left)
            for j in range(i + 1, len(h)):
                db = h[j].bits - h[i].bits
                if spent + db > budget:
                    continue
                gain = (h[i].error - h[j].error) / db
                if best is None or gain > best[0]:
                    best = (gain, n, j)
                break
        if best is None:
            break
        _, n, j = best
        spent += hulls[n][j].bits - cur[n].bits
        pos[n] = j
        cur[n] = hulls[n][j]
    # Knapsack fill: any non-hull point that lowers the error and still fits.
    improved = True
    while improved:
        improved = False
        best = None
        for n, ms in measurements.items():
            for mm in ms:
                db = mm.bits - cur[n].bits
                de = cur[n].error - mm.error
                if de > 0 and spent + db <= budget:
                    score = de / db if db > 0 else math.inf
                    if best is None or score > best[0]:
                        best = (score, n, mm)
        if best is not None:
            _, n, mm = best
            spent += mm.bits - cur[n].bits
            cur[n] = mm
            improved = True
    return Allocation(
        target_bits=target_bits,
        choice={n: c.config for n, c in cur.items()},
        bits={n: c.bits for n, c in cur.items()},
        error={n: c.error for n, c in cur.items()},
        weights=dict(elements),
    )


def fill_with_outliers(
    alloc: Allocation,
    encode_measure: Callable[[str, EncoderConfig], tuple[int, float]],
    tolerance: float = TOLERANCE,
    max_tries: int = 4,
) -> Allocation:
    """Step 3: spend the gap between the plan and the target on extra outliers.

    ``encode_measure(name, config)`` encodes one tensor and returns its exact (bits, error).
    Tensors whose chosen configuration is gptq without tau get a larger outlier budget spent by
    impact (``outlier_select="impact"``), largest tensor first, re-measured each time (secant
    on the outlier budget); a change is kept only if it does not pass the target. Stops once
    the total is within ``tolerance`` below the target.
    """
    total = sum(alloc.weights.values())
    budget_bits = alloc.target_bits * total
    # Any gptq choice without a tau can take outliers by impact (one without any gets them).
    order = sorted(
        (n for n, c in alloc.choice.items() if c.method == "gptq" and c.outlier_threshold is None),
        key=lambda n: -alloc.weights[n],
    )
    for n in order:
        gap = budget_bits - sum(alloc.bits.values())
        if gap < tolerance * total * 0.5:
            break
        cfg = alloc.choice[n]
        b0, bits0 = cfg.outlier_budget or 0.0, alloc.bits[n]
        if cfg.outlier_select != "impact":
            cfg = cfg.with_overrides(outlier_select="impact", outlier_budget=None)
        per = 33.0  # bits per extra outlier, first guess; refined from each measurement
        best = None
        for _ in range(max_tries):
            gap = budget_bits - (sum(alloc.bits.values()) - alloc.bits[n] + bits0)
            want = b0 + max(gap - 0.25 * tolerance * total, 0.0) / (per * alloc.weights[n])
            want = min(want, MAX_FILL_BUDGET)
            if want <= b0 + 1e-9:
                break
            trial = cfg.with_overrides(outlier_budget=float(f"{want:.6g}"))
            bits, err = encode_measure(n, trial)
            extra = bits - bits0
            k = (trial.outlier_budget - b0) * alloc.weights[n]
            if k > 0 and extra > 0:
                per = extra / k
            if sum(alloc.bits.values()) - alloc.bits[n] + bits <= budget_bits:
                best = (trial, bits, err)
                if (
                    budget_bits - (sum(alloc.bits.values()) - alloc.bits[n] + bits)
                    < (tolerance * total * 0.5)
                    or want >= MAX_FILL_BUDGET
                ):
                    break
                b0, bits0 = trial.outlier_budget, bits
                cfg = trial
            else:
                continue
        if best is not None:
            alloc.choice[n], alloc.bits[n], alloc.error[n] = best
    return alloc


def plan(
    names: Sequence[str],
    get: Callable[[str], tuple[np.ndarray, np.ndarray]],
    target_bits: float,
    candidates: Sequence[EncoderConfig] = DEFAULT_CANDIDATES,
    importance: dict[str, float] | None = None,
    progress: Callable[[str], None] | None = None,
    measured: dict[str, list[Measurement]] | None = None,
    objective: str | None = None,
) -> Allocation:
    """Measure, allocate and fill for the tensors ``names``; ``get(name)`` returns the tensor's
    ``(weight [m, n], hessian [n, n])`` (loaded on demand, so only one is in memory at a time).
    ``importance``: per-tensor weights of the output errors (default 1). ``measured``: the
    result of :func:`measure_all` for these names and candidates, to plan several targets from
    one measurement."""
    import warnings

    imp = dict(importance or {})
    objective = objective or DEFAULT_OBJECTIVE
    if objective not in OBJECTIVES:
        raise BadInputError(f"objective must be one of {OBJECTIVES}, got {objective!r}",
                            field="objective")  # fmt: skip
    check_target(target_bits, {n: tuple(get(n)[0].shape) for n in names}, candidates)
    if objective == "relative":  # the fill's re-measurements use the same scale
        for n in names:
            w, h = get(n)
            w32 = np.asarray(w, dtype=np.float32)
            den = float(np.einsum("ij,ij->", w32 @ np.asarray(h, np.float32), w32,
                                  dtype=np.float64))  # fmt: skip
            imp[n] = imp.get(n, 1.0) / den if den > 0 else imp.get(n, 1.0)
    ms = measured if measured is not None else measure_all(names, get, candidates, imp, progress)
    elements = {n: int(get(n)[0].size) for n in names}
    alloc = allocate(ms, elements, target_bits)
    alloc.candidates = list(candidates)
    alloc.objective = objective

    def encode_measure(n: str, cfg: EncoderConfig) -> tuple[int, float]:
        w, h = get(n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t, _ = encode_tensor(w, cfg, h, n)
        bits, err = output_error(w, t, h)
        return bits, imp.get(n, 1.0) * err

    return fill_with_outliers(alloc, encode_measure)


def measure_all(
    names: Sequence[str],
    get: Callable[[str], tuple[np.ndarray, np.ndarray]],
    candidates: Sequence[EncoderConfig] = DEFAULT_CANDIDATES,
    importance: dict[str, float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[Measurement]]:
    """:func:`measure` for every tensor of ``names``."""
    import warnings

    imp = importance or {}
    ms: dict[str, list[Measurement]] = {}
    for n in names:
        if progress:
            progress(n)
        w, h = get(n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ms[n] = measure(w, h, candidates, n, imp.get(n, 1.0))
    return ms
