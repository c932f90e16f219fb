"""The CMPQ chunk layout: the runtime form of a ``channel_mixed`` tensor for the GPU kernels.

A file stores each width run's codes as one dense row-major packed stream (SPEC C-12.3), its
tables back to back per row block (C-12.5) and outliers per block of 16 rows (C-6.2). The
kernels of ``spqr_format/gpu/kernels/spqr_cmpq.cu`` want one thread per row that loads 32
codes of its row with ``b`` coalesced 32-bit loads, tables in whole 32-column chunks and a
row's outliers behind per-row offsets. This module builds that form once, at load time
(SPEC section 7, "Runtime layouts"); it is not a file format. ``spqr_gpu.h`` documents it for
the C kernels.

Per run ``r`` (width ``b``, stored columns ``s .. s + c - 1``), ``K = ceil(c / 32)`` *chunks*
of 32 columns (the last padded with zero codes and zero table entries):

- ``codes``: u32, run after run; run ``r`` starts at word ``code_off``; chunk ``k``, word
  ``w`` (0..b-1), row ``i`` is word ``code_off + (k*b + w)*m + i``, holding codes
  ``32k .. 32k+31`` of row ``i`` LSB first (C-5.2 within the 32 codes). At each outlier the
  code is replaced by the code whose table value is nearest to the outlier (a matvec adds the
  outlier as a correction to that value; decoders ignore the code there, C-12.6).
- ``tables``: u16 (f16 bits) ``[T][Lp]``; run ``r`` starts at entry ``tab_off`` of a block,
  padded column ``jl`` of the run (``0 .. 32K-1``) at ``tab_off + (jl << b)``.
- padded columns: run ``r``'s padded column ``jl`` is column ``pad_start + jl`` of the padded
  input ``x'``; ``pcol[jp]`` is its original column (``perm`` of the stored column) or
  ``0xFFFFFFFF`` for padding.
- ``runs``: int64 ``[nruns, 8]``: start, count, bits, code_off, tab_off, pad_start, chunks, 0.
- outliers (or None): ``orows`` u32 ``[m + 1]`` per-row offsets, ``ocol`` u32 stored column,
  ``ocolp`` u32 padded column, ``oval`` u16 the f16 value, ``ocorr`` f32 ``o - T[q]`` for the
  code ``q`` stored at that position in ``codes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spqr_format.codec import channel_mixed as cm
from spqr_format.codec.packing import _pack_blocks, unpack_stream
from spqr_format.spec import DType

CHUNK = 32
NO_COLUMN = 0xFFFFFFFF
# Column tile of the matmul kernel: 32 * max(1, min(TILE_TABLE_CHUNKS >> b, TILE_X_CHUNKS // nb))
# columns, so the tile's f32 tables take at most 16 KiB (32 KiB for b = 8) and its x' at most
# 8 KiB of shared memory.
TILE_TABLE_CHUNKS = 128
TILE_X_CHUNKS = 64
MATMUL_ROWS = 256  # rows per block of spqr_cmpq_mm_* and spqr_cmpq_mv1_* (SPQR_CMPQ_ROWS)
# Column tile of the tensor-core kernels spqr_cmpq_tc_*: 32 * max(1, min(TC_TILE_TABLE_CHUNKS >>
# b, TC_TILE_CHUNKS)) columns; f16 tables with one table of skew per 8 columns (at most ~18 KiB)
# and x' in fragment order (16 KiB at 16 batch columns).
TC_TILE_TABLE_CHUNKS = 256
TC_TILE_CHUNKS = 16
TC_ROWS = 128  # rows per block of spqr_cmpq_tc_* (SPQR_CMPQ_TC_ROWS)


@dataclass
class CmpqLayout:
    shape: tuple[int, int]
    table_rows: int  # R (0: one table block)
    table_blocks: int  # T
    runs: np.ndarray  # int64 [nruns, 8]
    codes: np.ndarray  # uint32
    tables: np.ndarray  # uint16 [T * Lp]
    Lp: int
    np_: int  # padded columns
    pcol: np.ndarray  # uint32 [np_]
    perm: np.ndarray  # uint32 [n]
    inv_perm: np.ndarray  # uint32 [n]
    orows: np.ndarray | None
    ocol: np.ndarray | None
    ocolp: np.ndarray | None
    oval: np.ndarray | None  # uint16
    ocorr: np.ndarray | None  # float32
    dtype: DType = DType.FLOAT16

    @property
    def has_outliers(self) -> bool:
        return self.orows is not None


def tile_chunks(bits: int, nb: int) -> int:
    return max(1, min(TILE_TABLE_CHUNKS >> bits, TILE_X_CHUNKS // nb))


def tc_tile_chunks(bits: int) -> int:
    return max(1, min(TC_TILE_TABLE_CHUNKS >> bits, TC_TILE_CHUNKS))


def tc_tile_smem(nch: int, bits: int, nt: int) -> int:
    """Shared memory of one spqr_cmpq_tc_* tile: the skewed f16 tables (36 table slots per 32
    columns), 16-byte aligned, then x' for ``nt`` n-tiles of 8 (512 bytes a chunk and n-tile)."""
    return 16 * -(-(((nch * 36) << bits) * 2) // 16) + nch * nt * 512


def tiles(
    layout: CmpqLayout, nb: int, min_tiles: int = 1, tc: bool = False
) -> tuple[np.ndarray, int]:
    """Column tiles of the matmul kernels for ``nb`` batch columns: int64 ``[ntiles, 8]``
    (bits, chunks, first code word, first table entry, first padded column, 0, 0, 0), in run
    order, and the dynamic shared memory the kernel needs (bytes). ``tc``: the tiles of
    spqr_cmpq_tc_* (``nb`` a multiple of 8), else of spqr_cmpq_mm_* / spqr_cmpq_mv1_*. Tiles
    are made smaller (down to one chunk) until there are about ``min_tiles`` of them (small
    matrices: enough blocks for the GPU)."""
    m = layout.shape[0]
    rows, smem = [], 4
    total = int(layout.runs[:, 6].sum()) if layout.runs.size else 0
    cap = max(1, total // max(1, min_tiles))
    for _start, _count, b, code_off, tab_off, pad0, chunks, _ in layout.runs.tolist():
        step = min(tc_tile_chunks(b) if tc else tile_chunks(b, nb), cap)
        for k0 in range(0, chunks, step):
            nch = min(step, chunks - k0)
            rows.append([b, nch, code_off + k0 * b * m, tab_off + ((k0 * CHUNK) << b),
                         pad0 + k0 * CHUNK, 0, 0, 0])  # fmt: skip
            ncols = nch * CHUNK
            if tc:
                smem = max(smem, tc_tile_smem(nch, b, nb // 8))
            else:
                smem = max(smem, 4 * ((ncols << b) + (ncols * nb if nb > 1 else 0)))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 8), smem


def width_groups(tl: np.ndarray) -> list[tuple[int, int, int]]:
    """(bits, first tile, tiles) of each width in a tiles() array: the per-width kernels
    (spqr_cmpq_mv1_b*, spqr_cmpq_tc_b*) take one group each."""
    out: list[tuple[int, int, int]] = []
    for i, b in enumerate(tl[:, 0].tolist()):
        if out and out[-1][0] == b:
            out[-1] = (b, out[-1][1], out[-1][2] + 1)
        else:
            out.append((b, i, 1))
    return out


def _chunk_words(words: np.ndarray, m: int, c: int, b: int) -> np.ndarray:
    """A run's packed stream (m rows of c codes) -> uint32 [K, b, m]."""
    k = -(-c // CHUNK)
    if c % CHUNK == 0:  # rows are whole chunks: a transpose of the words
        return np.ascontiguousarray(
            np.asarray(words, np.uint32)[: m * k * b].reshape(m, k, b).transpose(1, 2, 0)
        )
    vals = unpack_stream(np.asarray(words, np.uint32), b, m * c).reshape(m, c)
    pad = np.zeros((m, k * CHUNK), np.uint8)
    pad[:, :c] = vals
    blocks = _pack_blocks(pad.reshape(-1, CHUNK), b)  # [m*k, b]
    return np.ascontiguousarray(blocks.reshape(m, k, b).transpose(1, 2, 0))


def _set_codes(cw: np.ndarray, rows, jloc, q, b: int) -> None:
    """Overwrite the codes of (row, run column) in a run's [K, b, m] words."""
    k = jloc // CHUNK
    bit = (jloc % CHUNK) * b
    w = bit >> 5
    sh = (bit & 31).astype(np.uint64)
    mask = np.uint64((1 << b) - 1)
    q = q.astype(np.uint64)
    lo_clear = (~(mask << sh) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    np.bitwise_and.at(cw, (k, w, rows), lo_clear)
    np.bitwise_or.at(cw, (k, w, rows), ((q << sh) & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    st = (sh + np.uint64(b)) > np.uint64(32)
    if np.any(st):
        k2, w2, r2, sh2, q2 = k[st], w[st] + 1, rows[st], sh[st], q[st]
        hi = np.uint64(32) - sh2
        np.bitwise_and.at(
            cw, (k2, w2, r2), (~(mask >> hi) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        )
        np.bitwise_or.at(cw, (k2, w2, r2), (q2 >> hi).astype(np.uint32))


def to_cmpq_layout(p: cm.PackedChannelMixed, *, validate: bool = True) -> CmpqLayout:
    """Build the chunk layout of a file-form ``channel_mixed`` tensor. ``validate`` runs the
    data checks of SPEC C-12.8 first (the kernels trust their input: an invalid permutation
    or outlier column would make them read or write out of bounds)."""
    o = cm.checked_outliers(p, validate)
    m, n = p.shape
    geo = p.geometry
    R = p.header.table_rows
    T = geo.table_blocks
    file_tables = np.asarray(p.tables, np.uint16).reshape(T, geo.table_entries)
    perm = np.asarray(p.perm).astype(np.uint32)
    if not validate:  # memory safety only: out-of-range entries read column 0
        perm = np.where(perm < n, perm, 0).astype(np.uint32)
    runs, code_parts, tab_parts = [], [], []
    code_off = tab_off = pad0 = 0
    for r in geo.runs:
        k = -(-r.count // CHUNK)
        runs.append([r.start, r.count, r.bits, code_off, tab_off, pad0, k, 0])
        words = np.asarray(p.codes[r.word_offset : r.word_offset + r.words], np.uint32)
        code_parts.append(_chunk_words(words, m, r.count, r.bits))
        t = np.zeros((T, (k * CHUNK) << r.bits), np.uint16)
        t[:, : r.count << r.bits] = file_tables[
            :, r.table_offset : r.table_offset + (r.count << r.bits)
        ]
        tab_parts.append(t)
        code_off += k * r.bits * m
        tab_off += (k * CHUNK) << r.bits
        pad0 += k * CHUNK
    runs_a = np.asarray(runs, np.int64).reshape(-1, 8)
    np_ = pad0
    pcol = np.full(np_, NO_COLUMN, np.uint32)
    for start, count, _b, _c, _t, p0, _k, _ in runs:
        pcol[p0 : p0 + count] = perm[start : start + count]
    inv = np.empty(n, np.uint32)
    inv[perm] = np.arange(n, dtype=np.uint32)
    orows = ocol = ocolp = oval = ocorr = None
    if o is not None and len(o) > 0:
        rows = np.asarray(o.rows, np.int64)
        cols = np.asarray(o.cols, np.int64)
        vals = np.asarray(o.values).astype(np.float16)
        order = np.lexsort((cols, rows))
        rows, cols, vals = rows[order], cols[order], vals[order]
        ocolp = np.empty(rows.shape[0], np.uint32)
        ocorr = np.empty(rows.shape[0], np.float32)
        for ri, (start, count, b, _c, _toff, p0, _k, _) in enumerate(runs):
            sel = np.nonzero((cols >= start) & (cols < start + count))[0]
            if sel.size == 0:
                continue
            jl = cols[sel] - start
            tb = rows[sel] // R if R else np.zeros(sel.size, np.int64)
            ent = tab_parts[ri][tb[:, None], (jl[:, None] << b) + np.arange(1 << b)[None, :]]
            tv = ent.view(np.float16).astype(np.float64)
            ov = vals[sel].astype(np.float64)
            q = np.argmin(np.abs(tv - ov[:, None]), axis=1)
            _set_codes(code_parts[ri], rows[sel], jl, q, b)
            ocolp[sel] = p0 + jl
            ocorr[sel] = (ov - tv[np.arange(sel.size), q]).astype(np.float32)
        orows = np.searchsorted(rows, np.arange(m + 1), side="left").astype(np.uint32)
        ocol = cols.astype(np.uint32)
        oval = vals.view(np.uint16)
    codes = (
        np.concatenate([c.reshape(-1) for c in code_parts])
        if code_parts
        else np.zeros(1, np.uint32)
    )
    Lp = int(sum(t.shape[1] for t in tab_parts))
    tables = np.concatenate(tab_parts, axis=1).reshape(-1) if tab_parts else np.zeros(1, np.uint16)
    return CmpqLayout(
        shape=(m, n),
        table_rows=R,
        table_blocks=T,
        runs=runs_a,
        codes=np.ascontiguousarray(codes, np.uint32),
        tables=np.ascontiguousarray(tables, np.uint16),
        Lp=Lp,
        np_=np_,
        pcol=pcol,
        perm=perm,
        inv_perm=inv,
        orows=orows,
        ocol=ocol,
        ocolp=ocolp,
        oval=oval,
        ocorr=ocorr,
        dtype=p.dtype,
    )


def reference_matmul(layout: CmpqLayout, x: np.ndarray) -> np.ndarray:
    """``Y = X W^T`` in f64 from the layout alone (numpy; a check of the layout, not fast):
    decodes every weight from the chunk codes and tables as the kernels do."""
    m, n = layout.shape
    W = dense_from_layout(layout).astype(np.float64)
    return np.asarray(x, np.float64) @ W.T


def dense_from_layout(layout: CmpqLayout) -> np.ndarray:
    """f32 ``W[m, n]`` decoded from the layout as the dequantize kernel does (tests)."""
    m, n = layout.shape
    out = np.empty((m, n), np.float32)
    tabs = layout.tables.reshape(layout.table_blocks, layout.Lp).view(np.float16)
    tb = (np.arange(m) // layout.table_rows) if layout.table_rows else np.zeros(m, np.int64)
    for start, count, b, code_off, toff, _p0, k, _ in layout.runs.tolist():
        cw = layout.codes[code_off : code_off + k * b * m].reshape(k, b, m)
        vals = _unpack_chunks(cw, b)[:, :count]  # [m, count]
        idx = toff + (np.arange(count)[None, :] << b) + vals.astype(np.int64)
        v = tabs[tb[:, None], idx].astype(np.float32)
        out[:, layout.perm[start : start + count]] = v
    if layout.has_outliers:
        rows = np.repeat(np.arange(m), np.diff(layout.orows.astype(np.int64)))
        out[rows, layout.perm[layout.ocol]] = layout.oval.view(np.float16).astype(np.float32)
    return out


def _unpack_chunks(cw: np.ndarray, b: int) -> np.ndarray:
    """uint32 [K, b, m] -> uint8 [m, 32K]."""
    k, _, m = cw.shape
    from spqr_format.codec.packing import _unpack_blocks

    blocks = cw.transpose(2, 0, 1).reshape(m * k, b)
    return _unpack_blocks(np.ascontiguousarray(blocks), b).reshape(m, k * CHUNK)
