"""An independent, deliberately plain model of SPEC.md sections 5-7: the test oracle.

Written from SPEC.md alone; it imports nothing from ``spqr_format.codec`` except the data
classes, so that a misreading in the reference codec is not silently shared. It is slow and
obvious on purpose:

- bit strings are expanded to one uint8 per bit (``np.unpackbits``, little bit order on the
  little-endian bytes of the words, which is exactly "bit k of the string is bit k mod 32 of
  word k // 32" of C-5.2), and element e is the sum of its w bits times powers of two;
- statistics and weights use numpy float32 ufuncs one operation at a time, in the order of
  C-7.1 and C-7.2 (numpy ufuncs never fuse a multiply and an add);
- outliers are applied by walking the raw entry words in Python (C-6.2);
- the permutation is applied last (C-7.4).
"""

from __future__ import annotations

import numpy as np


def bits_of_words(words: np.ndarray) -> np.ndarray:
    """uint32 [W] -> uint8 [32*W] with bit k of the stream at index k."""
    w = np.ascontiguousarray(words, dtype="<u4").reshape(-1)
    return np.unpackbits(w.view(np.uint8), bitorder="little")


def unpack_elements(words: np.ndarray, width: int, count: int) -> np.ndarray:
    """Elements ``0..count-1`` of ``width`` bits of a packed stream (C-5.2), as int64."""
    bits = bits_of_words(words)
    assert bits.shape[0] >= count * width
    per_element = bits[: count * width].reshape(count, width).astype(np.int64)
    weights = np.int64(1) << np.arange(width, dtype=np.int64)  # LSB first
    return (per_element * weights).sum(axis=1)


def padding_is_zero(words: np.ndarray, width: int, count: int) -> bool:
    """C-5.2: the bits after element ``count - 1`` of the stream are zero."""
    return not bits_of_words(words)[count * width :].any()


def f16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)


def statistics(p) -> tuple[np.ndarray, np.ndarray]:
    """(s, z) float32 [m, G] of C-7.1."""
    m, n = p.shape
    prm = p.header.params
    G = -(-n // prm.group_size)
    if prm.stats_bits == 0:
        st = np.asarray(p.stats).reshape(m, G, 2)  # C-5.4: (scale, zero) per (row, group)
        return f16_bits_to_f32(st[:, :, 0]), f16_bits_to_f32(st[:, :, 1])
    q = unpack_elements(p.stats, prm.stats_bits, m * 2 * G).reshape(m, 2 * G)  # C-5.5
    qs = q[:, 0::2].astype(np.float32)
    qz = q[:, 1::2].astype(np.float32)
    tile = np.arange(m) // prm.stats_group_size  # row tile of each row
    rec = f16_bits_to_f32(np.asarray(p.stats2)[tile])  # [m, G, 4], C-5.6
    ss, sbase, zs, zbase = rec[..., 0], rec[..., 1], rec[..., 2], rec[..., 3]
    prod_s = np.multiply(ss, qs, dtype=np.float32)  # rounded to f32 ...
    s = np.add(sbase, prod_s, dtype=np.float32)  # ... then the sum rounded to f32
    prod_z = np.multiply(zs, qz, dtype=np.float32)
    z = np.add(zbase, prod_z, dtype=np.float32)
    return s, z


def walk_outliers(p) -> list[tuple[int, int, int]]:
    """(row, stored column, f16 bits) of every outlier, by walking the raw stream (C-6.2):
    blocks of 16 rows, a running cell number restarting at -1 in each block."""
    if p.outlier_index is None:
        return []
    m, n = p.shape
    r = [int(x) for x in p.outlier_index]
    ent = [int(x) for x in p.outlier_entries]
    out = []
    for b in range(len(r) - 1):
        cell = -1
        for e in range(r[b], r[b + 1]):
            delta, value = ent[e] & 0xFFFF, ent[e] >> 16
            cell += delta
            if value != 0xFFFF:
                out.append((16 * b + cell // n, cell % n, value))
    return out


def decode_f32(p) -> np.ndarray:
    """W [m, n] float32 in original column order, per SPEC section 7."""
    m, n = p.shape
    prm = p.header.params
    q = unpack_elements(p.codes, prm.bits, m * n).reshape(m, n).astype(np.float32)  # C-5.3
    s, z = statistics(p)
    k = np.arange(n) // prm.group_size  # group of each stored column
    diff = np.subtract(q, z[:, k], dtype=np.float32)  # C-7.2: difference rounded ...
    v = np.multiply(s[:, k], diff, dtype=np.float32)  # ... then the product
    for i, c, value in walk_outliers(p):  # C-7.3: replace
        v[i, c] = np.array([value], dtype=np.uint16).view(np.float16)[0].astype(np.float32)
    if p.perm is None:
        return v
    w = np.empty_like(v)
    w[:, np.asarray(p.perm, dtype=np.int64)] = v  # C-7.4: W[i, perm[j]] = v[i, j]
    return w


def round_bf16_by_distance(w: np.ndarray) -> np.ndarray:
    """f32 -> bf16 bits by comparing exact distances to the two neighbours (ties to even).

    Independent of the bit trick used by the reference: the two candidates are the value
    truncated toward zero and the next bf16 away from zero; the distances are exact in fp64.
    """
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    lo = u & np.uint64(0xFFFF0000)
    hi = lo + np.uint64(0x10000)
    x = w.astype(np.float64)
    f_lo = lo.astype(np.uint32).view(np.float32).astype(np.float64)
    hi32 = hi.astype(np.uint32)  # hi may reach the infinity pattern; that is fine
    f_hi = hi32.view(np.float32).astype(np.float64)
    # Beyond the largest finite bf16 the "next" value is infinity; IEEE rounds as if the
    # exponent range were unbounded: compare against 2**128 instead.
    f_hi_cmp = np.where(np.isinf(f_hi), np.copysign(2.0**128, x), f_hi)
    d_lo = np.abs(x - f_lo)
    d_hi = np.abs(f_hi_cmp - x)
    lo_even = ((lo >> np.uint64(16)) & np.uint64(1)) == 0
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & ~lo_even)
    return np.where(pick_hi, hi >> np.uint64(16), lo >> np.uint64(16)).astype(np.uint16)
