"""The torch GPTQ/SpQR solver (GPU encoder) against the numba reference, on torch CPU and, when
a GPU is visible, on CUDA.

The contract: the same options, checks and result type as ``encode_gptq``; the layer output
error ``tr((W-Q) H (W-Q)^T)`` within 2 % of the reference on the same inputs; the packed result
decodes (normative decoder) to exactly the solver's reconstruction. Skipped without torch.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from spqr_format.codec.gptq import encode_gptq  # noqa: E402
from spqr_format.codec.gptq_torch import (  # noqa: E402
    HessianAccumulatorTorch,
    SharedProducts,
    encode_gptq_torch,
    encode_tensor_torch,
    resolve_device,
)
from spqr_format.codec.hessian import HessianAccumulator  # noqa: E402
from spqr_format.codec.packing import pack  # noqa: E402
from spqr_format.codec.presets import encode_tensor, get_preset  # noqa: E402
from spqr_format.codec.reference import decode_bilevel_f32  # noqa: E402
from spqr_format.codec.rtn import encode_rtn  # noqa: E402
from spqr_format.errors import BadInputError  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def make_problem(m: int, n: int, seed: int = 0, tokens: int = 1024, hot: int = 4, dead=()):
    """Heavy-tailed weights; correlated activations with a few high-magnitude features; the
    ``dead`` input columns never active."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(m, n)) * 0.02).astype(np.float32)
    mix = np.eye(n) + 0.4 * rng.standard_normal((n, n)) / np.sqrt(n)
    x = rng.standard_normal((tokens, n)) @ mix
    x[:, rng.choice(n, hot, replace=False)] *= 15.0
    x[:, list(dead)] = 0.0
    h = 2.0 / tokens * (x.T @ x)
    return w, h


def out_err(w, q, h) -> float:
    d = (w - q).astype(np.float64)
    w = w.astype(np.float64)
    return float(np.einsum("ij,jk,ik->", d, h, d) / np.einsum("ij,jk,ik->", w, h, w))


def preset_kw(name: str, **over) -> dict:
    c = get_preset(name)
    kw = dict(
        bits=c.bits, group_size=c.group_size, stats_bits=c.stats_bits,
        stats_group_size=c.stats_group_size, perm_order=c.perm_order, percdamp=c.percdamp,
        block_size=c.block_size, outlier_threshold=c.outlier_threshold,
        outlier_budget=c.outlier_budget, leave_one_out=c.leave_one_out,
    )  # fmt: skip
    kw.update(over)
    return kw


CONFIGS = {
    "spqr-3bit": preset_kw("spqr-3bit"),
    "spqr-4bit": preset_kw("spqr-4bit"),
    "gptq-3bit-g128": preset_kw("gptq-3bit-g128"),
    "gptq-4bit-g128": preset_kw("gptq-4bit-g128"),
    "spqr-3bit-budget": preset_kw("spqr-3bit", outlier_budget=0.004),
    "budget-only": preset_kw("gptq-3bit-g128", group_size=16, outlier_budget=0.01),
    "spqr-no-loo-identity": preset_kw("spqr-3bit", leave_one_out=False, perm_order="identity"),
    # groups across block boundaries, a 2-bit second level in tiles of 4 rows
    "odd-g10-s2": dict(
        bits=3,
        group_size=10,
        stats_bits=2,
        stats_group_size=4,
        block_size=16,
        outlier_threshold=0.3,
        perm_order="act_order",
        percdamp=0.1,
    ),
    # one group wider than several blocks
    "g300-block32": dict(bits=2, group_size=300, block_size=32, perm_order="identity"),
}


