"""The C example's channel_mixed reader and CPU decode (examples/c: spqr_reader.c,
spqr_cmpq_ref.c, driven by the CPU-only tool spqr_cmpq_cpu.c) give the Python reference
decoder's weights bit for bit, and refuse malformed files with a non-zero exit status and a
message naming the error code, the file and the tensor; mutated files never crash it (built
with the address and undefined-behaviour sanitizers where the compiler has them).

CPU only: built with the system C compiler (skipped without one). The GPU side of the example
(spqr_matvec.cu, which checks spqr_cmpq_matmul / spqr_cmpq_dequantize against this decode) is
tests/test_gpu_c_example.py.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from c_build import CC
from strategies import far_apart_outliers

from spqr_format.api import save
from spqr_format.codec import channel_mixed as cm
from spqr_format.codec.channel_mixed_ref import decode_channel_mixed
from spqr_format.gpu import _kernels as K
from spqr_format.gpu.synth import random_channel_mixed_tensor, random_packed
from spqr_format.spec import DType

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "c"
SOURCES = ["spqr_cmpq_cpu.c", "spqr_reader.c", "spqr_cmpq_ref.c"]
FLAGS = ["-std=c99", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off"]
NAME = "layer.weight"


def _build(out: Path, extra: list[str]) -> subprocess.CompletedProcess:
    cmd = [CC, *FLAGS, *extra, "-I", str(K.KERNEL_DIR)]
    cmd += [str(EXAMPLE / s) for s in SOURCES] + [str(K.KERNEL_DIR / "spqr_row_layout.c")]
    return subprocess.run(cmd + ["-o", str(out)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tool(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmpqcpu") / "spqr_cmpq_cpu"
    res = _build(out, [])
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    """The tool with -fsanitize=address,undefined (skipped where the toolchain lacks them)."""
    out = tmp_path_factory.mktemp("cmpqsan") / "spqr_cmpq_cpu_san"
    res = _build(out, ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"])
    if res.returncode != 0:
        pytest.skip(f"no sanitizers: {res.stderr[:200]}")
    probe = subprocess.run([str(out)], capture_output=True, text=True, timeout=60)
    if probe.returncode != 1:  # the usage message; anything else: the runtime does not work here
        pytest.skip(f"sanitizer runtime unusable: {probe.stderr[:200]}")
    return out


def run(tool, path, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(tool), str(path), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _tensor(case: str):
    if case == "outliers":
        return random_channel_mixed_tensor(70, 333, outlier_density=0.05, seed=3)
    if case == "row_blocks":  # R = 7: 10 table blocks, the last one full
        return random_channel_mixed_tensor(70, 333, table_rows=7, outlier_density=0.05, seed=4)
    if case == "short_block":  # R = 16, m = 33: the last table block has one row; no outliers
        return random_channel_mixed_tensor(33, 1000, table_rows=16, seed=5)
    if case == "u32_perm":  # n > 65536: u32 perm; outliers far apart: skip entries
        t = random_channel_mixed_tensor(5, 70000, widths=np.sort(np.arange(70000) % 2 + 2)
                                        .astype(np.uint8), seed=6)  # fmt: skip
        t.outliers = far_apart_outliers(5, 70000, last=65504.0)
        return t
    if case == "one_bit":
        return random_channel_mixed_tensor(1, 64, widths=np.ones(64, np.uint8), seed=7)
    if case == "eight_bit_f32":
        t = random_channel_mixed_tensor(17, 40, widths=np.full(40, 8, np.uint8), seed=8,
                                        dtype=DType.FLOAT32, outlier_density=0.1)  # fmt: skip
        return t
    if case == "bf16":
        return random_channel_mixed_tensor(20, 129, table_rows=1, seed=9, dtype=DType.BFLOAT16)
    raise AssertionError(case)


CASES = ["outliers", "row_blocks", "short_block", "u32_perm", "one_bit", "eight_bit_f32", "bf16"]
DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def _write(tmp_path: Path, tensors: dict) -> Path:
    path = tmp_path / "w.spqr"
    save(path, tensors)
    return path


def _fnv1a(raw: bytes) -> str:
    h = 1469598103934665603
    for byte in raw:
        h = ((h ^ byte) * 1099511628211) & ((1 << 64) - 1)
    return f"{h:016x}"


@pytest.mark.parametrize("case", CASES)
def test_cpu_decode_equals_python_reference(tool, tmp_path, case):
    p = cm.pack(_tensor(case))
    path = _write(tmp_path, {NAME: p})
    m, n = p.shape
    for arg, dtype in DTYPES.items():
        out = tmp_path / f"w_{arg}.bin"
        res = run(tool, path, NAME, arg, out)
        assert res.returncode == 0, res.stderr
        want = np.ascontiguousarray(decode_channel_mixed(p, dtype)).view(np.uint8).reshape(-1)
        got = np.fromfile(out, np.uint8)
        assert got.size == want.size and np.array_equal(got, want), (case, arg)
        head = (f"channel_mixed m={m} n={n} widths={','.join(map(str, p.header.width_counts))}"
                f" table_rows={p.header.table_rows}"
                f" outlier_entries={p.header.outlier_entry_count}")  # fmt: skip
        assert res.stdout.startswith(head), res.stdout
        if m * n <= 20000:
            assert f"fnv1a={_fnv1a(want.tobytes())}" in res.stdout
    # no dtype argument: the tensor's own dtype (C-12.2)
    res = run(tool, path, NAME, "", tmp_path / "own.bin")
    assert res.returncode == 0, res.stderr
    want = decode_channel_mixed(p)
    assert np.array_equal(np.fromfile(tmp_path / "own.bin", np.uint8),
                          np.ascontiguousarray(want).view(np.uint8).reshape(-1))  # fmt: skip


def test_outlier_count_and_skips(tool, tmp_path):
    p = cm.pack(_tensor("u32_perm"))
    entries = p.outlier_entries
    assert entries is not None and np.any(entries >> 16 == 0xFFFF)  # the case has skips
    res = run(tool, _write(tmp_path, {NAME: p}), NAME)
    assert res.returncode == 0, res.stderr
    assert f"outlier_entries={entries.size} outliers=3 " in res.stdout


def test_tensor_selection(tool, tmp_path):
    a = random_packed(8, 64, seed=1)
    b = cm.pack(random_channel_mixed_tensor(4, 50, seed=2))
    c = cm.pack(random_channel_mixed_tensor(6, 30, seed=3))
    path = _write(tmp_path, {"a": a, "b": b, "c": c})
    first = run(tool, path)  # no name: the first channel_mixed tensor
    assert first.returncode == 0 and "m=4 n=50 " in first.stdout, first.stderr
    named = run(tool, path, "c")
    assert named.returncode == 0 and "m=6 n=30 " in named.stdout, named.stderr
    bad = run(tool, path, "a")
    assert bad.returncode == 1
    assert "E_BAD_INPUT" in bad.stderr and "tensor 'a'" in bad.stderr and str(path) in bad.stderr
    missing = run(tool, path, "zz")
    assert missing.returncode == 1 and "E_NOT_FOUND" in missing.stderr and "zz" in missing.stderr
    (tmp_path / "only").mkdir()
    only_bilevel = _write(tmp_path / "only", {"a": a})
    none = run(tool, only_bilevel)
    assert none.returncode == 1 and "no channel_mixed tensor" in none.stderr


# --- malformed files ----------------------------------------------------------------------------


class Layout:
    """Offsets of the one tensor of a file: its record, params, and its sections by role."""

    def __init__(self, raw: bytes):
        ntens, nsec = struct.unpack_from("<II", raw, 24)
        assert ntens == 1
        self.record = 64
        self.params = 64 + 120
        self.sections = {}
        for k in range(nsec):
            rec = 64 + 160 * ntens + 32 * k
            off, length, _crc, role = struct.unpack_from("<QQIH", raw, rec)
            self.sections[role] = (rec, off, length)


def _patched(tmp_path: Path, p, patch) -> Path:
    path = _write(tmp_path, {NAME: p})
    raw = bytearray(path.read_bytes())
    raw = patch(raw, Layout(bytes(raw))) or raw
    path.write_bytes(bytes(raw))
    return path


def _put(raw: bytearray, fmt: str, off: int, *vals) -> None:
    struct.pack_into(fmt, raw, off, *vals)


def _entry(L, raw, k):
    return L.sections[7][1] + 4 * k


PATCHES = {
    # record and params (C-12.1, C-12.2)
    "dtype": (lambda r, L: _put(r, "<B", L.record + 12, 9), "E_BAD_FIELD", "dtype 9"),
    "ndim": (lambda r, L: _put(r, "<B", L.record + 13, 3), "E_BAD_SHAPE", "ndim 3"),
    "dim_cap": (lambda r, L: _put(r, "<Q", L.record + 24, 1 << 41), "E_LIMIT", "2^40"),
    "m_2_31": (lambda r, L: _put(r, "<Q", L.record + 24, 1 << 31), "E_LIMIT", "2^31"),
    "version": (
        lambda r, L: _put(r, "<H", L.record + 10, 2),
        "E_UNSUPPORTED_ENCODING_VERSION",
        "version 2",
    ),
    "table_rows": (
        lambda r, L: _put(r, "<I", L.params + 32, (1 << 24) + 1),
        "E_BAD_FIELD",
        "table_rows",
    ),
    "width_sum": (
        lambda r, L: _put(r, "<I", L.params, struct.unpack_from("<I", r, L.params)[0] + 1),
        "E_BAD_FIELD",
        "width_counts sum to",
    ),
    "entry_count": (
        lambda r, L: _put(r, "<I", L.params + 36, 1),
        "E_BAD_LAYOUT",
        "section outlier_entries is",
    ),
    "section_count": (lambda r, L: _put(r, "<I", L.record + 20, 4), "E_BAD_LAYOUT", "4 sections"),
    "section_range": (
        lambda r, L: _put(r, "<I", L.record + 16, 3),
        "E_BAD_LAYOUT",
        "section records",
    ),
    # section records
    "role": (lambda r, L: _put(r, "<H", L.sections[2][0] + 20, 3), "E_BAD_LAYOUT", "role 3"),
    "length": (
        lambda r, L: _put(r, "<Q", L.sections[8][0] + 8, L.sections[8][2] - 2),
        "E_BAD_LAYOUT",
        "section tables is",
    ),
    "offset": (
        lambda r, L: _put(r, "<Q", L.sections[5][0], 1 << 63),
        "E_TRUNCATED",
        "past the end of the file",
    ),
    "reserved": (
        lambda r, L: _put(r, "<H", L.sections[5][0] + 22, 1),
        "E_BAD_FIELD",
        "reserved",
    ),
    "truncated": (lambda r, L: r[: L.sections[8][1] + 10], "E_TRUNCATED", "tables"),
    # data (C-12.8 order)
    "perm_repeat": (
        lambda r, L: _put(
            r, "<H", L.sections[5][1] + 2, struct.unpack_from("<H", r, L.sections[5][1])[0]
        ),
        "E_BAD_PERMUTATION",
        "perm[1]",
    ),
    "perm_range": (
        lambda r, L: _put(r, "<H", L.sections[5][1], 333),
        "E_BAD_PERMUTATION",
        "out of range",
    ),
    "table_nan": (
        lambda r, L: _put(r, "<H", L.sections[8][1] + 10, 0x7E00),
        "E_NONFINITE",
        "tables entry 5",
    ),
    "table_inf": (
        lambda r, L: _put(r, "<H", L.sections[8][2] + L.sections[8][1] - 2, 0xFC00),
        "E_NONFINITE",
        "tables entry",
    ),
    "index0": (
        lambda r, L: _put(r, "<I", L.sections[6][1], 1),
        "E_BAD_OUTLIERS",
        "outlier_index[0]",
    ),
    "index_end": (
        lambda r, L: _put(r, "<I", L.sections[6][1] + L.sections[6][2] - 4, 0),
        "E_BAD_OUTLIERS",
        "outlier_index",
    ),
    "delta0": (lambda r, L: _put(r, "<H", _entry(L, r, 3), 0), "E_BAD_OUTLIERS", "delta 0"),
    "skip_delta": (
        lambda r, L: _put(r, "<I", _entry(L, r, 0), 0xFFFF0005),
        "E_BAD_OUTLIERS",
        "skip with delta 5",
    ),
    "skip_last": (
        lambda r, L: _put(r, "<I", _entry(L, r, L.sections[7][2] // 4 - 1), 0xFFFFFFFF),
        "E_BAD_OUTLIERS",
        "ends with a skip",
    ),
    "cell": (
        lambda r, L: _put(r, "<H", _entry(L, r, L.sections[7][2] // 4 - 1), 0xFFFF),
        "E_BAD_OUTLIERS",
        "past block",
    ),
    "value_nan": (
        lambda r, L: _put(r, "<H", _entry(L, r, 2) + 2, 0x7C01),
        "E_NONFINITE",
        "value 0x7c01",
    ),
}


@pytest.mark.parametrize("fault", list(PATCHES))
def test_malformed_file_is_refused(tool, tmp_path, fault):
    patch, code, words = PATCHES[fault]
    p = cm.pack(random_channel_mixed_tensor(70, 333, outlier_density=0.05, seed=3))
    path = _patched(tmp_path, p, patch)
    res = run(tool, path, NAME)
    assert res.returncode == 1, (fault, res.returncode, res.stdout, res.stderr)
    msg = res.stderr.strip()
    assert msg.startswith(code + ":"), msg
    assert str(path) in msg and f"tensor '{NAME}'" in msg and words in msg, msg
    assert "\n" not in msg and not res.stdout


@pytest.mark.parametrize(
    "raw,code",
    [(b"\x89SPQR\r\n\x1a", "E_TRUNCATED"), (b"NOTSPQR!" + bytes(56), "E_BAD_MAGIC")],
)
def test_container_faults(tool, tmp_path, raw, code):
    path = tmp_path / "bad.spqr"
    path.write_bytes(raw)
    res = run(tool, path)
    assert res.returncode == 1 and res.stderr.startswith(code), res.stderr
    res = run(tool, tmp_path / "absent.spqr")
    assert res.returncode == 1 and "E_IO" in res.stderr and "absent.spqr" in res.stderr


def test_hostile_name_is_printed_safely(tool, tmp_path):
    """A refused tensor's name from the file is shown with its control bytes replaced."""
    p = cm.pack(random_channel_mixed_tensor(4, 10, seed=1))
    path = _write(tmp_path, {"a\u2028b": p})  # valid UTF-8, non-ASCII bytes
    raw = bytearray(path.read_bytes())
    _put(raw, "<B", 64 + 12, 0)  # dtype 0
    path.write_bytes(bytes(raw))
    res = run(tool, path)
    assert res.returncode == 1 and "tensor 'a???b'" in res.stderr, res.stderr


