"""The conformance suite (conformance/, issue 16 section 2): the vectors rebuild to the
committed hashes, the reference decoder passes every fast vector, the external-decoder protocol
works end to end with our own decoder, and every MUST clause of SPEC.md has a vector."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from spqr_format.cli import main
from spqr_format.conformance import backends, generate, manifest, runner, stfile

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conformance"
pytestmark = pytest.mark.skipif(
    not (CONF / "manifest.json").exists(),
    reason="conformance/manifest.json not generated (spqr conformance generate)",
)
DECODE_CLI = f"{sys.executable} -m spqr_format.conformance.decode_cli"


@pytest.fixture(scope="module")
def doc():
    return manifest.load(CONF)


def must_clauses(spec_text: str) -> dict[str, str]:
    """Clause id -> text, for every ``- **C-x.y**`` item of SPEC.md whose text says MUST."""
    clauses: dict[str, str] = {}
    cur = None
    for line in spec_text.splitlines():
        m = re.match(r"\s*-\s+\*\*(C-\d+\.\d+[a-z]?)\*\*", line)
        if m:
            cur = m.group(1)
            clauses[cur] = line
            continue
        if cur is not None and (not line.strip() or not line.startswith("  ")):
            cur = None
        if cur is not None:
            clauses[cur] += " " + line.strip()
    return {c: t for c, t in clauses.items() if re.search(r"\bMUST\b", t)}


def test_manifest_files_match_hashes(doc):
    problems = []
    for v in doc["vectors"]:
        if v["suite"] == "fast":
            problems += manifest.check_files(CONF / "vectors" / v["id"], v)
    assert not problems, problems[:10]
    # the committed vectors stay small (issue 16: < 20 MB in all)
    size = sum(
        f["bytes"] for v in doc["vectors"] if v["suite"] == "fast" for f in v["files"].values()
    )
    assert size < 20e6
    listed = {v["id"] for v in doc["vectors"] if v["suite"] == "fast"}
    on_disk = {p.name for p in (CONF / "vectors").iterdir() if p.is_dir()}
    assert on_disk == listed


def test_fast_suite_rebuilds_to_committed_hashes():
    assert generate.check(CONF, suite="fast") == []


def test_reference_decoder_passes_every_fast_vector(doc):
    res = runner.run(backends.ReferenceDecoder(), CONF, suite="fast")
    failed = [(c["id"], c.get("problems")) for c in res["cases"] if c["status"] != "pass"]
    assert not failed, failed[:10]
    assert res["summary"]["passed"] == sum(v["suite"] == "fast" for v in doc["vectors"])


def test_independent_numpy_decoder_passes_every_fast_vector(doc):
    # conformance/numpy_decoder.py: written from SPEC.md alone (imports nothing of
    # spqr_format), checked against the same vectors, as gguf-py is checked against ggml
    res = runner.run(backends.load_backend("numpy"), CONF, suite="fast")
    failed = [(c["id"], c.get("problems")) for c in res["cases"] if c["status"] != "pass"]
    assert not failed, failed[:10]
    assert res["summary"]["passed"] == sum(v["suite"] == "fast" for v in doc["vectors"])
    src = (CONF / "numpy_decoder.py").read_text(encoding="utf-8")
    assert not re.search(r"^\s*(from|import)\s+spqr_format", src, re.M)


def test_every_must_clause_has_a_vector(doc):
    must = must_clauses((ROOT / "SPEC.md").read_text(encoding="utf-8"))
    assert len(must) >= 10  # the parser found the clauses
    covered = {c for v in doc["vectors"] for c in v["clauses"]}
    untestable = {u["clause"] for u in doc["untestable"]}
    assert all(u.get("reason") for u in doc["untestable"])
    missing = sorted(set(must) - covered - untestable)
    assert not missing, f"MUST clauses without a vector: {missing}"


def test_every_file_error_code_has_reject_vectors(doc):
    codes = {}
    for v in doc["vectors"]:
        if v["kind"] == "reject":
            codes[v["error"]] = codes.get(v["error"], 0) + 1
    file_codes = set(manifest.ERROR_CODES) - {"E_IO"}
    assert set(codes) == file_codes
    assert min(codes.values()) >= 3


def test_external_decoder_protocol_end_to_end():
    dec = backends.ExternalDecoder(
        f"{DECODE_CLI} {{input}} {{output}}", f"{DECODE_CLI} --matvec {{x}} {{input}} {{output}}"
    )
    only = [
        "raw-bfloat16",
        "bilevel-permutations",
        "reject-bad-outliers-delta-zero",
        "reject-bad-magic-gguf",
        "matvec-spqr-3bit",
    ]
    res = runner.run(dec, CONF, only=only)
    assert {c["id"]: c["status"] for c in res["cases"]} == dict.fromkeys(only, "pass")
    mv = next(c for c in res["cases"] if c["kind"] == "matvec")
    assert 0 <= mv["max_error_over_tolerance"] <= 1


def test_protocol_failures_are_judged():
    # exits non-zero without a code: refused, but no code -> reject vectors fail
    quiet = backends.ExternalDecoder(
        f"{sys.executable} -c 'import sys; sys.exit(3)' {{input}} {{output}}"
    )
    res = runner.run(quiet, CONF, only=["reject-bad-magic-zeros", "raw-float32"])
    assert [c["status"] for c in res["cases"]] == ["fail", "fail"]
    assert runner.exit_status(res) == 2
    # prints the right code on stdout: accepted as the reported code
    shout = backends.ExternalDecoder(
        f"{sys.executable} -c 'import sys; print(\"nope E_BAD_MAGIC\"); sys.exit(1)' "
        "{input} {output}"
    )
    res = runner.run(shout, CONF, only=["reject-bad-magic-zeros", "reject-truncated-file-0-bytes"])
    status = {c["id"]: c["status"] for c in res["cases"]}
    assert status == {"reject-bad-magic-zeros": "pass", "reject-truncated-file-0-bytes": "fail"}
    # decode-only decoders skip matvec vectors
    res = runner.run(quiet, CONF, only=["matvec-bits"])
    assert res["cases"][0]["status"] == "skip"


class _IgnorePerm:
    """A wrong matvec (permutation ignored) and a kernel-like one (W and x rounded to f16)."""

    name = "test"

    def __init__(self, mode):
        self.mode = mode

    def decode(self, path):
        raise AssertionError

    def matvec(self, path, xs):
        from spqr_format import api

        out = {}
        with api.open_file(path) as f:
            for n, x in xs.items():
                w = f.decode(n, "float32").astype(np.float64)
                if self.mode == "ignore-perm":
                    w = f.decode(n, "float32")[:, np.argsort(np.asarray(f.read(n).perm))]
                    w = w.astype(np.float64)
                else:
                    w = f.decode(n, "float16").astype(np.float64)
                y = w @ x.astype(np.float16).astype(np.float64)
                out[n] = y.astype(np.float16) if self.mode == "f16" else y
        return out


def test_matvec_tolerance_admits_f16_kernels_and_catches_wrong_ones():
    good = runner.run(_IgnorePerm("f16"), CONF, kinds=["matvec"])
    assert good["summary"]["failed"] == 0, [c.get("problems") for c in good["cases"]]
    with_perm = [v for v in ("matvec-spqr-3bit", "matvec-gptq-4bit-g128", "matvec-wide")]
    bad = runner.run(_IgnorePerm("ignore-perm"), CONF, only=with_perm)
    assert bad["summary"]["failed"] == len(with_perm)


def test_stfile_round_trip_and_strictness(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = stfile.dumps({"a": ("F32", a), "b": ("BF16", np.array([0x3F80], np.uint16))})
    got = stfile.loads(raw)
    assert got["a"] == ("F32", (2, 3), a.tobytes())
    assert stfile.as_array(got["b"]).tolist() == [0x3F80]
    with pytest.raises(stfile.StFormatError):
        stfile.loads(raw[:-1])


def test_cli_run_exit_status_and_results(tmp_path):
    out = tmp_path / "r.json"
    r = CliRunner().invoke(
        main, ["conformance", "run", "--only", "raw-*", "--results", str(out), "-q"]
    )
    assert r.exit_code == 0, r.output
    assert "4 passed" in r.output and out.exists()
    # a decoder that refuses everything fails the 4 decode vectors: exit status 4
    r = CliRunner().invoke(
        main,
        [
            "conformance",
            "run",
            "--only",
            "raw-*",
            "--decoder",
            f"{sys.executable} -c 'print(\"E_BAD_MAGIC\"); exit(1)' {{input}} {{output}}",
            "-q",
        ],
    )
    assert r.exit_code == 4, r.output


def test_cli_gpu_backend_fails_cleanly_without_cupy():
    pytest.importorskip("spqr_format")
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed")
    except ImportError:
        pass
    r = CliRunner().invoke(main, ["conformance", "run", "--backend", "gpu"])
    assert r.exit_code == 2
    assert "CuPy" in r.output