def _run_both(w, h, kw, device):
    ref = encode_gptq(w, h, **kw)
    info: dict = {}
    got = encode_gptq_torch(w, h, **kw, info=info, device=device)
    return ref, got, info


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_output_error_within_2_percent_and_decode_is_the_reconstruction(config, device):
    kw = CONFIGS[config]
    # 280 columns: not a multiple of 16 or 128 (tail group and tail block); 2 dead columns.
    w, h = make_problem(77, 280, seed=3, dead=(5, 200))
    ref, got, info = _run_both(w, h, kw, device)
    assert type(got) is type(ref)
    assert got.shape == ref.shape and got.params == ref.params and got.dtype == ref.dtype
    for a in ("codes", "stats"):
        assert getattr(got, a).dtype == getattr(ref, a).dtype
        assert getattr(got, a).shape == getattr(ref, a).shape
    assert (got.perm is None) == (ref.perm is None)
    if ref.perm is not None:
        np.testing.assert_array_equal(got.perm, ref.perm)  # same diagonal, same order
    q_ref = decode_bilevel_f32(pack(ref))
    q_got = decode_bilevel_f32(pack(got))
    # The normative decoder gives exactly the solver's reconstruction.
    np.testing.assert_array_equal(q_got, info["reconstruction"].cpu().numpy())
    rp = info["reconstruction_permuted"].cpu().numpy()
    if got.perm is not None:
        np.testing.assert_array_equal(rp, q_got[:, got.perm.astype(np.int64)])
    e_ref, e_got = out_err(w, q_ref, h), out_err(w, q_got, h)
    assert abs(e_got / e_ref - 1) <= 0.02, (config, e_ref, e_got)
    assert info["dead_columns"] == 2
    # Dead columns are zeroed: they decode to the code nearest 0, as in the reference.
    dead_got, dead_ref = np.abs(q_got[:, [5, 200]]).max(), np.abs(q_ref[:, [5, 200]]).max()
    assert dead_got <= 2 * dead_ref + 1e-3, (dead_got, dead_ref)
    budget = kw.get("outlier_budget")
    k_got = 0 if got.outliers is None else len(got.outliers)
    k_ref = 0 if ref.outliers is None else len(ref.outliers)
    if budget:
        assert k_got <= math.floor(budget * w.size)
    if kw.get("outlier_threshold") is None and not budget:
        assert k_got == 0
    else:
        assert k_got > 0 and abs(k_got - k_ref) <= max(3, 0.05 * k_ref)
        o = got.outliers
        assert np.all(np.diff(o.rows.astype(np.int64) * 10**6 + o.cols) > 0)  # sorted, unique
        # Outliers hold the solver's values; the dense code under one is the nearest code.
        np.testing.assert_array_equal(rp[o.rows, o.cols], o.values.astype(np.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "params",
    [
        dict(bits=4, group_size=128),
        dict(bits=3, group_size=16, stats_bits=3, stats_group_size=16),
        dict(bits=2, group_size=7, stats_bits=4, stats_group_size=5),
    ],  # fmt: skip
)
def test_identity_hessian_is_exactly_rtn(params, device):
    """With H = I there is no error feedback: GPTQ is RTN, so statistics (fp16 rounding,
    second level) and codes must equal the RTN encoder's bit for bit."""
    w, _ = make_problem(45, 150, seed=1)
    h = np.eye(150)
    got = encode_gptq_torch(w, h, **params, percdamp=0.0, device=device)
    rtn = encode_rtn(w, **params)
    np.testing.assert_array_equal(got.codes, rtn.codes)
    np.testing.assert_array_equal(got.stats, rtn.stats)
    if rtn.stats2 is not None:
        np.testing.assert_array_equal(got.stats2, rtn.stats2)
    assert got.outliers is None and got.perm is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reconstruction_rounded_like_the_decoder(dtype, device):
    """The pipeline puts back the reconstruction rounded to the tensor's dtype on the device;
    a reader (and a resumed run) decodes the file in that dtype: the same numbers."""
    from spqr_format.models.pipeline import decoded_f32
    from spqr_format.spec import DType

    w, h = make_problem(40, 96, seed=10)
    w[0, :4] = [3000.0, -7000.0, 0.5, 60000.0]  # large values: outliers and coarse steps
    dt = DType.FLOAT16 if dtype == "float16" else DType.BFLOAT16
    info: dict = {}
    t = encode_gptq_torch(w, h, **CONFIGS["spqr-3bit"], dtype=dt, info=info, device=device)
    rec = info["reconstruction"]
    put_back = rec.to(getattr(torch, dtype)).float().cpu().numpy()
    np.testing.assert_array_equal(put_back, decoded_f32(pack(t)))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_inputs_on_device_and_determinism(device):
    w, h = make_problem(40, 96, seed=5)
    kw = CONFIGS["spqr-3bit-budget"]
    a = encode_gptq_torch(w, h, **kw, device=device)
    b = encode_gptq_torch(torch.from_numpy(w).to(device), torch.from_numpy(h).to(device), **kw)
    c = encode_gptq_torch(w, h, **kw, device=device)
    assert str(resolve_device(None, torch.zeros(1, device=device)).type) == device
    for x in (b, c):
        np.testing.assert_array_equal(a.codes, x.codes)
        np.testing.assert_array_equal(a.stats, x.stats)
        np.testing.assert_array_equal(a.stats2, x.stats2)
        np.testing.assert_array_equal(a.outliers.values, x.outliers.values)
        np.testing.assert_array_equal(a.outliers.cols, x.outliers.cols)
    w0 = w.copy()
    encode_gptq_torch(w, h, **kw, device=device)
    np.testing.assert_array_equal(w, w0)  # the caller's weight is not modified


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "wmod,hmod,kw,frag",
    [
        (lambda w: np.where(w > 0.05, np.nan, w), None, {}, "non-finite"),
        (lambda w: w[:0], None, {}, "empty"),
        (lambda w: w * 1e6, None, {}, "fp16 range"),
        (None, lambda h: h[:-1, :-1], {}, "shape"),
        (None, lambda h: np.where(h > 1, np.inf, h), {}, "non-finite"),
        (None, lambda h: h + np.triu(np.ones_like(h)), {}, "symmetric"),
        (None, lambda h: h - 2 * np.diag(np.diag(h)), {}, "negative diagonal"),
        (None, None, dict(perm_order="random"), "perm_order"),
        (None, None, dict(outlier_threshold=-1.0), "outlier_threshold"),
        (None, None, dict(outlier_budget=1.5), "outlier_budget"),
        (None, None, dict(block_size=0), "block_size"),
        (None, None, dict(bits=0), "bits"),
    ],
)
def test_bad_input_same_errors_as_reference(wmod, hmod, kw, frag, device):
    w, h = make_problem(8, 32, seed=2)
    w = wmod(w) if wmod else w
    h = hmod(h) if hmod else h
    args = {"bits": 3, "group_size": 16, **kw}
    for as_tensor in (False, True):
        wi = torch.from_numpy(np.ascontiguousarray(w)).to(device) if as_tensor else w
        hi = torch.from_numpy(np.ascontiguousarray(h)).to(device) if as_tensor else h
        with pytest.raises(BadInputError, match=frag) as e:
            encode_gptq_torch(wi, hi, **args, name="model.layers.0.q", device=device)
        assert "model.layers.0.q" in str(e.value)
    with pytest.raises(BadInputError, match=frag):
        encode_gptq(w, h, **args)


