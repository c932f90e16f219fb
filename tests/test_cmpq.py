"""CMPQ (encoding channel_mixed, SPEC section 12) at the public API and the CLI: round trips,
the bit target met exactly, the two decoders bit for bit, rejects, exit-2 errors."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import spqr_format as sf
from spqr_format.cli import main
from spqr_format.codec import channel_mixed as cm
from spqr_format.codec import channel_mixed_ref as ref
from spqr_format.codec.bilevel import Outliers
from spqr_format.codec.cmpq import CmpqConfig, encode_cmpq
from spqr_format.errors import BadInputError, SpqrError
from spqr_format.safetensors_io import write_safetensors

ROOT = pathlib.Path(__file__).parents[1]


def _numpy_decoder():
    spec_ = importlib.util.spec_from_file_location(
        "numpy_decoder", ROOT / "conformance" / "numpy_decoder.py"
    )
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    return mod


def _layer(m, n, seed=0, tokens=400):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, (m, n)) * 0.02).astype(np.float32)
    x = rng.standard_normal((tokens, n))
    x[:, : max(1, n // 32)] *= 8.0
    return w, x.T @ x


def _bits(t: cm.ChannelMixedTensor) -> int:
    return sum(cm.section_bits(t).values())


@pytest.mark.parametrize("allocator", ["norm", "rd"])
@pytest.mark.parametrize("target", [2.5, 3.0, 3.5])
def test_target_met_exactly_counting_every_section(allocator, target):
    w, h = _layer(256, 192)
    t, rep = encode_cmpq(w, h, CmpqConfig(target_bits=target, allocator=allocator))
    total = _bits(t)
    assert total == rep["counted_bits"]
    assert total <= target * w.size  # never above the target
    assert target * w.size - total < 64  # within one outlier entry (+ padding)
    widths = np.asarray(t.widths)
    assert np.all(np.diff(widths.astype(int)) >= 0) and set(widths) <= {2, 3, 4}
    # wider columns are the ones of larger activation norm (norm ranking)
    if allocator == "norm" and len(set(widths)) > 1:
        s = np.sqrt(np.diagonal(h))[np.asarray(t.perm)]
        assert s[widths == widths.max()].min() >= s[widths == widths.min()].max()


def test_rd_allocator_output_error_not_worse_than_norm_on_diag():
    w, h = _layer(256, 128, seed=3)
    errs = {}
    for a in ("norm", "rd"):
        t, _ = encode_cmpq(w, h, CmpqConfig(target_bits=2.8, allocator=a, fill_outliers=False))
        d = (ref.dequantize(t, "float32") - w).astype(np.float64)
        errs[a] = float(np.sum(np.diagonal(h) * (d * d).sum(0)))
    assert errs["rd"] <= errs["norm"] * 1.02


def test_roundtrip_through_a_file_and_both_decoders_bit_for_bit(tmp_path):
    w, h = _layer(100, 70, seed=1)  # m not a multiple of 16, runs not word-aligned
    t, _ = encode_cmpq(w, h, CmpqConfig(target_bits=3.6, widths=(1, 3, 5), table_rows=33),
                       dtype=sf.DType.FLOAT32)  # fmt: skip
    path = tmp_path / "m.spqr"
    sf.save(path, {"w": t})
    nd = _numpy_decoder()
    with sf.open(path) as f:
        assert f.version == (1, 1)
        info = f.info("w")
        assert info.encoding == "channel_mixed" and info.params["table_rows"] == 33
        assert info.bits_per_weight == _bits(t) / w.size
        f.verify("w")
        ours = f.decode("w")
        theirs = nd.decode_file(str(path))["w"]
        assert ours.dtype == np.float32 and np.array_equal(
            ours.view(np.uint32), theirs.view(np.uint32)
        )
        got = f.read("w")
        back = cm.unpack(got)
        assert np.array_equal(back.codes, t.codes) and np.array_equal(back.perm, t.perm)
        x = np.linspace(-1, 1, 70, dtype=np.float32)
        y = ref.matvec_channel_mixed(got, x)
        dense = f.decode("w", "float32").astype(np.float64)
        assert np.allclose(y, dense @ x, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    rows=st.sampled_from([0, 1, 7, 16, 64]),
    seed=st.integers(0, 2**16),
    density=st.sampled_from([0.0, 0.05, 0.5]),
)
def test_decode_is_the_table_lookup_of_the_spec(m, n, rows, seed, density):
    rng = np.random.default_rng(seed)
    widths = np.sort(rng.integers(1, 9, n)).astype(np.uint8)
    perm = rng.permutation(n).astype(np.uint32)
    codes = (rng.integers(0, 256, (m, n)) % (1 << widths.astype(np.int64))).astype(np.uint8)
    geo = cm.ChannelMixedGeometry.of(
        (m, n), tuple(int((widths == b).sum()) for b in cm.WIDTHS), rows
    )
    tables = rng.standard_normal((geo.table_blocks, geo.table_entries)).astype(np.float16)
    mask = rng.random((m, n)) < density
    r, c = np.nonzero(mask)
    out = Outliers(
        r.astype(np.uint32), c.astype(np.uint32), rng.standard_normal(r.size).astype(np.float16)
    )
    t = cm.ChannelMixedTensor((m, n), widths, perm, codes, tables, out if r.size else None,
                              sf.DType.FLOAT32, rows)  # fmt: skip
    got = ref.dequantize(t, "float32")
    # the model: v = tables[t(i), o_j + q]; outliers replace; W[:, perm[j]] = v[:, j]
    offs = geo.column_table_offsets()
    blk = np.zeros(m, np.int64) if rows == 0 else np.arange(m) // rows
    v = tables[blk[:, None], offs[None, :] + codes].astype(np.float32)
    v[mask] = out.values.astype(np.float32)
    want = np.empty_like(v)
    want[:, perm] = v
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    back = cm.unpack(cm.pack(t))
    assert np.array_equal(back.codes, codes) and np.array_equal(back.tables, tables)


# ---- bad input ---------------------------------------------------------------------------


def test_encoder_bad_input_names_the_tensor():
    w, h = _layer(64, 48)
    with pytest.raises(BadInputError, match="unreachable") as e:
        encode_cmpq(w, h, CmpqConfig(target_bits=2.0), name="x.weight")
    assert "x.weight" in str(e.value)
    with pytest.raises(BadInputError, match="at most"):
        encode_cmpq(w, h, CmpqConfig(target_bits=9.0), name="x.weight")
    with pytest.raises(BadInputError, match="needs a Hessian"):
        encode_cmpq(w, None, CmpqConfig(target_bits=3.0), name="x.weight")
    with pytest.raises(BadInputError, match="does not match"):
        encode_cmpq(w, h[:-1, :-1], CmpqConfig(target_bits=3.0), name="x.weight")
    with pytest.raises(BadInputError, match="all zero"):
        encode_cmpq(w, np.zeros_like(h), CmpqConfig(target_bits=3.0), name="x.weight")


def _file(tmp_path, mutate=None):
    """A valid one-tensor channel_mixed file, then ``mutate(image)`` (conformance.image: CRCs
    and layout recomputed, so the mutation is the file's only fault)."""
    from spqr_format.conformance import image

    w, h = _layer(48, 40, seed=5)
    t, _ = encode_cmpq(w, h, CmpqConfig(target_bits=4.5, act_outliers=0.02))
    path = tmp_path / "x.spqr"
    sf.save(path, {"w": t})
    if mutate:
        im = image.parse(path.read_bytes())
        mutate(im.tensors[0])
        path.write_bytes(im.to_bytes())
    return path


def _u(sec, dt, fn):
    a = np.frombuffer(sec.data, dt).copy()
    fn(a)
    sec.data = a.tobytes()


@pytest.mark.parametrize(
    "fault, code",
    [
        (lambda t: _u(t.section(5), "<u2", lambda a: a.__setitem__(0, a[1])), "E_BAD_PERMUTATION"),
        (lambda t: _u(t.section(8), "<u2", lambda a: a.__setitem__(3, 0x7C00)), "E_NONFINITE"),
        (lambda t: _u(t.section(7), "<u4", lambda a: a.__setitem__(0, a[0] & 0xFFFF0000)), "E_BAD_OUTLIERS"),  # noqa: E501
        (lambda t: setattr(t, "params", t.params[:32] + struct.pack("<I", 2**24 + 1) + t.params[36:]), "E_BAD_FIELD"),  # noqa: E501
        (lambda t: setattr(t, "params", struct.pack("<I", struct.unpack("<I", t.params[:4])[0] + 1) + t.params[4:]), "E_BAD_FIELD"),  # noqa: E501
        (lambda t: setattr(t, "params", t.params[:32] + struct.pack("<I", 7) + t.params[36:]), "E_BAD_LAYOUT"),  # noqa: E501
        (lambda t: t.sections.pop(), "E_BAD_LAYOUT"),
        (lambda t: (setattr(t, "ndim", 1), t.dims.__setitem__(1, 0)), "E_BAD_SHAPE"),
    ],
)  # fmt: skip
def test_faults_are_refused_by_both_decoders_with_one_code(tmp_path, fault, code):
    path = _file(tmp_path, fault)
    with pytest.raises(SpqrError) as e:
        with sf.open(path) as f:
            f.decode("w")
    assert e.value.code == code
    nd = _numpy_decoder()
    with pytest.raises(nd.SpecError) as e2:
        nd.decode_file(str(path))
    assert e2.value.code == code


# ---- CLI ---------------------------------------------------------------------------------


def _model(tmp_path, hess_bad=None):
    rng = np.random.default_rng(2)
    w1 = (rng.standard_t(4, (96, 128)) * 0.02).astype(np.float16)
    w2 = (rng.standard_normal((64, 96)) * 0.02).astype(np.float32)
    src = tmp_path / "model.safetensors"
    write_safetensors(src, {"a.weight": ("float16", w1), "b.weight": ("float32", w2),
                            "norm.weight": ("float32", np.ones(64, np.float32))})  # fmt: skip
    hs = {}
    for name, n in (("a.weight", 128), ("b.weight", 96)):
        x = rng.standard_normal((300, n))
        x[:, :3] *= 8
        hs[name] = ("float32", (x.T @ x).astype(np.float32))
    if hess_bad:
        hess_bad(hs)
    hess = tmp_path / "H.safetensors"
    write_safetensors(hess, hs)
    return src, hess


def test_cli_encode_cmpq_then_info_verify_decode(tmp_path):
    src, hess = _model(tmp_path)
    out, rep = tmp_path / "m.spqr", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["encode", str(src), "-o", str(out), "--method", "cmpq",
                                  "--target-bits", "4", "--hessians", str(hess),
                                  "--report", str(rep)])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = {x["name"]: x for x in json.loads(rep.read_text())["tensors"]}
    assert rows["a.weight"]["encoding"] == "channel_mixed"
    for name in ("a.weight", "b.weight"):
        mn = rows[name]["shape"][0] * rows[name]["shape"][1]
        assert 4 - 64 / mn <= rows[name]["bits_per_weight"] <= 4
    r = CliRunner().invoke(main, ["info", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["version"] == "1.1"
    assert {t["name"]: t["encoding"] for t in doc["tensors"]}["b.weight"] == "channel_mixed"
    r = CliRunner().invoke(main, ["info", str(out)])
    assert "channel_mixed w" in r.output
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0, r.output
    dec = tmp_path / "d.safetensors"
    r = CliRunner().invoke(main, ["decode", str(out), "-o", str(dec)])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args, bad, expect",
    [
        (["--target-bits", "1.5"], None, "unreachable"),
        (["--target-bits", "4"], lambda hs: hs.pop("b.weight"), "b.weight"),
        (["--target-bits", "4"], lambda hs: hs.__setitem__("a.weight", ("float32", np.eye(5, dtype=np.float32))), "a.weight"),  # noqa: E501
        (["--target-bits", "4"], lambda hs: hs.__setitem__("a.weight", ("float32", np.zeros((128, 128), np.float32))), "all zero"),  # noqa: E501
        ([], None, "--target-bits"),
        (["--target-bits", "4", "--bits", "3"], None, "do not apply"),
    ],
)  # fmt: skip
def test_cli_cmpq_bad_input_exits_2(tmp_path, args, bad, expect):
    src, hess = _model(tmp_path, bad)
    out = tmp_path / "m.spqr"
    r = CliRunner().invoke(main, ["encode", str(src), "-o", str(out), "--method", "cmpq",
                                  "--hessians", str(hess), *args])  # fmt: skip
    assert r.exit_code == 2, r.output
    assert expect in r.output
    assert not out.exists()


# ---- the GPTQ solver (error feedback) ------------------------------------------------------


def _corr_layer(m, n, seed, tokens=1000):
    """Heavy-tailed weights, activations with strongly correlated columns (random mixing with a
    decaying spectrum) and three hot input channels."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, (m, n)) * 0.02).astype(np.float32)
    spec_ = 1.0 / np.sqrt(1.0 + np.arange(n) / 8.0)
    mix = rng.standard_normal((n, n)) / np.sqrt(n) * spec_[:, None] + np.eye(n) * 0.3
    x = rng.standard_normal((tokens, n)) @ mix
    x[:, rng.choice(n, 3, replace=False)] *= 8.0
    return w, x.T @ x


def _out_err(t, w, h):
    d = (ref.dequantize(t, "float32") - w).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", d, h, d))


def _outlier_mask(t):
    mask = np.zeros(t.shape, bool)
    if t.outliers is not None:
        mask[t.outliers.rows, np.asarray(t.perm)[t.outliers.cols]] = True
    return mask


@pytest.mark.parametrize(
    "target, allocator, rows", [(2.7, "norm", 0), (3.0, "rd", 0), (3.6, "norm", 48)]
)
def test_gptq_solver_spends_exactly_the_kmeans_bits(target, allocator, rows):
    """Widths, permutation and outlier positions are decided before the solve: the counted
    bits are the kmeans solver's, to the bit, and meet the target within 0.01 bits/weight."""
    w, h = _corr_layer(192, 160, seed=7)
    got = {}
    for s in ("kmeans", "gptq"):
        cfg = CmpqConfig(target_bits=target, allocator=allocator, table_rows=rows, solver=s)
        t, rep = encode_cmpq(w, h, cfg)
        assert _bits(t) == rep["counted_bits"] and rep["solver"] == s
        got[s] = t
    a, b = got["kmeans"], got["gptq"]
    assert _bits(a) == _bits(b)
    assert 0 <= target - _bits(b) / w.size < 0.01
    assert np.array_equal(a.widths, b.widths) and np.array_equal(a.perm, b.perm)
    assert np.array_equal(_outlier_mask(a), _outlier_mask(b))
    assert not np.array_equal(a.codes, b.codes)  # the solve did change the codes


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gptq_solver_lowers_the_output_error_on_correlated_activations(seed):
    """||(W - Q) X^T||^2 = tr(D H D^T): measured ratios gptq / kmeans 0.53-0.59 on these
    layers (seeds 0-5); the test asks for < 0.7 on each."""
    w, h = _corr_layer(192, 128, seed)
    for target, rows in ((2.9, 0), (3.5, 64)):
        e = {s: _out_err(encode_cmpq(w, h, CmpqConfig(target_bits=target, table_rows=rows,
                                                       solver=s))[0], w, h)
             for s in ("kmeans", "gptq")}  # fmt: skip
        assert e["gptq"] < 0.7 * e["kmeans"], (target, rows, e)


def test_gptq_solver_with_a_diagonal_hessian_is_the_kmeans_solver():
    """No correlation, no feedback: U is diagonal, so every column is fitted on its original
    values and the two solvers give the same tensor, bit for bit (without fill outliers: the
    kmeans solver's tables are fitted before the fill, the gptq solver's without every
    outlier)."""
    w, _ = _layer(96, 80, seed=4)
    h = np.diag(np.random.default_rng(4).uniform(0.5, 50.0, 80))
    h[5, 5] = 0.0  # a dead column too
    cfg = CmpqConfig(target_bits=3.6, fill_outliers=False)
    a, _ = encode_cmpq(w, h, cfg.with_overrides(solver="kmeans"))
    b, _ = encode_cmpq(w, h, cfg.with_overrides(solver="gptq"))
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.tables, b.tables)
    assert np.array_equal(a.outliers.values.view(np.uint16), b.outliers.values.view(np.uint16))


