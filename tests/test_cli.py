"""The `spqr` command line, end to end, through click's runner."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from spqr_format import api
from spqr_format.cli import main
from spqr_format.safetensors_io import SafetensorsFile, write_safetensors

SAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "tiny-llama.safetensors"
SPQR3 = ["--bits", "3", "--group-size", "16", "--stats-bits", "3", "--stats-group-size", "16"]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("cli") / "tiny.spqr"
    result = CliRunner().invoke(
        main, ["encode", str(SAMPLE), "-o", str(out), *SPQR3, "--outlier-fraction", "0.01"]
    )
    assert result.exit_code == 0, result.output
    return out


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_encode_quantizes_linear_weights_and_keeps_the_rest_dense(encoded):
    with api.open_file(encoded) as f, SafetensorsFile(SAMPLE) as src:
        assert f.names() == src.names()
        infos = {i.name: i for i in f.infos()}
    q = infos["model.layers.0.mlp.down_proj.weight"]
    assert q.encoding == "bilevel" and q.params["bits"] == 3 and q.params["stats_bits"] == 3
    assert 0.005 < q.outlier_fraction < 0.015
    # SPEC section 8, written out for this 128 x 352 tensor (streams padded to whole words).
    m, n, groups, tiles = 128, 352, 22, 8
    bits = (
        32 * -(-m * n * 3 // 32)  # codes
        + 32 * -(-m * 2 * groups * 3 // 32)  # stats codes
        + 64 * tiles * groups  # stats2
        + 32 * q.params["outlier_entries"]
        + 32 * (-(-m // 16) + 1)  # outlier stream and its index
    )
    assert q.bits_per_weight == bits / (m * n)
    assert infos["model.embed_tokens.weight"].encoding == "raw"
    assert infos["model.norm.weight"].encoding == "raw"
    assert infos["model.norm.weight"].dtype == "float32"


def test_encode_is_deterministic(encoded, tmp_path):
    again = tmp_path / "again.spqr"
    result = run(
        "encode", str(SAMPLE), "-o", str(again), *SPQR3, "--outlier-fraction", "0.01", "-q"
    )
    assert result.exit_code == 0, result.output
    assert again.read_bytes() == encoded.read_bytes()


def test_info_table_and_json(encoded):
    result = run("info", str(encoded))
    assert result.exit_code == 0
    assert "model.layers.1.mlp.up_proj.weight" in result.output
    assert "bilevel w3 g16 s3x16" in result.output
    result = run("info", str(encoded), "--json", "--metadata")
    assert result.exit_code == 0
    doc = json.loads(result.output)
    assert doc["tensor_count"] == 21 and doc["version"] == "1.0"
    assert doc["metadata"]["encoder.method"] == "rtn"
    assert {t["name"] for t in doc["tensors"]} >= {"lm_head.weight"}


def test_closed_output_pipe_ends_quietly_with_141(encoded):
    # the reader closes the pipe before the command writes: its first write fails with EPIPE
    proc = subprocess.Popen(
        [sys.executable, "-c", "from spqr_format.cli import main; main()", "info", str(encoded)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_verify_passes_on_intact_file_and_fails_with_exit_1_on_damage(encoded, tmp_path):
    result = run("verify", str(encoded))
    assert result.exit_code == 0, result.output
    assert "21 of 21 tensors verified" in result.output
    damaged = tmp_path / "damaged.spqr"
    data = bytearray(encoded.read_bytes())
    data[-5] ^= 0x01  # inside the last section: a CRC failure, not a structural one
    damaged.write_bytes(bytes(data))
    result = run("verify", str(damaged))
    assert result.exit_code == 1, result.output
    assert "E_SECTION_CRC" in result.output


def test_decode_round_trips_raw_tensors_exactly_and_bilevel_close(encoded, tmp_path):
    out = tmp_path / "dense.safetensors"
    result = run("decode", str(encoded), "-o", str(out))
    assert result.exit_code == 0, result.output
    with SafetensorsFile(out) as dense, SafetensorsFile(SAMPLE) as src, api.open_file(encoded) as f:
        for name in src.names():
            a, b = dense.get(name), src.get(name)
            assert a.dtype == b.dtype and a.shape == b.shape
            if f.info(name).encoding == "raw":
                assert np.array_equal(a.data, b.data)
            else:
                assert np.array_equal(a.data, f.decode(name))
                rel = np.linalg.norm(a.to_float32() - b.to_float32()) / np.linalg.norm(
                    b.to_float32()
                )
                assert rel < 0.25


def test_decode_to_other_dtype_and_single_tensor(encoded, tmp_path):
    out = tmp_path / "one.safetensors"
    name = "model.layers.0.self_attn.q_proj.weight"
    result = run("decode", str(encoded), "-o", str(out), "--dtype", "float32", "--tensor", name)
    assert result.exit_code == 0, result.output
    with SafetensorsFile(out) as dense, api.open_file(encoded) as f:
        assert dense.names() == [name]
        assert np.array_equal(dense.get(name).data, f.decode(name, "float32"))


def test_bad_input_gives_one_line_error_and_exit_2(tmp_path):
    junk = tmp_path / "junk.spqr"
    junk.write_bytes(b"not a spqr file at all, just text" * 3)
    for cmd in ("info", "verify"):
        result = run(cmd, str(junk))
        assert result.exit_code == 2
        assert "E_BAD_MAGIC" in result.output and "Traceback" not in result.output
    result = run("info", str(tmp_path / "missing.spqr"))
    assert result.exit_code == 2 and "E_IO" in result.output


def test_decode_unknown_tensor_writes_nothing(encoded, tmp_path):
    out = tmp_path / "x.safetensors"
    result = run("decode", str(encoded), "-o", str(out), "--tensor", "nope")
    assert result.exit_code == 2 and "E_NOT_FOUND" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_encode_rejects_nan_weights_and_leaves_no_output(tmp_path):
    src = tmp_path / "nan.safetensors"
    w = np.ones((8, 32), np.float32)
    w[3, 5] = np.nan
    write_safetensors(src, {"layer.weight": ("float32", w)})
    out = tmp_path / "out.spqr"
    result = run("encode", str(src), "-o", str(out), *SPQR3)
    assert result.exit_code == 2, result.output
    assert "layer.weight" in result.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]


def test_encode_does_not_touch_existing_output_on_failure(tmp_path, encoded):
    out = tmp_path / "keep.spqr"
    shutil.copy(encoded, out)
    before = out.read_bytes()
    src = tmp_path / "bad.safetensors"
    src.write_bytes(b"\xff" * 16)
    result = run("encode", str(src), "-o", str(out), *SPQR3)
    assert result.exit_code == 2
    assert out.read_bytes() == before


def test_usage_errors_exit_2():
    assert run("encode").exit_code == 2
    assert run("info", "--bogus").exit_code == 2
    assert run("--help").exit_code == 0


def _sparse_multi_gib_file(path: pathlib.Path, tensors: int = 20) -> int:
    """A valid header for ``tensors`` 8-bit 28672 x 8192 bilevel tensors (4.7 GB of sections),
    written as a sparse file: no section byte is ever written."""
    from spqr_format import spec
    from spqr_format.codec.bilevel import BilevelHeader, BilevelParams, section_layout
    from spqr_format.container import layout

    m, n = 28672, 8192
    header = BilevelHeader(BilevelParams(8, 16, 3, 16), False, False, 0, 0)
    sections = section_layout((m, n), header)
    names = [f"model.layers.{i}.mlp.down_proj.weight".encode() for i in range(tensors)]
    hlen = 64 + 160 * tensors + 32 * tensors * len(sections) + sum(map(len, names))
    offset = data_offset = spec.align_up(hlen, 64)
    trecs, srecs, name_off = b"", b"", 0
    for i, name in enumerate(names):
        trecs += layout.pack_tensor_record(
            name_offset=name_off,
            name_length=len(name),
            encoding=2,
            encoding_version=1,
            dtype=2,
            shape=(m, n),
            first_section=i * len(sections),
            section_count=len(sections),
            digest=bytes(32),
            params=header.to_bytes(),
        )
        name_off += len(name)
        for role, length in sections:
            offset = spec.align_up(offset, 64)
            srecs += layout.pack_section_record(offset=offset, length=length, crc32=0, role=role)
            offset += length
    fixed = layout.FixedHeader(
        spec.MAGIC, 1, 0, 64, 0, tensors, tensors * len(sections), name_off, 0, data_offset, 0, 0
    )
    buf = bytearray(fixed.pack() + trecs + srecs + b"".join(names))
    crc = layout.header_crc(buf, hlen)
    buf[56:60] = crc.to_bytes(4, "little")
    with open(path, "wb") as f:
        f.write(bytes(buf) + bytes(data_offset - hlen))
        f.truncate(offset)
    return offset


def test_info_on_a_multi_gib_file_reads_only_the_header(tmp_path):
    import time

    path = tmp_path / "big.spqr"
    size = _sparse_multi_gib_file(path)
    assert size > 4 << 30
    start = time.perf_counter()
    result = run("info", str(path), "--json")
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["file_size"] == size and doc["tensor_count"] == 20
    assert abs(doc["bits_per_weight_quantized"] - (8 + 6 / 16 + 64 / 256)) < 1e-9
    assert elapsed < 1.0


def _activations(path: pathlib.Path, names_in: dict[str, int], tokens: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, n in names_in.items():
        x = rng.standard_normal((tokens, n)).astype(np.float32)
        x[:, :4] *= 8.0  # a few high-magnitude input features, as in real LLM activations
        tensors[name] = ("float32", x)
    write_safetensors(path, tensors)


def test_calibrate_then_spqr_preset_encodes_with_outliers_and_output_error(tmp_path):
    src = tmp_path / "model.safetensors"
    rng = np.random.default_rng(1)
    w1 = rng.standard_t(4, size=(64, 96)).astype(np.float32)
    w2 = rng.standard_t(4, size=(32, 64)).astype(np.float32)
    write_safetensors(src, {"a.weight": ("float16", w1.astype(np.float16)),
                            "b.weight": ("float32", w2)})  # fmt: skip
    _activations(tmp_path / "acts0.safetensors", {"a.weight": 96}, 200, 0)
    _activations(tmp_path / "acts1.safetensors", {"a.weight": 96}, 100, 1)
    hess = tmp_path / "H.safetensors"
    result = run("calibrate", str(tmp_path / "acts0.safetensors"),
                 str(tmp_path / "acts1.safetensors"), "-o", str(hess))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "a.weight: 96x96 from 300 tokens" in result.output
    out, report = tmp_path / "m.spqr", tmp_path / "r.json"
    result = run("encode", str(src), "-o", str(out), "--hessians", str(hess),
                 "--preset", "spqr-3bit", "--report", str(report))  # fmt: skip
    assert result.exit_code == 0, result.output
    # b.weight has no Hessian: RTN fallback, with a warning naming it
    assert "warning:" in result.output and "b.weight" in result.output
    doc = json.loads(report.read_text())
    rows = {r["name"]: r for r in doc["tensors"]}
    assert doc["settings"]["preset"] == "spqr-3bit"
    assert rows["a.weight"]["method"] == "gptq" and rows["a.weight"]["outliers"] > 0
    assert 0 < rows["a.weight"]["relative_output_error"] < 0.1
    assert rows["b.weight"]["fallback"] is True and rows["b.weight"]["method"] == "rtn"
    with api.open_file(out) as f:
        assert f.info("a.weight").params["permutation"]  # act_order
        assert f.metadata["encoder.preset"] == "spqr-3bit"
        f.verify("a.weight")
        f.verify("b.weight")


def test_preset_overrides_are_recorded(tmp_path):
    out = tmp_path / "o.spqr"
    result = run("encode", str(SAMPLE), "-o", str(out), "--preset", "rtn-4bit-g128",
                 "--group-size", "64", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    with api.open_file(out) as f:
        settings = f.metadata["encoder.settings"]
        assert settings["preset"] == "rtn-4bit-g128" and settings["group_size"] == 64
        p = f.info("model.layers.0.mlp.up_proj.weight").params
        assert (p["bits"], p["group_size"], p["stats_bits"]) == (4, 64, 0)


def test_hessian_shape_mismatch_names_the_tensor(tmp_path):
    src = tmp_path / "model.safetensors"
    write_safetensors(src, {"a.weight": ("float32", np.ones((8, 32), np.float32))})
    _activations(tmp_path / "acts.safetensors", {"a.weight": 16}, 50, 0)
    hess = tmp_path / "H.safetensors"
    assert run("calibrate", str(tmp_path / "acts.safetensors"), "-o", str(hess)).exit_code == 0
    out = tmp_path / "m.spqr"
    result = run("encode", str(src), "-o", str(out), "--hessians", str(hess), "--preset",
                 "gptq-4bit-g128")  # fmt: skip
    assert result.exit_code == 2 and "a.weight" in result.output
    assert not out.exists()


def test_spqr_preset_encode_is_byte_identical_across_runs(tmp_path):
    src = tmp_path / "model.safetensors"
    w = np.random.default_rng(3).standard_t(4, size=(48, 80)).astype(np.float16)
    write_safetensors(src, {"a.weight": ("float16", w)})
    _activations(tmp_path / "acts.safetensors", {"a.weight": 80}, 120, 0)
    hess = tmp_path / "H.safetensors"
    assert run("calibrate", str(tmp_path / "acts.safetensors"), "-o", str(hess)).exit_code == 0
    outs = []
    for i in range(2):
        out = tmp_path / f"m{i}.spqr"
        args = ["encode", str(src), "-o", str(out), "--hessians", str(hess), "--preset",
                "spqr-3bit", "-q"]  # fmt: skip
        assert run(*args).exit_code == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_method_gptq_without_preset_uses_gptq_damping(tmp_path):
    src = tmp_path / "model.safetensors"
    w = np.random.default_rng(4).standard_normal((16, 64)).astype(np.float32)
    write_safetensors(src, {"a.weight": ("float32", w)})
    _activations(tmp_path / "acts.safetensors", {"a.weight": 64}, 100, 0)
    hess = tmp_path / "H.safetensors"
    assert run("calibrate", str(tmp_path / "acts.safetensors"), "-o", str(hess)).exit_code == 0
    out = tmp_path / "m.spqr"
    result = run(
        "encode", str(src), "-o", str(out), "--hessians", str(hess), "--method", "gptq", "-q"
    )
    assert result.exit_code == 0, result.output
    with api.open_file(out) as f:
        settings = f.metadata["encoder.settings"]
    assert settings["method"] == "gptq" and settings["percdamp"] == 0.01
    assert f.metadata["encoder.report"][0]["relative_output_error"] is not None


def test_cli_preset_choices_are_the_encoder_presets():
    # Listed in cli.py rather than imported, to keep the encoder out of `spqr info`'s start-up.
    from spqr_format.cli import PRESET_NAMES
    from spqr_format.codec.presets import PRESETS

    assert PRESET_NAMES == tuple(PRESETS)


def _has_gpu() -> bool:
    try:
        import cupy as cp

        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def test_bench_times_every_bilevel_tensor(encoded):
    result = run("bench", str(encoded), "--repeat", "2", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    with api.open_file(encoded) as f:
        bilevel = {i.name for i in f.infos() if i.encoding == "bilevel"}
    assert {r["tensor"] for r in doc["results"]} == bilevel
    for r in doc["results"]:
        assert r["device"] == "cpu" and r["op"] in ("dequantize-f16", "matvec")
        assert r["seconds"] > 0 and r["gbs"] > 0 and r["bytes"] > 0
    name = "model.layers.0.mlp.down_proj.weight"
    table = run("bench", str(encoded), "--tensor", name, "--repeat", "1")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["tensor", "shape", "device", "op", "batch", "us", "GB/s", "speedup"]
    assert len(lines) == 4 and all(line.startswith(name) for line in lines[2:])


def test_bench_bad_requests_exit_2(encoded, tmp_path):
    result = run("bench", str(encoded), "--tensor", "no.such.tensor")
    assert result.exit_code == 2 and "E_NOT_FOUND" in result.output
    result = run("bench", str(encoded), "--tensor", "model.norm.weight")
    assert result.exit_code == 2 and "stored raw" in result.output
    result = run("bench", str(tmp_path / "missing.spqr"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    if not _has_gpu():
        result = run("bench", str(encoded), "--device", "gpu")
        assert result.exit_code == 2 and "needs CuPy and a CUDA device" in result.output


def test_encode_is_the_library_loop_byte_for_byte(encoded, tmp_path):
    # `spqr encode` is a thin layer over spqr_format.models.tensors.encode_safetensors
    from spqr_format.codec.presets import get_preset
    from spqr_format.models.tensors import encode_safetensors

    config = get_preset("rtn-3bit-g16-bilevel", outlier_budget=0.01)
    out = tmp_path / "api.spqr"
    result = encode_safetensors(str(SAMPLE), str(out), config)
    assert out.read_bytes() == encoded.read_bytes()
    with api.open_file(out) as f:
        assert [r["name"] for r in result.rows] == f.names()
    assert result.metadata["encoder.report"] == result.rows


def test_report_gives_file_sizes_and_recorded_errors(encoded):
    result = CliRunner().invoke(main, ["report", str(encoded), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    with api.open_file(encoded) as f:
        infos = {i.name: i for i in f.infos()}
        recorded = {r["name"]: r for r in f.metadata["encoder.report"]}
    assert [t["name"] for t in doc["tensors"]] == list(infos)
    for t in doc["tensors"]:
        assert t["bits_per_weight"] == infos[t["name"]].bits_per_weight
        assert t["relative_weight_error"] == recorded[t["name"]]["relative_weight_error"]
    assert doc["quantized_tensors"] == sum(i.encoding == "bilevel" for i in infos.values())
    table = CliRunner().invoke(main, ["report", str(encoded)])
    assert table.exit_code == 0 and "bits/weight quantized" in table.output


def test_report_plot_needs_matplotlib_and_says_so(encoded, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if absent
    out = tmp_path / "r.png"
    result = CliRunner().invoke(main, ["report", str(encoded), "--plot", str(out)])
    assert result.exit_code == 2 and "matplotlib" in result.output and not out.exists()


def test_report_plot_writes_a_png(encoded, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.png"
    result = CliRunner().invoke(main, ["report", str(encoded), "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
