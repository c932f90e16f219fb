"""Hessian-aware encoder: GPTQ against a textbook solver, outliers, Hessians, presets, reports."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spqr_format.codec.bilevel import BilevelParams, BilevelTensor, Outliers
from spqr_format.codec.gptq import _loo_scores, encode_gptq
from spqr_format.codec.hessian import (
    HessianAccumulator,
    dead_columns,
    hessian_tokens,
    load_hessians,
    save_hessians,
    validate_hessian,
)
from spqr_format.codec.packing import pack
from spqr_format.codec.presets import (
    PRESETS,
    EncoderConfig,
    bits_per_weight,
    encode_tensor,
    get_preset,
    relative_output_error,
)
from spqr_format.codec.quantizer import f16_round_scalar
from spqr_format.codec.reference import decode_bilevel_f32
from spqr_format.errors import BadInputError, IoError


def make_problem(m: int, n: int, seed: int = 0, tokens: int = 2048, hot: int = 4):
    """Heavy-tailed weights; correlated activations with a few high-magnitude features."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(m, n)) * 0.02).astype(np.float32)
    mix = np.eye(n) + 0.4 * rng.standard_normal((n, n)) / np.sqrt(n)
    x = rng.standard_normal((tokens, n)) @ mix
    x[:, rng.choice(n, hot, replace=False)] *= 15.0
    h = 2.0 / tokens * (x.T @ x)
    return w, h


def out_err(w, q, h) -> float:
    d = (w - q).astype(np.float64)
    w = w.astype(np.float64)
    return float(np.trace(d @ h @ d.T) / np.trace(w @ h @ w.T))


