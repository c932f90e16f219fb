"""The launch plan (spqr_format/gpu/plan.py) without a GPU: table lookup, the override
variable and its errors, the generated C header."""

from __future__ import annotations

import pytest

from spqr_format.gpu import _kernels as K
from spqr_format.gpu import plan as P

BENCH = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv(P.ENV, raising=False)


def test_generated_header_is_up_to_date():
    """kernels/spqr_launch_plan.h is what `python -m spqr_format.gpu.plan --header` writes."""
    assert P.header_path().read_text() == P.c_header()


def test_shape_classes_of_the_benchmark_shapes():
    got = {s: P.shape_class(*s) for s in BENCH}
    assert got == {
        (4096, 4096): "small",
        (11008, 4096): "large",  # >= 5120 rows and >= 5120^2 weights
        (4096, 11008): "medium",
        (8192, 8192): "large",
        (28672, 8192): "large",
        (8192, 28672): "large",
    }


def _old_default(m: int, n: int, batch: int) -> str:
    """The tensor-core path choice before the plan (session 9 defaults, no env variables)."""
    if batch <= 8:
        large = m * n >= 1 << 27 or (m >= 5120 and m * n >= 5120 * 5120)
        return "tcg" if batch <= 2 and large else "tcv"
    return "tc_split"


@pytest.mark.parametrize("gpu", P.GPU_CLASSES)
@pytest.mark.parametrize("m,n", BENCH)
def test_measured_configurations_keep_their_kernels(gpu, m, n):
    """Up to batch 48 (64 above the small class) the plan picks what the code picked before it
    on every benchmark shape; above, dense."""
    last = 48 if P.shape_class(m, n) == "small" else 64
    for b in range(1, 2049):
        d = P.decide(gpu, "tc", m, n, b)
        assert d.entry >= 0 and P.PLAN[d.entry].path == d.path
        assert d.path == (_old_default(m, n, b) if b <= last else "dense"), b
    assert P.dense_from(gpu, "tc", m, n) == last + 1


@pytest.mark.parametrize("m,n", [*BENCH, (1, 1), (16, 70000)])
def test_simt_and_no_kernel_layouts(m, n):
    assert P.decide("hopper", "simt", m, n, 1).path == "mv1"
    assert [P.decide("hopper", "simt", m, n, b).path for b in (2, 3)] == ["simt", "simt"]
    assert all(P.decide("hopper", "simt", m, n, b).path == "dense" for b in (4, 64, 2048))
    assert all(P.decide("any", "none", m, n, b).path == "dense" for b in (1, 2, 9, 2048))


def test_every_entry_path_runs_its_layout_and_batches():
    for e in P.PLAN:
        assert e.path in P.LAYOUT_PATHS[e.layout]
        assert 1 <= e.lo <= e.hi <= P.BATCH_MAX
        assert P.can_run(e.path, e.layout, e.lo) and P.can_run(e.path, e.layout, e.hi)
        assert e.gpu in (None, *P.GPU_CLASSES)
        assert e.shapes is None or set(e.shapes) <= set(P.SHAPE_CLASSES)


def test_every_lookup_is_covered():
    for gpu in P.GPU_CLASSES:
        for layout in P.LAYOUTS:
            for m, n in [*BENCH, (1, 1), (5120, 5120)]:
                for b in (1, 2, 3, 8, 9, 64, 65, 1 << 20):
                    i, e = P.lookup_entry(gpu, layout, m, n, b)
                    assert P.PLAN[i] is e


def test_gpu_class():
    assert P.gpu_class(90) == "hopper"
    assert P.gpu_class(80) == P.gpu_class(89) == P.gpu_class(100) == "any"


