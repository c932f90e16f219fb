"""Round-to-nearest encoder: decode consistency, optimal codes, outliers, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spqr_format.codec.packing import pack
from spqr_format.codec.reference import decode_bilevel_f32
from spqr_format.codec.rtn import encode_rtn
from spqr_format.errors import BadInputError


def spec_decode(t) -> np.ndarray:
    """Independent, loop-light transcription of SPEC C-7.1..C-7.4 (f32 ops, no fusion)."""
    m, n = t.shape
    p = t.params
    f32 = np.float32
    out = np.empty((m, n), dtype=f32)
    for i in range(m):
        for k in range(-(-n // p.group_size)):
            if p.stats_bits == 0:
                s = f32(t.stats[i, k, 0])
                z = f32(t.stats[i, k, 1])
            else:
                ss, sbase, zs, zbase = (f32(v) for v in t.stats2[i // p.stats_group_size, k])
                s = f32(sbase + f32(ss * f32(t.stats[i, k, 0])))
                z = f32(zbase + f32(zs * f32(t.stats[i, k, 1])))
            cols = slice(k * p.group_size, min(n, (k + 1) * p.group_size))
            out[i, cols] = s * (t.codes[i, cols].astype(f32) - z)
    if t.outliers is not None:
        for r, c, v in zip(t.outliers.rows, t.outliers.cols, t.outliers.values, strict=True):
            out[r, c] = f32(v)
    if t.perm is not None:
        res = np.empty_like(out)
        res[:, t.perm.astype(np.int64)] = out
        out = res
    return out


def decoded_stats(t) -> tuple[np.ndarray, np.ndarray]:
    p = t.params
    if p.stats_bits == 0:
        return t.stats[..., 0].astype(np.float32), t.stats[..., 1].astype(np.float32)
    r2 = np.repeat(t.stats2.astype(np.float32), p.stats_group_size, axis=0)[: t.shape[0]]
    s = r2[..., 1] + r2[..., 0] * t.stats[..., 0].astype(np.float32)
    z = r2[..., 3] + r2[..., 2] * t.stats[..., 1].astype(np.float32)
    return s, z


def check_invariants(t, w: np.ndarray) -> None:
    m, n = w.shape
    p = t.params
    G = -(-n // p.group_size)
    assert t.codes.shape == (m, n) and t.codes.dtype == np.uint8
    assert int(t.codes.max()) < (1 << p.bits)
    if p.stats_bits == 0:
        assert t.stats.shape == (m, G, 2) and t.stats.dtype == np.float16
        assert np.isfinite(t.stats.astype(np.float32)).all()
        assert t.stats2 is None
    else:
        T = -(-m // p.stats_group_size)
        assert t.stats.shape == (m, G, 2) and t.stats.dtype == np.uint8
        assert int(t.stats.max()) < (1 << p.stats_bits)
        assert t.stats2.shape == (T, G, 4) and t.stats2.dtype == np.float16
        assert np.isfinite(t.stats2.astype(np.float32)).all()
    dec = decode_bilevel_f32(pack(t))
    np.testing.assert_array_equal(dec, spec_decode(t))
    # Codes are optimal given the decoded statistics: no other code decodes nearer.
    s, z = decoded_stats(t)
    col_group = np.arange(n) // p.group_size
    ss, zz = s[:, col_group], z[:, col_group]
    best = np.full((m, n), np.inf, dtype=np.float32)
    for q in range(1 << p.bits):
        best = np.minimum(best, np.abs(ss * (np.float32(q) - zz) - w))
    got = np.abs(ss * (t.codes.astype(np.float32) - zz) - w)
    if t.outliers is not None and len(t.outliers):
        mask = np.zeros((m, n), dtype=bool)
        mask[t.outliers.rows, t.outliers.cols] = True
        got = np.where(mask, best, got)
    np.testing.assert_array_equal(got, best)


def heavy(m: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, size=(m, n)) * 0.02).astype(np.float32)


@pytest.mark.parametrize(
    "kw",
    [
        dict(bits=4, group_size=128),
        dict(bits=3, group_size=16, stats_bits=3, stats_group_size=16),
        dict(bits=2, group_size=7, stats_bits=4, stats_group_size=5),
        dict(bits=8, group_size=1000),
        dict(bits=1, group_size=3),
        dict(bits=3, group_size=16, stats_bits=3, stats_group_size=16, outlier_fraction=0.02),
    ],
)
def test_rtn_invariants_and_error(kw):
    w = heavy(37, 150)
    t = encode_rtn(w, **kw, name="layer")
    check_invariants(t, w)
    err = np.linalg.norm(decode_bilevel_f32(pack(t)) - w) / np.linalg.norm(w)
    assert err < {8: 0.03, 4: 0.2, 3: 0.35, 2: 0.9, 1: 1.5}[kw["bits"]]


def test_rtn_4bit_error_bound_fp16_stats():
    # With fp16 stats every in-range weight is within half a step (plus the zero's rounding).
    w = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    t = encode_rtn(w, bits=4, group_size=32)
    s, _ = decoded_stats(t)
    err = np.abs(decode_bilevel_f32(pack(t)) - w)
    bound = np.repeat(s, 32, axis=1) * 0.51 + 1e-3
    assert (err <= bound).all()


def test_rtn_input_dtypes_agree():
    w16 = heavy(16, 64).astype(np.float16)
    a = encode_rtn(w16, bits=4, group_size=16)
    b = encode_rtn(w16.astype(np.float32), bits=4, group_size=16)
    c = encode_rtn(w16.astype(np.float64), bits=4, group_size=16)
    for x in (b, c):
        np.testing.assert_array_equal(a.codes, x.codes)
        np.testing.assert_array_equal(a.stats, x.stats)


def test_rtn_outliers():
    w = heavy(64, 256, seed=3)
    base = encode_rtn(w, bits=3, group_size=16, stats_bits=3, stats_group_size=16)
    t = encode_rtn(
        w, bits=3, group_size=16, stats_bits=3, stats_group_size=16, outlier_fraction=0.01
    )
    o = t.outliers
    assert len(o) == int(0.01 * 64 * 256)
    order = o.rows.astype(np.int64) * 256 + o.cols
    assert (np.diff(order) > 0).all()
    np.testing.assert_array_equal(o.values, w[o.rows, o.cols].astype(np.float16))
    dec = decode_bilevel_f32(pack(t))
    np.testing.assert_array_equal(dec[o.rows, o.cols], o.values.astype(np.float32))
    # The chosen ones are the largest deviations from their group means.
    g = w.reshape(64, 16, 16)
    score = np.abs(g - g.mean(-1, keepdims=True)).reshape(64, 256)
    assert score[o.rows, o.cols].min() >= np.delete(score.ravel(), order).max()
    e0 = np.linalg.norm(decode_bilevel_f32(pack(base)) - w)
    e1 = np.linalg.norm(dec - w)
    assert e1 < 0.9 * e0
    check_invariants(t, w)


def test_rtn_degenerate_groups():
    w = np.zeros((20, 48), dtype=np.float32)
    w[1] = 0.5
    w[2] = -3.0
    w[3, :] = 1.0
    w[3, ::2] = 1.0001  # narrow range far from zero: z would overflow fp16 unchecked
    w[4] = np.linspace(-1e-6, 1e-6, 48)
    w[5, :16] = 65504.0
    w[6] = 1e-30
    for kw in (
        dict(bits=3, group_size=16),
        dict(bits=3, group_size=16, stats_bits=3, stats_group_size=4),
        dict(bits=4, group_size=48, stats_bits=2, stats_group_size=20),
    ):
        t = encode_rtn(w, **kw)
        check_invariants(t, w)
        dec = decode_bilevel_f32(pack(t))
        assert np.isfinite(dec).all()
        np.testing.assert_array_equal(dec[0], 0)
        if kw["bits"] == 3 and kw.get("stats_bits", 0) == 0:
            np.testing.assert_allclose(dec[:4], w[:4], rtol=2e-3, atol=1e-3)


def test_rtn_determinism():
    w = heavy(33, 100, seed=5)
    kw = dict(bits=3, group_size=16, stats_bits=3, stats_group_size=16, outlier_fraction=0.03)
    a, b = encode_rtn(w, **kw), encode_rtn(w.copy(), **kw)
    for x, y in ((a.codes, b.codes), (a.stats, b.stats), (a.stats2, b.stats2)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.outliers.cols, b.outliers.cols)


def test_rtn_ties_in_outlier_scores_are_deterministic():
    w = np.tile(np.array([0.0, 1.0], dtype=np.float32), (4, 8))
    t = encode_rtn(w, bits=2, group_size=16, outlier_fraction=0.1)
    assert len(t.outliers) == 6
    np.testing.assert_array_equal(t.outliers.rows, [0] * 6)


@pytest.mark.parametrize(
    "weight,kw,frag",
    [
        (np.array([[1.0, np.nan]], dtype=np.float32), {}, "non-finite"),
        (np.array([[1.0, np.inf]], dtype=np.float32), {}, "non-finite"),
        (np.ones(4, dtype=np.float32), {}, "2-D"),
        (np.ones((2, 2, 2), dtype=np.float32), {}, "2-D"),
        (np.ones((0, 4), dtype=np.float32), {}, "empty"),
        (np.ones((2, 4), dtype=np.int32), {}, "dtype"),
        (np.full((2, 4), 1e6, dtype=np.float32), {}, "fp16 range"),
        (np.ones((2, 4), dtype=np.float32), dict(bits=0), "bits"),
        (np.ones((2, 4), dtype=np.float32), dict(bits=9), "bits"),
        (np.ones((2, 4), dtype=np.float32), dict(group_size=0), "group_size"),
        (np.ones((2, 4), dtype=np.float32), dict(stats_bits=3), "stats_group_size"),
        (np.ones((2, 4), dtype=np.float32), dict(stats_group_size=3), "stats_group_size"),
        (np.ones((2, 4), dtype=np.float32), dict(outlier_fraction=1.0), "outlier_fraction"),
        (np.ones((2, 4), dtype=np.float32), dict(outlier_fraction=-0.1), "outlier_fraction"),
        (np.ones((2, 4), dtype=np.float32), dict(bits=3.0), "integer"),
        ([[1.0, 2.0]], {}, "numpy"),
    ],
)
def test_rtn_bad_input(weight, kw, frag):
    args = dict(bits=3, group_size=2)
    args.update(kw)
    with pytest.raises(BadInputError) as ei:
        encode_rtn(weight, **args, name="blk.0.w")
    assert ei.value.code == "E_BAD_INPUT"
    assert "blk.0.w" in str(ei.value)
    assert frag in str(ei.value)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 70),
    bits=st.integers(1, 8),
    g=st.integers(1, 80),
    sb=st.integers(0, 4),
    S=st.integers(1, 9),
    frac=st.sampled_from([0.0, 0.05]),
    seed=st.integers(0, 2**16),
)
def test_rtn_property(m, n, bits, g, sb, S, frac, seed):
    w = heavy(m, n, seed)
    t = encode_rtn(
        w,
        bits=bits,
        group_size=g,
        stats_bits=sb,
        stats_group_size=S if sb else 0,
        outlier_fraction=frac,
    )
    check_invariants(t, w)


def test_rtn_output_decodes_identically_in_reference_and_spec_model():
    import spec_model

    w = heavy(40, 300, seed=9)
    t = encode_rtn(
        w, bits=3, group_size=16, stats_bits=3, stats_group_size=16, outlier_fraction=0.01
    )
    packed = pack(t)
    np.testing.assert_array_equal(
        decode_bilevel_f32(packed).view(np.uint32), spec_model.decode_f32(packed).view(np.uint32)
    )
