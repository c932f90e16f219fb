"""The prologue the GPU test modules share: CuPy with a CUDA device, or skip the module."""

from __future__ import annotations

import pytest


def cupy_or_skip():
    """The ``cupy`` module when it imports and sees a CUDA device; else skips the calling
    test module (call it at import time)."""
    cp = pytest.importorskip("cupy")
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception:  # pragma: no cover - no driver
        count = 0
    if count < 1:
        pytest.skip("no CUDA device", allow_module_level=True)
    return cp
