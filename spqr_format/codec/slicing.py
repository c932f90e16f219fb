"""Cheap slices of a ``bilevel`` tensor: which parts of ``W[m, n]`` can be read alone.

Used by tensor-parallel loading (:mod:`spqr_format.models.tp`), where each rank wants only its
part of a layer.

**Row blocks are cheap.** Rows ``[r0, r1)`` of a ``bilevel`` tensor are a self-contained
``bilevel`` tensor of ``r1 - r0`` rows (:func:`slice_rows`, no decoding, zero-copy views of the
file's sections) when

- ``r0`` is a multiple of 16 (the outlier blocks of SPEC section 6) and of the statistics tile
  ``S`` when ``sb > 0`` (``stats2`` records are per tile, C-5.6); ``r1`` likewise or ``r1 = m``;
- the row range starts on a u32 word of the packed streams: ``r0 * n * b`` and, with
  ``sb > 0``, ``r0 * 2G * sb`` are multiples of 32 (true whenever ``n`` is a multiple of 32,
  i.e. every real layer).

The slice reads ``codes`` / ``stats`` / ``stats2`` / outlier entries of its rows only, plus the
``n``-entry permutation and the ``NB + 1`` outlier index (a few KiB). Otherwise
:func:`slice_rows` raises :class:`NotCheapError` and the caller decodes whole rows.

**Column slices are not.** Every row's codes are one bit string in *stored* (permuted) column
order; the original columns ``[c0, c1)`` sit at stored columns ``inv_perm[c0:c1]``, scattered
over the whole row when the tensor has a permutation (SpQR's act-order), so a column slice
needs every row's codes: it costs a full read and decode (:func:`decode_columns`). Without a
permutation a column block at group boundaries would be contiguous per row, but still strided
over all ``m`` rows.

**Stored-column blocks are exact sub-tensors.** Stored columns ``[j0, j1)`` with ``j0`` (and
``j1`` unless it is ``n``) a multiple of the group size are a ``bilevel`` tensor of their own
(:func:`slice_stored_columns`): a weight's value depends only on its code, its row's
statistics of its group (and the tile's ``stats2`` record of that group) and an outlier at its
stored position, all of which the block carries; the slice has no permutation, and its column
``k`` is the original column ``perm[j0 + k]``. Building it reads the whole tensor and repacks
(integer work, no float decode), so it costs a full read, but the result is 1/N of the
compressed tensor. Tensor-parallel row-parallel layers use it
(:mod:`spqr_format.models.tp`): rank ``r`` holds stored columns ``[j0, j1)`` and multiplies them
with ``x[..., perm[j0:j1]]``, which needs the whole input ``x`` (an ``all_gather`` of the
column-parallel shards) unless the tensor has no permutation and the blocks coincide with the
ranks' input shards (Megatron's row-parallel layer, no gather).

CRCs and the decoded digest cover whole sections and whole tensors, so slices are read
without checking them (``verify_crc=False``): check a file once with ``spqr verify``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spqr_format.codec import reference
from spqr_format.codec.bilevel import PackedBilevel
from spqr_format.spec import DType

OUTLIER_BLOCK_ROWS = 16


class NotCheapError(ValueError):
    """The row range does not start/end on the boundaries that make it a standalone slice."""


def row_boundary(p: PackedBilevel) -> int:
    """Row slices must start at multiples of this (16 and the statistics tile)."""
    s = p.params.stats_group_size if p.params.stats_bits else 1
    return int(np.lcm(OUTLIER_BLOCK_ROWS, s))


def is_cheap_row_slice(p: PackedBilevel, r0: int, r1: int) -> bool:
    m, n = p.shape
    prm = p.params
    unit = row_boundary(p)
    if not (0 <= r0 < r1 <= m) or r0 % unit or (r1 % unit and r1 != m):
        return False
    if (r0 * n * prm.bits) % 32:
        return False
    groups = p.geometry.groups
    return not (prm.stats_bits and (r0 * 2 * groups * prm.stats_bits) % 32)


def slice_rows(p: PackedBilevel, r0: int, r1: int) -> PackedBilevel:
    """Rows ``[r0, r1)`` as a standalone :class:`PackedBilevel` (views, no decode)."""
    if not is_cheap_row_slice(p, r0, r1):
        raise NotCheapError(f"rows [{r0}, {r1}) of a {p.shape} tensor are not a cheap slice "
                            f"(boundaries at multiples of {row_boundary(p)})")  # fmt: skip
    m, n = p.shape
    prm = p.params
    rows = r1 - r0
    groups = p.geometry.groups
    w0 = r0 * n * prm.bits // 32
    codes = p.codes.reshape(-1)[w0 : w0 + -(-rows * n * prm.bits // 32)]
    if prm.stats_bits == 0:
        stats = p.stats[r0:r1]
        stats2 = None
    else:
        s0 = r0 * 2 * groups * prm.stats_bits // 32
        stats = p.stats.reshape(-1)[s0 : s0 + -(-rows * 2 * groups * prm.stats_bits // 32)]
        t0 = r0 // prm.stats_group_size
        stats2 = p.stats2[t0 : t0 + -(-rows // prm.stats_group_size)]
    header = p.header
    index = entries = None
    if header.has_outliers:
        k0, k1 = r0 // OUTLIER_BLOCK_ROWS, -(-r1 // OUTLIER_BLOCK_ROWS)
        x = p.outlier_index.reshape(-1)
        lo, hi = int(x[k0]), int(x[k1])
        if hi > lo:
            index = (x[k0 : k1 + 1] - np.uint32(lo)).astype(np.uint32)
            entries = p.outlier_entries.reshape(-1)[lo:hi]
            real = int(np.count_nonzero((entries >> 16) != 0xFFFF))
            header = dataclasses.replace(header, outlier_count=real, outlier_entry_count=hi - lo)
        else:
            header = dataclasses.replace(header, has_outliers=False, outlier_count=0,
                                         outlier_entry_count=0)  # fmt: skip
    return PackedBilevel((rows, n), header, codes, stats, stats2, p.perm, index, entries,
                         p.dtype)  # fmt: skip


def decode_rows(p: PackedBilevel, r0: int, r1: int, dtype: DType | None = None) -> np.ndarray:
    """Rows ``[r0, r1)`` decoded: from the slice alone when cheap, else whole rows decoded."""
    if is_cheap_row_slice(p, r0, r1):
        return reference.decode_bilevel(slice_rows(p, r0, r1), dtype)
    return reference.decode_bilevel(p, dtype)[r0:r1]


def decode_columns(p: PackedBilevel, c0: int, c1: int, dtype: DType | None = None) -> np.ndarray:
    """Original columns ``[c0, c1)``: every row decoded, then sliced (see the module text)."""
    return np.ascontiguousarray(reference.decode_bilevel(p, dtype)[:, c0:c1])


def column_blocks(p: PackedBilevel, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous blocks of stored columns at group boundaries (as equal as the
    groups allow; a block may be empty when there are fewer groups than parts)."""
    n, g = p.shape[1], p.params.group_size
    groups = -(-n // g)
    edges = [min(n, (k * groups // parts) * g) for k in range(parts)] + [n]
    return [(edges[k], edges[k + 1]) for k in range(parts)]


def slice_stored_columns(p: PackedBilevel, j0: int, j1: int) -> PackedBilevel:
    """Stored columns ``[j0, j1)`` as a standalone :class:`PackedBilevel` without permutation
    (see the module text); ``j0`` and ``j1`` (unless ``n``) multiples of the group size."""
    from spqr_format.codec.bilevel import Outliers
    from spqr_format.codec.packing import pack, unpack

    m, n = p.shape
    g = p.params.group_size
    if not (0 <= j0 < j1 <= n) or j0 % g or (j1 % g and j1 != n):
        raise NotCheapError(f"stored columns [{j0}, {j1}) of a {p.shape} tensor do not start "
                            f"and end at groups of {g}")  # fmt: skip
    t = unpack(p)
    g0, g1 = j0 // g, -(-j1 // g)
    outliers = None
    if t.outliers is not None and len(t.outliers):
        keep = (t.outliers.cols >= j0) & (t.outliers.cols < j1)
        outliers = Outliers(rows=t.outliers.rows[keep].copy(),
                            cols=(t.outliers.cols[keep] - np.uint32(j0)).astype(np.uint32),
                            values=t.outliers.values[keep].copy())  # fmt: skip
    sub = dataclasses.replace(
        t,
        shape=(m, j1 - j0),
        codes=np.ascontiguousarray(t.codes[:, j0:j1]),
        stats=np.ascontiguousarray(t.stats[:, g0:g1]),
        stats2=None if t.stats2 is None else np.ascontiguousarray(t.stats2[:, g0:g1]),
        perm=None,
        outliers=outliers,
    )
    return pack(sub)


def stored_columns(p: PackedBilevel, j0: int, j1: int) -> np.ndarray:
    """The original column of each stored column ``j0 .. j1 - 1`` (``perm[j0:j1]``)."""
    if p.perm is None:
        return np.arange(j0, j1, dtype=np.int64)
    return np.asarray(p.perm[j0:j1], dtype=np.int64)


__all__ = ["NotCheapError", "column_blocks", "decode_columns", "decode_rows",
           "is_cheap_row_slice", "row_boundary", "slice_rows", "slice_stored_columns",
           "stored_columns"]  # fmt: skip