def test_mutated_files_never_crash(sanitized, tmp_path):
    """Random byte changes in the directory and the sections: the reader either decodes or
    refuses with status 1, never a crash, an out-of-bounds access or undefined behaviour."""
    t = random_channel_mixed_tensor(40, 70, table_rows=16, outlier_density=0.1, seed=11)
    path = _write(tmp_path, {NAME: cm.pack(t)})
    base = path.read_bytes()
    L = Layout(base)
    rng = np.random.default_rng(0)
    # the records (tensor + sections) and the first bytes of every section
    spots = list(range(8, 64 + 160 + 32 * len(L.sections)))
    for _rec, off, length in L.sections.values():
        spots += list(range(off, off + min(length, 64)))
    target = tmp_path / "m.spqr"
    codes = {0: 0, 1: 0}
    for trial in range(250):
        raw = bytearray(base)
        for pos in rng.choice(spots, size=int(rng.integers(1, 4)), replace=False):
            raw[pos] = int(rng.integers(0, 256)) if trial % 2 else raw[pos] ^ 0xFF
        if trial % 25 == 0:
            raw = raw[: int(rng.integers(0, len(raw)))]
        target.write_bytes(bytes(raw))
        res = run(sanitized, target, NAME, "f32", timeout=60)
        assert res.returncode in (0, 1), (trial, res.returncode, res.stderr[-2000:])
        assert "runtime error" not in res.stderr and "Sanitizer" not in res.stderr, res.stderr
        codes[res.returncode] += 1
    assert codes[1] > 50  # most mutations are refused
