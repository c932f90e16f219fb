"""The row layout: the runtime form of a bilevel tensor that spqr-format's GPU kernels read.

A file packs densely (SPEC C-5.2: one bit stream per section, no padding between rows; u16
permutation entries when they fit; outliers indexed per block of 16 rows), because every bit
of padding is paid on every row of every stored model. A kernel wants the opposite: every row
starting on a 16-byte boundary, so that a thread loads 128 codes with one vector load, and a
row's outliers found without decoding its neighbours'. This module builds that form once, when a
tensor is uploaded (SPEC section 7, "Runtime layouts"): it is not a file format and has no
version. ``spqr_gpu.h`` documents it for the C kernels; ``spqr_row_layout.c`` is its C twin.

- ``codes``: ``uint32[m, row_words(n, b)]``: row ``i`` is the packed string of its ``n`` codes,
  padded with zero elements to a multiple of 128 elements (``ceil(n/128) * 4 * b`` words);
- ``stats`` (``sb > 0``): ``uint32[m, row_words(2G, sb)]``, the same for the statistics codes;
  with ``sb = 0`` the f16 pairs ``uint16[m, G, 2]`` as in the file;
- ``perm``: ``uint32[n]`` whatever ``n``;
- ``outlier_rows`` (``m + 1`` offsets) and ``outlier_entries``: the outlier stream of SPEC
  section 6 with blocks of one row, i.e. a running column that restarts at -1 in every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spqr_format.codec.bilevel import BilevelHeader, BilevelParams, PackedBilevel
from spqr_format.codec.outliers import encode_outlier_stream
from spqr_format.codec.packing import _pack_blocks, unpack_stream
from spqr_format.codec.validation import checked_outliers
from spqr_format.spec import DType

ROW_CHUNK_ELEMENTS = 128  # a padded row holds whole chunks of 128 elements (16 * b bytes)


def row_words(count: int, bits: int) -> int:
    """u32 words of one padded row of ``count`` elements of ``bits`` bits."""
    return -(-count // ROW_CHUNK_ELEMENTS) * (ROW_CHUNK_ELEMENTS // 32) * bits


def pack_padded_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """``uint8[m, N]`` -> ``uint32[m, row_words(N, bits)]``, each row packed LSB first and
    padded with zero elements to a multiple of 128 elements."""
    m, count = values.shape
    padded = row_words(count, bits) * 32 // bits
    src = np.zeros((m, padded), dtype=np.uint8)
    src[:, :count] = values
    return _pack_blocks(src.reshape(-1, 32), bits).reshape(m, -1)


def stream_to_padded_rows(words: np.ndarray, rows: int, count: int, bits: int) -> np.ndarray:
    """A packed stream of ``rows * count`` elements -> ``uint32[rows, row_words(count, bits)]``.

    When a row is a whole number of words (``count * bits % 32 == 0``, every real layer width)
    rows are copied word for word; otherwise the stream is unpacked and repacked per row."""
    words = np.asarray(words, dtype=np.uint32).reshape(-1)
    width = row_words(count, bits)
    if (count * bits) % 32 == 0:
        per_row = count * bits // 32
        src = words[: rows * per_row].reshape(rows, per_row)
        if per_row == width:
            return np.ascontiguousarray(src)
        out = np.zeros((rows, width), dtype=np.uint32)
        out[:, :per_row] = src
        return out
    values = unpack_stream(words, bits, rows * count).reshape(rows, count)
    return pack_padded_rows(values, bits)


@dataclass
class RowLayout:
    """A bilevel tensor in the row layout (see the module docstring); field names and types are
    those of the kernels' arguments (``spqr_gpu.h``)."""

    shape: tuple[int, int]
    header: BilevelHeader
    codes: np.ndarray  # uint32 [m, row_words(n, b)]
    stats: np.ndarray  # sb = 0: uint16 [m, G, 2]; sb > 0: uint32 [m, row_words(2G, sb)]
    stats2: np.ndarray | None  # uint16 [T, G, 4]
    perm: np.ndarray | None  # uint32 [n]
    outlier_rows: np.ndarray | None  # uint32 [m + 1]
    outlier_entries: np.ndarray | None  # uint32 [E'] (per-row stream)
    dtype: DType = DType.FLOAT16

    @property
    def params(self) -> BilevelParams:
        return self.header.params


def to_row_layout(p: PackedBilevel, *, validate: bool = True) -> RowLayout:
    """Build the row layout of a file-form tensor. ``validate`` runs the data checks of SPEC
    C-9.3 first (the kernels trust their input); without them the outlier stream is read by
    the non-raising path, so a bad stream gives unspecified values but in-range indices."""
    coords = checked_outliers(p, validate)
    m, n = p.shape
    prm = p.params
    geo = p.geometry
    codes = stream_to_padded_rows(p.codes, m, n, prm.bits)
    if prm.stats_bits:
        stats = stream_to_padded_rows(p.stats, m, 2 * geo.groups, prm.stats_bits)
    else:
        stats = np.asarray(p.stats, dtype=np.uint16)
    perm = None if p.perm is None else np.asarray(p.perm).astype(np.uint32)
    rows = entries = None
    header = p.header
    if coords is not None:
        rows, entries, k = encode_outlier_stream(coords, m, n, block_rows=1)
        header = BilevelHeader(
            params=prm,
            has_perm=header.has_perm,
            has_outliers=entries.shape[0] > 0,
            outlier_count=k,
            outlier_entry_count=int(entries.shape[0]),
        )
        if entries.shape[0] == 0:
            rows = entries = None
    return RowLayout(
        shape=(m, n),
        header=header,
        codes=codes,
        stats=stats,
        stats2=None if p.stats2 is None else np.asarray(p.stats2, dtype=np.uint16),
        perm=perm,
        outlier_rows=rows,
        outlier_entries=entries,
        dtype=p.dtype,
    )

