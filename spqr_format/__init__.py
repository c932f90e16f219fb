"""spqr-format: the .spqr file format for sparse-quantized LLM weights.

SPEC.md (in the source tree) is the normative format specification. Main entry points:

- :func:`open` / :class:`SpqrFile`: read, decode and verify a .spqr file;
- :func:`save` / :class:`SpqrWriter`: write one atomically;
- :mod:`spqr_format.codec`: encoders and the numba reference decoder;
- :mod:`spqr_format.gpu`: CUDA kernels (optional, needs CuPy);
- :func:`quantize_model` / :func:`load_model`: whole Hugging Face models (optional extra
  ``models``: torch and transformers).

Names are imported lazily, so ``import spqr_format`` is cheap and `spqr info` starts fast.
"""

from __future__ import annotations

import importlib
import os
import tempfile

__version__ = "0.1.0"


def _numba_cache_dir() -> str | None:
    """Where numba's on-disk cache (``cache=True`` kernels) goes: never inside the installed
    package. Without this, numba writes ``__pycache__/*.nbi``/``*.nbc`` next to the modules;
    in site-packages those files outlive ``pip uninstall`` and turn ``spqr_format`` into a
    namespace package that shadows a later editable install.

    ``$XDG_CACHE_HOME/spqr-format/numba`` (default ``~/.cache/...``), else a per-user
    directory under the temp dir; None when neither is writable."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    uid = getattr(os, "getuid", lambda: "user")()
    for path in (
        os.path.join(base, "spqr-format", "numba"),
        os.path.join(tempfile.gettempdir(), f"spqr-format-numba-{uid}"),
    ):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError:
            continue
        if os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK):
            return path
    return None


# Before numba is imported (by the codec, lazily), and only when the user has not chosen.
if "NUMBA_CACHE_DIR" not in os.environ:
    _dir = _numba_cache_dir()
    if _dir is not None:
        os.environ["NUMBA_CACHE_DIR"] = _dir
    del _dir

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
    "ChannelMixedTensor": "spqr_format.codec.channel_mixed",
    "PackedChannelMixed": "spqr_format.codec.channel_mixed",
    "CmpqConfig": "spqr_format.codec.cmpq",
    "encode_cmpq": "spqr_format.codec.cmpq",
    "DType": "spqr_format.spec",
    "load_model": "spqr_format.models.loader",
    "quantize_model": "spqr_format.models.pipeline",
    "Encoding": "spqr_format.spec",
}

__all__ = sorted([*_EXPORTS, "open"])


def __getattr__(name: str):
    if name == "open":  # spqr_format.open(path), as safetensors.safe_open
        name = "open_file"
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spqr_format' has no attribute {name!r}")
