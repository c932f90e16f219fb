"""Hostile files and inputs at the public API and the CLI (issue 16, section 3 and the end of
section 2). Each test failed on the code before its fix."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import struct

import ml_dtypes
import numpy as np
import pytest
import spqr_bytes as sb
from click.testing import CliRunner

from spqr_format import api
from spqr_format.cli import main
from spqr_format.codec.rtn import encode_rtn
from spqr_format.errors import SpqrError
from spqr_format.safetensors_io import SafetensorsFile, write_safetensors


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, code: int = 2, needle: str | None = None) -> None:
    """One-line error, the exit status asked for, no traceback."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output
    if needle is not None:
        assert needle in result.output, result.output


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> pathlib.Path:
    """raw f32 [8, 40], bilevel (2-level stats, permutation, outliers) and a 0-d raw f32."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 40)).astype(np.float32)
    t = encode_rtn(
        w, bits=3, group_size=16, stats_bits=3, stats_group_size=4, outlier_fraction=0.05
    )
    t = dataclasses.replace(t, perm=rng.permutation(40).astype(np.uint32))
    path = tmp_path_factory.mktemp("hard") / "sample.spqr"
    api.save(path, {"raw.w": w, "q.w": t, "s": np.array(1.5, np.float32)})
    return path


def altered(tmp_path, sample, change, name="altered.spqr") -> pathlib.Path:
    buf = bytearray(sample.read_bytes())
    change(buf)
    out = tmp_path / name
    out.write_bytes(bytes(buf))
    return out


# --- 1. info lists tensors of an encoding (version) it does not implement --------------------


@pytest.mark.parametrize(
    "field, value, code",
    [
        (sb.REC_ENCODING_VERSION, 2, "E_UNSUPPORTED_ENCODING_VERSION"),
        (sb.REC_ENCODING, 9, "E_UNKNOWN_ENCODING"),
        (
            sb.REC_ENCODING,
            4,
            "E_UNKNOWN_ENCODING",
        ),  # no version defines id 4 (3: channel_mixed, 1.1)
    ],
)
def test_info_lists_unsupported_tensors(tmp_path, sample, field, value, code):
    path = altered(tmp_path, sample, lambda b: sb.patch_record(b, 1, "<H", field, value))
    result = run("info", path)
    assert_clean_error(result, 0)
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert "unsupported" in lines["q.w"] and code in lines["q.w"]
    assert "raw" in lines["raw.w"] and "scalar" in lines["s"]
    doc = json.loads(run("info", "--json", path).stdout)
    by = {t["name"]: t for t in doc["tensors"]}
    assert by["q.w"]["supported"] is False and by["q.w"]["error"] == code
    assert by["raw.w"]["supported"] is True
    with api.open_file(path) as f:  # the others stay readable (C-3.4)
        assert f.decode("raw.w").shape == (8, 40)
        with pytest.raises(SpqrError) as err:
            f.decode("q.w")
        assert err.value.code == code


# --- 2. a zero-element raw tensor with huge other dims ---------------------------------------


def _zero_huge(tmp_path, dims=(0, 2**40, 2**40)) -> pathlib.Path:
    path = tmp_path / "zero.spqr"
    api.save(path, {"z": np.zeros((0, 3), np.float32)})
    buf = bytearray(path.read_bytes())
    struct.pack_into("<B", buf, sb.tensor_record(0) + sb.REC_NDIM, len(dims))
    struct.pack_into(f"<{len(dims)}Q", buf, sb.tensor_record(0) + sb.REC_DIMS, *dims)
    path.write_bytes(bytes(sb.fix_header_crc(buf)))
    return path


@pytest.mark.parametrize("dims", [(0, 2**40, 2**40), (2**40, 2**40, 0), (0, 2**40, 1 << 20)])
def test_zero_dim_with_huge_dims_reads_decodes_and_verifies(tmp_path, dims):
    path = _zero_huge(tmp_path, dims)
    with api.open_file(path) as f:
        assert f.info("z").shape == dims and f.info("z").elements == 0
        for a in (f.read("z").data, f.decode("z"), f.decode("z", "bfloat16")):
            assert a.size == 0 and a.ndim == 3
        f.verify("z")
    assert_clean_error(run("verify", path), 0)
    out = tmp_path / "z.safetensors"
    assert_clean_error(run("decode", path, "-o", out), 0)
    header = json.loads(out.read_bytes()[8 : 8 + struct.unpack_from("<Q", out.read_bytes())[0]])
    assert header["z"]["shape"] == list(dims) and header["z"]["data_offsets"] == [0, 0]


# --- 3. a tensor named __metadata__ -----------------------------------------------------------


def test_decode_refuses_a_tensor_named_like_safetensors_metadata(tmp_path):
    path = tmp_path / "m.spqr"
    api.save(path, {"__metadata__": np.ones(3, np.float32), "b": np.ones(2, np.float32)})
    out = tmp_path / "out.safetensors"
    result = run("decode", path, "-o", out)
    assert_clean_error(result, 2, "E_BAD_INPUT")
    assert "'__metadata__'" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == [path]
    assert_clean_error(run("decode", path, "-o", out, "--tensor", "b"), 0)
    with SafetensorsFile(out) as st:
        assert st.names() == ["b"]


# --- 6. safetensors input goes through the safetensors library -------------------------------


def _st(header, data: bytes = b"") -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


_F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_SAFETENSORS = {
    "negative dim": _st({"a": {**_F32x2, "shape": [-1, 2]}}, bytes(8)),
    "dtype not a string": _st({"a": {**_F32x2, "dtype": 5}}, bytes(8)),
    "metadata a list": _st({"__metadata__": [1], "a": _F32x2}, bytes(8)),
    "metadata value not a string": _st({"__metadata__": {"x": 1}, "a": _F32x2}, bytes(8)),
    "deep JSON": _st(b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"),
    "float dim": _st({"a": {**_F32x2, "shape": [2.0]}}, bytes(8)),
    "overlapping offsets": _st({"a": _F32x2, "b": {**_F32x2, "data_offsets": [4, 12]}}, bytes(12)),
    "offsets past the end": _st({"a": {**_F32x2, "data_offsets": [0, 16]}}, bytes(8)),
    "shorter than 8 bytes": b"\x01\x00",
    "huge header length": struct.pack("<Q", 2**63) + b"{}",
    "header not JSON": _st(b"{nope}"),
    "header a list": _st(b"[]"),
    "unknown dtype": _st({"a": {**_F32x2, "dtype": "Q4"}}, bytes(8)),
    "empty file": b"",
}


@pytest.mark.parametrize("what", BAD_SAFETENSORS)
def test_encode_refuses_malformed_safetensors_cleanly(tmp_path, what):
    src = tmp_path / "in.safetensors"
    src.write_bytes(BAD_SAFETENSORS[what])
    result = run("encode", src, "-o", tmp_path / "out.spqr", "-q")
    assert_clean_error(result, 2, "E_BAD_INPUT")
    assert str(src) in result.output
    assert not (tmp_path / "out.spqr").exists()
    with pytest.raises(SpqrError):
        SafetensorsFile(src)


def test_safetensors_bf16_reads_as_real_bfloat16_and_round_trips(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    vals = np.array([[1.0, -2.5, 3.0e38, 1e-40], [0.0, -0.0, 65504.0, 7.0]], np.float32)
    bf = vals.astype(ml_dtypes.bfloat16)
    src = tmp_path / "bf.safetensors"
    save_file({"w.weight": bf, "s": np.array(2.0, ml_dtypes.bfloat16)}, str(src))
    with SafetensorsFile(src) as st:
        t = st.get("w.weight")
        assert t.dtype == "bfloat16" and t.data.dtype == ml_dtypes.bfloat16
        assert np.array_equal(t.to_float32(), bf.astype(np.float32))
    spqr = tmp_path / "bf.spqr"
    assert_clean_error(run("encode", src, "-o", spqr, "--keep-dense", "*", "-q"), 0)
    with api.open_file(spqr) as f:
        assert f.info("w.weight").dtype == "bfloat16"
        assert np.array_equal(f.decode("w.weight"), bf.view(np.uint16))
        assert f.decode("s").shape == ()
    out = tmp_path / "dense.safetensors"
    assert_clean_error(run("decode", spqr, "-o", out), 0)
    with safe_open(str(out), framework="numpy") as g:  # the library itself loads it as BF16
        assert g.get_slice("w.weight").get_dtype() == "BF16"
        assert np.array_equal(g.get_tensor("w.weight").view(np.uint16), bf.view(np.uint16))
        assert g.get_tensor("s").shape == ()


def test_api_accepts_ml_dtypes_bfloat16_arrays(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    api.save(tmp_path / "a.spqr", {"a": a})
    with api.open_file(tmp_path / "a.spqr") as f:
        assert f.info("a").dtype == "bfloat16"
        assert np.array_equal(f.decode("a").view(ml_dtypes.bfloat16), a)
    write_safetensors(tmp_path / "a.safetensors", {"a": ("bfloat16", a)})
    with SafetensorsFile(tmp_path / "a.safetensors") as st:
        assert np.array_equal(st.get("a").data, a)


# --- 9. verify: damaged (exit 1) versus invalid (exit 2) -------------------------------------


def _flip_in_section(role):
    def change(buf):
        off, _ = sb.section_of(buf, 1, role)
        buf[off] ^= 0x01

    return change


def _with_crcs(change):
    def inner(buf):
        change(buf)
        sb.fix_all(buf)

    return inner


def _outlier_values_nan(buf):  # the first outlier entry's value becomes a NaN
    off, length = sb.section_of(buf, 1, 7)
    for pos in range(off, off + length, 4):  # first value-carrying entry
        entry = struct.unpack_from("<I", buf, pos)[0]
        if entry != 0xFFFFFFFF:
            struct.pack_into("<I", buf, pos, (entry & 0xFFFF) | (0x7E00 << 16))
            return
    raise AssertionError("no outlier entry")


@pytest.mark.parametrize(
    "change, status, codes",
    [
        (_flip_in_section(2), 1, {"E_SECTION_CRC"}),  # a bit flip in the codes: damaged
        (lambda b: b.__setitem__(100, b[100] ^ 1), 1, {"E_HEADER_CRC"}),
        (lambda b: b.__delitem__(slice(len(b) - 8, None)), 1, {"E_TRUNCATED"}),
        # A permutation entry swapped, CRCs fixed: a valid file whose digest is stale.
        (_with_crcs(lambda b: _swap_perm(b)), 1, {"E_DIGEST_MISMATCH"}),
        # Valid CRCs, invalid content: not damage, the file is invalid (exit 2).
        (_with_crcs(lambda b: _dup_perm(b)), 2, {"E_BAD_PERMUTATION"}),
        (_with_crcs(_outlier_values_nan), 2, {"E_NONFINITE", "E_BAD_OUTLIERS"}),
        (lambda b: sb.patch_record(b, 1, "<H", sb.REC_ENCODING, 9), 2, {"E_UNKNOWN_ENCODING"}),
    ],
)
def test_verify_exit_status_separates_damaged_from_invalid(tmp_path, sample, change, status, codes):
    path = altered(tmp_path, sample, change)
    result = run("verify", path)
    assert_clean_error(result, status)
    assert any(c in result.output for c in codes), result.output
    doc = json.loads(run("verify", "--json", path).stdout)
    assert doc["status"] == {1: "damaged", 2: "invalid"}[status]


def _perm_offset(buf) -> tuple[int, int]:
    return sb.section_of(buf, 1, 5)  # role 5: the permutation


def _swap_perm(buf):
    off, length = _perm_offset(buf)
    width = length // 40  # u16 or u32 entries, whatever the layout stores
    a, b = bytes(buf[off : off + width]), bytes(buf[off + width : off + 2 * width])
    buf[off : off + width], buf[off + width : off + 2 * width] = b, a


def _dup_perm(buf):
    off, length = _perm_offset(buf)
    width = length // 40
    buf[off : off + width] = buf[off + width : off + 2 * width]


# --- 15. bf16 decode of a 0-d float32 tensor --------------------------------------------------


def test_decode_0d_tensor_to_bfloat16(tmp_path, sample):
    out = tmp_path / "bf.safetensors"
    assert_clean_error(run("decode", sample, "-o", out, "--dtype", "bfloat16"), 0)
    with SafetensorsFile(out) as st:
        s = st.get("s")
        assert s.shape == () and s.data.dtype == ml_dtypes.bfloat16 and float(s.data) == 1.5
    with api.open_file(sample) as f:
        assert f.decode("s", "bfloat16").shape == ()
        assert f.decode("s", "float16").shape == () and f.decode("s", "float16") == 1.5


# --- 16. decode checks digests ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["original", "float32", "bfloat16"])
def test_decode_refuses_a_stale_digest_and_leaves_no_output(tmp_path, sample, dtype):
    path = altered(tmp_path, sample, _with_crcs(_swap_perm))
    out = tmp_path / "w.safetensors"
    result = run("decode", path, "-o", out, "--dtype", dtype)
    assert_clean_error(result, 2, "E_DIGEST_MISMATCH")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert_clean_error(run("decode", path, "-o", out, "--no-verify-digest"), 0)
    assert out.exists()


def test_decode_refuses_a_stale_raw_digest(tmp_path, sample):
    def change(buf):
        off, _ = sb.section_of(buf, 0, 1)
        buf[off] ^= 0x40
        sb.fix_all(buf)

    path = altered(tmp_path, sample, change)
    out = tmp_path / "w.safetensors"
    assert_clean_error(run("decode", path, "-o", out, "--dtype", "float16"), 2, "E_DIGEST")
    assert not out.exists()


# --- 4, 5, 13 at the CLI: metadata and names are refused at open -----------------------------


def _with_metadata(tmp_path, raw: bytes) -> pathlib.Path:
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent / "fuzz"))
    import spqr_mutator

    path = tmp_path / "m.spqr"
    api.save(path, {"w": np.ones(2, np.float32)}, metadata={"a.b": 1})
    buf = spqr_mutator._rebuild(bytearray(path.read_bytes()), meta=raw)
    path.write_bytes(bytes(sb.fix_all(buf)))
    return path


@pytest.mark.parametrize(
    "raw",
    [b'{"a.b":1e999}', b'{"a.b":1' + b"0" * 400 + b"}", b'{"a.b":[' + b"[]," * 2**20 + b"[]]}"],
)
def test_info_refuses_non_finite_or_huge_metadata(tmp_path, raw):
    path = _with_metadata(tmp_path, raw)
    result = run("info", "--json", "--metadata", path)
    assert_clean_error(result, 2, "E_BAD_METADATA")
    assert "Infinity" not in result.output


def test_info_escapes_names_it_prints(tmp_path, monkeypatch):
    """Names with C1/bidi characters are refused (C-2.10); a name that passes the reader is
    still printed escaped when it holds other non-printables (defence in depth)."""
    from spqr_format.cli import safe_text

    assert safe_text("a\u202eb\x85c\u2028d\u200be") == "a\\u202eb\\x85c\\u2028d\\u200be"
    path = tmp_path / "n.spqr"
    api.save(path, {"zero\u200bwidth": np.ones(2, np.float32)})
    result = run("info", path)
    assert_clean_error(result, 0)
    assert "zero\\u200bwidth" in result.output and "\u200b" not in result.output
    with pytest.raises(SpqrError) as err:
        api.save(tmp_path / "bidi.spqr", {"x\u202eevil": np.ones(2, np.float32)})
    assert err.value.code == "E_BAD_INPUT" and not (tmp_path / "bidi.spqr").exists()


# --- 7. FIFOs as input or --hessians -----------------------------------------------------------


@pytest.fixture
def small_st(tmp_path) -> pathlib.Path:
    src = tmp_path / "in.safetensors"
    w = np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32)
    write_safetensors(src, {"a.weight": ("float32", w)})
    return src


@pytest.mark.parametrize("where", ["input", "hessians", "calibrate"])
def test_fifo_inputs_are_refused_not_waited_on(tmp_path, small_st, where):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out.spqr"
    if where == "input":
        result = run("encode", fifo, "-o", out, "-q")
    elif where == "hessians":
        result = run("encode", small_st, "--hessians", fifo, "-o", out, "-q")
    else:
        result = run("calibrate", fifo, "-o", tmp_path / "H.safetensors")
    assert_clean_error(result, 2, "E_IO")
    assert "not a regular file" in result.output and not out.exists()


# --- 8. outputs that would replace an input ----------------------------------------------------


def _same_file_cases(tmp_path, src: pathlib.Path) -> dict[str, pathlib.Path]:
    import os

    (tmp_path / "x").mkdir()
    os.symlink(src, tmp_path / "link.safetensors")
    os.link(src, tmp_path / "hard.safetensors")
    return {
        "plain": src,
        "dotdot": tmp_path / "x" / ".." / src.name,
        "symlink": tmp_path / "link.safetensors",
        "hardlink": tmp_path / "hard.safetensors",
    }


@pytest.mark.parametrize("how", ["plain", "dotdot", "symlink", "hardlink"])
def test_encode_refuses_to_overwrite_its_input_or_hessians(tmp_path, small_st, how):
    before = small_st.read_bytes()
    target = _same_file_cases(tmp_path, small_st)[how]
    assert_clean_error(run("encode", small_st, "-o", target, "-q"), 2, "same file")
    h = tmp_path / "H.safetensors"
    assert_clean_error(run("calibrate", small_st, "-o", h), 0)
    h_before = h.read_bytes()
    assert_clean_error(run("encode", small_st, "--hessians", h, "-o", h, "-q"), 2, "same file")
    assert_clean_error(
        run("encode", small_st, "-o", tmp_path / "o.spqr", "--report", target, "-q"),
        2,
        "same file",
    )
    assert small_st.read_bytes() == before and h.read_bytes() == h_before
    assert not (tmp_path / "o.spqr").exists()
    # calibrate reading the file it would write
    assert_clean_error(run("calibrate", small_st, "-o", target), 2, "same file")
    assert small_st.read_bytes() == before


@pytest.mark.parametrize("how", ["plain", "dotdot", "symlink", "hardlink"])
def test_decode_refuses_to_overwrite_its_input(tmp_path, sample, how):
    import os
    import shutil

    src = tmp_path / "f.spqr"
    shutil.copy(sample, src)
    before = src.read_bytes()
    (tmp_path / "x").mkdir()
    target = {
        "plain": src,
        "dotdot": tmp_path / "x" / ".." / "f.spqr",
        "symlink": tmp_path / "l.spqr",
        "hardlink": tmp_path / "h.spqr",
    }[how]
    if how == "symlink":
        os.symlink(src, target)
    if how == "hardlink":
        os.link(src, target)
    assert_clean_error(run("decode", src, "-o", target), 2, "same file")
    assert src.read_bytes() == before


# --- 10. settings are validated before any work ------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--outlier-threshold", "inf", "--method", "gptq"], "--outlier-threshold"),
        (["--outlier-threshold", "nan", "--method", "gptq"], "--outlier-threshold"),
        (["--outlier-threshold", "-1"], "--outlier-threshold"),
        (["--outlier-fraction", "nan"], "--outlier-fraction"),
        (["--outlier-fraction", "inf"], "--outlier-fraction"),
        (["--percdamp", "inf"], "--percdamp"),
        (["--percdamp", "nan"], "--percdamp"),
    ],
)
def test_bad_settings_are_refused_before_encoding(tmp_path, small_st, monkeypatch, args, needle):
    import spqr_format.codec.presets as presets

    def never(*a, **k):  # the encode must not start
        raise AssertionError("encode_tensor was called")

    monkeypatch.setattr(presets, "encode_tensor", never)
    out = tmp_path / "o.spqr"
    result = run("encode", small_st, "-o", out, "-q", *args)
    assert_clean_error(result, 2, needle)
    assert not out.exists()


# --- 11. numba's cache stays out of the package ------------------------------------------------


def test_numba_cache_goes_to_the_user_cache_dir(tmp_path):
    import os
    import subprocess
    import sys

    import spqr_format

    pkg = pathlib.Path(spqr_format.__file__).parent

    def in_package() -> set:
        return {(p, p.stat().st_mtime_ns) for p in pkg.rglob("*.nb[ic]")}

    before = in_package()
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    code = (
        "import os, numpy as np, spqr_format\n"
        "from spqr_format.codec.rtn import encode_rtn\n"
        "from spqr_format.codec.packing import pack\n"
        "from spqr_format.codec import reference\n"
        "print(os.environ['NUMBA_CACHE_DIR'])\n"
        "t = encode_rtn(np.ones((4, 16), np.float32), bits=3, group_size=16)\n"
        "reference.decode_bilevel(pack(t))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cache = tmp_path / "xdg" / "spqr-format" / "numba"
    assert proc.stdout.strip() == str(cache)
    assert list(cache.rglob("*.nbi")), "numba wrote no index into the cache dir"
    assert in_package() == before, "numba wrote cache files inside the package"
    # A user's own choice wins.
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")
    proc = subprocess.run(
        [sys.executable, "-c", "import os, spqr_format; print(os.environ['NUMBA_CACHE_DIR'])"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.stdout.strip() == str(tmp_path / "mine")


# --- 14. stale temporary files of killed writers -----------------------------------------------


def test_stale_temp_files_of_dead_writers_are_cleaned(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    import time

    from spqr_format import atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = atomic._host_tag()
    old = time.time() - 2 * atomic.STALE_AFTER_S
    target = tmp_path / "m.spqr"

    serial = iter(range(100))

    def temp(name, pid, kind="tmp", host=host, age=old):
        p = tmp_path / f".{name}.{kind}-{pid}-{host}-{next(serial):016x}"
        p.write_bytes(b"partial")
        os.utime(p, (age, age))
        return p

    stale = temp("m.spqr", dead.pid)
    stale_spool = temp("m.spqr", dead.pid, kind="spool")
    keep = [
        temp("m.spqr", os.getpid()),  # its writer is alive
        temp("m.spqr", dead.pid, age=time.time()),  # too recent to judge
        temp("m.spqr", dead.pid, host="0" * 8),  # another machine's
        temp("other.spqr", dead.pid),  # another destination's
    ]
    legacy = tmp_path / ".m.spqr.tmp-0123456789abcdef"  # old format, no owner: kept
    legacy.write_bytes(b"x")
    api.save(target, {"w": np.ones(2, np.float32)})
    assert not stale.exists() and not stale_spool.exists()
    assert all(p.exists() for p in keep) and legacy.exists()
    assert target.exists()


def test_killed_writer_leaves_a_temp_that_the_next_write_removes(tmp_path):
    """SIGKILL mid-write, then the next write of the same file cleans up (age forced)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from spqr_format import atomic

    target = tmp_path / "k.spqr"
    code = (
        "import sys, time, numpy as np\n"
        "from spqr_format.api import SpqrWriter\n"
        f"w = SpqrWriter({str(target)!r})\n"
        "w.add('a', np.ones(4, np.float32))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".k.spqr.")]
    assert left, "the killed writer left no temporary file (nothing to test)"
    for p in left:
        old = time.time() - 2 * atomic.STALE_AFTER_S
        os.utime(p, (old, old))
    api.save(target, {"w": np.ones(2, np.float32)})
    assert not any(p.exists() for p in left)
    assert [p.name for p in tmp_path.iterdir()] == ["k.spqr"]
