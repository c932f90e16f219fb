"""SPEC.md section 11 is exactly what the reference implementation writes and decodes."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def test_spec_worked_example_matches_reference_output():
    out = subprocess.run(
        [sys.executable, str(ROOT / "conformance" / "worked_example.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spec = (ROOT / "SPEC.md").read_text(encoding="utf-8")
    assert "## 11. Worked example\n\n" + out in spec