def test_override_path_and_dense_from(monkeypatch):
    monkeypatch.setenv(P.ENV, "path=tc_split")
    d = P.decide("hopper", "tc", 4096, 4096, 1)
    assert (d.path, d.entry) == ("tc_split", -1) and P.ENV in d.reason
    # a forced path that cannot run the batch: the table decides
    monkeypatch.setenv(P.ENV, "path=tcv")
    assert P.decide("hopper", "tc", 4096, 4096, 9).path == "tc_split"
    assert P.decide("hopper", "tc", 4096, 4096, 2048).path == "dense"
    assert P.decide("hopper", "simt", 4096, 4096, 2).path == "simt"  # not a SIMT path
    monkeypatch.setenv(P.ENV, "dense_from=0")  # never dense: the last fused entry's path
    assert P.decide("hopper", "tc", 8192, 8192, 2048).path == "tc_split"
    assert P.decide("hopper", "simt", 8192, 8192, 2048).path == "simt"
    assert P.decide("hopper", "none", 8192, 8192, 1).path == "dense"
    monkeypatch.setenv(P.ENV, "dense_from=4")
    assert [P.decide("hopper", "tc", 8192, 8192, b).path for b in (1, 3, 4)] == [
        "tcg",
        "tcv",
        "dense",
    ]
    assert P.dense_from("hopper", "tc", 8192, 8192) == 4
    monkeypatch.setenv(P.ENV, "path=dense")
    assert P.decide("hopper", "tc", 8192, 8192, 1).path == "dense"


def test_override_tuning_keys(monkeypatch):
    monkeypatch.setenv(P.ENV, " tcv_ks=2 , tc_splits=3,finish_lanes=16, dq_rows=1, dq_oct=0")
    assert K.tcv_ks(1792, 26, 132, 2) == 1
    assert K.tc_splits(1792, 26, 132, 2, 1, 2336) == (3, 9)
    assert K.tc_finish_lanes(8, 28672, 0, 132) == 16
    assert K.dq_rows() == 1 and not K.dq_oct()
    assert not K.dequant_row2_supported(3, 16, 1)
    monkeypatch.setenv(P.ENV, "dq_threads=64,dqo_threads=512,cmpq_blocks_per_sm=1")
    assert K.dequant_row_geometry(8192) == 64
    assert K.dequant_oct_geometry(100) == 512
    assert K.cmpq_target_tiles(256, 132) == 132
    monkeypatch.delenv(P.ENV)
    assert K.dq_rows() == 2 and K.dq_oct() and K.dequant_oct_geometry(100) == 128


def test_cmpq_path_per_slice(monkeypatch):
    """channel_mixed: by default (or cmpq_v2=1) mv1 at batch 1 (any dtype), tensor cores at
    2-16 for f16 x with whole 16-row m-tiles per table block, the first-design kernels
    otherwise; cmpq_v2=0: the first design for every slice."""
    for env in (None, "cmpq_v2=1"):
        if env is None:
            monkeypatch.delenv(P.ENV, raising=False)
        else:
            monkeypatch.setenv(P.ENV, env)
        assert [K.cmpq_path(1, c, 0) for c in (0, 1, 2)] == ["mv1"] * 3
        assert [K.cmpq_path(b, 1, r) for b in (2, 16) for r in (0, 16)] == ["tc"] * 4
    assert [K.cmpq_path(1, c, 0) for c in (0, 1, 2)] == ["mv1"] * 3
    assert K.cmpq_path(1, 1, 7) == "mv1"
    assert [K.cmpq_path(b, 1, r) for b in (2, 9, 16) for r in (0, 16, 64)] == ["tc"] * 9
    assert [K.cmpq_path(5, c, 0) for c in (0, 2)] == ["mm", "mm"]  # f32 / bf16 x: no rounding
    assert [K.cmpq_path(5, 1, r) for r in (1, 7, 300)] == ["mm"] * 3
    assert K.cmpq_target_tiles(8192, 132, K.CMPQ_TC_ROWS) == 9
    monkeypatch.setenv(P.ENV, "cmpq_v2=0")
    assert K.cmpq_path(1, 1, 0) == K.cmpq_path(8, 1, 0) == "mm"
    monkeypatch.setenv(P.ENV, "cmpq_v2=2")
    with pytest.raises(P.PlanError):
        K.cmpq_path(1, 1, 0)


