"""The outlier stream of a bilevel tensor (SPEC section 6).

Outliers are kept as ``(row, stored column, f16 value)`` triples (:class:`Outliers`). In a file
they are a CSR-like stream: ``outlier_rows`` (``R``, ``m + 1`` u32 row offsets, C-6.1) and
``outlier_entries`` (u32 words, ``delta`` in bits 0..15, f16 ``value`` in bits 16..31, C-6.2).
Columns are delta-coded from a running column that starts at -1 in every row; a gap wider
than 65535 is bridged by *skip* entries ``(65535, 0xFFFF)``. C-6.3 makes the form unique, and
the decoder here rejects every stream that is not in that form.

Everything is vectorized: the running column of every entry is a per-row prefix sum of the
deltas, computed as one global ``cumsum`` minus its value at the start of the entry's row.
"""

from __future__ import annotations

import numpy as np

from spqr_format import spec
from spqr_format.codec.bilevel import Outliers
from spqr_format.errors import BadInputError, BadOutliersError, NonFiniteError

SKIP_ENTRY = np.uint32((spec.OUTLIER_SKIP_VALUE << 16) | spec.OUTLIER_MAX_DELTA)  # 0xFFFFFFFF
_MAX_DELTA = spec.OUTLIER_MAX_DELTA


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


def encode_outlier_stream(outliers: Outliers, m: int, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode outliers (already valid, see :func:`check_outliers`) in the unique form of C-6.3.

    Returns ``(R uint32[m + 1], entries uint32[E], K)`` with ``K`` the number of outliers.
    """
    rows = np.asarray(outliers.rows, dtype=np.int64)
    cols = np.asarray(outliers.cols, dtype=np.int64)
    k = rows.shape[0]
    # Running column before each outlier: -1 at the start of a row, else the previous column.
    prev = np.full(k, -1, dtype=np.int64)
    if k > 1:
        same_row = rows[1:] == rows[:-1]
        prev[1:][same_row] = cols[:-1][same_row]
    gap = cols - prev  # >= 1
    # C-6.3: while gap > 65535, a skip adds 65535. The number of skips is the smallest s with
    # gap - 65535*s <= 65535, i.e. ceil(gap / 65535) - 1 = (gap - 1) // 65535.
    skips = (gap - 1) // _MAX_DELTA
    delta = gap - skips * _MAX_DELTA
    ends = np.cumsum(skips + 1)  # one past the index of each outlier's own entry
    e = int(ends[-1]) if k else 0
    entries = np.full(e, SKIP_ENTRY, dtype=np.uint32)
    values = np.asarray(outliers.values, dtype=np.float16).view(np.uint16).astype(np.uint32)
    entries[ends - 1] = (values << np.uint32(16)) | delta.astype(np.uint32)
    # R[i] = entries of the outliers in rows < i.
    first = np.searchsorted(rows, np.arange(m + 1), side="left")
    r = np.concatenate(([0], ends))[first].astype(np.uint32)
    return r, entries, k


def _row_of(r: np.ndarray, idx: int) -> int:
    """Row that entry ``idx`` belongs to under a valid ``R``."""
    return int(np.searchsorted(r, idx, side="right")) - 1


def decode_outlier_stream(
    rows: np.ndarray, entries: np.ndarray, m: int, n: int, outlier_count: int
) -> Outliers:
    """Decode and validate an outlier stream (C-6.1, C-6.2).

    Raises BadOutliersError for each broken rule, saying which row / entry and what was
    expected, and NonFiniteError for a non-skip value that is NaN or infinite.
    """
    r = np.asarray(rows).astype(np.int64)
    ent = np.asarray(entries).astype(np.uint32, copy=False)
    if r.shape != (m + 1,):
        raise BadOutliersError(
            f"outlier_rows has shape {r.shape}, expected ({m + 1},)", field="outlier_rows"
        )
    if ent.ndim != 1:
        raise BadOutliersError("outlier_entries must be 1-D", field="outlier_entries")
    e = ent.shape[0]
    # C-6.1: R[0] = 0, non-decreasing, R[m] = E.
    if r[0] != 0:
        raise BadOutliersError(f"R[0] is {int(r[0])}, expected 0", field="outlier_rows")
    dec = np.flatnonzero(r[1:] < r[:-1])
    if dec.size:
        i = int(dec[0])
        raise BadOutliersError(
            f"R[{i + 1}] = {int(r[i + 1])} is less than R[{i}] = {int(r[i])} (row {i} would "
            "have a negative number of entries)",
            field="outlier_rows",
        )
    if r[m] != e:
        raise BadOutliersError(
            f"R[{m}] is {int(r[m])}, expected the entry count {e}", field="outlier_rows"
        )

    delta = (ent & np.uint32(0xFFFF)).astype(np.int64)
    value = (ent >> np.uint32(16)).astype(np.uint16)
    skip = value == spec.OUTLIER_SKIP_VALUE

    bad = np.flatnonzero(delta == 0)
    if bad.size:
        j = int(bad[0])
        raise BadOutliersError(
            f"entry {j} (row {_row_of(r, j)}) has delta 0, expected >= 1 (columns must "
            "strictly increase)",
            field="outlier_entries",
        )
    bad = np.flatnonzero(skip & (delta != _MAX_DELTA))
    if bad.size:
        j = int(bad[0])
        raise BadOutliersError(
            f"entry {j} (row {_row_of(r, j)}) is a skip with delta {int(delta[j])}, expected "
            f"{_MAX_DELTA}",
            field="outlier_entries",
        )
    # The last entry of each non-empty row is at R[i+1] - 1; it must not be a skip.
    counts = np.diff(r)
    last = r[1:][counts > 0] - 1
    bad = last[skip[last]]
    if bad.size:
        j = int(bad[0])
        raise BadOutliersError(
            f"entry {j} is a skip and the last entry of row {_row_of(r, j)}; a row's last "
            "entry must be an outlier",
            field="outlier_entries",
        )

    # Running column: c = -1 + (sum of deltas of the row up to and including this entry).
    row_of_entry = np.repeat(np.arange(m, dtype=np.int64), counts)
    csum = np.cumsum(delta)
    before_row = np.concatenate(([0], csum))[r[:-1]]  # sum of deltas of earlier rows
    col = csum - before_row[row_of_entry] - 1
    real = ~skip
    bad = np.flatnonzero(real & (col >= n))
    if bad.size:
        j = int(bad[0])
        raise BadOutliersError(
            f"entry {j} (row {int(row_of_entry[j])}) puts an outlier at column {int(col[j])}, "
            f"expected < n = {n}",
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
            f"entry {j} (row {int(row_of_entry[j])}, column {int(col[j])}) has value "
            f"0x{int(value[j]):04x}, not a finite f16",
            field="outlier_entries",
        )
    return Outliers(
        rows=row_of_entry[real].astype(np.uint32),
        cols=col[real].astype(np.uint32),
        values=value[real].view(np.float16),
    )
