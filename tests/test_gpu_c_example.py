"""The standalone C example (examples/c) gives the same y as the Python layer, bit for bit.

Needs nvcc, CuPy and a CUDA device (skipped otherwise; tests/test_kernels_compile.py compiles
the example on CPU-only machines).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numba
import numpy as np
import pytest
from gpu_env import cupy_or_skip
from strategies import far_apart_outliers

cp = cupy_or_skip()
NVCC = shutil.which("nvcc")
if NVCC is None:
    pytest.skip("nvcc not found", allow_module_level=True)

from spqr_format.api import save  # noqa: E402
from spqr_format.codec import channel_mixed as cm  # noqa: E402
from spqr_format.codec.channel_mixed_ref import decode_channel_mixed  # noqa: E402
from spqr_format.codec.reference import decode_bilevel  # noqa: E402
from spqr_format.gpu import GpuTensor  # noqa: E402
from spqr_format.gpu import plan as P  # noqa: E402
from spqr_format.gpu.cmpq import GpuCmpqTensor  # noqa: E402
from spqr_format.gpu.synth import random_channel_mixed_tensor, random_packed  # noqa: E402

pytestmark = pytest.mark.gpu
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "c"
KDIR = Path(__file__).resolve().parents[1] / "spqr_format" / "gpu" / "kernels"


def _lcg(n: int, seed: int):
    """The example's 64-bit LCG (spqr_matvec.cu): the top 31 bits of each of n states."""
    s, mask = seed, (1 << 64) - 1
    for _ in range(n):
        s = (s * 6364136223846793005 + 1442695040888963407) & mask
        yield s >> 33


def make_x(n: int, seed: int) -> np.ndarray:
    """The example's LCG input (see make_x in spqr_matvec.cu), as f16."""
    out = np.array(
        [(((r >> 30) & 1) << 15) | ((13 + (r >> 10) % 3) << 10) | (r & 0x3FF)
         for r in _lcg(n, seed)],
        dtype=np.uint16,
    )  # fmt: skip
    return out.view(np.float16)


def make_x32(n: int, seed: int) -> np.ndarray:
    """The example's f32 input (make_x32 in spqr_matvec.cu), as uint32 bits."""
    return np.array(
        [(((r >> 30) & 1) << 31) | ((125 + ((r >> 23) & 0x7F) % 3) << 23) | (r & 0x7FFFFF)
         for r in _lcg(n, seed)],
        dtype=np.uint32,
    )  # fmt: skip


def fnv1a(y_bits: np.ndarray) -> str:
    h = 1469598103934665603
    for v in y_bits.tolist():
        for byte in (v & 0xFF, v >> 8):
            h = ((h ^ byte) * 1099511628211) & ((1 << 64) - 1)
    return f"{h:016x}"


@numba.njit(cache=False)
def _fnv1a_u16(v: np.ndarray) -> np.uint64:
    h = np.uint64(1469598103934665603)
    prime = np.uint64(1099511628211)
    for x in v:
        h = (h ^ np.uint64(x & 0xFF)) * prime
        h = (h ^ np.uint64(x >> 8)) * prime
    return h


