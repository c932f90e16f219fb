"""Whole Hugging Face models: walk, calibrate and quantize block by block, load back, evaluate.

The "models" layer of the design: above codec/container/gpu, below the CLI. torch and
transformers are optional (``pip install 'spqr-format[models]'``) and imported only when a
function here is called, so ``import spqr_format.models`` is cheap and works without them.

- :func:`quantize_model`: a local HF model directory -> one ``.spqr`` file (sequential,
  GPTQ/SpQR-style calibration; :mod:`spqr_format.models.pipeline`);
- :func:`load_model`: the model back from the file (+ its config/tokenizer directory);
  :func:`load_model_tp`: the same sharded over torchrun ranks (tensor parallel);
- :func:`perplexity`: sliding-window perplexity of a causal LM on a text;
  :func:`evaluate_models`: the same for several models (directories, ``.spqr`` files) at once.
"""

from __future__ import annotations

import importlib

# Tensors ``spqr encode`` / :func:`~spqr_format.models.tensors.encode_safetensors` store raw by
# default (glob patterns of names): here so that the CLI can show it without importing more.
DEFAULT_KEEP_DENSE = ("*embed*", "*norm*", "*lm_head*")

_EXPORTS = {
    "quantize_model": "spqr_format.models.pipeline",
    "QuantizeResult": "spqr_format.models.pipeline",
    "load_model": "spqr_format.models.loader",
    "load_model_tp": "spqr_format.models.tp",
    "load_tokenizer": "spqr_format.models.hf",
    "perplexity": "spqr_format.models.evaluate",
    "evaluate_models": "spqr_format.models.evaluate",
    "find_blocks": "spqr_format.models.walker",
    "find_linears": "spqr_format.models.walker",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spqr_format.models' has no attribute {name!r}")
