"""The ``bilevel`` encoding (SPEC section 5): parameters, logical and physical forms.

Two forms of one tensor, kept apart as torchao keeps scheme and packing apart:

- :class:`BilevelTensor` is the *logical* form an encoder produces: one array per quantity,
  one element per value (codes as ``uint8[m, n]``, statistics codes as ``uint8``), easy to
  reason about and to test.
- :class:`PackedBilevel` is the *physical* form, exactly the bytes of the file's sections
  (SPEC C-5.2 .. C-6.2), typed as numpy views. Decoders, the container and GPU kernels use it;
  a file opened with mmap gives one without copying.

``pack`` / ``unpack`` (in :mod:`spqr_format.codec.packing`) convert between them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from spqr_format import spec
from spqr_format.errors import BadFieldError, BadLayoutError, BadShapeError, LimitError
from spqr_format.spec import DType, Role

_PARAMS = struct.Struct("<BBHIIIQQQ")
assert _PARAMS.size == 40


@dataclass(frozen=True)
class BilevelParams:
    """Quantization parameters of one bilevel tensor (SPEC C-5.1).

    ``stats_bits == 0`` stores first-level statistics in fp16 (GPTQ, RTN without bilevel);
    ``stats_bits > 0`` quantizes them in groups of ``stats_group_size`` rows (SpQR).
    """

    bits: int
    group_size: int
    stats_bits: int = 0
    stats_group_size: int = 0

    def validate(self) -> None:
        """Raise :class:`BadFieldError` unless every parameter is in its SPEC range."""
        if not spec.MIN_BITS <= self.bits <= spec.MAX_BITS:
            raise BadFieldError(f"bits must be 1..8, got {self.bits}", field="params.bits")
        if not 1 <= self.group_size <= spec.MAX_GROUP_SIZE:
            raise BadFieldError(
                f"group_size must be 1..{spec.MAX_GROUP_SIZE}, got {self.group_size}",
                field="params.group_size",
            )
        if self.stats_bits == 0:
            if self.stats_group_size != 0:
                raise BadFieldError(
                    f"stats_group_size must be 0 when stats_bits is 0, got {self.stats_group_size}",
                    field="params.stats_group_size",
                )
        else:
            if not spec.MIN_BITS <= self.stats_bits <= spec.MAX_BITS:
                raise BadFieldError(
                    f"stats_bits must be 0..8, got {self.stats_bits}", field="params.stats_bits"
                )
            if not 1 <= self.stats_group_size <= spec.MAX_GROUP_SIZE:
                raise BadFieldError(
                    f"stats_group_size must be 1..{spec.MAX_GROUP_SIZE}, "
                    f"got {self.stats_group_size}",
                    field="params.stats_group_size",
                )


@dataclass(frozen=True)
class BilevelHeader:
    """Everything the tensor record says about a bilevel tensor (the 40-byte params decoded)."""

    params: BilevelParams
    has_perm: bool
    has_outliers: bool
    outlier_count: int
    outlier_entry_count: int

    def to_bytes(self) -> bytes:
        flags = (spec.BILEVEL_FLAG_PERM if self.has_perm else 0) | (
            spec.BILEVEL_FLAG_OUTLIERS if self.has_outliers else 0
        )
        p = self.params
        return _PARAMS.pack(
            p.bits,
            p.stats_bits,
            flags,
            p.group_size,
            p.stats_group_size,
            0,
            self.outlier_count,
            self.outlier_entry_count,
            0,
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> BilevelHeader:
        """Decode and validate the params field (SPEC C-5.1); raises BadFieldError."""
        if len(raw) != _PARAMS.size:
            raise BadFieldError(f"params must be 40 bytes, got {len(raw)}", field="params")
        bits, sbits, flags, g, sg, res0, k, e, res1 = _PARAMS.unpack(raw)
        if res0 != 0 or res1 != 0:
            raise BadFieldError("reserved params bytes must be zero", field="params.reserved")
        if flags & ~spec.BILEVEL_KNOWN_FLAGS:
            raise BadFieldError(f"unknown flag bits 0x{flags:04x}", field="params.flags")
        params = BilevelParams(bits, g, sbits, sg)
        params.validate()
        has_outliers = bool(flags & spec.BILEVEL_FLAG_OUTLIERS)
        if has_outliers != (e > 0):
            raise BadFieldError(
                f"outlier_entry_count is {e} but the outliers flag is "
                f"{'set' if has_outliers else 'clear'}",
                field="params.outlier_entry_count",
            )
        if e > spec.MAX_OUTLIER_ENTRIES:
            raise LimitError(
                f"{e} outlier entries exceed the cap", field="params.outlier_entry_count"
            )
        if k > e:
            raise BadFieldError(
                f"outlier_count {k} exceeds outlier_entry_count {e}", field="params.outlier_count"
            )
        return cls(params, bool(flags & spec.BILEVEL_FLAG_PERM), has_outliers, k, e)


@dataclass(frozen=True)
class BilevelGeometry:
    """Sizes derived from shape and parameters (SPEC C-5.1 .. C-6.1)."""

    m: int
    n: int
    groups: int  # G
    tiles: int  # T (0 when stats_bits == 0)
    code_words: int  # u32 words of the codes stream (C-5.3)
    stats_words: int  # u32 words of the stats stream (C-5.5); 0 when stats_bits == 0
    perm_dtype: np.dtype  # u16 when n <= 65536, else u32 (C-5.7)
    outlier_blocks: int  # B = ceil(m / 16) (C-6.1)

    @classmethod
    def of(cls, shape: tuple[int, int], params: BilevelParams) -> BilevelGeometry:
        m, n = shape
        groups = -(-n // params.group_size)
        tiles = -(-m // params.stats_group_size) if params.stats_bits else 0
        return cls(
            m=m,
            n=n,
            groups=groups,
            tiles=tiles,
            code_words=spec.packed_stream_words(m * n, params.bits),
            stats_words=(
                spec.packed_stream_words(m * 2 * groups, params.stats_bits)
                if params.stats_bits
                else 0
            ),
            perm_dtype=np.dtype(np.uint16 if spec.perm_entry_size(n) == 2 else np.uint32),
            outlier_blocks=spec.outlier_blocks(m),
        )


def check_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """A bilevel tensor is 2-D with both dims >= 1 (SPEC C-5.1)."""
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise BadShapeError(f"bilevel tensors are 2-D with m, n >= 1, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def section_layout(shape: tuple[int, ...], header: BilevelHeader) -> list[tuple[Role, int]]:
    """The roles and byte lengths the sections of this tensor must have, in order (C-5.1)."""
    m, n = check_shape(shape)
    if m > spec.MAX_DIM or n > spec.MAX_DIM or m * n > spec.MAX_ELEMENTS:
        raise LimitError(f"shape {m}x{n} exceeds the caps")
    p = header.params
    geo = BilevelGeometry.of((m, n), p)
    out = [(Role.CODES, 4 * geo.code_words)]
    if p.stats_bits == 0:
        out.append((Role.STATS, 4 * m * geo.groups))
    else:
        out.append((Role.STATS, 4 * geo.stats_words))
        out.append((Role.STATS2, 8 * geo.tiles * geo.groups))
    if header.has_perm:
        out.append((Role.PERM, geo.perm_dtype.itemsize * n))
    if header.has_outliers:
        out.append((Role.OUTLIER_INDEX, 4 * (geo.outlier_blocks + 1)))
        out.append((Role.OUTLIER_ENTRIES, 4 * header.outlier_entry_count))
    return out


@dataclass
class Outliers:
    """Outliers in coordinate form: stored (permuted) columns, sorted by (row, col), unique."""

    rows: np.ndarray  # uint32 [K]
    cols: np.ndarray  # uint32 [K]
    values: np.ndarray  # float16 [K]

    def __len__(self) -> int:
        return int(self.rows.shape[0])


@dataclass
class BilevelTensor:
    """Logical form of a bilevel tensor: what an encoder produces.

    ``codes``  uint8 [m, n], stored column order, values < 2**bits.
    ``stats``  stats_bits == 0: float16 [m, G, 2] = (scale, zero);
               stats_bits > 0:  uint8   [m, G, 2] = (scale code, zero code), < 2**stats_bits.
    ``stats2`` stats_bits > 0:  float16 [T, G, 4] = (scale_step, scale_base, zero_step, zero_base);
               else None.
    ``perm``   uint32 [n] (perm[j] = original column of stored column j) or None.
    ``outliers`` :class:`Outliers` or None (None and empty mean the same).
    ``dtype``  the dtype the tensor decodes to by default (and that its digest covers).
    """

    shape: tuple[int, int]
    params: BilevelParams
    codes: np.ndarray
    stats: np.ndarray
    stats2: np.ndarray | None = None
    perm: np.ndarray | None = None
    outliers: Outliers | None = None
    dtype: DType = DType.FLOAT16


@dataclass
class PackedBilevel:
    """Physical form of a bilevel tensor: the sections as typed arrays (SPEC C-5.3 .. C-6.2).

    ``codes``  uint32 [code_words]: one packed stream of the m*n codes, row after row
    ``stats``  stats_bits == 0: uint16 [m, G, 2] (f16 bit patterns);
               else uint32 [stats_words]: one packed stream of the m*2G statistics codes
    ``stats2`` uint16 [T, G, 4] (f16 bit patterns) or None
    ``perm``   uint16 [n] (n <= 65536) or uint32 [n], or None
    ``outlier_index`` uint32 [ceil(m/16) + 1] or None; ``outlier_entries`` uint32 [E] or None
    """

    shape: tuple[int, int]
    header: BilevelHeader
    codes: np.ndarray
    stats: np.ndarray
    stats2: np.ndarray | None
    perm: np.ndarray | None
    outlier_index: np.ndarray | None
    outlier_entries: np.ndarray | None
    dtype: DType = DType.FLOAT16

    @property
    def params(self) -> BilevelParams:
        return self.header.params

    @property
    def geometry(self) -> BilevelGeometry:
        return BilevelGeometry.of(self.shape, self.header.params)

    def sections(self) -> list[tuple[Role, np.ndarray]]:
        """The sections in file order, as contiguous arrays whose bytes are the section bytes."""
        out = [(Role.CODES, self.codes), (Role.STATS, self.stats)]
        if self.stats2 is not None:
            out.append((Role.STATS2, self.stats2))
        if self.perm is not None:
            out.append((Role.PERM, self.perm))
        if self.outlier_index is not None:
            out.append((Role.OUTLIER_INDEX, self.outlier_index))
            out.append((Role.OUTLIER_ENTRIES, self.outlier_entries))
        return out

    @classmethod
    def from_sections(
        cls,
        shape: tuple[int, ...],
        header: BilevelHeader,
        sections: dict[Role, memoryview | bytes | np.ndarray],
        dtype: DType = DType.FLOAT16,
    ) -> PackedBilevel:
        """Type the raw section bytes (no copy). Lengths must already match section_layout."""
        m, n = check_shape(shape)
        geo = BilevelGeometry.of((m, n), header.params)
        expected = dict(section_layout((m, n), header))
        if set(sections) != set(expected):
            raise BadLayoutError(
                f"sections {sorted(r.name for r in sections)} do not match "
                f"{sorted(r.name for r in expected)}"
            )

        def view(role: Role, dt, shp: tuple[int, ...]) -> np.ndarray:
            buf = sections[role]
            arr = np.frombuffer(buf, dtype=np.dtype(dt).newbyteorder("<"))
            if arr.nbytes != expected[role]:
                raise BadLayoutError(
                    f"section {role.name.lower()} is {arr.nbytes} bytes, expected {expected[role]}"
                )
            return arr.reshape(shp)

        if header.params.stats_bits == 0:
            stats = view(Role.STATS, "u2", (m, geo.groups, 2))
            stats2 = None
        else:
            stats = view(Role.STATS, "u4", (geo.stats_words,))
            stats2 = view(Role.STATS2, "u2", (geo.tiles, geo.groups, 4))
        has_out = header.has_outliers
        return cls(
            shape=(m, n),
            header=header,
            codes=view(Role.CODES, "u4", (geo.code_words,)),
            stats=stats,
            stats2=stats2,
            perm=view(Role.PERM, geo.perm_dtype, (n,)) if header.has_perm else None,
            outlier_index=(
                view(Role.OUTLIER_INDEX, "u4", (geo.outlier_blocks + 1,)) if has_out else None
            ),
            outlier_entries=(
                view(Role.OUTLIER_ENTRIES, "u4", (header.outlier_entry_count,))
                if has_out
                else None
            ),
            dtype=dtype,
        )
