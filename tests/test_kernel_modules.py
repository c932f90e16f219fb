"""The small NVRTC modules (_kernels.kernel_module) and what precompile builds: every entry point
in exactly one module, each module's -D selection defines exactly its entry points (checked on
the preprocessed source: no GPU, no CuPy, no nvcc needed; a C++ preprocessor is)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from spqr_format.gpu import _kernels as K
from spqr_format.gpu import _precompile

ALL = K.all_kernel_names() + K.tc_kernel_names() + K.cmpq_kernel_names()
CPP = shutil.which("g++") or shutil.which("clang++") or shutil.which("cpp")
ENTRY = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\('
)


def _entry_points(code: str, defines: tuple[str, ...]) -> list[str]:
    cmd = [CPP, "-E", "-P", "-x", "c++", *defines, "-"]
    if CPP.endswith("cpp"):
        cmd = [CPP, "-P", "-x", "c++", *defines, "-"]
    res = subprocess.run(cmd, input=code, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return sorted(ENTRY.findall(res.stdout))


def test_every_entry_point_in_exactly_one_module():
    specs = K.every_module()
    assert len({s.key for s in specs}) == len(specs)
    owners = {}
    for spec in specs:
        for name in K.module_kernel_names(spec):
            assert name not in owners, (name, owners.get(name), spec.key)
            owners[name] = spec.key
    assert sorted(owners) == sorted(ALL)
    # 12 tensor-core pairs, 10 SIMT (bits 0/2/3/4/8, h/q), 2 shared, cmpq
    assert len(specs) == 12 + 10 + 2 + 1
    assert len(K.module_kernel_names(K.tc_module(3, 3))) == 6
    assert K.module_kernel_names(K.simt_module(5, 0)) == sorted(
        f"spqr_dequant{k}_b0_h_{o}" for k in ("", "_row") for o in ("f32", "f16", "bf16")
    )


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("spqr_tc_b3_s3_nt4", "tc:3:3"),
        ("spqr_tcv_b2_s1", "tc:2:1"),
        ("spqr_tcg_b4_s4", "tc:4:4"),
        ("spqr_tc_prepare_x", "tc:shared"),
        ("spqr_tc_finish_p16", "tc:shared"),
        ("spqr_matvec_b3_q_nb4", "simt:3:q"),
        ("spqr_mv1r16_b8_h", "simt:8:h"),
        ("spqr_dequant_b0_q_f32", "simt:0:q"),
        ("spqr_dequant_oct_b2_h_bf16", "simt:2:h"),
        ("spqr_dequant_row2_b4_q_f16", "simt:4:q"),
        ("spqr_prepare_x", "simt:shared"),
        ("spqr_mv1_finish", "simt:shared"),
        ("spqr_dequant_outliers_f16", "simt:shared"),
        ("spqr_cmpq_mm_nb4", "cmpq"),
    ],
)
def test_kernel_module_of_a_name(name, key):
    assert K.kernel_module(name).key == key


def test_kernel_module_rejects_unknown_names():
    with pytest.raises(ValueError):
        K.kernel_module("spqr_nope")


def test_launcher_names_map_to_their_configuration_module():
    """What a (bits, stats_bits) tensor launches comes from that pair's modules or a shared one."""
    for bits in (2, 3, 4, 5, 8):
        for sb in (0, 3):
            mods = {s.key for s in K.config_modules(bits, sb)}
            names = [K.dequant_name(bits, sb, oc) for oc in K.OUT_NAMES]
            names += [K.dequant_row_name(bits, sb, oc) for oc in K.OUT_NAMES]
            names += [K.dequant_outliers_name(1), "spqr_prepare_x", "spqr_mv1_finish"]
            if bits in K.MATVEC_BITS:
                names += [K.matvec_name(bits, sb, 4), K.mv1_name(bits, sb, True)]
            if bits in K.TC_BITS and sb:
                names += [K.tc_name(bits, sb, 8), K.tcv_name(bits, sb), K.tcg_name(bits, sb)]
                names += ["spqr_tc_prepare_x", K.tc_finish_name(9)]
            for n in names:
                assert K.kernel_module(n).key in mods, (bits, sb, n)


