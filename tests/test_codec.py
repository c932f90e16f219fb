"""Tests of the reference codec against the independent SPEC model (tests/spec_model.py)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import spec_model
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import bilevel_tensors, make_outliers, random_bilevel

from spqr_format.codec import reference
from spqr_format.codec.bilevel import BilevelParams, BilevelTensor, PackedBilevel
from spqr_format.codec.outliers import decode_outlier_stream, encode_outlier_stream
from spqr_format.codec.packing import pack, pack_stream, unpack, unpack_stream
from spqr_format.codec.reference import (
    decode_bilevel,
    decode_bilevel_f32,
    decode_raw,
    dequantize,
    matvec_bilevel,
    tensor_digest,
)
from spqr_format.errors import (
    BadInputError,
    BadLayoutError,
    BadOutliersError,
    BadPermutationError,
    NonFiniteError,
)
from spqr_format.spec import DType, packed_stream_words

FAST = settings(derandomize=True, deadline=None, max_examples=300)
SLOW = settings(derandomize=True, deadline=None, max_examples=60)


def bits32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def replace_packed(p: PackedBilevel, **changes) -> PackedBilevel:
    fields = {k: getattr(p, k) for k in PackedBilevel.__dataclass_fields__}
    fields.update(changes)
    return PackedBilevel(**fields)


# --------------------------------------------------------------------------------------------
# Decoding is bit-exact


@FAST
@given(bilevel_tensors())
def test_packed_decode_equals_spec_model_bit_for_bit(t):
    p = pack(t)
    got = decode_bilevel_f32(p)
    want = spec_model.decode_f32(p)
    assert got.shape == t.shape and got.dtype == np.float32
    np.testing.assert_array_equal(bits32(got), bits32(want))


@FAST
@given(bilevel_tensors(regimes=("any",)))
def test_f16_and_bf16_outputs_are_f32_rounded_to_nearest_even(t):
    p = pack(t)
    w = spec_model.decode_f32(p)
    f16 = decode_bilevel(p, DType.FLOAT16)
    assert f16.dtype == np.float16
    # numpy's astype(float16) is an independent RNE implementation (overflow -> inf).
    with np.errstate(over="ignore"):
        want16 = w.astype(np.float16)
    np.testing.assert_array_equal(f16.view(np.uint16), want16.view(np.uint16))
    bf16 = decode_bilevel(p, "bfloat16")
    assert bf16.dtype == np.uint16
    np.testing.assert_array_equal(bf16, spec_model.round_bf16_by_distance(w))


def test_default_dtype_is_the_tensors_dtype_and_dequantize_matches():
    t = random_bilevel(np.random.default_rng(1), 3, 40, BilevelParams(4, 16), True, 0.1)
    assert decode_bilevel(pack(t)).dtype == np.float16
    t.dtype = DType.FLOAT32
    np.testing.assert_array_equal(bits32(dequantize(t)), bits32(spec_model.decode_f32(pack(t))))


def test_f32_to_f16_rounding_edge_cases_match_numpy():
    # White-box check of the in-kernel rounding on values around every f16 boundary:
    # overflow threshold 65520, the normal/subnormal boundary, 2**-25 ties, +-0, inf.
    from numba import njit

    conv = njit(lambda u: reference._f32_bits_to_f16(u))  # noqa: E731

    @njit
    def run(us, out):
        for i in range(us.shape[0]):
            out[i] = conv(np.int64(us[i]))

    specials = np.array(
        [0.0, -0.0, 65504.0, 65519.996, 65520.0, 65536.0, 1e9, 2.0**-14, 2.0**-24, 2.0**-25,
         2.0**-25 * 1.0000001, 2.0**-26, 3 * 2.0**-25, 1.5 * 2.0**-24, np.inf, -np.inf],
        dtype=np.float32,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    # every f32 exponent from far below the f16 subnormals to above the f16 range, random
    # mantissas, plus the mantissas next to the rounding point (low 13 bits 0x0FFF..0x1001).
    exps = np.arange(90, 145, dtype=np.uint32)
    mant = rng.integers(0, 1 << 23, size=(exps.size, 400), dtype=np.uint32)
    mant[:, :6] = (mant[:, :6] & ~np.uint32(0x3FFF)) | np.array(
        [0x0FFF, 0x1000, 0x1001, 0x2FFF, 0x3000, 0x3001], dtype=np.uint32
    )
    u = ((exps[:, None] << np.uint32(23)) | mant).reshape(-1)
    u = np.concatenate([u, u | np.uint32(0x80000000), specials.view(np.uint32)])
    out = np.empty(u.size, dtype=np.uint16)
    run(u, out)
    with np.errstate(over="ignore"):
        want = u.view(np.float32).astype(np.float16)
    np.testing.assert_array_equal(out, want.view(np.uint16))


def test_f32_to_bf16_bits_rounds_to_nearest_even_and_keeps_nan():
    rng = np.random.default_rng(2)
    u = rng.integers(0, 1 << 32, size=200_000, dtype=np.uint64).astype(np.uint32)
    u[:4] = [0x7F7FFFFF, 0x3F808000, 0x3F818000, 0xFF7F8000]  # overflow, ties to even
    f = u.view(np.float32)
    fin = np.isfinite(f)
    got = reference.f32_to_bf16_bits(f)
    np.testing.assert_array_equal(got[fin], spec_model.round_bf16_by_distance(f[fin]))
    nan = got[np.isnan(f)]
    assert np.all((nan & 0x7F80) == 0x7F80) and np.all(nan & 0x7F)


def test_hand_worked_2x5_example():
    """2x5, bits=3, g=4 (G=2: columns 0-3 and 4), stats_bits=2, S=2 (T=1), perm, 1 outlier.

    stats2 tile 0: group 0 (ss, sbase, zs, zbase) = (0.5, 0.25, 1.0, 1.5)
                   group 1                         = (0.125, 1.0, 2.0, -1.0)
    row 0: codes [0 3 7 5 | 2], (qs, qz) g0 = (1, 2), g1 = (3, 0)
      g0: s = 0.25 + 0.5*1 = 0.75, z = 1.5 + 1.0*2 = 3.5: v = 0.75*(q - 3.5)
          q = 0, 3, 7, 5 -> -2.625, -0.375, 2.625, 1.125
      g1: s = 1.0 + 0.125*3 = 1.375, z = -1.0 + 2.0*0 = -1.0: q = 2 -> 1.375*3 = 4.125
    row 1: codes [1 4 6 2 | 7], (qs, qz) g0 = (0, 1), g1 = (2, 3)
      g0: s = 0.25 + 0 = 0.25, z = 1.5 + 1 = 2.5: q = 1, 4, 6, 2 -> -0.375, 0.375, 0.875, -0.125
      g1: s = 1.0 + 0.125*2 = 1.25, z = -1.0 + 2.0*3 = 5.0: q = 7 -> 1.25*2 = 2.5
      outlier at stored column 2 = 10.0 replaces 0.875
    perm = [4, 0, 1, 2, 3]: W[i, perm[j]] = v[i, j], so W[:, 4] = v[:, 0], W[:, 0] = v[:, 1] ...
    """
    t = BilevelTensor(
        shape=(2, 5),
        params=BilevelParams(bits=3, group_size=4, stats_bits=2, stats_group_size=2),
        codes=np.array([[0, 3, 7, 5, 2], [1, 4, 6, 2, 7]], dtype=np.uint8),
        stats=np.array([[[1, 2], [3, 0]], [[0, 1], [2, 3]]], dtype=np.uint8),
        stats2=np.array([[[0.5, 0.25, 1.0, 1.5], [0.125, 1.0, 2.0, -1.0]]], dtype=np.float16),
        perm=np.array([4, 0, 1, 2, 3], dtype=np.uint32),
        outliers=make_outliers([1], [2], [10.0]),
        dtype=DType.FLOAT32,
    )
    p = pack(t)
    # codes row 0: 0 | 3<<3 | 7<<6 | 5<<9 | 2<<12 = 24 + 448 + 2560 + 8192 = 11224
    # codes row 1: 1 | 4<<3 | 6<<6 | 2<<9 | 7<<12 = 1 + 32 + 384 + 1024 + 28672 = 30113,
    # right after row 0 in the stream (bit 15): one word, 11224 | 30113 << 15
    assert p.codes.shape == (1,)  # ceil(2 * 5 * 3 / 32) words
    assert p.codes.tolist() == [11224 | 30113 << 15]
    # stats row 0: [1, 2, 3, 0] in 2 bits: 1 | 2<<2 | 3<<4 = 57; row 1: [0,1,2,3]: 4+32+192 = 228
    assert p.stats.shape == (1,) and p.stats.tolist() == [57 | 228 << 8]
    assert p.perm.dtype == np.uint16  # C-5.7: n <= 65536
    # outliers: one block of rows 0-1; cell of (1, 2) = 1 * 5 + 2 = 7: delta 7 - (-1) = 8,
    # value f16(10.0) = 0x4900
    assert p.outlier_index.tolist() == [0, 1]
    assert p.outlier_entries.tolist() == [0x49000008]
    assert p.header.outlier_count == 1 and p.header.outlier_entry_count == 1
    expected = np.array(
        [[-0.375, 2.625, 1.125, 4.125, -2.625], [0.375, 10.0, -0.125, 2.5, -0.375]],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(decode_bilevel(p), expected)
    np.testing.assert_array_equal(spec_model.decode_f32(p), expected)


def test_more_than_65536_columns_decode_bit_for_bit_with_skip_entries():
    n = 270_000
    rng = np.random.default_rng(7)
    t = random_bilevel(rng, 3, n, BilevelParams(3, 16, 3, 2), True, 0.0)
    # row 0: gaps of exactly 65535, 65536 and 131071; row 1 none; row 2 only the last column
    t.outliers = make_outliers([0, 0, 0, 2], [65534, 131070, 262141, n - 1], [1.5, -2, 3, 4])
    p = pack(t)
    deltas = (p.outlier_entries & 0xFFFF).tolist()
    skips = ((p.outlier_entries >> 16) == 0xFFFF).tolist()
    # 65534 - (-1) = 65535: no skip. 131070 - 65534 = 65536: skip, then 1.
    # 262141 - 131070 = 131071: two skips, then 1.
    assert deltas[:6] == [65535, 65535, 1, 65535, 65535, 1]
    assert skips[:6] == [False, True, False, True, True, False]
    # row 2 (same 16-row block): cell 2 * n + n - 1 = 809999, after cell 262141: a gap of
    # 547858 = 8 * 65535 + 23578: eight skips, then 23578.
    assert deltas[6:] == [65535] * 8 + [23578] and skips[6:] == [True] * 8 + [False]
    assert p.outlier_index.tolist() == [0, 15]
    assert p.header.outlier_count == 4 and p.header.outlier_entry_count == 15
    np.testing.assert_array_equal(bits32(decode_bilevel_f32(p)), bits32(spec_model.decode_f32(p)))
    np.testing.assert_array_equal(
        decode_outlier_stream(p.outlier_index, p.outlier_entries, 3, n, 4).cols, t.outliers.cols
    )


# --------------------------------------------------------------------------------------------
# Packing


@FAST
@given(
    st.integers(1, 4),
    st.integers(0, 700),
    st.integers(1, 8),
    st.integers(0, 2**32 - 1),
)
def test_pack_stream_round_trips_and_matches_spec_bit_layout(m, count, bits, seed):
    values = np.random.default_rng(seed).integers(0, 1 << bits, size=(m, count), dtype=np.uint8)
    words = pack_stream(values, bits)
    assert words.dtype == np.uint32 and words.shape == (packed_stream_words(m * count, bits),)
    assert words.shape[0] == -(-(m * count * bits) // 32)  # no padding but the last word's
    np.testing.assert_array_equal(unpack_stream(words, bits, m * count), values.reshape(-1))
    np.testing.assert_array_equal(
        spec_model.unpack_elements(words, bits, m * count), values.reshape(-1)
    )
    assert spec_model.padding_is_zero(words, bits, m * count)


def test_pack_stream_straddling_element_follows_spec_example():
    # C-5.2: with w = 3, element 10 is bits 30, 31 of word 0 and bit 0 of word 1.
    values = np.zeros(11, dtype=np.uint8)
    values[10] = 0b101
    words = pack_stream(values, 3)
    assert words.tolist() == [1 << 30, 1]


def test_unpack_stream_ignores_padding_bits():
    words = pack_stream(np.full(5, 3, dtype=np.uint8), 2)
    words[-1] |= np.uint32(0xFFFFFC00)  # garbage after element 4 (bits 10..31)
    np.testing.assert_array_equal(unpack_stream(words, 2, 5), np.full(5, 3))


def assert_same_tensor(a: BilevelTensor, b: BilevelTensor) -> None:
    assert a.shape == b.shape and a.params == b.params and a.dtype == b.dtype
    for name in ("codes", "stats", "stats2", "perm"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=name)
    ka = 0 if a.outliers is None else len(a.outliers)
    kb = 0 if b.outliers is None else len(b.outliers)
    assert ka == kb
    if ka:
        for name in ("rows", "cols", "values"):
            x, y = getattr(a.outliers, name), getattr(b.outliers, name)
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=name)


@FAST
@given(bilevel_tensors())
def test_pack_then_unpack_is_identity_and_repack_gives_same_bytes(t):
    p = pack(t)
    u = unpack(p)
    assert_same_tensor(u, t)
    q = pack(u)
    assert q.header == p.header
    for (ra, xa), (rb, xb) in zip(p.sections(), q.sections(), strict=True):
        assert ra == rb and xa.tobytes() == xb.tobytes()


# --------------------------------------------------------------------------------------------
# Outlier stream


@FAST
@given(bilevel_tensors(max_m=6, max_n=200))
def test_outlier_stream_is_canonical(t):
    m, n = t.shape
    if t.outliers is None:
        return
    rows, entries, k = encode_outlier_stream(t.outliers, m, n)
    o = decode_outlier_stream(rows, entries, m, n, k)
    rows2, entries2, k2 = encode_outlier_stream(o, m, n)
    assert k2 == k and rows2.tolist() == rows.tolist() and entries2.tolist() == entries.tolist()
    for name in ("rows", "cols"):
        np.testing.assert_array_equal(getattr(o, name), getattr(t.outliers, name))
    np.testing.assert_array_equal(o.values.view(np.uint16), t.outliers.values.view(np.uint16))


@pytest.mark.parametrize(
    "gap, expected",
    [
        (65535, [(65535, False)]),
        (65536, [(65535, True), (1, False)]),
        (131070, [(65535, True), (65535, False)]),
        (131071, [(65535, True), (65535, True), (1, False)]),
    ],
)
def test_outlier_gap_uses_the_fewest_skips(gap, expected):
    rows, entries, k = encode_outlier_stream(make_outliers([0], [gap - 1], [1.0]), 1, gap)
    got = [(int(e) & 0xFFFF, (int(e) >> 16) == 0xFFFF) for e in entries]
    assert got == expected and k == 1 and rows.tolist() == [0, len(expected)]


def _entry(delta: int, value: int = 0x3C00) -> int:
    return (value << 16) | delta


SKIP = _entry(65535, 0xFFFF)

# (index, entries, m, n, outlier_count, error, words expected in the message); one index
# entry per block of 16 rows (C-6.1), cells numbered row-major within a block (C-6.2)
MALFORMED = {
    "index0_not_zero": ([1, 1], [_entry(1)], 1, 10, 1, BadOutliersError, "index[0]"),
    "index_decreasing": ([0, 2, 1, 2], [_entry(1), _entry(1)], 40, 10, 2, BadOutliersError,
                         "index[2]"),
    "index_last_not_E": ([0, 1], [_entry(1), _entry(2)], 1, 10, 2, BadOutliersError, "index[1]"),
    "index_wrong_length": ([0, 1, 1], [_entry(1)], 16, 10, 1, BadOutliersError, "shape"),
    "delta_zero": ([0, 2], [_entry(1), _entry(0)], 1, 10, 2, BadOutliersError, "delta 0"),
    "skip_short_delta": ([0, 2], [_entry(7, 0xFFFF), _entry(1)], 1, 10, 1, BadOutliersError,
                         "skip"),
    "skip_last_in_block": ([0, 2, 3], [_entry(1), SKIP, _entry(1)], 20, 10**6, 2,
                           BadOutliersError, "block 0"),
    "cell_past_block": ([0, 2], [_entry(3), _entry(8)], 1, 10, 2, BadOutliersError, "cell 10"),
    "cell_past_last_row_via_skip": ([0, 2], [SKIP, _entry(1)], 1, 65535, 1, BadOutliersError,
                                    "cell 65535"),
    "cell_past_short_block": ([0, 0, 1], [_entry(30)], 17, 10, 1, BadOutliersError,
                              "cell 29"),
    "count_mismatch": ([0, 1], [_entry(1)], 1, 10, 2, BadOutliersError, "outlier_count"),
    "nan_value": ([0, 1], [_entry(1, 0x7E00)], 1, 10, 1, NonFiniteError, "0x7e00"),
    "inf_value": ([0, 1], [_entry(1, 0xFC00)], 1, 10, 1, NonFiniteError, "0xfc00"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_each_malformed_outlier_stream_rule_is_rejected(case):
    r, ent, m, n, k, err, words = MALFORMED[case]
    rows = np.array(r, dtype=np.uint32)
    entries = np.array(ent, dtype=np.uint32)
    with pytest.raises(err) as info:
        decode_outlier_stream(rows, entries, m, n, k)
    assert words in str(info.value)


def test_malformed_stream_is_rejected_by_decoder_and_unpack():
    t = random_bilevel(np.random.default_rng(3), 4, 50, BilevelParams(3, 16), False, 0.1)
    p = pack(t)
    bad = p.outlier_entries.copy()
    bad[0] &= 0xFFFF0000  # delta 0
    q = replace_packed(p, outlier_entries=bad)
    for fn in (decode_bilevel, reference.validate_packed, unpack):
        with pytest.raises(BadOutliersError):
            fn(q)
    decode_bilevel(q, validate=False)  # memory safe, values unspecified


# --------------------------------------------------------------------------------------------
# Other data checks


@pytest.mark.parametrize("perm", [[0, 1, 1, 3], [0, 1, 2, 4], [3, 2, 1, 0xFFFF]])
def test_bad_permutation_is_rejected(perm):
    t = random_bilevel(np.random.default_rng(4), 2, 4, BilevelParams(2, 2), True, 0.0)
    p = replace_packed(pack(t), perm=np.array(perm, dtype=np.uint16))  # C-5.7: u16 for n <= 2^16
    for fn in (decode_bilevel, reference.validate_packed, unpack):
        with pytest.raises(BadPermutationError):
            fn(p)
    matvec_bilevel(p, np.ones(4, np.float32), validate=False)  # memory safe
    t.perm = np.array(perm, dtype=np.uint32)
    with pytest.raises(BadInputError):
        pack(t)


@pytest.mark.parametrize("value", [0x7C00, 0xFC00, 0x7E00, 0x7C01])
def test_nonfinite_statistics_are_rejected(value):
    rng = np.random.default_rng(5)
    t2 = random_bilevel(rng, 3, 20, BilevelParams(3, 8, 2, 2), False, 0.0)
    p2 = pack(t2)
    s2 = p2.stats2.copy()
    s2[1, 2, 3] = value
    t0 = random_bilevel(rng, 3, 20, BilevelParams(3, 8), False, 0.0)
    p0 = pack(t0)
    s0 = p0.stats.copy()
    s0[2, 1, 0] = value
    for p in (replace_packed(p2, stats2=s2), replace_packed(p0, stats=s0)):
        with pytest.raises(NonFiniteError):
            decode_bilevel(p)
        with pytest.raises(NonFiniteError):
            unpack(p)


def _invalid_inputs():
    def base():
        return random_bilevel(np.random.default_rng(6), 3, 20, BilevelParams(3, 8, 2, 2), True, 0.2)

    def with_(**kw):
        t = base()
        for k, v in kw.items():
            setattr(t, k, v(t) if callable(v) else v)
        return t

    def bump(name, idx, value):
        def f(t):
            a = getattr(t, name).copy()
            a[idx] = value
            return a

        return f

    o = make_outliers
    return {
        "codes_too_large": (with_(codes=bump("codes", (0, 0), 8)), "codes"),
        "codes_wrong_dtype": (with_(codes=lambda t: t.codes.astype(np.int32)), "codes"),
        "codes_wrong_shape": (with_(codes=lambda t: t.codes[:, :-1]), "codes"),
        "stats_code_too_large": (with_(stats=bump("stats", (0, 0, 1), 4)), "stats"),
        "stats2_nan": (with_(stats2=bump("stats2", (0, 0, 0), np.nan)), "stats2"),
        "stats2_missing": (with_(stats2=None), "stats2"),
        "perm_wrong_dtype": (with_(perm=lambda t: t.perm.astype(np.int64)), "perm"),
        "outliers_unsorted": (with_(outliers=o([0, 0], [5, 4], [1, 1])), "outliers"),
        "outliers_duplicate": (with_(outliers=o([1, 1], [4, 4], [1, 1])), "outliers"),
        "outliers_row_range": (with_(outliers=o([3], [4], [1])), "outliers.rows"),
        "outliers_col_range": (with_(outliers=o([0], [20], [1])), "outliers.cols"),
        "outliers_inf": (with_(outliers=o([0], [2], [np.inf])), "outliers.values"),
        "bad_params": (with_(params=BilevelParams(9, 8)), "params.bits"),
    }


INVALID = _invalid_inputs()


@pytest.mark.parametrize("case", sorted(INVALID))
def test_pack_rejects_invalid_logical_tensor_naming_the_field(case):
    t, field = INVALID[case]
    with pytest.raises(BadInputError) as info:
        pack(t)
    assert info.value.field == field


def test_empty_outliers_store_no_outlier_sections():
    t = random_bilevel(np.random.default_rng(8), 2, 9, BilevelParams(3, 4), False, 0.0)
    t.outliers = make_outliers([], [], [])
    p = pack(t)
    assert not p.header.has_outliers and p.outlier_index is None and p.outlier_entries is None


# --------------------------------------------------------------------------------------------
# matvec


def gamma(k: int) -> float:
    u = 2.0**-24
    return k * u / (1 - k * u)


@SLOW
@given(bilevel_tensors(max_m=6, max_n=400), st.integers(0, 2**32 - 1))
def test_matvec_is_within_derived_bound_of_fp64_product(t, seed):
    p = pack(t)
    m, n = t.shape
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    w = spec_model.decode_f32(p).astype(np.float64)
    exact = w @ x.astype(np.float64)  # fp64 product: error ~2**-53 relative, negligible
    y = matvec_bilevel(p, x)
    assert y.dtype == np.float32 and y.shape == (m,)
    # fp32 dot product as 8 interleaved lanes + pairwise lane combination: each term sees at
    # most ceil(n/8) + 3 additions and 1 multiplication (docstring of matvec_bilevel); finite
    # checks only (fp16-range statistics cannot overflow f32).
    bound = gamma(-(-n // 8) + 4) * (np.abs(w) @ np.abs(x.astype(np.float64)))
    assert np.all(np.abs(y.astype(np.float64) - exact) <= bound * (1 + 1e-9))


def test_matvec_uses_original_column_order():
    t = random_bilevel(np.random.default_rng(9), 5, 300, BilevelParams(4, 32, 3, 2), True, 0.05)
    p = pack(t)
    x = np.zeros(300, np.float32)
    x[17] = 1.0  # y = column 17 of W (original order)
    np.testing.assert_array_equal(matvec_bilevel(p, x), decode_bilevel_f32(p)[:, 17])


# --------------------------------------------------------------------------------------------
# raw and digest


@pytest.mark.parametrize("dtype", [DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16])
def test_decode_raw_returns_bytes_bit_for_bit(dtype):
    data = bytes(range(256)) * 3
    size = 4 if dtype == DType.FLOAT32 else 2
    a = decode_raw(data, dtype, (len(data) // size // 3, 3))
    assert a.tobytes() == data
    assert a.dtype == {1: np.float32, 2: np.float16, 3: np.uint16}[int(dtype)]
    with pytest.raises(BadLayoutError):
        decode_raw(data + b"\0", dtype, a.shape)
    assert decode_raw(b"", dtype, (0, 5)).shape == (0, 5)


def test_tensor_digest_is_sha256_of_little_endian_c_order_bytes():
    w = np.arange(12, dtype=np.float16).reshape(3, 4)
    assert tensor_digest(w) == hashlib.sha256(w.tobytes()).digest()
    assert tensor_digest(w.T) == hashlib.sha256(np.ascontiguousarray(w.T).tobytes()).digest()
    assert tensor_digest(w.astype(">f2")) == tensor_digest(w)