def fnv1a_fast(bits: np.ndarray) -> str:
    """fnv1a for millions of values (the C example's checksum of a dequantized tensor)."""
    return f"{int(_fnv1a_u16(np.ascontiguousarray(bits, dtype=np.uint16))):016x}"


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    # SPQR_TEST_C_EXAMPLE=PATH: a binary already built by the command below from this tree
    # (the build takes minutes; with pytest-xdist every worker would build its own copy)
    prebuilt = os.environ.get("SPQR_TEST_C_EXAMPLE")
    if prebuilt:
        return Path(prebuilt)
    major, minor = cp.cuda.Device().compute_capability[:-1], cp.cuda.Device().compute_capability[-1]
    arch = f"sm_{major}{minor}"
    out = tmp_path_factory.mktemp("cexample") / "spqr_matvec"
    cmd = [NVCC, "-O2", "-std=c++17", f"-arch={arch}", "-Xcompiler", "-ffp-contract=off"]
    cmd += ["-I", str(KDIR), str(EXAMPLE / "spqr_matvec.cu"), str(EXAMPLE / "spqr_reader.c")]
    cmd += [str(EXAMPLE / "spqr_cmpq_ref.c")]
    cmd += [str(KDIR / "spqr_host.cu"), str(KDIR / "spqr_tc_host.cu")]
    cmd += [str(KDIR / "spqr_tile_layout.c"), str(KDIR / "spqr_row_layout.c")]
    cmd += [str(KDIR / "spqr_cmpq_host.cu"), str(KDIR / "spqr_cmpq_layout.c"), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return out


def run_example(binary, tmp_path, p, *args: str) -> tuple[Path, str, float]:
    """Save ``p`` as layer.weight of ``tmp_path``/w.spqr, run the C example on it with
    ``args`` and return the file and the example's checksum (FNV-1a hex digest, sum)."""
    path = tmp_path / "w.spqr"
    save(path, {"layer.weight": p})
    res = subprocess.run(
        [str(binary), str(path), "layer.weight", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    got = re.search(r"fnv1a=([0-9a-f]{16}) sum=(\S+)", res.stdout)
    assert got, res.stdout
    return path, got.group(1), float(got.group(2))


@pytest.mark.parametrize(
    "m,n,kw",
    [
        (300, 4096, {}),
        (7, 1000, dict(bits=4, group_size=128, stats_bits=0, perm=False, outlier_fraction=0)),
        (64, 28672, dict(outlier_fraction=0.01)),
    ],
)
def test_c_example_matches_python(binary, tmp_path, m, n, kw):
    p = random_packed(m, n, seed=m, **kw)
    seed = 12345
    path, digest, total = run_example(binary, tmp_path, p, str(seed))
    # the C launcher (spqr_host.cu) runs the SPEC-layout kernels; so does this side
    g = GpuTensor.from_file(path, "layer.weight", tensor_cores=False)
    y = cp.asnumpy(g.matvec(cp.asarray(make_x(n, seed))))
    assert digest == fnv1a(y.view(np.uint16)), y[:8]
    assert total == pytest.approx(float(y.astype(np.float64).sum()), rel=1e-9)


@pytest.mark.parametrize("path", ["", "tc_split", "tcg"])
@pytest.mark.parametrize(
    "m,n,kw,splits",
    [
        (300, 4096, {}, "2"),
        (37, 1000, dict(bits=2, stats_bits=2, outlier_fraction=0.05), "1"),
        (20000, 2048, dict(bits=4, stats_bits=3, outlier_fraction=0.01), "3"),
    ],
)
def test_c_example_tensor_cores_match_python(binary, tmp_path, monkeypatch, m, n, kw, splits, path):
    """`spqr_matvec FILE NAME SEED tc`: host repack (spqr_tile_repack) + spqr_tc_matmul gives
    the Python tensor-core path's y bit for bit on each batch-1 path: the one-kernel path
    (the plan's choice), the k-split path and its outlier pass (SPQR_GPU_PLAN path=tc_split,
    with the same forced k-split; 20,000 rows take the four-rows-per-warp pass) and the
    group-separated kernel (path=tcg). Both layers read SPQR_GPU_PLAN on every call."""
    p = random_packed(m, n, seed=m, **kw)
    seed = 777
    monkeypatch.setenv("SPQR_GPU_PLAN", f"tc_splits={splits}" + (f",path={path}" if path else ""))
    path, digest, _ = run_example(binary, tmp_path, p, str(seed), "tc")
    g = GpuTensor.from_file(path, "layer.weight", tensor_cores=True)
    assert g.tc is not None
    y = cp.asnumpy(g.matvec(cp.asarray(make_x(n, seed))))
    assert digest == fnv1a(y.view(np.uint16)), y[:8]


@pytest.mark.parametrize(
    "m,n,kw",
    [
        (301, 4096, dict(perm=False)),  # the octet kernel (no permutation)
        (300, 4096, {}),  # a permutation: the row kernel and its scatter
        (9, 1000, dict(bits=4, group_size=128, stats_bits=0, perm=False)),
        (5, 28672, dict(perm=False, outlier_fraction=0.01)),
        (6, 1000, dict(bits=5, group_size=24)),  # generic bits, g % 16 != 0: the flat kernel
    ],
)
def test_c_example_dequantize_matches_reference(binary, tmp_path, m, n, kw):
    """`spqr_matvec FILE NAME SEED dq`: spqr_dequantize (the C launcher) writes the f16 weights
    of the CPU reference decoder, bit for bit."""
    p = random_packed(m, n, seed=m, **kw)
    _, digest, total = run_example(binary, tmp_path, p, "1", "dq")
    w = decode_bilevel(p, "float16")
    assert digest == fnv1a_fast(w.view(np.uint16).ravel())
    assert total == pytest.approx(float(w.astype(np.float64).sum()), rel=1e-9)


# --- channel_mixed ------------------------------------------------------------------------------

CODE = {"f32": 0, "f16": 1, "bf16": 2}
LINE = re.compile(
    r"^matmul batch=(\d+) x=(\w+) y=(\w+) max_err/tol=(\S+) checksum fnv1a=([0-9a-f]{16})", re.M
)


def _cmpq_x(n: int, batch: int, seed: int, code: int) -> np.ndarray:
    """X of the example (row b from seed + b) as the bits the example uploads."""
    if code == 1:
        return np.stack([make_x(n, seed + b).view(np.uint16) for b in range(batch)])
    x32 = np.stack([make_x32(n, seed + b) for b in range(batch)])
    return x32 if code == 0 else (x32 >> 16).astype(np.uint16)


@pytest.mark.parametrize(
    "m,n,kw",
    [
        (300, 1000, dict(outlier_density=0.02)),  # R = 0: tensor cores at batch 4 and 17
        (37, 4096, dict(table_rows=16)),  # R = 16 (one short block), no outliers
        (64, 512, dict(table_rows=7, outlier_density=0.3)),  # R % 16 != 0: the first design
        (5, 70000, dict(widths=np.sort(np.arange(70000) % 2 + 2).astype(np.uint8))),  # u32 perm
    ],
)
def test_c_example_channel_mixed(binary, tmp_path, monkeypatch, m, n, kw):
    """`spqr_matvec FILE NAME SEED` on a channel_mixed tensor: the example's own checks pass
    (spqr_cmpq_dequantize bit-exact with its CPU decode in f16 / f32 / bf16, spqr_cmpq_matmul
    within SPEC C-7.6 of its fp64 product: "channel_mixed OK"), its dequantized weights are the
    Python reference decoder's and its y are GpuCmpqTensor.matmul_into's (the same default
    plan), bit for bit."""
    monkeypatch.delenv(P.ENV, raising=False)  # the default plan, the one the C launcher runs
    t = random_channel_mixed_tensor(m, n, seed=m, **kw)
    if n > 65536:
        t.outliers = far_apart_outliers(m, n, last=-2.0)
    p = cm.pack(t)
    path = tmp_path / "w.spqr"
    save(path, {"layer.weight": p})
    seed = 4242
    res = subprocess.run([str(binary), str(path), "layer.weight", str(seed)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.rstrip().endswith("channel_mixed OK"), res.stdout
    for name, dtype in (("f16", "float16"), ("f32", "float32"), ("bf16", "bfloat16")):
        got = re.search(rf"^dequantize {name}: bit-exact .* fnv1a=([0-9a-f]{{16}})", res.stdout,
                        re.M)  # fmt: skip
        assert got, res.stdout
        w = np.ascontiguousarray(decode_channel_mixed(p, dtype)).view(np.uint16).reshape(-1)
        assert got.group(1) == fnv1a_fast(w), name
    g = GpuCmpqTensor.from_packed(p)
    cases = LINE.findall(res.stdout)
    assert [(int(b), x, y) for b, x, y, _, _ in cases] == [
        (1, "f16", "f16"), (4, "f16", "f16"), (17, "f16", "f16"), (3, "f32", "f32"),
        (2, "bf16", "f32")]  # fmt: skip
    for batch, xin, yout, ratio, digest in cases:
        batch, cin, cout = int(batch), CODE[xin], CODE[yout]
        assert float(ratio) <= 1.0
        X = cp.asarray(_cmpq_x(n, batch, seed, cin))
        Y = cp.zeros((batch, m), np.float32 if cout == 0 else np.uint16)
        ws = cp.empty(max(1, g.workspace_bytes(batch, cin) // 4), np.float32)
        g.matmul_into(X.data.ptr, n, cin, Y.data.ptr, m, cout, batch, ws.data.ptr)
        cp.cuda.get_current_stream().synchronize()
        assert digest == fnv1a_fast(cp.asnumpy(Y).view(np.uint16).reshape(-1)), (batch, xin)


def test_c_example_channel_mixed_dq_and_refusals(binary, tmp_path):
    """`dq` dequantizes only; `tc` is for bilevel tensors; a malformed channel_mixed tensor is
    refused with the reader's message and status 1 before any launch."""
    p = cm.pack(random_channel_mixed_tensor(20, 100, outlier_density=0.1, seed=1))
    path = tmp_path / "w.spqr"
    save(path, {"layer.weight": p})
    res = subprocess.run([str(binary), str(path), "", "1", "dq"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert res.returncode == 0 and "matmul" not in res.stdout, res.stdout + res.stderr
    assert res.stdout.count("bit-exact") == 3 and "channel_mixed OK" in res.stdout
    res = subprocess.run([str(binary), str(path), "layer.weight", "1", "tc"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 1 and "bilevel" in res.stderr
    raw = bytearray(path.read_bytes())
    raw[64 + 120 : 64 + 124] = (p.header.width_counts[0] + 1).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    res = subprocess.run([str(binary), str(path), "layer.weight"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert res.returncode == 1 and res.stderr.startswith("E_BAD_FIELD"), res.stderr
    assert "width_counts" in res.stderr and not res.stdout
