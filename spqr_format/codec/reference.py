"""Reference decoder of the ``bilevel`` encoding: the ground truth other decoders match.

Arithmetic follows SPEC section 7 exactly. The kernels are numba ``@njit`` *without*
``fastmath``: fastmath would let LLVM contract ``a * b + c`` into an FMA and reassociate, which
C-7.1/C-7.2 forbid. Without it every ``*``, ``+``, ``-`` on float32 values is one IEEE binary32
operation with round-to-nearest-even, and numba sets no flush-to-zero mode. (The test suite
checks the result bit for bit against an independent plain-numpy model of the SPEC.)

Decoding works row by row (SPEC C-7.1 .. C-7.5):

1. unpack the row's codes from the packed stream (C-5.2) through a 64-bit window refilled one
   word at a time, so an element straddling two words comes out whole;
2. compute ``(s, z)`` once per (row, group) (C-7.1) and ``v = s * (f32(q) - z)`` (C-7.2);
3. *replace* ``v`` at each of the row's outlier columns (C-7.3); the outlier stream is turned
   into per-row coordinates once, vectorized, before the kernel runs;
4. round to the output dtype (C-7.5) and place ``v[i, j]`` at ``W[i, perm[j]]`` (C-7.4), done
   as a gather through the inverse permutation (sequential stores are cheaper than scattered).

numpy has no bfloat16: bf16 output is returned as a ``uint16`` array of bit patterns.
"""

from __future__ import annotations

import hashlib

import numba
import numpy as np
from numba import njit, prange

from spqr_format import spec
from spqr_format.codec.bilevel import BilevelTensor, Outliers, PackedBilevel
from spqr_format.codec.packing import pack
from spqr_format.codec.validation import check_bilevel_data, checked_outliers
from spqr_format.errors import BadInputError, BadLayoutError
from spqr_format.spec import DType

_MODE = {DType.FLOAT32: 0, DType.FLOAT16: 1, DType.BFLOAT16: 2}
_NUMPY_DTYPE = {DType.FLOAT32: np.float32, DType.FLOAT16: np.float16, DType.BFLOAT16: np.uint16}


# --------------------------------------------------------------------------------------------
# Rounding f32 -> f16 / bf16 (C-7.5), on bit patterns, so that it runs inside the kernel.


@njit(cache=True, inline="always")
def _f32_bits_to_f16(u):
    """IEEE binary32 bits -> binary16 bits, round to nearest even, overflow to infinity."""
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x7F800000:  # inf stays inf; NaN stays a (quiet) NaN
        return sign | 0x7C00 | (0x200 | ((a >> 13) & 0x3FF) if a > 0x7F800000 else 0)
    if a >= 0x477FF000:  # >= 65520 = halfway between 65504 (max f16) and 2**16: RNE -> inf
        return sign | 0x7C00
    if a >= 0x38800000:  # >= 2**-14: a normal f16. Rebias the exponent 127 -> 15, then round
        r = a - 0x38000000  # the 13 dropped mantissa bits; a carry may bump the exponent.
        r = r + 0xFFF + ((r >> 13) & 1)
        return sign | (r >> 13)
    if a < 0x33000000:  # < 2**-25 (half the smallest subnormal): rounds to zero; 2**-25 ties
        return sign  # to the even value zero too.
    # f16 subnormal: value = mant * 2**(e - 150) in units of 2**-24 is mant >> (126 - e).
    e = a >> 23
    mant = (a & 0x7FFFFF) | 0x800000
    shift = 126 - e  # 14 .. 24
    q = mant >> shift
    rem = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q += 1  # may become 0x400, the smallest normal: its bit pattern is exactly that
    return sign | q


@njit(cache=True, inline="always")
def _f32_bits_to_bf16(u):
    """binary32 bits -> bfloat16 bits (the upper half), round to nearest even."""
    if (u & 0x7FFFFFFF) > 0x7F800000:  # NaN: keep it a quiet NaN (cannot occur in decoding)
        return (u >> 16) | 0x40
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


# --------------------------------------------------------------------------------------------
# The row decoder shared by decode and matvec.


