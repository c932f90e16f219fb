"""The outlier stream of a bilevel tensor (SPEC section 6).

Outliers are kept as ``(row, stored column, f16 value)`` triples (:class:`Outliers`). In a file
they are a delta-coded stream split into blocks of 16 rows: ``outlier_index`` (``ceil(m/16)+1``
u32 offsets, one per block, C-6.1) and ``outlier_entries`` (u32 words, ``delta`` in bits 0..15,
f16 ``value`` in bits 16..31, C-6.2). Within a block the cells are numbered row-major
(``(i - 16*blk) * n + c``) and a running cell number that starts at -1 in every block advances by
each entry's delta; a gap wider than 65535 is bridged by *skip* entries ``(65535, 0xFFFF)``.
C-6.3 makes the form unique, and the decoder here rejects every stream that is not in it.

The same code, with blocks of one row, builds the per-row stream that the first-generation GPU
kernels read (:mod:`spqr_format.codec.row_layout`): ``block_rows`` is a parameter throughout.

Everything is vectorized: the running cell of every entry is a per-block prefix sum of the
deltas, computed as one global ``cumsum`` minus its value at the start of the entry's block.
"""

from __future__ import annotations

import numpy as np

from spqr_format import spec
from spqr_format.codec.bilevel import Outliers
from spqr_format.errors import BadInputError, BadOutliersError, NonFiniteError

SKIP_ENTRY = np.uint32((spec.OUTLIER_SKIP_VALUE << 16) | spec.OUTLIER_MAX_DELTA)  # 0xFFFFFFFF
_MAX_DELTA = spec.OUTLIER_MAX_DELTA
_BLOCK = spec.OUTLIER_BLOCK_ROWS


def check_outliers(outliers: Outliers, m: int, n: int) -> None:
    """Check an :class:`Outliers` an encoder wants stored (BadInputError naming the field):
    1-D arrays of equal length, dtypes uint32/uint32/float16, rows < m, cols < n, sorted by
    (row, col) with no repeated position, values finite."""
    arrays = (("rows", np.uint32), ("cols", np.uint32), ("values", np.float16))
    for name, dt in arrays:
        a = getattr(outliers, name)
        if not isinstance(a, np.ndarray) or a.dtype != dt or a.ndim != 1:
            got = f"{a.dtype}{list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
            raise BadInputError(
                f"must be a 1-D {np.dtype(dt)} array, got {got}", field=f"outliers.{name}"
            )
    k = outliers.rows.shape[0]
    if outliers.cols.shape[0] != k or outliers.values.shape[0] != k:
        raise BadInputError(
            f"rows, cols, values have lengths {k}, {outliers.cols.shape[0]}, "
            f"{outliers.values.shape[0]}",
            field="outliers",
        )
    if k == 0:
        return
    rows = outliers.rows.astype(np.int64)
    cols = outliers.cols.astype(np.int64)
    for name, a, lim in (("rows", rows, m), ("cols", cols, n)):
        bad = np.flatnonzero(a >= lim)
        if bad.size:
            i = int(bad[0])
            raise BadInputError(
                f"outlier {i} has {name[:-1]} {int(a[i])}, not < {lim}", field=f"outliers.{name}"
            )
    key = rows * n + cols  # < m*n <= 2**48: no overflow in int64
    bad = np.flatnonzero(key[1:] <= key[:-1])
    if bad.size:
        i = int(bad[0]) + 1
        raise BadInputError(
            f"outlier {i} at ({int(rows[i])}, {int(cols[i])}) does not come after outlier "
            f"{i - 1} at ({int(rows[i - 1])}, {int(cols[i - 1])}): outliers must be sorted by "
            "(row, col) and unique",
            field="outliers",
        )
    vbits = outliers.values.view(np.uint16)
    bad = np.flatnonzero((vbits & 0x7C00) == 0x7C00)
    if bad.size:
        i = int(bad[0])
        raise BadInputError(
            f"outlier {i} value 0x{int(vbits[i]):04x} is not a finite f16", field="outliers.values"
        )