def test_device_errors():
    with pytest.raises(BadInputError, match="unknown device"):
        resolve_device("tpu")
    if not CUDA:
        with pytest.raises(BadInputError, match="CUDA is not available"):
            encode_gptq_torch(np.ones((2, 2), np.float32), np.eye(2), bits=3, group_size=2,
                              device="cuda")  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_hessians_and_rows(device):
    w, h = make_problem(12, 48, seed=4)
    h_bad = h.copy()
    h_bad[0, 1] = h_bad[1, 0] = 10 * np.sqrt(h[0, 0] * h[1, 1])  # not positive definite
    info: dict = {}
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        t = encode_gptq_torch(w, h_bad, bits=4, group_size=8, percdamp=0.0, info=info,
                              device=device)  # fmt: skip
    assert info["extra_damping"] > 0 and t.codes.shape == w.shape
    with pytest.warns(RuntimeWarning, match="all zero"):
        t = encode_gptq_torch(w, np.zeros((48, 48)), bits=4, group_size=16, device=device)
    assert np.abs(decode_bilevel_f32(pack(t))).max() < 1e-3  # every column dead: zeroed
    # Identical rows (no variance to scale tau by) and a single row: no outlier flood.
    same = np.repeat(w[:1], 12, axis=0)
    for x in (same, w[:1]):
        t = encode_gptq_torch(x, h, bits=3, group_size=16, outlier_threshold=0.2, device=device)
        assert t.outliers is None


