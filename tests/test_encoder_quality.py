"""Issue 18: clipped statistics, outliers by impact under a budget, new presets, --target-bits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from spqr_format import api
from spqr_format.cli import main
from spqr_format.codec import allocate
from spqr_format.codec.hessian import HessianAccumulator
from spqr_format.codec.packing import pack
from spqr_format.codec.presets import PRESETS, EncoderConfig, encode_tensor, get_preset
from spqr_format.codec.quantizer import clipped_stats, dequant, minmax_stats
from spqr_format.codec.reference import decode_bilevel_f32
from spqr_format.errors import BadInputError
from spqr_format.safetensors_io import write_safetensors


def _layer(m, n, seed=0, tokens=512):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=(m, n)) * 0.02).astype(np.float32)
    x = rng.standard_normal((tokens, n)).astype(np.float32)
    x[:, rng.choice(n, 3, replace=False)] *= 10.0
    acc = HessianAccumulator(n)
    acc.add(x)
    return w, acc.hessian()


# ---- statistics -----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([2, 3, 4]), g=st.sampled_from([4, 16]))
def test_clipped_stats_never_worse_than_minmax(seed, bits, g):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(8, g)) * rng.uniform(0.01, 2)).astype(np.float32)

    def err(s, z):
        q = np.clip(np.floor(w / s[:, None] + z[:, None] + 0.5), 0, 2**bits - 1)
        return ((dequant(q, s[:, None], z[:, None]) - w).astype(np.float64) ** 2).sum(1)

    s0, z0 = minmax_stats(w, bits)
    s1, z1 = clipped_stats(w, bits)
    assert np.all(err(s1, z1) <= err(s0, z0) * (1 + 1e-5) + 1e-12)
    # the grid's first point is min-max itself: identical stats when nothing is better
    same = err(s1, z1) >= err(s0, z0)
    assert np.allclose(s1[same], s0[same]) and np.allclose(z1[same], z0[same])


def test_clipped_stats_degenerate_groups_match_minmax():
    w = np.array([[0, 0, 0, 0], [1.5, 1.5, 1.5, 1.5], [1.0, 1.0001, 1.0, 1.0]], np.float32)
    for a, b in zip(clipped_stats(w, 3), minmax_stats(w, 3), strict=True):
        np.testing.assert_array_equal(a, b)


# ---- the solver -----------------------------------------------------------------------------


def test_old_presets_unchanged_and_settings_keys_unchanged():
    old = ("spqr-3bit", "spqr-4bit", "gptq-4bit-g128", "gptq-3bit-g128", "rtn-4bit-g128",
           "rtn-3bit-g16-bilevel")  # fmt: skip
    for name in old:
        cfg = PRESETS[name]
        assert "stats_search" not in cfg.to_dict() and "outlier_select" not in cfg.to_dict()
        assert EncoderConfig.from_dict(cfg.to_dict()) == cfg, name
    new = PRESETS["q3-g16"]
    assert new.to_dict()["stats_search"] == "mse"
    assert EncoderConfig.from_dict(new.to_dict()) == new


def test_impact_outliers_spend_the_budget_and_lower_the_error():
    w, h = _layer(96, 128)
    base = get_preset("q3-g16", outlier_budget=None, outlier_select="column")
    _, r0 = encode_tensor(w, base, h)
    t, r1 = encode_tensor(w, get_preset("q3-g16", outlier_budget=0.01), h)
    k = math.floor(0.01 * w.size)
    assert 0.5 * k <= r1["outliers"] <= k
    assert r1["relative_output_error"] < r0["relative_output_error"]
    # the decoder agrees with the solver's reconstruction
    info = {}
    t2, _ = encode_tensor(w, get_preset("q3-g16", outlier_budget=0.01), h, info=info)
    q = decode_bilevel_f32(pack(t2))
    perm = t2.perm.astype(np.int64)
    np.testing.assert_array_equal(q[:, perm], info["reconstruction_permuted"])


def test_mse_stats_lower_the_output_error_of_gptq():
    w, h = _layer(64, 256, seed=3)
    _, a = encode_tensor(w, PRESETS["gptq-4bit-g128"], h)
    _, b = encode_tensor(w, get_preset("gptq-4bit-g128", stats_search="mse"), h)
    assert b["relative_output_error"] < a["relative_output_error"]
    assert b["bits_per_weight"] == a["bits_per_weight"]


def test_bad_new_settings_are_refused():
    with pytest.raises(BadInputError, match="stats_search"):
        get_preset("spqr-3bit", stats_search="best")
    with pytest.raises(BadInputError, match="outlier_threshold"):
        get_preset("spqr-3bit", outlier_select="impact")  # tau 0.2 still set
    with pytest.raises(BadInputError, match="impact"):
        get_preset("rtn-4bit-g128", outlier_select="impact", outlier_budget=0.01)


# ---- allocation -----------------------------------------------------------------------------


def _tensors():
    out = {}
    for i, (m, n) in enumerate([(64, 128), (96, 64), (64, 64)]):
        w, h = _layer(m, n, seed=10 + i)
        out[f"l{i}.weight"] = (w * (1 + i), h)
    return out


@pytest.mark.parametrize("target", [3.0, 3.5, 4.0])
def test_plan_meets_the_target_within_tolerance(target):
    ts = _tensors()
    a = allocate.plan(list(ts), ts.__getitem__, target)
    assert target - allocate.TOLERANCE <= a.bits_per_weight <= target
    assert set(a.choice) == set(ts)
    json.dumps(a.to_metadata(), allow_nan=False)


def test_plan_objectives_and_bad_objective():
    ts = _tensors()
    rel = allocate.plan(list(ts), ts.__getitem__, 3.5)
    ab = allocate.plan(list(ts), ts.__getitem__, 3.5, objective="absolute")
    assert rel.objective == "relative" and ab.objective == "absolute"
    # l2 has the largest weights (x3): absolute errors give it more bits than relative ones
    assert ab.bits["l2.weight"] >= rel.bits["l2.weight"]
    with pytest.raises(BadInputError, match="objective"):
        allocate.plan(list(ts), ts.__getitem__, 3.5, objective="loss")


def test_plan_refuses_a_target_below_the_cheapest_before_encoding():
    ts = _tensors()  # 64-96 rows: the permutation alone costs 0.33-0.5 bits/weight
    with pytest.raises(BadInputError, match="below the smallest reachable"):
        allocate.plan(list(ts), ts.__getitem__, 2.5)


def test_hull_greedy_prefers_error_per_bit():
    C = EncoderConfig
    ms = {
        "a": [allocate.Measurement(C(), 100, 10.0), allocate.Measurement(C(bits=4), 200, 1.0)],
        "b": [allocate.Measurement(C(), 100, 10.0), allocate.Measurement(C(bits=4), 200, 9.0)],
    }
    a = allocate.allocate(ms, {"a": 100, "b": 100}, 1.5)
    assert a.bits == {"a": 200, "b": 100}


def test_check_target_rejects_unreachable_and_bad_values():
    shapes = {"x.weight": (64, 128)}
    with pytest.raises(BadInputError, match="below the smallest reachable") as e:
        allocate.check_target(1.0, shapes)
    assert e.value.tensor == "x.weight"
    with pytest.raises(BadInputError, match="above the largest reachable"):
        allocate.check_target(30.0, shapes)
    for bad in (math.inf, math.nan, -1, "3"):
        with pytest.raises(BadInputError, match="target-bits"):
            allocate.check_target(bad, shapes)


# ---- CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tb")
    ts = _tensors()
    write_safetensors(
        d / "m.safetensors",
        {**{n: ("float32", w) for n, (w, _) in ts.items()},
         "norm.weight": ("float32", np.ones(64, np.float32))},
    )  # fmt: skip
    hs = {n: ("float32", h.astype(np.float32)) for n, (_, h) in ts.items()}
    write_safetensors(d / "H.safetensors", hs)
    return d


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_target_bits_file_accounting_and_report(model_files, tmp_path):
    out = tmp_path / "o.spqr"
    r = run("encode", model_files / "m.safetensors", "--hessians", model_files / "H.safetensors",
            "--target-bits", "3.0", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "config" in r.output and "target 3 bits/weight" in r.output
    info = json.loads(run("info", out, "--json").output)
    assert 2.99 <= info["bits_per_weight_quantized"] <= 3.0
    with api.open_file(out) as f:
        alloc = f.metadata["encoder.allocation"]
        assert set(alloc["tensors"]) == {"l0.weight", "l1.weight", "l2.weight"}
        for n in alloc["tensors"]:
            f.verify(n)
    rep = run("report", out)
    assert rep.exit_code == 0, rep.output
    assert "allocation: target 3 bits/weight" in rep.output
    doc = json.loads(run("report", out, "--json").output)
    assert all(t["config"] for t in doc["tensors"] if t["encoding"] == "bilevel")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--target-bits", "1.0"], "below the smallest reachable"),
        (["--target-bits", "inf"], "finite"),
        (["--target-bits", "3", "--bits", "4"], "cannot be combined with --bits"),
    ],
)
def test_cli_target_bits_bad_input_exits_2(model_files, tmp_path, extra, needle):
    out = tmp_path / "o.spqr"
    r = run("encode", model_files / "m.safetensors", "--hessians", model_files / "H.safetensors",
            *extra, "-o", out)  # fmt: skip
    assert r.exit_code == 2, r.output
    assert needle in r.output and not out.exists()


def test_cli_target_bits_needs_every_hessian(model_files, tmp_path):
    out = tmp_path / "o.spqr"
    r = run("encode", model_files / "m.safetensors", "--target-bits", "3", "-o", out)
    assert r.exit_code == 2 and "--hessians" in r.output
    part = tmp_path / "H1.safetensors"
    w, h = _tensors()["l0.weight"]
    write_safetensors(part, {"l0.weight": ("float32", h.astype(np.float32))})
    r = run("encode", model_files / "m.safetensors", "--hessians", part, "--target-bits", "3",
            "-o", out)  # fmt: skip
    assert r.exit_code == 2 and "l1.weight" in r.output and not out.exists()


def test_cli_target_bits_bad_hessian_shape_named_before_work(model_files, tmp_path):
    out = tmp_path / "o.spqr"
    bad = tmp_path / "Hbad.safetensors"
    ts = _tensors()
    hs = {n: ("float32", h.astype(np.float32)) for n, (_, h) in ts.items()}
    hs["l1.weight"] = ("float32", np.eye(5, dtype=np.float32))
    write_safetensors(bad, hs)
    r = run("encode", model_files / "m.safetensors", "--hessians", bad, "--target-bits", "3",
            "-o", out)  # fmt: skip
    assert r.exit_code == 2 and "l1.weight" in r.output and "does not match" in r.output
    assert not out.exists()