@njit(cache=True)
def _narrow_row(buf, mode):
    """The f32 row ``buf`` rounded to f16 (``mode`` 1) or bf16 (2) bit patterns, in order."""
    n = buf.shape[0]
    ubuf = buf.view(np.uint32)
    hbuf = np.empty(n, dtype=np.uint16)
    if mode == 1:
        for j in range(n):
            hbuf[j] = _f32_bits_to_f16(np.int64(ubuf[j]))
    else:
        for j in range(n):
            hbuf[j] = _f32_bits_to_bf16(np.int64(ubuf[j]))
    return hbuf


@njit(cache=True)
def _dot8(buf, xp, n):
    """sum_j buf[j] * xp[j] over ``j < n`` in fp32: 8 interleaved partial sums (lane
    ``j % 8``), combined pairwise (lanes 4 apart, then 2, then 1)."""
    acc = np.zeros(8, dtype=np.float32)
    n8 = n - n % 8
    for j0 in range(0, n8, 8):
        for lane in range(8):
            acc[lane] += buf[j0 + lane] * xp[j0 + lane]
    for j in range(n8, n):
        acc[j - n8] += buf[j] * xp[j]
    for half in (4, 2, 1):
        for lane in range(half):
            acc[lane] += acc[lane + half]
    return acc[0]


@njit(cache=True)
def _decode_row(
    i, codes, bits, n, g, sb, tile_rows, stats, stats_words, stats2, optr, ocols, ovals, buf
):
    """Decode row ``i`` into ``buf[:n]`` (float32, stored column order, outliers applied).

    ``codes`` and ``stats_words`` are the packed streams of C-5.3 / C-5.5. ``stats`` float32
    [m, G, 2] (sb = 0) and ``stats2`` float32 [T, G, 4] (sb > 0) are pre-widened from f16
    (exact, C-7.1). The outliers come as per-row coordinates: row ``i``'s are
    ``ocols[optr[i]:optr[i+1]]`` with values ``ovals``. Every index is guarded, so that even
    unvalidated data cannot make the kernel touch memory outside its arrays.
    """
    # 1. codes -> float32 (exact: q < 256). Element (i, j) occupies bits [(i*n + j)*b, +b) of
    # the stream (C-5.2); read the row through a 64-bit window that is refilled with the next
    # word whenever fewer than b bits are left in it, which handles elements straddling words.
    nw = codes.shape[0]
    ub = np.uint64(bits)
    umask = np.uint64((1 << bits) - 1)
    start = np.int64(i) * np.int64(n) * np.int64(bits)
    w = start >> 5  # next word to load
    skip = start & 31
    window = np.uint64(0)
    have = 0  # valid bits in window
    if skip and w < nw:
        window = np.uint64(codes[w]) >> np.uint64(skip)
        have = 32 - skip
        w += 1
    for j in range(n):
        if have < bits:
            if w < nw:
                window |= np.uint64(codes[w]) << np.uint64(have)
            w += 1
            have += 32
        buf[j] = np.float32(window & umask)
        window >>= ub
        have -= bits
    # 2. statistics once per (row, group), then v = s * (q - z), two roundings (C-7.1, C-7.2).
    ngroups = (n + g - 1) // g
    smask = (1 << sb) - 1
    t = i // tile_rows if sb > 0 else 0
    snw = stats_words.shape[0]
    for k in range(ngroups):
        if sb == 0:
            s = stats[i, k, 0]
            z = stats[i, k, 1]
        else:
            pos = (np.int64(i) * (2 * ngroups) + 2 * k) * sb
            w = pos >> 5
            sh = pos & 31
            x = np.int64(stats_words[w]) if w < snw else np.int64(0)
            if w + 1 < snw:  # may set the sign bit; only bits < 56 are read below
                x |= np.int64(stats_words[w + 1]) << 32
            qs = np.float32((x >> sh) & smask)
            qz = np.float32((x >> (sh + sb)) & smask)  # sh + 2*sb <= 47 bits: inside x
            s = stats2[t, k, 1] + (stats2[t, k, 0] * qs)
            z = stats2[t, k, 3] + (stats2[t, k, 2] * qz)
        j1 = min(n, (k + 1) * g)
        for j in range(k * g, j1):
            buf[j] = s * (buf[j] - z)
    # 3. outliers replace the dense value at their stored column (C-6.2, C-7.3).
    if optr.shape[0] > i + 1:
        ne = ocols.shape[0]
        for e in range(min(optr[i], ne), min(optr[i + 1], ne)):
            c = ocols[e]
            if 0 <= c < n:
                buf[c] = ovals[e]


