"""The README's Python example runs as written (GPU examples are skipped without CUDA)."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).parents[1]


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cpu_blocks = [b for b in python_blocks() if "cupy" not in b]
    assert cpu_blocks
    for block in cpu_blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "layer.spqr").exists()
    assert namespace["w16"].shape == (256, 512)
