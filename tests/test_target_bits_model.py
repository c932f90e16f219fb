"""``quantize_model(..., target_bits=)`` / ``spqr quantize-model --target-bits`` on a tiny llama
(tests/tiny_models.py); skipped without torch/transformers."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import tiny_models as tm  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from spqr_format import api  # noqa: E402
from spqr_format.cli import main  # noqa: E402
from spqr_format.models.pipeline import quantize_model  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("tb-model")
    text = tm.make_corpus()
    (d / "c.txt").write_text(text, encoding="utf-8")
    tm.build_model("llama", d / "m", text)
    yield d
    torch.set_num_threads(threads)


def test_quantize_model_meets_target_bits_and_records_the_allocation(setup):
    d = setup
    out = d / "o.spqr"
    res = quantize_model(d / "m", out, calib=str(d / "c.txt"), samples=4, seq_len=32,
                         target_bits=3.5)  # fmt: skip
    with api.open_file(out) as f:
        q = [i for i in f.infos() if i.encoding == "bilevel"]
        bpw = 8 * sum(i.nbytes for i in q) / sum(i.elements for i in q)
        alloc = f.metadata["encoder.allocation"]
        assert set(alloc["tensors"]) == {i.name for i in q}
    assert abs(bpw - 3.5) <= 0.01
    assert all(r.get("config") for r in res.reports if r["encoding"] == "bilevel")
    rep = CliRunner().invoke(main, ["report", str(out), "--json"])
    assert rep.exit_code == 0 and json.loads(rep.stdout)["allocation"]["target_bits"] == 3.5


def test_cli_unreachable_target_exits_2_before_work(setup, tmp_path):
    d = setup
    out = tmp_path / "o.spqr"
    r = CliRunner().invoke(main, ["quantize-model", str(d / "m"), "-o", str(out), "--calib",
                                  str(d / "c.txt"), "--samples", "4", "--seq-len", "32",
                                  "--target-bits", "1.5"])  # fmt: skip
    assert r.exit_code == 2, r.output
    assert "--target-bits 1.5 is below" in r.output and "embedding calibration" not in r.output
    assert not out.exists()