@njit(cache=True, parallel=True)
def _decode_kernel(
    m, codes, bits, n, g, sb, tile_rows, stats, stats_words, stats2, inv_perm, optr, ocols,
    ovals, mode, out32, out16,
):  # fmt: skip
    """Decode every row; ``mode`` 0 writes float32 to ``out32``, 1 f16 bits / 2 bf16 bits to
    ``out16``. ``inv_perm`` (stored column of original column c) is empty without a
    permutation; every value in it is < n (built by :func:`_inverse_perm`)."""
    has_perm = inv_perm.shape[0] == n
    for i in prange(m):
        buf = np.empty(n, dtype=np.float32)
        _decode_row(
            i, codes, bits, n, g, sb, tile_rows, stats, stats_words, stats2, optr, ocols, ovals,
            buf,
        )  # fmt: skip
        if mode == 0:
            if has_perm:
                for c in range(n):  # W[i, c] = v[i, inv_perm[c]], i.e. W[i, perm[j]] = v[i, j]
                    out32[i, c] = buf[inv_perm[c]]
            else:
                out32[i, :] = buf
        else:
            # Round in stored order (sequential), then gather: a gather is much cheaper than
            # scattering stores, and the output row is written sequentially.
            hbuf = _narrow_row(buf, mode)
            if has_perm:
                for c in range(n):
                    out16[i, c] = hbuf[inv_perm[c]]
            else:
                out16[i, :] = hbuf


@njit(cache=True, parallel=True)
def _matvec_kernel(
    m, codes, bits, n, g, sb, tile_rows, stats, stats_words, stats2, optr, ocols, ovals, xp, y
):
    """y[i] = sum_j v[i, j] * xp[j] over stored columns, fp32, 8 interleaved partial sums."""
    for i in prange(m):
        buf = np.empty(n, dtype=np.float32)
        _decode_row(
            i, codes, bits, n, g, sb, tile_rows, stats, stats_words, stats2, optr, ocols, ovals,
            buf,
        )  # fmt: skip
        y[i] = _dot8(buf, xp, n)


# --------------------------------------------------------------------------------------------
# Python entry points


def validate_packed(p: PackedBilevel) -> Outliers | None:
    """Every data-dependent check required before decoding, in the order of SPEC C-9.3
    (:func:`spqr_format.codec.validation.check_bilevel_data`); returns the outliers in
    coordinate form (None without outliers)."""
    return check_bilevel_data(p)


def _inverse_perm(perm: np.ndarray, n: int) -> np.ndarray:
    """``inv[perm[j]] = j``, so that ``W[i, c] = v[i, inv[c]]`` (C-7.4 as a gather).

    For a valid perm this is its inverse. For an unvalidated bad one (``validate=False``),
    out-of-range entries are dropped and unfilled columns read stored column 0: unspecified
    values, but every index stays < n.
    """
    p = np.asarray(perm).astype(np.int64)
    ok = (p >= 0) & (p < n)
    inv = np.zeros(n, dtype=np.uint32)
    inv[p[ok]] = np.flatnonzero(ok).astype(np.uint32)
    return inv


