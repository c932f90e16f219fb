"""Faults that touch the *inside* of bilevel sections: the one place that knows how the bytes
of ``codes``, ``stats``, ``stats2``, ``perm`` and the outlier sections are laid out.

LAYOUT-SPECIFIC (SPEC 5.2 .. 6.2). Every function below works on the section bytes found by
role in an :class:`~spqr_format.conformance.image.Image`, and uses only facts that hold in
both the per-row layout of the 1.0 draft and the dense layout that replaces it:

- ``perm`` holds ``n`` unsigned elements; their width is ``len(section) // n`` (u32 today,
  u16 when ``n <= 65536`` in the dense layout);
- the outlier *index* section (role 6: ``outlier_rows``, then ``outlier_index``) is u32
  offsets into the entries, one unit (a row, or a block of 16 rows) after the other: the
  first is 0, they never decrease, the last is ``E``; entries of one unit run from
  ``R[k]`` to ``R[k+1] - 1`` and their running position restarts at -1 in each unit;
- an outlier entry is u32 ``delta | value << 16``;
- ``stats`` with ``stats_bits = 0`` and ``stats2`` are arrays of f16;
- code element 0 (row 0, stored column 0) is bits ``0 .. b-1`` of the first u32 word of
  ``codes``; stats element 0 (scale code of row 0, group 0) likewise of ``stats``;
- the highest bit of the last word of ``codes`` is padding when the packed bits do not fill
  it (checked by decoding: :func:`set_codes_padding_bit` verifies it).

If the layout changes again, adjust this module (and only this one), regenerate, and check
that every reject vector still fails with its code (tests/test_conformance.py does).
"""

from __future__ import annotations

import struct

import numpy as np

from spqr_format.conformance.image import Image, Tensor
from spqr_format.spec import Role

ROLE_OUTLIER_INDEX = 6  # "outlier_rows" in the 1.0 draft, "outlier_index" in the dense layout
ROLE_OUTLIER_ENTRIES = 7
_PARAMS = struct.Struct("<BBHIIIQQQ")


def _u(section_data: bytes, width: int) -> np.ndarray:
    return np.frombuffer(section_data, dtype=f"<u{width}").copy()


def _set(t: Tensor, role: int, arr: np.ndarray) -> None:
    t.section(role).data = arr.tobytes()


def params(t: Tensor) -> list:
    return list(_PARAMS.unpack(t.params))


def set_params(t: Tensor, **kw) -> None:
    names = [
        "bits",
        "stats_bits",
        "flags",
        "group_size",
        "stats_group_size",
        "res0",
        "outlier_count",
        "outlier_entry_count",
        "res1",
    ]
    vals = params(t)
    for k, v in kw.items():
        vals[names.index(k)] = v
    t.params = _PARAMS.pack(*vals)


# --- perm ------------------------------------------------------------------------------------
def perm_array(t: Tensor) -> tuple[np.ndarray, int]:
    n = t.dims[1]
    data = t.section(Role.PERM).data
    width = len(data) // n
    return _u(data, width), width


def set_perm_entry(t: Tensor, j: int, value: int) -> None:
    p, _ = perm_array(t)
    p[j] = value
    _set(t, Role.PERM, p)


def swap_perm(t: Tensor, a: int, b: int) -> None:
    p, _ = perm_array(t)
    p[a], p[b] = p[b], p[a]
    _set(t, Role.PERM, p)


def perm_max_value(t: Tensor) -> int:
    _, width = perm_array(t)
    return (1 << (8 * width)) - 1


# --- outlier stream --------------------------------------------------------------------------
def outlier_index(t: Tensor) -> np.ndarray:
    return _u(t.section(ROLE_OUTLIER_INDEX).data, 4)


def outlier_entries(t: Tensor) -> np.ndarray:
    return _u(t.section(ROLE_OUTLIER_ENTRIES).data, 4)


def set_index_entry(t: Tensor, k: int, value: int) -> None:
    r = outlier_index(t)
    r[k] = value
    _set(t, ROLE_OUTLIER_INDEX, r)


def units_with_entries(t: Tensor, at_least: int = 1) -> list[tuple[int, int]]:
    """(first, end) entry ranges of units (rows / row blocks) holding >= at_least entries."""
    r = outlier_index(t).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(r[:-1], r[1:], strict=True) if b - a >= at_least]


def set_entry(t: Tensor, e: int, delta: int | None = None, value: int | None = None) -> None:
    ent = outlier_entries(t)
    d, v = int(ent[e]) & 0xFFFF, int(ent[e]) >> 16
    d = d if delta is None else delta
    v = v if value is None else value
    ent[e] = (v << 16) | d
    _set(t, ROLE_OUTLIER_ENTRIES, ent)


def entry_fields(t: Tensor, e: int) -> tuple[int, int]:
    x = int(outlier_entries(t)[e])
    return x & 0xFFFF, x >> 16


# --- statistics ------------------------------------------------------------------------------
def set_f16(t: Tensor, role: int, k: int, bits: int) -> None:
    a = _u(t.section(role).data, 2)
    a[k] = bits
    _set(t, role, a)


def flip_first_bit(t: Tensor, role: int) -> None:
    """Flip bit 0 of the first word: code element 0 (codes) / scale code of row 0, group 0
    (stats with stats_bits > 0)."""
    a = _u(t.section(role).data, 4)
    a[0] ^= 1
    _set(t, role, a)


def set_codes_padding_bit(t: Tensor) -> None:
    """Set the highest bit of the last word of ``codes`` (padding when the codes do not fill
    it; the caller decodes the result to confirm the weights are unchanged)."""
    a = _u(t.section(Role.CODES).data, 4)
    a[-1] |= np.uint32(0x80000000)
    _set(t, Role.CODES, a)


def set_stats_padding_bit(t: Tensor) -> None:
    a = _u(t.section(Role.STATS).data, 4)
    a[-1] |= np.uint32(0x80000000)
    _set(t, Role.STATS, a)


__all__ = [name for name in dir() if not name.startswith("_")] + ["Image"]
