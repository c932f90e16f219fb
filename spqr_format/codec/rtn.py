"""Round-to-nearest (RTN) encoder for the ``bilevel`` encoding.

RTN is the configuration of the shared quantizer (:mod:`quantizer`) with no Hessian: every
(row, group) gets min-max statistics, the statistics are quantized (fp16 or bilevel), and every
weight gets the code nearest in decoded value. Optional outliers are chosen by magnitude.

Outlier rule (``outlier_fraction > 0``): the ``floor(fraction * m * n)`` weights with the largest
``|w - mean(row, group)|`` are kept in fp16. Why this score: min-max statistics spend their range
on the extreme weights of the group, and the weights far from the group's centre are exactly the
ones that stretch that range; removing them shrinks ``s`` for the whole group. The mean is taken
over the group's real (not padded) weights, outliers included, so the score does not depend on
which other weights were picked. Ties at the threshold are broken by position (row-major), so
the choice is deterministic.
"""

from __future__ import annotations

import numpy as np

from spqr_format.codec.bilevel import BilevelTensor, Outliers
from spqr_format.codec.quantizer import (
    check_params,
    check_weight,
    choose_codes,
    clipped_stats,
    minmax_stats,
    quantize_stats,
)
from spqr_format.errors import BadInputError
from spqr_format.spec import DType


def select_top(score: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` largest entries of ``score`` (ties broken by lowest flat index)."""
    flat = score.ravel()
    mask = np.zeros(flat.shape, dtype=bool)
    if k <= 0:
        return mask.reshape(score.shape)
    if k >= flat.size:
        mask[:] = True
        return mask.reshape(score.shape)
    # The k-th largest value; everything above it is in, ties at it are taken in index order.
    thr = np.partition(flat, flat.size - k)[flat.size - k]
    above = flat > thr
    mask |= above
    need = k - int(above.sum())
    if need > 0:
        ties = np.flatnonzero(flat == thr)[:need]
        mask[ties] = True
    return mask.reshape(score.shape)


def _grouped(w: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """``w[m, n]`` as ``[m, G, g]`` (last group padded with zeros) and its validity mask."""
    m, n = w.shape
    G = -(-n // g)
    pad = G * g - n
    if pad:
        w = np.concatenate([w, np.zeros((m, pad), dtype=w.dtype)], axis=1)
    valid = np.ones((G * g,), dtype=bool)
    valid[n:] = False
    return w.reshape(m, G, g), np.broadcast_to(valid.reshape(1, G, g), (m, G, g))


def encode_rtn(
    weight: np.ndarray,
    *,
    bits: int,
    group_size: int,
    stats_bits: int = 0,
    stats_group_size: int = 0,
    outlier_fraction: float = 0.0,
    stats_search: str = "minmax",
    dtype: DType = DType.FLOAT16,
    name: str | None = None,
) -> BilevelTensor:
    """Encode ``weight[m, n]`` (rows = outputs) with round-to-nearest into a :class:`BilevelTensor`.

    ``bits``: code width; ``group_size``: columns per first-level group; ``stats_bits`` /
    ``stats_group_size``: 0 / 0 for fp16 statistics, else the second level (SPEC C-7.1);
    ``outlier_fraction``: share of weights in [0, 1) kept in fp16 (rule in the module doc);
    ``stats_search``: ``minmax`` or ``mse`` (clipped range of least squared error);
    ``dtype``: the dtype the tensor decodes to. Raises :class:`BadInputError` (naming ``name``)
    for non-finite, non-2-D, empty or out-of-range input and for bad parameters.
    """
    w = check_weight(weight, name)
    params = check_params(bits, group_size, stats_bits, stats_group_size, name)
    try:
        dtype = DType(dtype)
    except ValueError:
        raise BadInputError(f"unknown dtype {dtype!r}", tensor=name) from None
    frac = float(outlier_fraction)
    if not 0.0 <= frac < 1.0:
        raise BadInputError(
            f"outlier_fraction must be in [0, 1), got {outlier_fraction!r}", tensor=name
        )

    m, n = w.shape
    g = params.group_size
    wg, valid = _grouped(w, min(g, n) if g > n else g)
    G = wg.shape[1]

    keep = valid
    out_mask = None
    k = int(np.floor(frac * m * n))
    if k > 0:
        # f32 scores; padding (zeros, only in the last group) is excluded from mean and choice.
        cnt = valid[0].sum(axis=-1).astype(np.float32)[None, :, None]
        mean = (wg.sum(axis=-1, keepdims=True, dtype=np.float64) / cnt).astype(np.float32)
        score = np.abs(wg - mean)
        if wg.shape[1] * wg.shape[2] != n:
            score[:, -1, n - (G - 1) * wg.shape[2] :] = -1.0  # padding never selected
        out_mask = select_top(score, k)
        keep = valid & ~out_mask

    if stats_search == "mse":
        scale, zero = clipped_stats(wg, params.bits, mask=keep)
    elif stats_search == "minmax":
        scale, zero = minmax_stats(wg, params.bits, mask=keep)
    else:
        raise BadInputError(f"unknown stats_search {stats_search!r}", tensor=name)
    qs = quantize_stats(scale, zero, params)

    target = wg
    if out_mask is not None:
        # The dense code at an outlier is the code nearest the stored fp16 value (SPEC section 6).
        target = np.where(out_mask, wg.astype(np.float16).astype(np.float32), wg)
    codes = choose_codes(target, qs.scale, qs.zero, params.bits)
    codes = np.ascontiguousarray(codes.reshape(m, G * wg.shape[2])[:, :n])

    outliers = None
    if out_mask is not None:
        flat = out_mask.reshape(m, -1)[:, :n]
        rows, cols = np.nonzero(flat)  # row-major: sorted by (row, col)
        outliers = Outliers(
            rows=rows.astype(np.uint32),
            cols=cols.astype(np.uint32),
            values=w[rows, cols].astype(np.float16),
        )
    return BilevelTensor(
        shape=(m, n),
        params=params,
        codes=codes,
        stats=np.ascontiguousarray(qs.stats),
        stats2=None if qs.stats2 is None else np.ascontiguousarray(qs.stats2),
        perm=None,
        outliers=outliers,
        dtype=dtype,
    )