def _kernel_args(p: PackedBilevel, o: Outliers | None):
    """Arrays in the exact types the kernels are compiled for (one specialization each);
    ``o`` the outliers in coordinate form (from ``validation.checked_outliers``)."""
    m, n = p.shape
    prm = p.params
    codes = np.ascontiguousarray(p.codes, dtype=np.uint32).reshape(-1)
    if prm.stats_bits == 0:
        # f16 -> f32 widening is exact (C-7.1); done once here, vectorized.
        stats = np.ascontiguousarray(p.stats, dtype=np.uint16).view(np.float16).astype(np.float32)
        stats_words = np.zeros(1, dtype=np.uint32)
        stats2 = np.zeros((0, 0, 4), dtype=np.float32)
        tile_rows = 1
    else:
        stats = np.zeros((0, 0, 2), dtype=np.float32)
        stats_words = np.ascontiguousarray(p.stats, dtype=np.uint32).reshape(-1)
        stats2 = np.ascontiguousarray(p.stats2, dtype=np.uint16).view(np.float16)
        stats2 = stats2.astype(np.float32)
        tile_rows = prm.stats_group_size
    if o is not None and len(o) > 0:
        optr = np.searchsorted(o.rows, np.arange(m + 1), side="left").astype(np.int64)
        ocols = o.cols.astype(np.int64)
        ovals = o.values.astype(np.float32)
    else:
        optr = np.zeros(0, dtype=np.int64)
        ocols = np.zeros(0, dtype=np.int64)
        ovals = np.zeros(0, dtype=np.float32)
    common = (m, codes, prm.bits, n, prm.group_size, prm.stats_bits, tile_rows, stats)
    return common, stats_words, stats2, optr, ocols, ovals


def decode_bilevel(
    p: PackedBilevel, dtype: DType | str | None = None, *, validate: bool = True
) -> np.ndarray:
    """Decode to ``W[m, n]`` in original column order (SPEC section 7).

    ``dtype`` defaults to the tensor's dtype. Returns float32, float16, or for bfloat16 a
    ``uint16`` array holding the bf16 bit patterns (numpy has no bfloat16; ``.view`` it as
    ``torch.bfloat16`` or ``ml_dtypes.bfloat16``). ``validate=False`` skips the data checks of
    :func:`validate_packed` (not the structural ones): only for streams already validated;
    an invalid stream then decodes to unspecified values, but never unsafe memory accesses.
    """
    dt = spec.parse_dtype(dtype, p.dtype)
    o = checked_outliers(p, validate)
    m, n = p.shape
    common, stats_words, stats2, optr, ocols, ovals = _kernel_args(p, o)
    inv_perm = _inverse_perm(p.perm, n) if p.perm is not None else np.zeros(0, np.uint32)
    mode = _MODE[dt]
    if mode == 0:
        out32 = np.empty((m, n), dtype=np.float32)
        out16 = np.zeros((0, 0), dtype=np.uint16)
    else:
        out32 = np.zeros((0, 0), dtype=np.float32)
        out16 = np.empty((m, n), dtype=np.uint16)
    _decode_kernel(
        *common, stats_words, stats2, inv_perm, optr, ocols, ovals, mode, out32, out16
    )
    if mode == 0:
        return out32
    if mode == 1:
        return out16.view(np.float16)
    return out16


def decode_bilevel_f32(p: PackedBilevel, *, validate: bool = True) -> np.ndarray:
    """``decode_bilevel(p, DType.FLOAT32)``: the exact values ``v`` of C-7.2/C-7.3."""
    return decode_bilevel(p, DType.FLOAT32, validate=validate)