@pytest.mark.parametrize(
    "act_order, rows, target", [(True, 0, 4.2), (False, 0, 4.2), (True, 32, 6.0)]
)
def test_gptq_solver_follows_the_gptq_recursion(act_order, rows, target):
    """Replays the solve in float64 from the decoded tensor: columns in the solve order (act
    order: descending diag H), each decoded column is the nearest table entry of the column's
    current value, an outlier holds that current (error-updated) value in f16, not the
    original weight, and the error (w - q) / U_jj updates the later columns through U (the
    upper factor of the damped H^-1)."""
    w, h = _corr_layer(64, 48, seed=11, tokens=300)
    cfg = CmpqConfig(target_bits=target, solver="gptq", act_order=act_order, table_rows=rows,
                     percdamp=0.05, act_outliers=0.02)  # fmt: skip
    t, _ = encode_cmpq(w, h, cfg)
    q = ref.dequantize(t, "float32").astype(np.float64)
    mask = _outlier_mask(t)
    n = w.shape[1]
    order = np.argsort(-np.diagonal(h), kind="stable") if act_order else np.arange(n)
    hp = h[np.ix_(order, order)] + 0.05 * np.mean(np.diagonal(h)) * np.eye(n)
    u = np.linalg.cholesky(np.linalg.inv(hp)).T  # upper, U^T U = hp^-1
    cur = w.astype(np.float64)[:, order]
    qp, mp = q[:, order], mask[:, order]
    perm = np.asarray(t.perm)
    inv = np.empty(n, np.int64)
    inv[perm] = np.arange(n)
    tab = t.tables.astype(np.float64)
    offs = cm.ChannelMixedGeometry.of(t.shape, cm_counts(t), rows).column_table_offsets()
    blk = np.zeros(w.shape[0], np.int64) if rows == 0 else np.arange(w.shape[0]) // rows
    moved = 0
    for j in range(n):
        x, v = cur[:, j], qp[:, j]
        o = mp[:, j]
        # outliers: the current value, rounded to f16 (within one f16 step of the replay)
        assert np.allclose(v[o], x[o], rtol=2**-10, atol=2**-24)
        moved += int(np.sum(np.abs(x[o] - w[o, order[j]]) > 1e-3 * np.abs(w[o, order[j]])))
        # the rest: the nearest entry of the column's table (ties and float32 rounding aside)
        sc = inv[order[j]]
        k = 1 << int(t.widths[sc])
        entries = tab[blk][:, offs[sc] : offs[sc] + k]
        best = np.abs(entries - x[:, None]).min(axis=1)
        assert np.all(np.abs(v - x)[~o] <= best[~o] + 1e-5)
        e = (x - v) / u[j, j]
        cur[:, j + 1 :] -= np.outer(e, u[j, j + 1 :])
    # outliers hold updated values, not the original weights (all but the first columns' moved;
    # measured 30 of 66 here with act order: the hot columns come first and get little feedback)
    assert moved >= 0.25 * mask.sum()