def textbook_gptq(w, h, bits, percdamp, perm=None):
    """Plain float64 GPTQ, one column at a time, one (fp16) scale/zero per row."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    if perm is not None:
        w, h = w[:, perm], h[np.ix_(perm, perm)]
    n = h.shape[0]
    dead = np.diag(h) == 0
    h[np.diag_indices(n)] += percdamp * np.mean(np.diag(h))
    h[dead, dead] = 1
    w[:, dead] = 0
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    maxq = 2**bits - 1
    lo, hi = w.min(1), w.max(1)
    s = ((hi - lo) / maxq).astype(np.float16).astype(np.float64)
    z = (-lo / ((hi - lo) / maxq)).astype(np.float16).astype(np.float64)
    codes = np.zeros(w.shape, dtype=np.uint8)
    for c in range(n):
        q = np.clip(np.round(w[:, c] / s + z), 0, maxq)
        codes[:, c] = q
        err = (w[:, c] - s * (q - z)) / u[c, c]
        w[:, c + 1 :] -= np.outer(err, u[c, c + 1 :])
    return codes


@pytest.mark.parametrize("perm_order,block", [("identity", 128), ("act_order", 48)])
def test_matches_textbook_gptq(perm_order, block):
    w, h = make_problem(96, 256, seed=1)
    t = encode_gptq(
        w, h, bits=4, group_size=256, perm_order=perm_order, percdamp=0.01, block_size=block
    )
    perm = None if t.perm is None else t.perm.astype(np.int64)
    ref = textbook_gptq(w, h, 4, 0.01, perm)
    same = float((t.codes == ref).mean())
    assert same >= 0.999, same


def test_reconstruction_is_the_decode_and_deterministic():
    w, h = make_problem(64, 200, seed=2)
    kw = dict(
        bits=3, group_size=16, stats_bits=3, stats_group_size=16, perm_order="act_order",
        percdamp=1.0, outlier_threshold=0.2, block_size=64,
    )  # fmt: skip
    info: dict = {}
    a = encode_gptq(w, h, **kw, info=info)
    b = encode_gptq(w.copy(), h.copy(), **kw)
    for x, y in ((a.codes, b.codes), (a.stats, b.stats), (a.stats2, b.stats2), (a.perm, b.perm)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.outliers.rows, b.outliers.rows)
    np.testing.assert_array_equal(a.outliers.values, b.outliers.values)
    dec = decode_bilevel_f32(pack(a))
    np.testing.assert_array_equal(info["reconstruction_permuted"], dec[:, a.perm.astype(np.int64)])
    assert int(a.codes.max()) < 8 and int(a.stats.max()) < 8
    assert np.isfinite(a.stats2.astype(np.float32)).all()
    # The code under an outlier is the nearest code to the outlier value.
    o = a.outliers
    assert len(o) > 0
    order = o.rows.astype(np.int64) * 200 + o.cols
    assert (np.diff(order) > 0).all()


def test_input_not_modified():
    w, h = make_problem(16, 64)
    w0, h0 = w.copy(), h.copy()
    encode_gptq(w, h, bits=3, group_size=16, perm_order="act_order", outlier_threshold=0.2)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(h, h0)


def test_outliers_on_beat_off_and_spqr_beats_rtn():
    w, h = make_problem(128, 256, seed=3)
    on, r_on = encode_tensor(w, PRESETS["spqr-3bit"], h)
    off, r_off = encode_tensor(w, get_preset("spqr-3bit", outlier_threshold=None), h)
    rtn, r_rtn = encode_tensor(w, PRESETS["rtn-3bit-g16-bilevel"], h)
    assert r_on["outliers"] > 0 and r_off["outliers"] == 0
    assert r_on["relative_output_error"] < r_off["relative_output_error"]
    assert r_off["relative_output_error"] < r_rtn["relative_output_error"]
    # The report's output error is the decoded tensor's.
    assert r_on["relative_output_error"] == pytest.approx(
        out_err(w, decode_bilevel_f32(pack(on)), h), rel=1e-3
    )
    # n = 256: 3-bit codes, 2G = 32 3-bit statistics codes per row (3/8 bit per weight, no
    # padding: C-5.5), one stats2 record per (16-row tile, group).
    assert r_rtn["bits_per_weight"] == 3 + 3 * 32 / 256 + 64 * 8 * 16 / (128 * 256)


def test_outlier_budget_caps_count():
    w, h = make_problem(64, 256, seed=4)
    for tau in (0.2, None):
        t = encode_gptq(
            w, h, bits=3, group_size=16, stats_bits=3, stats_group_size=16,
            perm_order="act_order", percdamp=1.0, outlier_threshold=tau, outlier_budget=0.005,
        )  # fmt: skip
        k = len(t.outliers)
        assert 0 < k <= int(0.005 * 64 * 256)
    base = encode_gptq(w, h, bits=3, group_size=16, perm_order="act_order", percdamp=1.0)
    capped = encode_gptq(
        w, h, bits=3, group_size=16, perm_order="act_order", percdamp=1.0,
        outlier_threshold=0.2, outlier_budget=0.005,
    )  # fmt: skip
    assert out_err(w, decode_bilevel_f32(pack(capped)), h) < out_err(
        w, decode_bilevel_f32(pack(base)), h
    )


def test_act_order_perm_and_decode_approximates_w():
    w, h = make_problem(32, 96, seed=5)
    t = encode_gptq(w, h, bits=4, group_size=16, perm_order="act_order")
    assert t.perm.dtype == np.uint32
    np.testing.assert_array_equal(np.sort(t.perm), np.arange(96))
    np.testing.assert_array_equal(t.perm, np.argsort(-np.diag(h), kind="stable"))
    dec = decode_bilevel_f32(pack(t))
    assert np.linalg.norm(dec - w) / np.linalg.norm(w) < 0.2
    assert out_err(w, dec, h) < 0.02


def test_dead_columns_and_awkward_shapes():
    w, h = make_problem(21, 77, seed=6)
    h[5, :] = h[:, 5] = 0
    h[40, :] = h[:, 40] = 0
    assert dead_columns(h).sum() == 2
    for kw in (
        dict(bits=3, group_size=10, stats_bits=2, stats_group_size=4, block_size=16),
        dict(bits=2, group_size=300, block_size=32),
        dict(bits=5, group_size=1, block_size=7, outlier_threshold=0.5),
    ):
        info: dict = {}
        t = encode_gptq(w, h, perm_order="act_order", **kw, info=info)
        dec = decode_bilevel_f32(pack(t))
        assert info["dead_columns"] == 2
        # Dead columns are zeroed (GPTQ): they decode to the code nearest 0.
        dd = dec[:, [5, 40]]
        if kw.get("stats_bits", 0) == 0 and kw["group_size"] >= 77:
            s_, z_ = (t.stats[:, 0, i].astype(np.float32)[:, None] for i in (0, 1))
            grid = np.abs(s_ * (np.arange(2 ** kw["bits"], dtype=np.float32) - z_))
            np.testing.assert_array_equal(np.abs(dd), np.repeat(grid.min(1, keepdims=True), 2, 1))
        assert np.abs(dd).max() < 0.1
        np.testing.assert_array_equal(info["reconstruction_permuted"], dec[:, t.perm.astype(int)])


@pytest.mark.parametrize(
    "wmod,hmod,kw,frag",
    [
        (lambda w: np.where(w > 0.05, np.nan, w), None, {}, "non-finite"),
        (lambda w: w[:0], None, {}, "empty"),
        (None, lambda h: h[:-1, :-1], {}, "shape"),
        (None, lambda h: np.where(h > 1, np.inf, h), {}, "non-finite"),
        (None, lambda h: h + np.triu(np.ones_like(h)), {}, "symmetric"),
        (None, lambda h: h - 2 * np.diag(np.diag(h)), {}, "negative diagonal"),
        (None, lambda h: h.astype(np.int64), {}, "dtype"),
        (None, None, dict(perm_order="random"), "perm_order"),
        (None, None, dict(outlier_threshold=-1.0), "outlier_threshold"),
        (None, None, dict(outlier_budget=1.5), "outlier_budget"),
        (None, None, dict(percdamp=float("nan")), "percdamp"),
        (None, None, dict(block_size=0), "block_size"),
        (None, None, dict(bits=0), "bits"),
    ],
)
def test_bad_input(wmod, hmod, kw, frag):
    w, h = make_problem(8, 32)
    w = wmod(w) if wmod else w
    h = hmod(h) if hmod else h
    args = dict(bits=3, group_size=16)
    args.update(kw)
    with pytest.raises(BadInputError) as ei:
        encode_gptq(w, h, **args, name="model.layers.0.q")
    assert "model.layers.0.q" in str(ei.value) and frag in str(ei.value)


def test_non_psd_hessian_is_damped_with_warning():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 24))
    h = x.T @ x  # rank 3: singular
    h[0, 1] = h[1, 0] = 10 * np.sqrt(h[0, 0] * h[1, 1])  # indefinite, positive diagonal
    w = rng.standard_normal((8, 24)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        info: dict = {}
        t = encode_gptq(w, h, bits=4, group_size=8, percdamp=0.0, info=info)
    assert info["extra_damping"] > 0
    assert np.isfinite(decode_bilevel_f32(pack(t))).all()


def test_f16_rounding_and_loo_scores():
    rng = np.random.default_rng(8)
    x = (rng.standard_normal(3000) * 10.0 ** rng.integers(-9, 5, 3000)).astype(np.float32)
    x = np.concatenate([x, np.float32([0, -0.0, 65504, 65519, 2.0**-24, 2.0**-25, 3 * 2.0**-26])])
    got = np.array([f16_round_scalar(v) for v in x], dtype=np.float32)
    np.testing.assert_array_equal(
        got, np.clip(x, -65504, 65504).astype(np.float16).astype(np.float32)
    )
    g = rng.standard_normal((5, 6)).astype(np.float32)
    d = rng.uniform(0.5, 2, 6)
    score = _loo_scores(g, d, 7, np.empty(g.shape))

    def err(v, dd):
        s = (v.max() - v.min()) / 7
        z = -v.min() / s
        q = np.clip(np.floor(v / s + z + 0.5), 0, 7)
        return float((((s * (q - z) - v) / dd) ** 2).sum())

    for i in range(5):
        gi = g[i].astype(np.float64)
        for k in range(6):
            keep = np.arange(6) != k
            want = err(gi, d) - err(gi[keep], d[keep])
            assert score[i, k] == pytest.approx(want, rel=1e-9, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 40),
    bits=st.integers(2, 5),
    g=st.integers(1, 20),
    sb=st.integers(0, 3),
    tau=st.sampled_from([None, 0.3]),
    order=st.sampled_from(["identity", "act_order"]),
    seed=st.integers(0, 1000),
)
def test_gptq_property(m, n, bits, g, sb, tau, order, seed):
    w, h = make_problem(m, n, seed=seed, tokens=64, hot=min(2, n))
    info: dict = {}
    t = encode_gptq(
        w, h, bits=bits, group_size=g, stats_bits=sb, stats_group_size=3 if sb else 0,
        perm_order=order, outlier_threshold=tau, block_size=8, info=info,
    )  # fmt: skip
    assert int(t.codes.max()) < 2**bits
    dec = decode_bilevel_f32(pack(t))
    assert np.isfinite(dec).all()
    perm = np.arange(n) if t.perm is None else t.perm.astype(np.int64)
    np.testing.assert_array_equal(info["reconstruction_permuted"], dec[:, perm])


# ---- Hessians ---------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 9)), min_size=1, max_size=4),
    n=st.integers(1, 12),
    seed=st.integers(0, 100),
)
def test_hessian_accumulation_equals_direct(shapes, n, seed):
    rng = np.random.default_rng(seed)
    acc = HessianAccumulator(n)
    xs = []
    for a, b in shapes:
        x = rng.standard_normal((a, b, n)).astype(np.float32)
        acc.add(x)
        xs.append(x.reshape(-1, n).astype(np.float64))
    x = np.concatenate(xs)
    np.testing.assert_allclose(acc.hessian(), 2.0 / len(x) * x.T @ x, rtol=1e-12, atol=1e-12)
    assert acc.tokens == len(x)
    np.testing.assert_array_equal(acc.hessian(), acc.hessian().T)


def test_hessian_accumulator_errors():
    acc = HessianAccumulator(4, name="l0")
    with pytest.raises(BadInputError, match="no activations"):
        acc.hessian()
    with pytest.raises(BadInputError, match="expected 4"):
        acc.add(np.ones((2, 5), np.float32))
    with pytest.raises(BadInputError, match="non-finite"):
        acc.add(np.array([[1, 2, np.nan, 4]], np.float32))
    with pytest.raises(BadInputError, match="l0"):
        acc.add(np.ones((2, 4), np.int32))


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    acc = HessianAccumulator(6)
    acc.add(rng.standard_normal((10, 6)))
    hs = {"b.weight": acc, "a.weight": np.eye(3) * 2}
    path = tmp_path / "h.safetensors"
    save_hessians(path, hs)
    got = load_hessians(path)
    assert sorted(got) == ["a.weight", "b.weight"]
    np.testing.assert_array_equal(got["b.weight"], acc.hessian())
    np.testing.assert_array_equal(got["a.weight"], np.eye(3) * 2)
    assert hessian_tokens(path) == {"b.weight": 10}
    assert os.listdir(tmp_path) == ["h.safetensors"]  # no temporary left behind
    first = path.read_bytes()
    save_hessians(path, hs)
    assert path.read_bytes() == first  # deterministic bytes
    save_hessians(tmp_path / "h32.safetensors", hs, dtype="float32")
    assert load_hessians(tmp_path / "h32.safetensors")["a.weight"].dtype == np.float32
    with pytest.raises(BadInputError, match="non-finite"):
        save_hessians(tmp_path / "bad.safetensors", {"x": np.full((2, 2), np.nan)})
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(IoError):
        load_hessians(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(IoError):
        load_hessians(tmp_path / "junk.safetensors")


def test_validate_hessian_symmetrizes_copy():
    h = np.array([[2.0, 1.0], [1.0 + 1e-9, 3.0]], dtype=np.float32)
    out = validate_hessian(h, 2)
    assert out.dtype == np.float64 and out is not h
    np.testing.assert_array_equal(out, out.T)


# ---- presets, accounting, reports -------------------------------------------------------


def test_presets_valid_and_round_trip():
    for name, cfg in PRESETS.items():
        assert cfg.preset == name and cfg.version == 1
        assert EncoderConfig.from_dict(cfg.to_dict()) == cfg
    c = get_preset("spqr-3bit", outlier_budget=0.01, perm_order="identity")
    assert c.outlier_budget == 0.01 and c.perm_order == "identity" and c.preset == "spqr-3bit"
    with pytest.raises(BadInputError):
        get_preset("spqr-3bit", group_size=0)
    with pytest.raises(BadInputError):
        get_preset("nope")
    with pytest.raises(BadInputError, match="unknown keys"):
        EncoderConfig.from_dict({"bitz": 3})
    with pytest.raises(BadInputError):
        get_preset("rtn-4bit-g128", outlier_threshold=0.2)
    with pytest.raises(BadInputError):
        EncoderConfig.from_dict({**PRESETS["spqr-3bit"].to_dict(), "version": 2})


def _blank(shape, params, perm, outliers=None):
    """A valid all-zero tensor of this geometry (section sizes do not depend on values)."""
    m, n = shape
    g = -(-n // params.group_size)
    if params.stats_bits:
        tiles = -(-m // params.stats_group_size)
        stats, stats2 = np.zeros((m, g, 2), np.uint8), np.zeros((tiles, g, 4), np.float16)
    else:
        stats, stats2 = np.zeros((m, g, 2), np.float16), None
    return BilevelTensor(
        shape, params, np.zeros(shape, np.uint8), stats, stats2,
        None if not perm else np.arange(n, dtype=np.uint32), outliers,
    )  # fmt: skip


def test_bits_per_weight_matches_spec_table():
    m = n = 4096
    k = 167_772
    flat = np.sort(np.random.default_rng(0).choice(m * n, k, replace=False))
    o = Outliers(
        (flat // n).astype(np.uint32), (flat % n).astype(np.uint32), np.ones(k, np.float16)
    )
    spqr3 = BilevelParams(3, 16, 3, 16)
    assert round(bits_per_weight(_blank((m, n), spqr3, True, o)), 3) == 3.949
    assert round(bits_per_weight(_blank((m, n), BilevelParams(4, 16, 3, 16), True, o)), 3) == 4.949
    assert round(bits_per_weight(_blank((m, n), BilevelParams(4, 128), True)), 3) == 4.254
    assert bits_per_weight(_blank((m, n), spqr3, False)) == 3.625
    # Padding: 100 4-bit codes take 13 words (the stream ends on a whole word), one fp16 pair.
    assert bits_per_weight(_blank((1, 100), BilevelParams(4, 100), False)) == (13 * 32 + 32) / 100


def test_outlier_entry_count_counts_skips():
    o = Outliers(
        np.array([0, 0, 0, 1], np.uint32),
        np.array([65534, 65535, 200000, 65535], np.uint32),
        np.ones(4, np.float16),
    )
    t = _blank((2, 300000), BilevelParams(3, 300000), False, o)
    # One 16-row block, cells row-major: row 0: 65534 (delta 65535), 65535 (delta 1), 200000
    # (gap 134465: two skips); row 1, column 65535 is cell 365535 (gap 165535: two skips).
    assert pack(t).header.outlier_entry_count == 4 + 2 + 2


def test_encode_tensor_fallback_and_report():
    w, h = make_problem(32, 64, seed=10)
    with pytest.warns(RuntimeWarning, match="no Hessian"):
        t, r = encode_tensor(w.astype(np.float16), PRESETS["spqr-3bit"], name="x")
    assert r["fallback"] and r["method"] == "rtn" and r["relative_output_error"] is None
    assert t.dtype.name == "FLOAT16" and t.perm is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t, r = encode_tensor(w, PRESETS["gptq-4bit-g128"], h, name="x")
    assert not r["fallback"] and r["method"] == "gptq"
    assert set(r) >= {
        "bits_per_weight", "outlier_percent", "relative_weight_error", "relative_output_error",
    }  # fmt: skip
    assert r["relative_output_error"] == pytest.approx(
        out_err(w, decode_bilevel_f32(pack(t)), h), rel=1e-4
    )
    assert relative_output_error(w, w, h) == 0.0
    with pytest.raises(BadInputError, match="x"):
        encode_tensor(w, PRESETS["rtn-4bit-g128"], h[:3, :3], name="x")


def test_gptq_output_decodes_identically_in_reference_and_spec_model():
    """Real SpQR encoder output (perm, outliers, bilevel stats) through both decoders."""
    import spec_model

    w, h = make_problem(40, 300, seed=11)
    t, _ = encode_tensor(w, PRESETS["spqr-3bit"], h)
    assert t.perm is not None and len(t.outliers) > 0
    packed = pack(t)
    np.testing.assert_array_equal(
        decode_bilevel_f32(packed).view(np.uint32), spec_model.decode_f32(packed).view(np.uint32)
    )


def test_inverse_cholesky_upper_factor():
    from spqr_format.codec.gptq import inverse_cholesky_upper

    _, h = make_problem(4, 50, seed=12)
    h += np.eye(50) * 0.1
    u, extra = inverse_cholesky_upper(h)
    assert extra == 0
    np.testing.assert_allclose(np.triu(u), u)
    assert (np.diag(u) > 0).all()
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(h), rtol=1e-8, atol=1e-10)


def test_all_zero_hessian_warns_and_zeroes():
    w, _ = make_problem(8, 32)
    with pytest.warns(RuntimeWarning, match="all zero"):
        t = encode_gptq(w, np.zeros((32, 32)), bits=4, group_size=16, name="z")
    assert np.abs(decode_bilevel_f32(pack(t))).max() < 1e-3


def test_rtn_config_with_budget_and_hessian_report():
    w, h = make_problem(32, 128, seed=13)
    t, r = encode_tensor(w, get_preset("rtn-4bit-g128", outlier_budget=0.01), h)
    assert r["outliers"] == int(0.01 * 32 * 128) and r["method"] == "rtn"
    assert 0 < r["relative_output_error"] < 0.05


def test_identical_rows_do_not_become_all_outliers():
    w, h = make_problem(1, 64, seed=14)
    w = np.repeat(w, 6, axis=0)
    t = encode_gptq(w, h, bits=3, group_size=16, outlier_threshold=0.2)
    assert t.outliers is None
    t1 = encode_gptq(w[:1], h, bits=3, group_size=16, outlier_threshold=0.2)  # m = 1
    assert t1.outliers is None


@pytest.mark.parametrize("tau", [float("inf"), float("nan"), 0.0, -1.0])
def test_api_refuses_a_threshold_that_cannot_be_stored_before_encoding(tau):
    # the CLI guards this too; the config itself must, so that the API never runs a whole
    # encode whose settings cannot then be written as JSON metadata
    with pytest.raises(BadInputError, match="outlier_threshold"):
        get_preset("spqr-3bit", outlier_threshold=tau)