def encode_outlier_stream(
    outliers: Outliers, m: int, n: int, block_rows: int = _BLOCK
) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode outliers (already valid, see :func:`check_outliers`) in the unique form of C-6.3.

    Returns ``(index uint32[ceil(m / block_rows) + 1], entries uint32[E], K)`` with ``K`` the
    number of outliers. ``block_rows`` is 16 in a file (C-6.1); 1 gives per-row offsets.
    """
    rows = np.asarray(outliers.rows, dtype=np.int64)
    cols = np.asarray(outliers.cols, dtype=np.int64)
    k = rows.shape[0]
    blocks = -(-m // block_rows)
    block = rows // block_rows
    cell = (rows - block * block_rows) * n + cols  # < block_rows * n <= 2**44: no overflow
    # Running cell before each outlier: -1 at the start of a block, else the previous cell.
    prev = np.full(k, -1, dtype=np.int64)
    if k > 1:
        same = block[1:] == block[:-1]
        prev[1:][same] = cell[:-1][same]
    gap = cell - prev  # >= 1
    # C-6.3: while gap > 65535, a skip adds 65535. The number of skips is the smallest s with
    # gap - 65535*s <= 65535, i.e. ceil(gap / 65535) - 1 = (gap - 1) // 65535.
    skips = (gap - 1) // _MAX_DELTA
    delta = gap - skips * _MAX_DELTA
    ends = np.cumsum(skips + 1)  # one past the index of each outlier's own entry
    e = int(ends[-1]) if k else 0
    entries = np.full(e, SKIP_ENTRY, dtype=np.uint32)
    values = np.asarray(outliers.values, dtype=np.float16).view(np.uint16).astype(np.uint32)
    entries[ends - 1] = (values << np.uint32(16)) | delta.astype(np.uint32)
    # index[b] = entries of the outliers in blocks < b.
    first = np.searchsorted(block, np.arange(blocks + 1), side="left")
    index = np.concatenate(([0], ends))[first].astype(np.uint32)
    return index, entries, k


def _block_of(index: np.ndarray, idx: int) -> int:
    """Block that entry ``idx`` belongs to under a valid index."""
    return int(np.searchsorted(index, idx, side="right")) - 1


def decode_outlier_stream(
    index: np.ndarray,
    entries: np.ndarray,
    m: int,
    n: int,
    outlier_count: int,
    block_rows: int = _BLOCK,
) -> Outliers:
    """Decode and validate an outlier stream (C-6.1, C-6.2).

    Raises BadOutliersError for each broken rule, saying which block / entry and what was
    expected, and NonFiniteError for a non-skip value that is NaN or infinite.
    """
    blocks = -(-m // block_rows)
    r = np.asarray(index).astype(np.int64)
    ent = np.asarray(entries).astype(np.uint32, copy=False)
    if r.shape != (blocks + 1,):
        raise BadOutliersError(
            f"outlier_index has shape {r.shape}, expected ({blocks + 1},)", field="outlier_index"
        )
    if ent.ndim != 1:
        raise BadOutliersError("outlier_entries must be 1-D", field="outlier_entries")
    e = ent.shape[0]
    # C-6.1: index[0] = 0, non-decreasing, index[B] = E.
    if r[0] != 0:
        raise BadOutliersError(f"index[0] is {int(r[0])}, expected 0", field="outlier_index")
    dec = np.flatnonzero(r[1:] < r[:-1])
    if dec.size:
        b = int(dec[0])
        raise BadOutliersError(
            f"index[{b + 1}] = {int(r[b + 1])} is less than index[{b}] = {int(r[b])} (block {b}"
            " would have a negative number of entries)",
            field="outlier_index",
        )
    if r[blocks] != e:
        raise BadOutliersError(
            f"index[{blocks}] is {int(r[blocks])}, expected the entry count {e}",
            field="outlier_index",
        )

    delta = (ent & np.uint32(0xFFFF)).astype(np.int64)
    value = (ent >> np.uint32(16)).astype(np.uint16)
    skip = value == spec.OUTLIER_SKIP_VALUE

    bad = np.flatnonzero(delta == 0)
    if bad.size:
        j = int(bad[0])
        raise BadOutliersError(
            f"entry {j} (block {_block_of(r, j)}) has delta 0, expected >= 1 (positions must "
            "strictly increase)",
            field="outlier_entries",
        )
    bad = np.flatnonzero(skip & (delta != _MAX_DELTA))
    if bad.size:
        j = int(bad[0])
        raise BadOutliersError(
            f"entry {j} (block {_block_of(r, j)}) is a skip with delta {int(delta[j])}, "
            f"expected {_MAX_DELTA}",
            field="outlier_entries",
        )
    # The last entry of each non-empty block is at index[b+1] - 1; it must not be a skip.
    counts = np.diff(r)
    last = r[1:][counts > 0] - 1
    bad = last[skip[last]]
    if bad.size:
        j = int(bad[0])
        raise BadOutliersError(
            f"entry {j} is a skip and the last entry of block {_block_of(r, j)}; a block's last "
            "entry must be an outlier",
            field="outlier_entries",
        )

    # Running cell: -1 + (sum of the block's deltas up to and including this entry).
    block_of_entry = np.repeat(np.arange(blocks, dtype=np.int64), counts)
    csum = np.cumsum(delta)  # <= E * 65535 < 2**48
    before = np.concatenate(([0], csum))[r[:-1]]  # sum of deltas of earlier blocks
    cell = csum - before[block_of_entry] - 1
    row_in_block = cell // n
    row = block_of_entry * block_rows + row_in_block
    col = cell - row_in_block * n
    real = ~skip
    bad = np.flatnonzero(real & (row >= np.minimum(block_of_entry * block_rows + block_rows, m)))
    if bad.size:
        j = int(bad[0])
        b = int(block_of_entry[j])
        raise BadOutliersError(
            f"entry {j} (block {b}) puts an outlier at cell {int(cell[j])} of the block, "
            f"expected < {min(block_rows, m - b * block_rows) * n} (rows x n)",
            field="outlier_entries",
        )
    k = int(np.count_nonzero(real))
    if k != outlier_count:
        raise BadOutliersError(
            f"the stream has {k} outliers (non-skip entries), but outlier_count is {outlier_count}",
            field="params.outlier_count",
        )
    bad = np.flatnonzero(real & ((value & 0x7C00) == 0x7C00))
    if bad.size:
        j = int(bad[0])
        raise NonFiniteError(
            f"entry {j} (row {int(row[j])}, column {int(col[j])}) has value "
            f"0x{int(value[j]):04x}, not a finite f16",
            field="outlier_entries",
        )
    return Outliers(
        rows=row[real].astype(np.uint32),
        cols=col[real].astype(np.uint32),
        values=value[real].view(np.float16),
    )


def outlier_coordinates_unchecked(
    index: np.ndarray, entries: np.ndarray, m: int, n: int, block_rows: int = _BLOCK
) -> Outliers:
    """The outliers of a stream *not* known to be valid, without raising: offsets clamped to
    ``[0, E]`` and made non-decreasing, entries that land outside their block dropped, skips
    dropped. For a valid stream this equals :func:`decode_outlier_stream`; for an invalid one
    the result is unspecified but every coordinate is in range (decoding with validation off
    must stay memory-safe)."""
    blocks = -(-m // block_rows)
    ent = np.asarray(entries).astype(np.uint32, copy=False).reshape(-1)
    e = ent.shape[0]
    raw = np.asarray(index).astype(np.int64).reshape(-1)[: blocks + 1]
    r = np.full(blocks + 1, e, dtype=np.int64)
    r[: raw.shape[0]] = np.clip(raw, 0, e)
    r = np.maximum.accumulate(r)
    counts = np.diff(r)
    lo, hi = int(r[0]), int(r[-1])
    delta = (ent[lo:hi] & np.uint32(0xFFFF)).astype(np.int64)
    value = (ent[lo:hi] >> np.uint32(16)).astype(np.uint16)
    block_of_entry = np.repeat(np.arange(blocks, dtype=np.int64), counts)
    csum = np.cumsum(delta)
    before = np.concatenate(([0], csum))[r[:-1] - lo]
    cell = csum - before[block_of_entry] - 1
    row = block_of_entry * block_rows + cell // n
    col = cell % n
    keep = (value != spec.OUTLIER_SKIP_VALUE) & (cell >= 0)
    keep &= row < np.minimum(block_of_entry * block_rows + block_rows, m)
    # A stream that is not strictly increasing may name a cell twice: keep the last entry.
    order = np.flatnonzero(keep)
    return Outliers(
        rows=row[order].astype(np.uint32),
        cols=col[order].astype(np.uint32),
        values=value[order].view(np.float16),
    )


def decoder_outliers(p, validate: bool, check_data, check_structure) -> Outliers | None:
    """The outliers of the packed tensor ``p`` in coordinate form (None without outliers), for
    a decoder: ``check_data(p)`` (every data check; returns them) when ``validate``, else
    ``check_structure(p)`` and :func:`outlier_coordinates_unchecked`, so that a bad stream
    gives unspecified values but every index stays in range (decoding unvalidated data must
    stay memory-safe)."""
    if validate:
        return check_data(p)
    check_structure(p)
    if not p.header.has_outliers:
        return None
    m, n = p.shape
    return outlier_coordinates_unchecked(p.outlier_index, p.outlier_entries, m, n)