def cm_counts(t):
    w = np.asarray(t.widths)
    return tuple(int((w == b).sum()) for b in cm.WIDTHS)


def test_gptq_solver_round_trip_through_a_file(tmp_path):
    w, h = _corr_layer(100, 70, seed=2, tokens=400)
    t, rep = encode_cmpq(w, h, CmpqConfig(target_bits=3.8, widths=(1, 3, 5), table_rows=33,
                                          solver="gptq"), dtype=sf.DType.FLOAT32)  # fmt: skip
    path = tmp_path / "g.spqr"
    sf.save(path, {"w": t})
    nd = _numpy_decoder()
    with sf.open(path) as f:
        f.verify("w")
        assert f.info("w").bits_per_weight == rep["counted_bits"] / w.size
        ours = f.decode("w")
        theirs = nd.decode_file(str(path))["w"]
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
        assert np.array_equal(ours, ref.dequantize(t, "float32"))


def test_config_solver_fields_validated_and_old_dicts_load():
    with pytest.raises(BadInputError, match="solver must be one of") as e:
        CmpqConfig(solver="adam")
    assert e.value.field == "config.solver"
    for bad in (-0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(BadInputError, match="percdamp must be a finite number >= 0"):
            CmpqConfig(percdamp=bad)
    with pytest.raises(BadInputError, match="act_order must be true or false"):
        CmpqConfig(act_order=1)
    old = CmpqConfig().to_dict()
    for k in ("solver", "percdamp", "act_order"):
        old.pop(k)
    # a config recorded before the solver existed was a k-means encode
    assert CmpqConfig.from_dict(old) == CmpqConfig(solver="kmeans")
    c = CmpqConfig(solver="kmeans", percdamp=0.5, act_order=False)
    assert CmpqConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_cli_cmpq_solver_flags_reach_the_metadata(tmp_path):
    src, hess = _model(tmp_path)
    out, rep = tmp_path / "m.spqr", tmp_path / "r.json"
    base = ["encode", str(src), "-o", str(out), "--method", "cmpq", "--target-bits", "4",
            "--hessians", str(hess)]  # fmt: skip
    r = CliRunner().invoke(main, [*base, "--solver", "gptq", "--percdamp", "0.05",
                                  "--perm-order", "identity", "--report", str(rep)])  # fmt: skip
    assert r.exit_code == 0, r.output
    s = json.loads(rep.read_text())["settings"]
    assert (s["solver"], s["percdamp"], s["act_order"]) == ("gptq", 0.05, False)
    with sf.open(out) as f:
        assert f.metadata["encoder.settings"]["solver"] == "gptq"
    out.unlink()
    r = CliRunner().invoke(main, [*base, "--solver", "kmeans", "--percdamp", "0.1"])
    assert r.exit_code == 2 and "only apply to --method cmpq --solver gptq" in r.output
    r = CliRunner().invoke(main, ["encode", str(src), "-o", str(out), "--solver", "gptq"])
    assert r.exit_code == 2 and "--solver only apply to --method cmpq" in r.output
    assert not out.exists()