def test_cmpq_dense_from(monkeypatch):
    """channel_mixed: dequantize + cuBLAS from cmpq_dense_from rows of f16 x on (bf16 W
    would leave C-7.6, so bf16 / f32 x stay on the fused kernels); by default from the
    measured crossover K.CMPQ_DENSE_FROM."""
    monkeypatch.delenv(P.ENV, raising=False)
    d = K.CMPQ_DENSE_FROM
    assert 16 < d <= 128  # never for the batch 1-16 fused kernels' own range
    assert [K.cmpq_dense(b, 1) for b in (1, 16, d - 1, d, 1 << 20)] == [0, 0, 0, 1, 1]
    assert not any(K.cmpq_dense(1 << 20, c) for c in (0, 2))
    monkeypatch.setenv(P.ENV, "cmpq_dense_from=17")
    assert [K.cmpq_dense(b, 1) for b in (1, 16, 17, 4096)] == [False, False, True, True]
    assert not any(K.cmpq_dense(4096, c) for c in (0, 2))
    monkeypatch.setenv(P.ENV, "cmpq_dense_from=0")
    assert not K.cmpq_dense(1 << 20, 1)


def test_cmpq_dequantizer_names():
    assert K.cmpq_dq_name("bf16") == "spqr_cmpq_dequant_bf16"
    assert set(K.cmpq_kernel_names()) >= {f"spqr_cmpq_dequant_{o}" for o in K.OUT_NAMES.values()}
    assert not [k for k in K.cmpq_kernel_names() if "dequant_tile" in k]  # one design left


def test_override_defines_parse():
    assert P.parse_override("defines=-DSPQR_MV1_RB=16 -DFOO") == {
        "defines": ("-DSPQR_MV1_RB=16", "-DFOO")
    }


@pytest.mark.parametrize(
    "text,msg",
    [
        ("bogus=1", "bad item"),
        ("path", "bad item"),
        ("path=fast", "not one of"),
        ("tcv_ks=9", "out of range"),
        ("tcv_ks=two", "not an integer"),
        ("finish_lanes=5", "out of range"),
        ("dq_rows=3", "out of range"),
        ("tc=1,tc=0", "given twice"),
        ("defines=SPQR_X=1", "-D options only"),
        ("dense_from=-1", "out of range"),
    ],
)
def test_override_errors_name_the_variable(monkeypatch, text, msg):
    with pytest.raises(P.PlanError, match=msg) as ei:
        P.parse_override(text)
    assert P.ENV in str(ei.value)
    monkeypatch.setenv(P.ENV, text)
    with pytest.raises(P.PlanError):
        P.decide("hopper", "tc", 16, 16, 1)


def test_no_other_environment_variables_steer_kernels():
    """The plan's one override is the only SPQR_* variable the GPU layer reads."""
    import re

    for mod in ("_kernels.py", "tensor.py", "nn.py", "cmpq.py", "plan.py"):
        src = (P.header_path().parent.parent / mod).read_text()
        assert not re.search(r"environ\.get\(\s*\"SPQR_(?!GPU_PLAN)", src), mod
        assert "os.environ" not in src or mod == "plan.py", mod
    for c in ("spqr_tc_host.cu", "spqr_host.cu", "spqr_tc_plan.h"):
        src = (P.header_path().parent / c).read_text()
        assert re.findall(r"getenv\(([^)]*)\)", src) in ([], ["SPQR_PLAN_ENV"]), c


def test_describe_lists_every_entry():
    assert len(P.describe().splitlines()) == len(P.PLAN)


def test_deleted_path_is_refused(monkeypatch):
    """``tcp`` (the pipelined kernel, measured slower than tc_split everywhere) is gone: the
    override names it as an unknown path instead of running something else silently."""
    assert "tcp" not in P.PATHS and all(e.path in P.PATHS for e in P.PLAN)
    monkeypatch.setenv(P.ENV, "path=tcp")
    with pytest.raises(P.PlanError, match="tcp"):
        P.decide("hopper", "tc", 8192, 8192, 16)
