"""spqr-format: the .spqr file format for sparse-quantized LLM weights.

SPEC.md (in the source tree) is the normative format specification. Main entry points:

- :func:`open` / :class:`SpqrFile`: read, decode and verify a .spqr file;
- :func:`save` / :class:`SpqrWriter`: write one atomically;
- :mod:`spqr_format.codec`: encoders and the numba reference decoder;
- :mod:`spqr_format.gpu`: CUDA kernels (optional, needs CuPy).

Names are imported lazily, so ``import spqr_format`` is cheap and `spqr info` starts fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "RawTensor": "spqr_format.api",
    "SpqrFile": "spqr_format.api",
    "SpqrWriter": "spqr_format.api",
    "TensorInfo": "spqr_format.api",
    "open_file": "spqr_format.api",
    "save": "spqr_format.api",
    "BilevelParams": "spqr_format.codec.bilevel",
    "BilevelTensor": "spqr_format.codec.bilevel",
    "Outliers": "spqr_format.codec.bilevel",
    "PackedBilevel": "spqr_format.codec.bilevel",
    "DType": "spqr_format.spec",
    "Encoding": "spqr_format.spec",
}

__all__ = sorted([*_EXPORTS, "open"])


def __getattr__(name: str):
    if name == "open":  # spqr_format.open(path), as safetensors.safe_open
        name = "open_file"
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spqr_format' has no attribute {name!r}")