@pytest.mark.parametrize("device", DEVICES)
def test_encode_tensor_torch_report_matches_encode_tensor(device):
    w, h = make_problem(33, 70, seed=6)
    for preset in ("spqr-3bit", "gptq-4bit-g128", "rtn-4bit-g128"):
        cfg = get_preset(preset)
        _, ra = encode_tensor(w, cfg, h, "x")
        info: dict = {}
        t, rb = encode_tensor_torch(torch.from_numpy(w).to(device), cfg, h, "x", info=info)
        assert ra.keys() == rb.keys()
        for k in ("method", "preset", "fallback", "shape", "bits_per_weight"):
            assert ra[k] == rb[k], (preset, k)
        for k in ("relative_weight_error", "relative_output_error"):
            assert rb[k] == pytest.approx(ra[k], rel=0.02), (preset, k)
        np.testing.assert_array_equal(
            decode_bilevel_f32(info["packed"]), info["reconstruction"].cpu().numpy()
        )
    with pytest.warns(RuntimeWarning, match="no Hessian"):
        _, r = encode_tensor_torch(w, get_preset("spqr-3bit"), None, "x", device=device)
    assert r["fallback"] and r["method"] == "rtn" and r["relative_output_error"] is None


@pytest.mark.parametrize("device", DEVICES)
def test_hessian_accumulator_torch(device):
    rng = np.random.default_rng(7)
    a = HessianAccumulator(24)
    b = HessianAccumulatorTorch(24, device=device)
    # Two layers fed the very same tensor share its x^T x through SharedProducts.
    shared = SharedProducts()
    c1 = HessianAccumulatorTorch(24, device=device)
    c2 = HessianAccumulatorTorch(24, device=device)
    for _ in range(3):
        x = rng.standard_normal((2, 17, 24)).astype(np.float32)
        a.add(x)
        xt = torch.from_numpy(x).to(device)
        b.add(xt)
        c1.add(xt, shared)
        c2.add(xt, shared)
    assert shared.source is xt
    for c in (c1, c2):
        assert c.tokens == b.tokens
        assert torch.equal(c.hessian(), b.hessian())
    hb = b.hessian().cpu().numpy()
    assert b.tokens == a.tokens == 102
    np.testing.assert_allclose(hb, a.hessian(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(hb, hb.T)
    bad = HessianAccumulatorTorch(4, device=device)
    bad.add(torch.tensor([[1.0, float("nan"), 0.0, 0.0]], device=device))
    with pytest.raises(BadInputError, match="non-finite"):
        bad.hessian()
    with pytest.raises(BadInputError, match="no activations"):
        HessianAccumulatorTorch(4, device=device).hessian()
    with pytest.raises(BadInputError, match="shape"):
        bad.add(torch.zeros(3, 5, device=device))


@settings(max_examples=12, deadline=None)
@given(
    m=st.integers(1, 24),
    n=st.integers(2, 70),
    bits=st.integers(2, 5),
    g=st.sampled_from([3, 8, 16, 64]),
    sb=st.sampled_from([0, 3]),
    tau=st.sampled_from([None, 0.2]),
    budget=st.sampled_from([None, 0.02]),
    block=st.sampled_from([5, 16, 128]),
    seed=st.integers(0, 2**16),
)
def test_property_decode_equals_reconstruction(m, n, bits, g, sb, tau, budget, block, seed):
    w, h = make_problem(m, n, seed=seed, tokens=64, hot=1)
    info: dict = {}
    t = encode_gptq_torch(
        w, h, bits=bits, group_size=g, stats_bits=sb, stats_group_size=4 if sb else 0,
        perm_order="act_order", block_size=block, outlier_threshold=tau, outlier_budget=budget,
        percdamp=0.1, info=info,
    )  # fmt: skip
    np.testing.assert_array_equal(decode_bilevel_f32(pack(t)), info["reconstruction"].numpy())
    if budget:
        assert (0 if t.outliers is None else len(t.outliers)) <= math.floor(budget * m * n)


def test_module_imports_without_torch():
    """torch is an optional extra: importing the module must not import it."""
    code = (
        "import sys; import spqr_format.codec.gptq_torch as g; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_warnings_do_not_leak_state():
    """The solver forces full-precision float32 GEMMs only while it runs."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        w, h = make_problem(4, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            encode_gptq_torch(w, h, bits=3, group_size=8)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(prev)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", ["spqr-3bit", "spqr-3bit-budget", "gptq-4bit-g128",
                                    "odd-g10-s2", "g300-block32"])  # fmt: skip
def test_cuda_graphs_match_eager(config, monkeypatch):  # pragma: no cover - GPU only
    """The captured steps replay exactly the eager kernels: identical results."""
    from spqr_format.codec import gptq_torch

    w, h = make_problem(300, 400, seed=8, dead=(7,))
    kw = CONFIGS[config]
    info: dict = {}
    a = encode_gptq_torch(w, h, **kw, device="cuda", info=info)
    assert info["cuda_graphs"], info["cuda_graphs_error"]
    monkeypatch.setattr(gptq_torch, "CUDA_GRAPHS", False)
    b = encode_gptq_torch(w, h, **kw, device="cuda")
    for x, y in ((a.codes, b.codes), (a.stats, b.stats), (a.stats2, b.stats2)):
        np.testing.assert_array_equal(x, y)
    assert (a.outliers is None) == (b.outliers is None)
    if a.outliers is not None:
        for f in ("rows", "cols", "values"):
            np.testing.assert_array_equal(getattr(a.outliers, f), getattr(b.outliers, f))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", ["spqr-3bit", "gptq-4bit-g128"])
def test_cuda_larger_layer_within_2_percent(config, monkeypatch):  # pragma: no cover - GPU only
    """A 1024 x 2048 layer (a realistic group count per row) on the GPU against numba; prints
    the times of numba (1 thread), the GPU with CUDA graphs and without (eager kernels)."""
    import time

    from spqr_format.codec import gptq_torch

    w, h = make_problem(1024, 2048, seed=9, tokens=4096, hot=16)
    kw = CONFIGS[config]
    t0 = time.perf_counter()
    ref = encode_gptq(w, h, **kw)
    t1 = time.perf_counter()
    encode_gptq_torch(w[:64, :256], h[:256, :256], **kw, device="cuda")  # CUDA warm-up
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    info: dict = {}
    got = encode_gptq_torch(w, h, **kw, device="cuda", info=info)
    t3 = time.perf_counter()
    monkeypatch.setattr(gptq_torch, "CUDA_GRAPHS", False)
    eager = encode_gptq_torch(w, h, **kw, device="cuda")
    t4 = time.perf_counter()
    np.testing.assert_array_equal(eager.codes, got.codes)
    q_ref, q_got = decode_bilevel_f32(pack(ref)), decode_bilevel_f32(pack(got))
    np.testing.assert_array_equal(q_got, info["reconstruction"].cpu().numpy())
    e_ref, e_got = out_err(w, q_ref, h), out_err(w, q_got, h)
    stages = {k: round(v, 3) for k, v in info["times"].items()}
    print(f"\n{config} 1024x2048: numba {t1 - t0:.2f} s err {e_ref:.5f}; cuda graphs "
          f"{t3 - t2:.2f} s ({info['cuda_graphs']}) eager {t4 - t3:.2f} s, err {e_got:.5f}; "
          f"stages {stages}")  # fmt: skip
    assert abs(e_got / e_ref - 1) <= 0.02, (e_ref, e_got)


def test_torch_encoder_refuses_what_it_does_not_implement():
    """The q* presets' clipped statistics and impact outliers run on the CPU encoder only: the
    torch encoder says so instead of silently encoding min-max statistics."""
    from spqr_format.codec.gptq_torch import encode_tensor_torch
    from spqr_format.codec.presets import get_preset

    w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    with pytest.raises(BadInputError, match="stats_search='mse'"):
        encode_tensor_torch(w, get_preset("q3-g16"), np.eye(64), "t", device="cpu")
