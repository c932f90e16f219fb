"""Generators of valid logical bilevel tensors, for the codec tests and the GPU tests.

- :func:`random_bilevel` is a plain function of a numpy ``Generator``: deterministic, for
  tests and benchmarks that do not use hypothesis.
- :func:`bilevel_tensors` is a hypothesis strategy drawing shapes and parameters across the
  edge cases (m = 1, n = 1, group sizes 1 / 7 / 16 / 32 / 128 / n / > n, fp16 or 1..8-bit
  statistics, stats tiles 1 / 3 / 16 / > m, with/without permutation, no outliers / some /
  rows full of them) and then filling the arrays with :func:`random_bilevel` from a drawn seed.

Two value regimes: ``"moderate"`` statistics look like real quantizer output (small scales,
zeros inside the code range); ``"any"`` draws arbitrary *finite* f16 bit patterns (subnormals,
+-0, values near 65504), which exercises rounding and fp16 overflow to infinity.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from spqr_format.codec.bilevel import BilevelParams, BilevelTensor, Outliers
from spqr_format.spec import DType

__all__ = ["random_bilevel", "bilevel_tensors", "bilevel_params", "make_outliers", "finite_f16"]


def finite_f16(rng: np.random.Generator, shape, regime: str = "any") -> np.ndarray:
    """Random finite float16 values: arbitrary bit patterns with exponent < 31 ("any"), or
    normal(0, 1) values ("moderate")."""
    if regime == "moderate":
        return rng.standard_normal(shape).astype(np.float16)
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint32).astype(np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0xBFFF, bits)  # clear an exponent bit
    return bits.astype(np.uint16).view(np.float16)


def make_outliers(rows, cols, values) -> Outliers:
    """An :class:`Outliers` from sequences (sorted by the caller)."""
    return Outliers(
        rows=np.asarray(rows, dtype=np.uint32),
        cols=np.asarray(cols, dtype=np.uint32),
        values=np.asarray(values, dtype=np.float16),
    )


def _random_outliers(
    rng: np.random.Generator, m: int, n: int, fraction: float, layout: str, regime: str
) -> Outliers | None:
    if fraction <= 0:
        return None
    if layout == "full_rows":
        # A share `fraction` of the rows (at least one) are entirely outliers, the rest none.
        k_rows = max(1, round(fraction * m))
        full = np.sort(rng.choice(m, size=k_rows, replace=False))
        flat = (full[:, None] * n + np.arange(n)[None, :]).reshape(-1)
    else:
        k = max(1, round(fraction * m * n))
        flat = np.sort(rng.choice(m * n, size=min(k, m * n), replace=False))
    values = finite_f16(rng, flat.shape[0], "moderate" if regime == "moderate" else "any")
    if regime == "moderate":
        values = (values.astype(np.float32) * 4).astype(np.float16)
    return make_outliers(flat // n, flat % n, values)


def random_bilevel(
    rng: np.random.Generator,
    m: int,
    n: int,
    params: BilevelParams,
    perm: bool,
    outlier_fraction: float,
    *,
    regime: str = "moderate",
    outlier_layout: str = "uniform",
    dtype: DType = DType.FLOAT16,
) -> BilevelTensor:
    """A valid random :class:`BilevelTensor` of shape ``(m, n)``.

    ``outlier_fraction`` is the share of weights that are outliers (0 = none, 1 = all) with
    ``outlier_layout="uniform"``, or the share of rows made entirely of outliers with
    ``"full_rows"``. ``regime`` is ``"moderate"`` or ``"any"`` (see the module docstring).
    """
    b, g, sb, sg = params.bits, params.group_size, params.stats_bits, params.stats_group_size
    G = -(-n // g)
    codes = rng.integers(0, 1 << b, size=(m, n), dtype=np.uint8)
    stats2 = None
    if sb == 0:
        if regime == "moderate":
            scale = rng.uniform(-0.05, 0.05, size=(m, G))
            zero = rng.uniform(0, (1 << b) - 1, size=(m, G))
            stats = np.stack([scale, zero], axis=-1).astype(np.float16)
        else:
            stats = finite_f16(rng, (m, G, 2))
    else:
        T = -(-m // sg)
        stats = rng.integers(0, 1 << sb, size=(m, G, 2), dtype=np.uint8)
        if regime == "moderate":
            top = (1 << sb) - 1 or 1
            stats2 = np.stack(
                [
                    rng.uniform(0.001, 0.05, size=(T, G)) / top,  # scale_step
                    rng.uniform(0.0, 0.01, size=(T, G)),  # scale_base
                    rng.uniform(0.0, (1 << b) - 1, size=(T, G)) / top,  # zero_step
                    rng.uniform(-0.5, 0.5, size=(T, G)),  # zero_base
                ],
                axis=-1,
            ).astype(np.float16)
        else:
            stats2 = finite_f16(rng, (T, G, 4))
    return BilevelTensor(
        shape=(m, n),
        params=params,
        codes=codes,
        stats=stats,
        stats2=stats2,
        perm=rng.permutation(n).astype(np.uint32) if perm else None,
        outliers=_random_outliers(rng, m, n, outlier_fraction, outlier_layout, regime),
        dtype=dtype,
    )


@st.composite
def bilevel_params(draw, m: int, n: int, bits=None, stats_bits=None) -> BilevelParams:
    """Parameters for an ``m x n`` tensor, biased to the edge cases of group sizes."""
    b = draw(st.integers(1, 8)) if bits is None else bits
    g = draw(st.sampled_from([1, 7, 16, 32, 128, n, n + 1, n + 100]))
    sb = draw(st.integers(0, 8)) if stats_bits is None else stats_bits
    sg = 0
    if sb > 0:
        sg = draw(st.sampled_from([1, 3, 16, m, m + 1, m + 50]))
    return BilevelParams(bits=b, group_size=g, stats_bits=sb, stats_group_size=sg)


@st.composite
def bilevel_tensors(
    draw,
    max_m: int = 8,
    max_n: int = 300,
    *,
    bits=None,
    stats_bits=None,
    perm=None,
    outliers: bool = True,
    regimes=("moderate", "any"),
    dtype: DType = DType.FLOAT16,
) -> BilevelTensor:
    """A hypothesis strategy of valid :class:`BilevelTensor` values up to ``max_m x max_n``.

    ``bits`` / ``stats_bits`` / ``perm`` fix those choices when given; ``outliers=False``
    gives tensors without outliers.
    """
    m = draw(st.one_of(st.just(1), st.integers(1, max_m)))
    n = draw(st.one_of(st.just(1), st.integers(1, max_n)))
    params = draw(bilevel_params(m, n, bits=bits, stats_bits=stats_bits))
    with_perm = draw(st.booleans()) if perm is None else perm
    fraction, layout = 0.0, "uniform"
    if outliers:
        fraction, layout = draw(
            st.sampled_from(
                [
                    (0.0, "uniform"),
                    (0.02, "uniform"),
                    (0.3, "uniform"),
                    (1.0, "uniform"),
                    (0.5, "full_rows"),
                ]
            )
        )
    regime = draw(st.sampled_from(regimes))
    seed = draw(st.integers(0, 2**32 - 1))
    return random_bilevel(
        np.random.default_rng(seed),
        m,
        n,
        params,
        with_perm,
        fraction,
        regime=regime,
        outlier_layout=layout,
        dtype=dtype,
    )


def far_apart_outliers(m: int, n: int, last: float) -> Outliers:
    """Three outliers far apart, two in row 0 and one in the last row, so that on wide rows
    the outlier stream needs skip entries: (0, 1) = 3.5, (0, n - 2) = -0.0, (m - 1, n - 1) =
    ``last``."""
    rows = np.array([0, 0, m - 1], np.uint32)
    cols = np.array([1, n - 2, n - 1], np.uint32)
    return Outliers(rows, cols, np.array([3.5, -0.0, last], np.float16))
