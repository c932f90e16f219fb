"""Local Hugging Face model directories: checks, loading (never a hub download), hashes."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os

from spqr_format.errors import BadInputError, IoError
from spqr_format.models._deps import require_torch, require_transformers

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_model_dir(model_dir: str) -> list[str]:
    """Check that ``model_dir`` is a local HF model directory; return its safetensors files."""
    if not os.path.isdir(model_dir):
        raise IoError("model directory not found", path=model_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise BadInputError("no config.json in the model directory", path=model_dir)
    weights = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not weights:
        raise BadInputError(
            "no *.safetensors weights in the model directory (only safetensors is read)",
            path=model_dir,
        )
    return weights


def tokenizer_hashes(model_dir: str) -> dict[str, str]:
    """sha256 of each tokenizer file present in ``model_dir``."""
    out = {}
    for name in TOKENIZER_FILES:
        p = os.path.join(model_dir, name)
        if os.path.isfile(p):
            out[name] = sha256_file(p)
    return out


def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_config(model_dir: str):
    transformers = require_transformers()
    _offline()
    try:
        return transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInputError(f"cannot read config.json: {msg}", path=model_dir) from None


def model_class(config):
    """The transformers class named by ``config.architectures[0]`` (else ``AutoModel``)."""
    transformers = require_transformers()
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_hf_model(model_dir: str, *, dtype=None):
    """The model of ``model_dir`` in eval mode with eager attention, on CPU.

    ``dtype`` None keeps the checkpoint's dtype (``dtype="auto"``)."""
    torch = require_torch()
    check_model_dir(model_dir)
    config = load_config(model_dir)
    cls = model_class(config)
    _offline()
    try:
        require_transformers().utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover - older transformers
        pass
    try:
        model = cls.from_pretrained(
            model_dir,
            dtype="auto" if dtype is None else dtype,
            local_files_only=True,
            attn_implementation="eager",
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInputError(
            f"cannot load the model ({cls.__name__}): {msg}", path=model_dir
        ) from None
    model.eval()
    torch.set_grad_enabled(False)
    return model


def load_tokenizer(model_dir: str):
    """The tokenizer saved in ``model_dir`` (local files only)."""
    transformers = require_transformers()
    _offline()
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInputError(f"cannot load the tokenizer: {msg}", path=model_dir) from None


def config_json(config) -> dict:
    """The config as plain JSON (non-finite numbers as strings: .spqr metadata refuses them)."""
    d = json.loads(config.to_json_string(use_diff=False))

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return clean(d)
