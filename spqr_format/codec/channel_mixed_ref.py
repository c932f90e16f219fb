"""Reference decoder of the ``channel_mixed`` encoding (SPEC C-12.7): numba, row-parallel.

Row ``i``, stored column ``j`` of width ``b`` in the run that starts at stored column ``s``
with ``c`` columns and codes at word ``R``: the code is element ``i * c + (j - s)`` of the run's
packed stream, i.e. bits ``[e*b, e*b + b)`` after word ``R``; the value is the f16 table entry
``t_j + code`` widened to f32; an outlier replaces it; ``W[i, perm[j]] = v``. No arithmetic is
involved, so every decoder gives the same bits by construction (f16 and f32 output are exact;
bf16 output rounds the f32 value by C-7.5).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from spqr_format import spec
from spqr_format.codec import channel_mixed as cm
from spqr_format.codec.reference import _dot8, _inverse_perm, _narrow_row
from spqr_format.errors import BadInputError
from spqr_format.spec import DType

_MODE = {DType.FLOAT32: 0, DType.FLOAT16: 1, DType.BFLOAT16: 2}


@njit(cache=True, inline="always")
def _code(codes, word_off, bit, b):
    w = word_off + (bit >> 5)
    sh = bit & 31
    v = np.uint64(codes[w]) >> np.uint64(sh)
    if sh + b > 32:
        v |= np.uint64(codes[w + 1]) << np.uint64(32 - sh)
    return np.int64(v & np.uint64((1 << b) - 1))


@njit(cache=True)
def _decode_row(i, n, codes, cwidth, cword, ccount, cpos, ctab, tables, optr, ocols, ovals, buf):
    """buf[j] = v[i, j] as f32 for every stored column j (C-12.7), outliers applied.
    ``tables`` is [T, L]; ``tables.shape[0] == 1`` or row i's block is i // R (ctab holds
    R in its last element, see _column_arrays)."""
    rows = ctab[n]
    t = np.int64(i) // rows
    for j in range(n):
        b = np.int64(cwidth[j])
        e = np.int64(i) * ccount[j] + cpos[j]
        q = _code(codes, cword[j], e * b, b)
        buf[j] = tables[t, ctab[j] + q]
    if optr.shape[0] > 0:
        for k in range(optr[i], optr[i + 1]):
            buf[ocols[k]] = ovals[k]


@njit(cache=True, parallel=True)
def _decode_kernel(m, n, codes, cwidth, cword, ccount, cpos, ctab, tables, optr, ocols, ovals,
                   inv_perm, mode, out32, out16):  # fmt: skip
    for i in prange(m):
        buf = np.empty(n, dtype=np.float32)
        _decode_row(i, n, codes, cwidth, cword, ccount, cpos, ctab, tables, optr, ocols, ovals,
                    buf)  # fmt: skip
        if mode == 0:
            for c in range(n):
                out32[i, c] = buf[inv_perm[c]]
        else:
            # f16: every value is an f16 widened exactly (C-12.7), so this narrowing is exact
            hbuf = _narrow_row(buf, mode)
            for c in range(n):
                out16[i, c] = hbuf[inv_perm[c]]


@njit(cache=True, parallel=True)
def _matvec_kernel(m, n, codes, cwidth, cword, ccount, cpos, ctab, tables, optr, ocols, ovals,
                   xp, y):  # fmt: skip
    for i in prange(m):
        buf = np.empty(n, dtype=np.float32)
        _decode_row(i, n, codes, cwidth, cword, ccount, cpos, ctab, tables, optr, ocols, ovals,
                    buf)  # fmt: skip
        y[i] = _dot8(buf, xp, n)


def _column_arrays(p: cm.PackedChannelMixed):
    """Per stored column: width, first code word of its run, run column count, position in
    the run, first table entry. All int64 except widths (uint8)."""
    geo = p.geometry
    n = p.shape[1]
    cword = np.empty(n, np.int64)
    ccount = np.empty(n, np.int64)
    cpos = np.empty(n, np.int64)
    for r in geo.runs:
        sl = slice(r.start, r.start + r.count)
        cword[sl] = r.word_offset
        ccount[sl] = r.count
        cpos[sl] = np.arange(r.count)
    # the rows per table block ride at the end of the table offsets (R = 0: all rows)
    r = p.header.table_rows or max(p.shape[0], 1)
    ctab = np.concatenate([geo.column_table_offsets(), np.array([r], np.int64)])
    return geo.column_widths(), cword, ccount, cpos, ctab


def _args(p: cm.PackedChannelMixed, validate: bool):
    o = cm.checked_outliers(p, validate)
    m, n = p.shape
    codes = np.ascontiguousarray(p.codes, dtype=np.uint32)
    if codes.shape[0] == 0:
        codes = np.zeros(1, np.uint32)
    else:
        codes = np.concatenate([codes, np.zeros(1, np.uint32)])  # straddle read of last word
    geo = p.geometry
    tables = np.ascontiguousarray(p.tables, dtype=np.uint16).view(np.float16).astype(np.float32)
    tables = tables.reshape(geo.table_blocks, geo.table_entries)
    if o is not None and len(o) > 0:
        optr = np.searchsorted(o.rows, np.arange(m + 1), side="left").astype(np.int64)
        ocols = o.cols.astype(np.int64)
        ovals = o.values.astype(np.float32)
    else:
        optr = np.zeros(0, np.int64)
        ocols = np.zeros(0, np.int64)
        ovals = np.zeros(0, np.float32)
    return (m, n, codes, *_column_arrays(p), tables, optr, ocols, ovals)


def decode_channel_mixed(
    p: cm.PackedChannelMixed, dtype: DType | str | None = None, *, validate: bool = True
) -> np.ndarray:
    """Decode to ``W[m, n]`` in original column order (SPEC C-12.7); bf16 as uint16 bits."""
    dt = spec.parse_dtype(dtype, p.dtype)
    args = _args(p, validate)
    m, n = p.shape
    inv = _inverse_perm(p.perm, n)
    mode = _MODE[dt]
    out32 = np.empty((m, n) if mode == 0 else (0, 0), np.float32)
    out16 = np.empty((m, n) if mode != 0 else (0, 0), np.uint16)
    _decode_kernel(*args, inv, mode, out32, out16)
    if mode == 0:
        return out32
    return out16.view(np.float16) if mode == 1 else out16


def decode_channel_mixed_f32(p: cm.PackedChannelMixed, *, validate: bool = True) -> np.ndarray:
    return decode_channel_mixed(p, DType.FLOAT32, validate=validate)


def matvec_channel_mixed(
    p: cm.PackedChannelMixed, x: np.ndarray, *, validate: bool = True
) -> np.ndarray:
    """``y = W x`` (x in original column order), fp32, W never materialized."""
    args = _args(p, validate)
    m, n = p.shape
    x = np.asarray(x)
    if x.shape != (n,):
        raise BadInputError(f"x must have shape ({n},), got {x.shape}", field="x")
    xp = np.take(x.astype(np.float32), p.perm, mode="clip")
    y = np.empty(m, np.float32)
    _matvec_kernel(*args, xp, y)
    return y


def dequantize(t: cm.ChannelMixedTensor, dtype: DType | str | None = None) -> np.ndarray:
    return decode_channel_mixed(cm.pack(t), dtype)
