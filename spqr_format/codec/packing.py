"""Bit packing (SPEC C-5.2) and the logical <-> physical conversion of bilevel tensors.

``pack_stream`` / ``unpack_stream`` convert between element values and a packed stream of
``u32`` words. ``pack`` turns a :class:`BilevelTensor` (what an encoder produces) into a
:class:`PackedBilevel` (the bytes of the file's sections), validating every array first;
``unpack`` is its inverse and validates the data-dependent rules of the stream.

Why 32-element blocks: 32 elements of ``w`` bits fill exactly ``w`` words, so element ``e`` of a
block starts at bit ``e*w`` of the block, i.e. in word ``(e*w) // 32`` at shift ``(e*w) % 32``,
the same for every block. So we loop over the 32 positions (a Python loop of 32 iterations)
and vectorize over all blocks: memory stays O(input) and no bit array is built. A stream whose
length is not a multiple of 32 elements is packed as if padded with zero elements, and cut to
its ``ceil(count * w / 32)`` words.
"""

from __future__ import annotations

import numpy as np

from spqr_format import spec
from spqr_format.codec.bilevel import (
    BilevelGeometry,
    BilevelHeader,
    BilevelParams,
    BilevelTensor,
    Outliers,
    PackedBilevel,
)
from spqr_format.codec.outliers import (
    check_outliers,
    decode_outlier_stream,
    encode_outlier_stream,
)
from spqr_format.errors import (
    BadFieldError,
    BadInputError,
    BadLayoutError,
    BadPermutationError,
    NonFiniteError,
)
from spqr_format.spec import DType

_BLOCK = 32  # elements per block; a block of w-bit elements is exactly w words


def _check_bits(bits: int) -> int:
    bits = int(bits)
    if not spec.MIN_BITS <= bits <= spec.MAX_BITS:
        raise BadInputError(f"bits must be 1..8, got {bits}", field="bits")
    return bits


def _pack_blocks(blocks: np.ndarray, bits: int) -> np.ndarray:
    """``uint8[k, 32]`` -> ``uint32[k, bits]``: each row of 32 elements packed LSB first."""
    out = np.zeros((blocks.shape[0], bits), dtype=np.uint32)
    for e in range(_BLOCK):
        word, shift = divmod(e * bits, 32)
        col = blocks[:, e].astype(np.uint32)
        # uint32 shifts drop the bits that do not fit; those go to the next word.
        out[:, word] |= col << np.uint32(shift)
        if shift + bits > 32:  # element straddles two words (C-5.2 example, w = 3, e = 10)
            out[:, word + 1] |= col >> np.uint32(32 - shift)
    return out


