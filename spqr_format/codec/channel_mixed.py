"""The ``channel_mixed`` encoding (SPEC section 12): CMPQ channel-wise mixed precision.

Each stored column ``j`` of ``W[m, n]`` has its own width ``b_j`` (1..8 bits) and its own
lookup table of ``2**b_j`` f16 values; the stored columns are sorted by width, so equal widths
form contiguous *runs* (at most 8), and ``perm`` puts them back in original order. The outlier
stream is the one of ``bilevel`` (SPEC section 6), over stored columns.

As for ``bilevel`` there are two forms: :class:`ChannelMixedTensor` (logical: one array per
quantity, codes as ``uint8[m, n]``) and :class:`PackedChannelMixed` (physical: the bytes of the
sections as typed views). :func:`pack` / :func:`unpack` convert; :func:`check_data` runs the
data-dependent checks of SPEC C-12.8 in their order. The numba decoder is
:mod:`spqr_format.codec.channel_mixed_ref`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from spqr_format import spec
from spqr_format.codec.bilevel import Outliers
from spqr_format.codec.outliers import (
    check_outliers,
    decode_outlier_stream,
    decoder_outliers,
    encode_outlier_stream,
)
from spqr_format.codec.packing import (
    check_finite_f16,
    check_permutation,
    pack_stream,
    unpack_stream,
)
from spqr_format.errors import (
    BadFieldError,
    BadInputError,
    BadLayoutError,
    BadShapeError,
    LimitError,
)
from spqr_format.spec import DType, Role

# C-12.1: width_counts c_1..c_8 (u32 each), table_rows R (u32), outlier_entry_count E (u32).
_PARAMS = struct.Struct("<8III")
assert _PARAMS.size == 40

WIDTHS = tuple(range(spec.MIN_BITS, spec.MAX_BITS + 1))  # 1..8


@dataclass(frozen=True)
class ChannelMixedHeader:
    """The 40-byte params of a channel_mixed tensor (SPEC C-12.1).

    ``table_rows`` R: 0 = one table per column, else one table per column per block of R
    rows (1..2**24). There is no outlier_count: the stream's non-skip entries are the
    outliers (C-12.6)."""

    width_counts: tuple[int, ...]  # c_b for b = 1..8 (index b - 1)
    table_rows: int  # R
    outlier_entry_count: int  # E

    @property
    def has_outliers(self) -> bool:
        return self.outlier_entry_count > 0

    def table_blocks(self, m: int) -> int:
        """T: row blocks with their own tables (1 when R = 0)."""
        return 1 if self.table_rows == 0 else -(-m // self.table_rows)

    def to_bytes(self) -> bytes:
        return _PARAMS.pack(*self.width_counts, self.table_rows, self.outlier_entry_count)

    @classmethod
    def from_bytes(cls, raw: bytes) -> ChannelMixedHeader:
        """Decode the params (C-12.1): R is 0 or 1..2**24 (E_BAD_FIELD). The sum of the width
        counts is checked against the shape by :func:`section_layout`."""
        if len(raw) != _PARAMS.size:
            raise BadFieldError(f"params must be 40 bytes, got {len(raw)}", field="params")
        vals = _PARAMS.unpack(bytes(raw))
        counts, r, e = tuple(vals[:8]), vals[8], vals[9]
        if r > spec.MAX_GROUP_SIZE:
            raise BadFieldError(
                f"table_rows must be 0..{spec.MAX_GROUP_SIZE}, got {r}", field="params.table_rows"
            )
        return cls(counts, r, e)


@dataclass(frozen=True)
class Run:
    """One run of equal widths: stored columns ``start .. start + count - 1`` of width
    ``bits``; its codes are words ``word_offset ..`` of ``codes`` and its tables start at
    entry ``table_offset`` of ``tables``."""

    bits: int
    start: int
    count: int
    word_offset: int
    words: int
    table_offset: int


@dataclass(frozen=True)
class ChannelMixedGeometry:
    """Sizes derived from the shape and the width counts (SPEC C-12.3 .. C-12.6)."""

    m: int
    n: int
    runs: tuple[Run, ...]  # non-empty runs, by increasing width
    code_words: int
    table_entries: int  # L: entries of one row block's tables
    table_blocks: int  # T
    perm_dtype: np.dtype
    outlier_blocks: int

    @property
    def total_table_entries(self) -> int:
        return self.table_blocks * self.table_entries

    @classmethod
    def of(
        cls, shape: tuple[int, int], counts: tuple[int, ...], table_rows: int = 0
    ) -> ChannelMixedGeometry:
        m, n = shape
        runs = []
        start = word = tab = 0
        for b, c in zip(WIDTHS, counts, strict=False):
            if c == 0:
                continue
            words = spec.packed_stream_words(m * c, b)
            runs.append(Run(b, start, c, word, words, tab))
            start += c
            word += words
            tab += c << b
        return cls(
            m=m,
            n=n,
            runs=tuple(runs),
            code_words=word,
            table_entries=tab,
            table_blocks=1 if table_rows == 0 else -(-m // table_rows),
            perm_dtype=np.dtype(np.uint16 if spec.perm_entry_size(n) == 2 else np.uint32),
            outlier_blocks=spec.outlier_blocks(m),
        )

    def column_widths(self) -> np.ndarray:
        """uint8[n]: the width of every stored column (non-decreasing)."""
        out = np.empty(self.n, dtype=np.uint8)
        for r in self.runs:
            out[r.start : r.start + r.count] = r.bits
        return out

    def column_table_offsets(self) -> np.ndarray:
        """int64[n]: the first table entry of every stored column (C-12.5)."""
        out = np.empty(self.n, dtype=np.int64)
        for r in self.runs:
            out[r.start : r.start + r.count] = r.table_offset + (
                np.arange(r.count, dtype=np.int64) << r.bits
            )
        return out


def check_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """A channel_mixed tensor is 2-D with both dims >= 1 (SPEC C-12.2)."""
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise BadShapeError(
            f"channel_mixed tensors are 2-D with m, n >= 1, got shape {tuple(shape)}"
        )
    return int(shape[0]), int(shape[1])


def section_layout(shape: tuple[int, ...], header: ChannelMixedHeader) -> list[tuple[Role, int]]:
    """Shape (E_BAD_SHAPE), then sum of width counts = n (E_BAD_FIELD), then the roles and
    byte lengths the sections must have, in order (SPEC C-12.2, C-12.3)."""
    m, n = check_shape(shape)
    if m > spec.MAX_DIM or n > spec.MAX_DIM or m * n > spec.MAX_ELEMENTS:
        raise LimitError(f"shape {m}x{n} exceeds the caps")
    total = sum(header.width_counts)
    if total != n:
        raise BadFieldError(
            f"width counts {list(header.width_counts)} sum to {total}, but n = {n}",
            field="params.width_counts",
        )
    geo = ChannelMixedGeometry.of((m, n), header.width_counts, header.table_rows)
    out = [(Role.CODES, 4 * geo.code_words), (Role.PERM, geo.perm_dtype.itemsize * n)]
    if header.has_outliers:
        out.append((Role.OUTLIER_INDEX, 4 * (geo.outlier_blocks + 1)))
        out.append((Role.OUTLIER_ENTRIES, 4 * header.outlier_entry_count))
    out.append((Role.TABLES, 2 * geo.total_table_entries))
    return out


@dataclass
class ChannelMixedTensor:
    """Logical form, what the CMPQ encoder produces.

    ``widths``  uint8 [n], width of every stored column, non-decreasing, each 1..8
    ``perm``    uint32 [n], original column of every stored column
    ``codes``   uint8 [m, n], stored column order, ``codes[:, j] < 2**widths[j]``
    ``tables``  float16 [T, L]: for every row block t, the tables of the stored columns one
                after the other (column j: ``2**widths[j]`` values), all finite
    ``table_rows`` R: 0 = one table per column (T = 1), else rows per table block
    ``outliers`` :class:`Outliers` over stored columns, or None
    """

    shape: tuple[int, int]
    widths: np.ndarray
    perm: np.ndarray
    codes: np.ndarray
    tables: np.ndarray
    outliers: Outliers | None = None
    dtype: DType = DType.FLOAT16
    table_rows: int = 0

    def width_counts(self) -> tuple[int, ...]:
        w = np.asarray(self.widths)
        return tuple(int(np.count_nonzero(w == b)) for b in WIDTHS)


@dataclass
class PackedChannelMixed:
    """Physical form: the sections (SPEC C-12.3 .. C-12.6) as typed arrays.

    ``codes`` uint32 [code_words] (the runs' packed streams, one after the other);
    ``perm`` uint16 [n] (n <= 65536) or uint32 [n]; ``outlier_index`` uint32 [ceil(m/16)+1]
    and ``outlier_entries`` uint32 [E], or None; ``tables`` uint16 [T * L] (f16 bit patterns).
    """

    shape: tuple[int, int]
    header: ChannelMixedHeader
    codes: np.ndarray
    perm: np.ndarray
    outlier_index: np.ndarray | None
    outlier_entries: np.ndarray | None
    tables: np.ndarray
    dtype: DType = DType.FLOAT16

    @property
    def geometry(self) -> ChannelMixedGeometry:
        h = self.header
        return ChannelMixedGeometry.of(self.shape, h.width_counts, h.table_rows)

    def sections(self) -> list[tuple[Role, np.ndarray]]:
        out = [(Role.CODES, self.codes), (Role.PERM, self.perm)]
        if self.outlier_index is not None:
            out.append((Role.OUTLIER_INDEX, self.outlier_index))
            out.append((Role.OUTLIER_ENTRIES, self.outlier_entries))
        out.append((Role.TABLES, self.tables))
        return out

    @classmethod
    def from_sections(
        cls,
        shape: tuple[int, ...],
        header: ChannelMixedHeader,
        sections: dict,
        dtype: DType = DType.FLOAT16,
    ) -> PackedChannelMixed:
        """Type the raw section bytes (no copy)."""
        m, n = check_shape(shape)
        expected = dict(section_layout((m, n), header))
        if set(sections) != set(expected):
            raise BadLayoutError(
                f"sections {sorted(r.name for r in sections)} do not match "
                f"{sorted(r.name for r in expected)}"
            )
        geo = ChannelMixedGeometry.of((m, n), header.width_counts, header.table_rows)

        def view(role: Role, dt, count: int) -> np.ndarray:
            arr = np.frombuffer(sections[role], dtype=np.dtype(dt).newbyteorder("<"))
            if arr.nbytes != expected[role]:
                raise BadLayoutError(
                    f"section {role.name.lower()} is {arr.nbytes} bytes, expected {expected[role]}"
                )
            return arr.reshape(count)

        has = header.has_outliers
        return cls(
            shape=(m, n),
            header=header,
            codes=view(Role.CODES, "u4", geo.code_words),
            perm=view(Role.PERM, geo.perm_dtype, n),
            outlier_index=view(Role.OUTLIER_INDEX, "u4", geo.outlier_blocks + 1) if has else None,
            outlier_entries=(
                view(Role.OUTLIER_ENTRIES, "u4", header.outlier_entry_count) if has else None
            ),
            tables=view(Role.TABLES, "u2", geo.total_table_entries),
            dtype=dtype,
        )


# --------------------------------------------------------------------------------------------
# checks


def check_structure(p: PackedChannelMixed) -> ChannelMixedGeometry:
    """The arrays of ``p`` have the dtypes and shapes its header implies (BadInputError /
    BadLayoutError / BadFieldError, as :func:`packing.check_packed_structure` for bilevel)."""
    if not isinstance(p.header, ChannelMixedHeader):
        raise BadInputError("header must be a ChannelMixedHeader", field="header")
    m, n = p.shape
    if m < 1 or n < 1:
        raise BadInputError(f"shape must be (m, n) with m, n >= 1, got {p.shape}", field="shape")
    h = p.header
    if len(h.width_counts) != 8 or sum(h.width_counts) != n:
        raise BadFieldError(
            f"width counts {list(h.width_counts)} must be 8 counts summing to n = {n}",
            field="params.width_counts",
        )
    if not 0 <= h.table_rows <= spec.MAX_GROUP_SIZE:
        raise BadFieldError("table_rows must be 0..2**24", field="params.table_rows")
    geo = ChannelMixedGeometry.of((m, n), h.width_counts, h.table_rows)

    def arr(a, name: str, size: int, length: int) -> None:
        if not isinstance(a, np.ndarray) or (a.dtype.kind, a.dtype.itemsize) != ("u", size):
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise BadInputError(f"{name} must be a u{8 * size} array, got {got}", field=name)
        if not a.dtype.isnative:
            raise BadInputError(f"{name} must be in native byte order", field=name)
        if a.shape != (length,):
            raise BadLayoutError(f"{name} has shape {a.shape}, expected ({length},)", field=name)

    arr(p.codes, "codes", 4, geo.code_words)
    arr(p.perm, "perm", geo.perm_dtype.itemsize, n)
    arr(p.tables, "tables", 2, geo.total_table_entries)
    if h.has_outliers:
        arr(p.outlier_index, "outlier_index", 4, geo.outlier_blocks + 1)
        arr(p.outlier_entries, "outlier_entries", 4, h.outlier_entry_count)
    elif p.outlier_index is not None or p.outlier_entries is not None:
        raise BadInputError("outlier arrays are given but E is 0", field="outliers")
    return geo


def check_data(p: PackedChannelMixed) -> Outliers | None:
    """SPEC C-12.8, data part, in order: the permutation (E_BAD_PERMUTATION), finite tables
    (E_NONFINITE), the outlier stream by C-6.2 (E_BAD_OUTLIERS / E_NONFINITE). Returns the
    outliers in coordinate form (None without)."""
    check_structure(p)
    m, n = p.shape
    check_permutation(p.perm, n)
    check_finite_f16(p.tables, "tables")
    if not p.header.has_outliers:
        return None
    # No outlier_count in the params (C-12.1): rule 6 of C-6.2 does not apply, so the count
    # given to the shared checker is the stream's own.
    ent = np.asarray(p.outlier_entries)
    k = int(np.count_nonzero((ent >> np.uint32(16)) != spec.OUTLIER_SKIP_VALUE))
    return decode_outlier_stream(p.outlier_index, p.outlier_entries, m, n, k)


def checked_outliers(p: PackedChannelMixed, validate: bool) -> Outliers | None:
    """As ``validation.checked_outliers`` for bilevel: validated, or memory-safe unchecked."""
    return decoder_outliers(p, validate, check_data, check_structure)


# --------------------------------------------------------------------------------------------
# logical <-> physical


def pack(t: ChannelMixedTensor) -> PackedChannelMixed:
    """Validate a :class:`ChannelMixedTensor` (BadInputError naming the field) and pack it."""
    if not isinstance(t, ChannelMixedTensor):
        raise BadInputError(f"expected a ChannelMixedTensor, got {type(t).__name__}")
    if len(t.shape) != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise BadInputError(f"shape must be (m, n) with m, n >= 1, got {t.shape}", field="shape")
    m, n = int(t.shape[0]), int(t.shape[1])
    widths = np.asarray(t.widths)
    if widths.dtype != np.uint8 or widths.shape != (n,):
        raise BadInputError(f"widths must be uint8[{n}], got {widths.dtype}{list(widths.shape)}",
                            field="widths")  # fmt: skip
    if widths.min() < spec.MIN_BITS or widths.max() > spec.MAX_BITS:
        raise BadInputError("widths must be 1..8", field="widths")
    if np.any(widths[1:] < widths[:-1]):
        raise BadInputError("widths of the stored columns must be non-decreasing (C-12.2)",
                            field="widths")  # fmt: skip
    counts = t.width_counts()
    if max(counts) > 0xFFFFFFFF:
        raise BadInputError("more than 2**32 - 1 columns of one width", field="widths")
    r_rows = t.table_rows
    if isinstance(r_rows, bool) or not isinstance(r_rows, (int, np.integer)) or not (
        0 <= r_rows <= spec.MAX_GROUP_SIZE
    ):
        raise BadInputError(f"table_rows must be 0..2**24, got {r_rows!r}", field="table_rows")
    geo = ChannelMixedGeometry.of((m, n), counts, int(r_rows))
    perm = np.asarray(t.perm)
    if perm.dtype.kind not in "ui" or perm.shape != (n,):
        raise BadInputError(f"perm must be an integer array of shape ({n},)", field="perm")
    try:
        check_permutation(perm, n)
    except Exception as exc:  # BadPermutationError -> the encoder's input is wrong
        raise BadInputError(str(exc), field="perm") from None
    codes = np.asarray(t.codes)
    if codes.dtype != np.uint8 or codes.shape != (m, n):
        raise BadInputError(f"codes must be uint8[{m}, {n}], got {codes.dtype}{list(codes.shape)}",
                            field="codes")  # fmt: skip
    tables = np.asarray(t.tables)
    tshape = (geo.table_blocks, geo.table_entries)
    if tables.dtype != np.float16 or tables.shape != tshape:
        raise BadInputError(
            f"tables must be float16{list(tshape)}, got {tables.dtype}{list(tables.shape)}",
            field="tables",
        )
    try:
        check_finite_f16(tables.view(np.uint16), "tables")
    except Exception as exc:
        raise BadInputError(str(exc), field="tables") from None
    words = []
    for r in geo.runs:
        block = np.ascontiguousarray(codes[:, r.start : r.start + r.count])
        if block.size and int(block.max()) >> r.bits:
            raise BadInputError(
                f"a code of the {r.bits}-bit run is >= 2**{r.bits}", field="codes"
            )
        words.append(pack_stream(block, r.bits))
    code_words = np.concatenate(words).astype(np.uint32) if words else np.zeros(0, np.uint32)
    o = t.outliers
    if o is not None and len(o) > 0:
        check_outliers(o, m, n)
        index, entries, _ = encode_outlier_stream(o, m, n)
        if entries.shape[0] > spec.MAX_OUTLIER_ENTRIES:
            raise BadInputError("too many outlier entries", field="outliers")
    else:
        index = entries = None
    header = ChannelMixedHeader(
        counts, int(r_rows), 0 if entries is None else int(entries.shape[0])
    )
    return PackedChannelMixed(
        shape=(m, n),
        header=header,
        codes=code_words,
        perm=perm.astype(geo.perm_dtype),
        outlier_index=index,
        outlier_entries=entries,
        tables=np.ascontiguousarray(tables).view(np.uint16).reshape(-1).copy(),
        dtype=DType(t.dtype),
    )


def unpack(p: PackedChannelMixed) -> ChannelMixedTensor:
    """Inverse of :func:`pack` (runs the data checks of C-12.8 first)."""
    o = check_data(p)
    m, n = p.shape
    geo = p.geometry
    codes = np.empty((m, n), dtype=np.uint8)
    for r in geo.runs:
        w = p.codes[r.word_offset : r.word_offset + r.words]
        codes[:, r.start : r.start + r.count] = unpack_stream(w, r.bits, m * r.count).reshape(
            m, r.count
        )
    return ChannelMixedTensor(
        shape=(m, n),
        widths=geo.column_widths(),
        perm=np.asarray(p.perm).astype(np.uint32),
        codes=codes,
        tables=np.asarray(p.tables).astype(np.uint16).view(np.float16).reshape(
            geo.table_blocks, geo.table_entries
        ),
        outliers=o,
        dtype=p.dtype,
        table_rows=p.header.table_rows,
    )


def section_bits(p: PackedChannelMixed | ChannelMixedTensor) -> dict[str, int]:
    """Exact size in bits of each section (SPEC C-12.9)."""
    packed = pack(p) if isinstance(p, ChannelMixedTensor) else p
    return {spec.ROLE_NAMES[role]: 8 * a.nbytes for role, a in packed.sections()}


def bits_per_weight(p: PackedChannelMixed | ChannelMixedTensor) -> float:
    m, n = p.shape
    return sum(section_bits(p).values()) / (m * n)
