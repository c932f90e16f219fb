"""`spqr bench --device gpu` (needs CuPy and a CUDA device; skipped otherwise)."""

from __future__ import annotations

import json

import pytest
from gpu_env import cupy_or_skip

cp = cupy_or_skip()

from click.testing import CliRunner  # noqa: E402

from spqr_format.api import save  # noqa: E402
from spqr_format.cli import main  # noqa: E402
from spqr_format.gpu.synth import random_packed  # noqa: E402

pytestmark = pytest.mark.gpu


def test_bench_gpu_times_dequantize_and_each_batch(tmp_path):
    path = tmp_path / "w.spqr"
    save(path, {"a.weight": random_packed(256, 1024, seed=1), "b.weight": random_packed(64, 512)})
    result = CliRunner().invoke(
        main, ["bench", str(path), "--device", "gpu", "--batch", "1", "--batch", "9", "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["results"]
    for name in ("a.weight", "b.weight"):
        mine = {(r["op"], r["batch"]): r for r in rows if r["tensor"] == name}
        assert set(mine) == {("dequantize-f16", None), ("matmul", 1), ("matmul", 9)}
        for r in mine.values():
            assert r["device"] == "gpu" and r["seconds"] > 0 and r["gbs"] > 0
        assert mine[("matmul", 9)]["speedup"] > 0