def _unpack_blocks(blocks: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack_blocks`: ``uint32[k, bits]`` -> ``uint8[k, 32]``."""
    out = np.empty((blocks.shape[0], _BLOCK), dtype=np.uint8)
    mask = np.uint32((1 << bits) - 1)
    for e in range(_BLOCK):
        word, shift = divmod(e * bits, 32)
        v = blocks[:, word] >> np.uint32(shift)
        if shift + bits > 32:
            v = v | (blocks[:, word + 1] << np.uint32(32 - shift))
        out[:, e] = v & mask
    return out


def pack_stream(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``uint8`` values (any shape, C order) of ``bits`` bits into one packed stream:
    ``uint32[packed_stream_words(values.size, bits)]`` (C-5.2: element ``e`` at bits
    ``[e*bits, e*bits + bits)``, LSB first, the end padded with zero bits to a whole word).
    Values must be ``< 2**bits`` (BadInputError otherwise)."""
    bits = _check_bits(bits)
    values = np.asarray(values)
    if values.dtype != np.uint8:
        raise BadInputError(f"values must be uint8, got {values.dtype}", field="values")
    flat = np.ascontiguousarray(values).reshape(-1)
    count = flat.shape[0]
    if count and int(flat.max()) >> bits:
        raise BadInputError(f"a value is >= 2**{bits}", field="values")
    nblocks = -(-count // _BLOCK)
    if nblocks * _BLOCK != count:
        src = np.zeros(nblocks * _BLOCK, dtype=np.uint8)
        src[:count] = flat
        flat = src
    words = _pack_blocks(flat.reshape(nblocks, _BLOCK), bits).reshape(-1)
    return np.ascontiguousarray(words[: spec.packed_stream_words(count, bits)])


def unpack_stream(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_stream`: a packed stream -> ``uint8[count]``.

    ``words`` must be ``uint32[packed_stream_words(count, bits)]``. The padding bits after the
    last element are ignored (C-5.2 requires writers to zero them, not decoders to check).
    """
    bits = _check_bits(bits)
    words = np.asarray(words)
    count = int(count)
    if words.ndim != 1 or words.dtype.kind != "u" or words.dtype.itemsize != 4:
        raise BadInputError(
            f"words must be a 1-D uint32 array, got {words.dtype}{list(words.shape)}",
            field="words",
        )
    expected = spec.packed_stream_words(count, bits)
    if words.shape[0] != expected:
        raise BadLayoutError(
            f"a packed stream of {count} {bits}-bit elements is {expected} words, "
            f"got {words.shape[0]}"
        )
    nblocks = -(-count // _BLOCK)
    src = np.zeros(nblocks * bits, dtype=np.uint32)
    src[:expected] = words
    out = _unpack_blocks(src.reshape(nblocks, bits), bits).reshape(-1)
    return out if out.shape[0] == count else np.ascontiguousarray(out[:count])


# --------------------------------------------------------------------------------------------
# Checks shared by pack, unpack and the reference decoder.


def check_permutation(perm: np.ndarray, n: int) -> None:
    """C-5.7: ``perm`` holds every value of ``0..n-1`` exactly once (BadPermutationError)."""
    p = np.asarray(perm).astype(np.int64, copy=False)
    if p.shape != (n,):
        raise BadPermutationError(f"perm has shape {p.shape}, expected ({n},)", field="perm")
    bad = np.flatnonzero((p < 0) | (p >= n))
    if bad.size:
        j = int(bad[0])
        raise BadPermutationError(f"perm[{j}] = {int(p[j])} is not < n = {n}", field="perm")
    seen = np.bincount(p, minlength=n)
    dup = np.flatnonzero(seen != 1)
    if dup.size:
        c = int(dup[0])
        raise BadPermutationError(
            f"column {c} appears {int(seen[c])} times in perm (expected once)", field="perm"
        )


def check_finite_f16(bits: np.ndarray, field: str, error: type = NonFiniteError) -> None:
    """C-5.8: every f16 (given as uint16 bit patterns) is finite: exponent bits not all ones."""
    b = np.asarray(bits).reshape(-1)
    bad = np.flatnonzero((b & 0x7C00) == 0x7C00)
    if bad.size:
        k = int(bad[0])
        idx = np.unravel_index(k, np.shape(bits))
        raise error(
            f"{field}{list(map(int, idx))} is 0x{int(b[k]):04x}, not a finite f16", field=field
        )


def _expect_array(arr, name: str, dtype, shape: tuple[int, ...], error: type) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise error(f"{name} must be a numpy array, got {type(arr).__name__}", field=name)
    if arr.dtype != np.dtype(dtype) or arr.shape != shape:
        raise error(
            f"{name} must be {np.dtype(dtype)}{list(shape)}, got {arr.dtype}{list(arr.shape)}",
            field=name,
        )
    return arr


def _params_of(params: BilevelParams, error: type) -> BilevelParams:
    try:
        params.validate()
    except BadFieldError as exc:
        raise error(exc.message, field=exc.field) from None
    return params


def check_packed_structure(p: PackedBilevel) -> BilevelGeometry:
    """Check that the arrays of ``p`` have the dtypes and shapes its header implies.

    This is the API-level form of C-5.1's section lengths: BadLayoutError for a wrong shape,
    BadInputError for a wrong dtype or a missing/extra array. Returns the geometry.
    """
    m, n = p.shape
    if m < 1 or n < 1:
        raise BadInputError(f"shape must be (m, n) with m, n >= 1, got {p.shape}", field="shape")
    h = p.header
    params = _params_of(h.params, BadFieldError)
    geo = BilevelGeometry.of((m, n), params)

    def arr(a, name: str, kind_size: tuple[str, int], shape: tuple[int, ...]) -> None:
        if not isinstance(a, np.ndarray) or (a.dtype.kind, a.dtype.itemsize) != kind_size:
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise BadInputError(
                f"{name} must be a u{8 * kind_size[1]} array, got {got}", field=name
            )
        if not a.dtype.isnative:
            raise BadInputError(f"{name} must be in native byte order", field=name)
        if a.shape != shape:
            raise BadLayoutError(f"{name} has shape {a.shape}, expected {shape}", field=name)

    arr(p.codes, "codes", ("u", 4), (geo.code_words,))
    if params.stats_bits == 0:
        arr(p.stats, "stats", ("u", 2), (m, geo.groups, 2))
        if p.stats2 is not None:
            raise BadInputError("stats2 must be None when stats_bits is 0", field="stats2")
    else:
        arr(p.stats, "stats", ("u", 4), (geo.stats_words,))
        arr(p.stats2, "stats2", ("u", 2), (geo.tiles, geo.groups, 4))
    if h.has_perm:
        arr(p.perm, "perm", ("u", geo.perm_dtype.itemsize), (n,))
    elif p.perm is not None:
        raise BadInputError("perm is given but the perm flag is clear", field="perm")
    if h.has_outliers:
        arr(p.outlier_index, "outlier_index", ("u", 4), (geo.outlier_blocks + 1,))
        arr(p.outlier_entries, "outlier_entries", ("u", 4), (h.outlier_entry_count,))
    elif p.outlier_index is not None or p.outlier_entries is not None:
        raise BadInputError(
            "outlier arrays are given but the outliers flag is clear", field="outliers"
        )
    if h.has_outliers != (h.outlier_entry_count > 0):
        raise BadFieldError(
            "outlier_entry_count must be > 0 exactly when the outliers flag is set",
            field="params.outlier_entry_count",
        )
    return geo


# --------------------------------------------------------------------------------------------
# Logical -> physical


def pack(t: BilevelTensor) -> PackedBilevel:
    """Validate a logical tensor and lay it out as the sections of SPEC C-5.3 .. C-6.2.

    Every failure is BadInputError naming the field: wrong array dtype or shape, a code
    ``>= 2**bits``, a stats code ``>= 2**stats_bits``, a non-finite statistic, a perm that is
    not a permutation, outliers not sorted/unique/in range/finite. Empty outliers are stored
    as no outlier sections (C-5.1: ``outlier_entry_count`` is 0 iff the flag is clear).
    """
    shape = tuple(int(d) for d in t.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise BadInputError(f"shape must be (m, n) with m, n >= 1, got {t.shape}", field="shape")
    m, n = shape
    if m > spec.MAX_DIM or n > spec.MAX_DIM or m * n > spec.MAX_ELEMENTS:
        raise BadInputError(f"shape {m}x{n} exceeds the caps of C-2.9", field="shape")
    params = _params_of(t.params, BadInputError)
    geo = BilevelGeometry.of(shape, params)
    try:
        dtype = DType(t.dtype)
    except ValueError:
        raise BadInputError(f"dtype {t.dtype!r} is not a DType", field="dtype") from None

    codes = _expect_array(t.codes, "codes", np.uint8, (m, n), BadInputError)
    if int(codes.max()) >> params.bits:
        raise BadInputError(f"a code is >= 2**bits = {1 << params.bits}", field="codes")
    packed_codes = pack_stream(codes, params.bits)

    if params.stats_bits == 0:
        stats = _expect_array(t.stats, "stats", np.float16, (m, geo.groups, 2), BadInputError)
        packed_stats = np.ascontiguousarray(stats).view(np.uint16).copy()
        check_finite_f16(packed_stats, "stats", BadInputError)
        if t.stats2 is not None:
            raise BadInputError("stats2 must be None when stats_bits is 0", field="stats2")
        packed_stats2 = None
    else:
        stats = _expect_array(t.stats, "stats", np.uint8, (m, geo.groups, 2), BadInputError)
        if int(stats.max()) >> params.stats_bits:
            raise BadInputError(
                f"a stats code is >= 2**stats_bits = {1 << params.stats_bits}", field="stats"
            )
        # C-5.5: element 2k is the scale code and 2k+1 the zero code of group k.
        packed_stats = pack_stream(stats, params.stats_bits)
        s2 = _expect_array(
            t.stats2, "stats2", np.float16, (geo.tiles, geo.groups, 4), BadInputError
        )
        packed_stats2 = np.ascontiguousarray(s2).view(np.uint16).copy()
        check_finite_f16(packed_stats2, "stats2", BadInputError)

    perm = None
    if t.perm is not None:
        perm = _expect_array(t.perm, "perm", np.uint32, (n,), BadInputError)
        try:
            check_permutation(perm, n)
        except BadPermutationError as exc:
            raise BadInputError(exc.message, field="perm") from None
        perm = perm.astype(geo.perm_dtype)  # C-5.7: u16 entries when n <= 65536

    index = entries = None
    k = e = 0
    if t.outliers is not None and len(t.outliers) > 0:
        check_outliers(t.outliers, m, n)
        index, entries, k = encode_outlier_stream(t.outliers, m, n)
        e = int(entries.shape[0])
        if e > spec.MAX_OUTLIER_ENTRIES:
            raise BadInputError(f"{e} outlier entries exceed the cap", field="outliers")

    header = BilevelHeader(
        params=params,
        has_perm=perm is not None,
        has_outliers=e > 0,
        outlier_count=k,
        outlier_entry_count=e,
    )
    return PackedBilevel(
        shape=shape,
        header=header,
        codes=packed_codes,
        stats=packed_stats,
        stats2=packed_stats2,
        perm=perm,
        outlier_index=index,
        outlier_entries=entries,
        dtype=dtype,
    )


# --------------------------------------------------------------------------------------------
# Physical -> logical


def unpack(p: PackedBilevel) -> BilevelTensor:
    """Inverse of :func:`pack`. Validates structure and stream: perm (E_BAD_PERMUTATION),
    finite statistics (E_NONFINITE), outlier stream (E_BAD_OUTLIERS / E_NONFINITE).
    Padding elements of packed rows are ignored (C-5.2)."""
    geo = check_packed_structure(p)
    m, n = p.shape
    params = p.params
    codes = unpack_stream(p.codes, params.bits, m * n).reshape(m, n)
    if params.stats_bits == 0:
        check_finite_f16(p.stats, "stats")
        stats = np.ascontiguousarray(p.stats, dtype=np.uint16).view(np.float16).copy()
        stats2 = None
    else:
        stats = unpack_stream(p.stats, params.stats_bits, m * 2 * geo.groups)
        stats = stats.reshape(m, geo.groups, 2)
        check_finite_f16(p.stats2, "stats2")
        stats2 = np.ascontiguousarray(p.stats2, dtype=np.uint16).view(np.float16).copy()
    perm = None
    if p.header.has_perm:
        check_permutation(p.perm, n)
        perm = np.array(p.perm, dtype=np.uint32)
    outliers = None
    if p.header.has_outliers:
        outliers = decode_outlier_stream(
            p.outlier_index, p.outlier_entries, m, n, p.header.outlier_count
        )
    return BilevelTensor(
        shape=(m, n),
        params=params,
        codes=codes,
        stats=stats,
        stats2=stats2,
        perm=perm,
        outliers=outliers,
        dtype=p.dtype,
    )


def empty_outliers() -> Outliers:
    """An :class:`Outliers` with no entries."""
    return Outliers(
        rows=np.zeros(0, np.uint32), cols=np.zeros(0, np.uint32), values=np.zeros(0, np.float16)
    )