@pytest.mark.skipif(CPP is None, reason="no C++ preprocessor")
@pytest.mark.parametrize("spec", K.every_module(), ids=lambda s: s.key)
def test_module_defines_select_exactly_its_entry_points(spec):
    assert _entry_points(spec.code(), spec.defines) == K.module_kernel_names(spec)


@pytest.mark.skipif(CPP is None, reason="no C++ preprocessor")
@pytest.mark.parametrize(
    ("src", "names"),
    [(K.KERNEL_SOURCE, K.all_kernel_names), (K.TC_SOURCE, K.tc_kernel_names)],
    ids=["spqr_kernels", "spqr_tc"],
)
def test_whole_source_still_defines_every_entry_point(src, names):
    """Without a selection (spqr_host.cu, spqr_tc_host.cu, the nvcc compile test): all."""
    assert _entry_points(src.read_text(), ()) == names()


def test_precompile_modules_for_the_presets():
    assert K.preset_configs() == [(2, 3), (3, 0), (3, 3), (4, 0), (4, 3)]
    specs = K.precompile_modules()
    assert [s.key for s in specs] == [
        "tc:2:3", "tc:3:3", "tc:4:3",
        "simt:2:q", "simt:3:h", "simt:3:q", "simt:4:h", "simt:4:q",
        "tc:shared", "simt:shared",
    ]  # fmt: skip
    by_key = {s.key: s for s in specs}
    assert by_key["tc:3:3"].defines == ("-DSPQR_TC_B=3", "-DSPQR_TC_SB=3")
    assert by_key["tc:3:3"].sources == (K.TC_SOURCE,)
    assert by_key["simt:3:h"].defines == ("-DSPQR_SIMT_B=3", "-DSPQR_SIMT_Q=0")
    assert by_key["simt:shared"].defines == ("-DSPQR_SIMT_SHARED",)
    assert by_key["tc:shared"].defines == ("-DSPQR_TC_SHARED",)
    for s in specs:
        assert s.options()[: len(K.COMPILE_OPTIONS)] == K.COMPILE_OPTIONS
        assert s.options()[-len(s.defines) :] == s.defines


def test_precompile_modules_for_given_configs():
    keys = [s.key for s in K.precompile_modules([(5, 0), (3, 3), (3, 3)], cmpq=True)]
    assert keys == ["tc:3:3", "simt:0:h", "simt:3:q", "cmpq", "tc:shared", "simt:shared"]
    keys = [s.key for s in K.precompile_modules([(3, 3)], tensor_cores=False)]
    assert keys == ["simt:3:q", "simt:shared"]
    every = K.precompile_modules("all")
    assert sorted(s.key for s in every) == sorted(s.key for s in K.every_module())
    assert [s.key for s in every][:2] == ["tc:2:1", "tc:2:2"]
    assert [s.key for s in every][-2:] == ["tc:shared", "simt:shared"]


def test_precompile_worker_jobs():
    """What each worker process gets: the module's code, options and an entry point to load."""
    specs = K.precompile_modules([(3, 3)])
    jobs = _precompile.jobs_for(specs, device=1)
    assert [j[0] for j in jobs] == [s.key for s in specs]
    for (_key, code, options, entry, device), spec in zip(jobs, specs, strict=True):
        assert code == spec.code() and options == spec.options() and device == 1
        assert entry in K.module_kernel_names(spec)
    tc = jobs[0]
    assert tc[1] == K.TC_SOURCE.read_text()


def test_precompile_compiles_each_module_once(monkeypatch):
    """One job: in process, through a stand-in for CuPy (RawModule(code, options), then one
    get_function, which is what makes CuPy compile and cache)."""
    import contextlib
    import types

    calls = []

    class RawModule:
        def __init__(self, code, options):
            self.code, self.options = code, options

        def get_function(self, name):
            calls.append((self.code, self.options, name))

    fake = types.SimpleNamespace(
        RawModule=RawModule, cuda=types.SimpleNamespace(Device=lambda d: contextlib.nullcontext())
    )
    monkeypatch.setitem(__import__("sys").modules, "cupy", fake)
    done = _precompile.precompile([(4, 0), (4, 0)], jobs=1)
    specs = K.precompile_modules([(4, 0)])
    assert list(done) == [s.key for s in specs] == ["simt:4:h", "simt:shared"]
    assert [(c[0], c[1]) for c in calls] == [(s.code(), s.options()) for s in specs]
    assert calls[0][2] in K.module_kernel_names(specs[0])