def matvec_bilevel(p: PackedBilevel, x: np.ndarray, *, validate: bool = True) -> np.ndarray:
    """``y = W x`` with ``x`` (length n) in original column order; float32 result [m].

    ``x`` is first converted to float32. Each row is decoded on the fly (W is never
    materialized) and accumulated in fp32 as 8 interleaved partial sums combined pairwise.
    Accuracy: with ``u = 2**-24`` and ``gamma_k = k*u / (1 - k*u)``, the standard bound for a
    dot product computed this way is

        |y_i - sum_j W_ij x_j| <= gamma_{ceil(n/8) + 4} * sum_j |W_ij x_j|

    against the exact (e.g. fp64) product of the decoded f32 W and the f32 x (one rounding per
    product, at most ``ceil(n/8)`` additions per lane, 3 for combining the lanes). It is
    independent of cancellation only through ``sum_j |W_ij x_j|``.
    """
    o = checked_outliers(p, validate)
    m, n = p.shape
    x = np.asarray(x)
    if x.shape != (n,):
        raise BadInputError(f"x must have shape ({n},), got {x.shape}", field="x")
    x = x.astype(np.float32)
    # Gather to stored column order: stored column j multiplies x[perm[j]] (C-7.4). "clip"
    # only matters for an unvalidated bad perm: unspecified values, but no out-of-range read.
    xp = np.take(x, p.perm, mode="clip") if p.perm is not None else x
    common, stats_words, stats2, optr, ocols, ovals = _kernel_args(p, o)
    y = np.empty(m, dtype=np.float32)
    _matvec_kernel(*common, stats_words, stats2, optr, ocols, ovals, xp, y)
    return y


def dequantize(t: BilevelTensor, dtype: DType | str | None = None) -> np.ndarray:
    """Convenience: ``decode_bilevel(pack(t), dtype)``."""
    return decode_bilevel(pack(t), dtype)


def decode_raw(
    data: memoryview | bytes | bytearray | np.ndarray, dtype: DType | str, shape: tuple[int, ...]
) -> np.ndarray:
    """Decode a ``raw`` tensor (C-4.1): the elements bit for bit, C order.

    bfloat16 comes back as ``uint16`` bit patterns. The result is a view of ``data`` when
    possible (read-only if ``data`` is). BadLayoutError when the length does not match.
    """
    dt = spec.parse_dtype(dtype, None)
    shape = tuple(int(d) for d in shape)
    if len(shape) > spec.MAX_NDIM or any(d < 0 for d in shape):
        raise BadInputError(f"invalid shape {shape}", field="shape")
    count = int(np.prod(shape, dtype=object)) if shape else 1
    np_dt = np.dtype(_NUMPY_DTYPE[dt]).newbyteorder("<")
    buf = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else data.view(np.uint8)
    if buf.nbytes != count * np_dt.itemsize:
        raise BadLayoutError(
            f"raw data is {buf.nbytes} bytes, expected {count} x {np_dt.itemsize}", field="data"
        )
    arr = np.frombuffer(buf, dtype=np_dt).reshape(shape)
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def tensor_digest(decoded: np.ndarray) -> bytes:
    """SHA-256 of the elements, C order, little-endian (C-2.12). bf16 as uint16 bit patterns."""
    a = np.asarray(decoded)
    # np.require, not ascontiguousarray: that turns a 0-d array into 1-d. reshape(-1) + a
    # uint8 view also serves zero-size arrays, which memoryview.cast refuses.
    a = np.require(a, dtype=a.dtype.newbyteorder("<"), requirements="C")
    return hashlib.sha256(a.reshape(-1).view(np.uint8)).digest()


def f32_to_f16(a: np.ndarray) -> np.ndarray:
    """float32 array -> float16, round to nearest even (C-7.5), vectorized: values beyond the
    largest finite f16 become infinities, subnormals are kept, and a NaN becomes a quiet NaN of
    the same sign with the top bits of its payload (the decoder's rule; numpy's own cast keeps
    a signalling NaN signalling)."""
    a = np.asarray(a, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        out = a.astype(np.float16)
    nan = np.isnan(a)
    if nan.any():
        u = a.view(np.uint32)[nan]
        bits = ((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x3FF)
        out.view(np.uint16)[nan] = bits.astype(np.uint16)
    return out


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 array -> bfloat16 bit patterns (uint16), round to nearest even (C-7.5).

    The same rule as the decoder's, vectorized; NaN stays a quiet NaN (raw tensors may hold
    NaN), values beyond the largest finite bf16 become infinities.
    """
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    nan = (u & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000)
    quiet = (u >> np.uint64(16)) | np.uint64(0x40)
    return np.where(nan, quiet, rounded).astype(np.uint16)


def set_threads(count: int) -> None:
    """Threads used by the parallel kernels (numba.set_num_threads)."""
    numba.set_num_threads(count)
