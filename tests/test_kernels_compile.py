"""Every .cu file builds with nvcc for sm_80 and sm_90, with every specialisation the Python
layer can launch (no GPU needed: --cubin / -c only). Skipped when nvcc is absent."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from spqr_format.gpu import _kernels as K

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
ARCHS = ("sm_80", "sm_90")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = ROOT / "examples" / "c"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    # A guard against a hung compiler, not a speed bound: an sm_90 build of spqr_kernels.cu
    # takes ~1 min on an idle core and several times that on a loaded machine.
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    """The kernel module built once per arch, both arches in parallel."""
    out = tmp_path_factory.mktemp("cubin")

    def build(job):
        arch, src = job
        path = out / f"{src.stem}_{arch}.cubin"
        cmd = [NVCC, *K.COMPILE_OPTIONS, f"-arch={arch}", "--cubin", "-o", str(path)]
        cmd += ["-Werror", "all-warnings", str(src)]
        return arch, src, path, _run(cmd)

    def build_split(spec):
        # a small module as NVRTC gets it (tensor.compiled: _kernels.kernel_module), sm_90
        src = out / f"split_{spec.key.replace(':', '_')}.cu"
        src.write_text(spec.code())
        path = src.with_suffix(".cubin")
        cmd = [NVCC, *spec.options(), "-arch=sm_90", "--cubin", "-o", str(path)]
        cmd += ["-Werror", "all-warnings", str(src)]
        return "sm_90", spec, path, _run(cmd)

    jobs = [(a, s) for a in ARCHS for s in SOURCES]
    with ThreadPoolExecutor(len(jobs) + len(SPLIT)) as pool:
        split = [pool.submit(build_split, spec) for spec in SPLIT]
        done = list(pool.map(build, jobs))
        return done + [f.result() for f in split]


SOURCES = (K.KERNEL_SOURCE, K.TC_SOURCE, K.CMPQ_SOURCE)
NAMES = {
    K.KERNEL_SOURCE: K.all_kernel_names,
    K.TC_SOURCE: K.tc_kernel_names,
    K.CMPQ_SOURCE: K.cmpq_kernel_names,
}
BUILDS = [f"{a}-{s.stem}" for a in ARCHS for s in SOURCES]
# Small modules of the Python layer (one of each kind; tests/test_kernel_modules.py checks every
# module's entry points on the preprocessed source, and the whole builds above every kernel)
SPLIT = (K.tc_module(3, 3), K.TC_SHARED, K.simt_module(3, 3), K.SIMT_SHARED)
ALL_NAMES = K.all_kernel_names() + K.tc_kernel_names()


@pytest.mark.parametrize("index", range(len(BUILDS)), ids=BUILDS)
def test_kernels_build_with_every_entry_point(cubins, index):
    arch, src, path, res = cubins[index]
    assert res.returncode == 0, f"nvcc failed for {src.name} {arch}:\n{res.stderr}"
    blob = path.read_bytes()
    missing = [n for n in NAMES[src]() if n.encode() + b"\0" not in blob]
    assert not missing, f"{src.name} {arch}: entry points missing from the cubin: {missing}"


@pytest.mark.parametrize("spec", SPLIT, ids=[s.key for s in SPLIT])
def test_small_module_builds_with_exactly_its_entry_points(cubins, spec):
    """A module the Python layer compiles (-D selection, _kernels.kernel_module) builds with
    -Werror and holds exactly its entry points."""
    _, _, path, res = next(c for c in cubins if c[1] == spec)
    assert res.returncode == 0, f"nvcc failed for {spec.key}:\n{res.stderr}"
    blob = path.read_bytes()
    names = K.module_kernel_names(spec)
    assert names and all(n.encode() + b"\0" in blob for n in names)
    others = [n for n in ALL_NAMES if n not in names and n.encode() + b"\0" in blob]
    assert not others, f"{spec.key}: unexpected entry points {others}"


@pytest.mark.parametrize("src", SOURCES, ids=[s.stem for s in SOURCES])
def test_kernel_source_needs_no_host_headers(src):
    # NVRTC (CuPy) compiles the same file: no #include at all keeps it self-contained.
    assert "#include" not in src.read_text()
    assert "use_fast_math" not in " ".join(K.COMPILE_OPTIONS)


@pytest.mark.skipif(not (EXAMPLE_DIR / "spqr_matvec.cu").exists(), reason="no C example")
def test_host_launcher_and_c_example_compile(tmp_path):
    srcs = [K.HOST_SOURCE, K.KERNEL_DIR / "spqr_tc_host.cu", EXAMPLE_DIR / "spqr_matvec.cu"]
    srcs += [EXAMPLE_DIR / "spqr_reader.c", K.KERNEL_DIR / "spqr_tile_layout.c"]
    srcs += [K.KERNEL_DIR / "spqr_row_layout.c", EXAMPLE_DIR / "spqr_cmpq_ref.c"]
    srcs += [EXAMPLE_DIR / "spqr_cmpq_cpu.c"]

    def build(src):
        lang = ["-x", "cu"] if src.suffix == ".cu" else []
        obj = tmp_path / (src.stem + ".o")
        # PTX only (no ptxas): checks the host code and the front end quickly; the kernels'
        # machine code is checked by the cubin builds above.
        cmd = [NVCC, *K.COMPILE_OPTIONS, "-arch=compute_80", "-c", *lang, str(src), "-o", str(obj)]
        if src.suffix == ".c":
            cmd = [NVCC, "-c", str(src), "-o", str(obj)]
        cmd += ["-I", str(K.KERNEL_DIR)]
        return src.name, _run(cmd)

    with ThreadPoolExecutor(len(srcs)) as pool:
        results = list(pool.map(build, srcs))
    for name, res in results:
        assert res.returncode == 0, f"{name} failed to compile:\n{res.stderr}"


def test_cmpq_host_launcher_compiles_without_warnings(tmp_path):
    """spqr_cmpq_host.cu (with spqr_cmpq.cu, which it includes) and spqr_cmpq_layout.c build with
    nvcc, warnings as errors (PTX only, as above), and export the C ABI of spqr_gpu.h."""
    host = K.KERNEL_DIR / "spqr_cmpq_host.cu"
    obj = tmp_path / "spqr_cmpq_host.o"
    cmd = [NVCC, *K.COMPILE_OPTIONS, "-arch=compute_80", "-c", "-x", "cu", str(host)]
    cmd += ["-o", str(obj), "-I", str(K.KERNEL_DIR), "-Werror", "all-warnings"]
    lobj = tmp_path / "spqr_cmpq_layout.o"
    ccmd = [NVCC, "-c", str(K.KERNEL_DIR / "spqr_cmpq_layout.c"), "-o", str(lobj)]
    ccmd += ["-I", str(K.KERNEL_DIR), "-Werror", "all-warnings"]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_run, [cmd, ccmd]))
    for res in results:
        assert res.returncode == 0, res.stderr
    blobs = obj.read_bytes() + lobj.read_bytes()
    for name in ("spqr_cmpq_matmul", "spqr_cmpq_dequantize", "spqr_cmpq_workspace_bytes",
                 "spqr_cmpq_layout_sizes", "spqr_cmpq_repack", "spqr_cmpq_tiles"):  # fmt: skip
        assert name.encode() + b"\0" in blobs, name
