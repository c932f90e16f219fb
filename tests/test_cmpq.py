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
