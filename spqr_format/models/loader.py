"""Rebuild a Hugging Face model from a ``.spqr`` file written by :func:`quantize_model`.

The file alone is enough: its metadata holds the model config and architecture
(``model.config``, ``model.architecture``), its tensors every weight. On CPU the bilevel
weights are dequantized (exactly as the reference decoder does, in each tensor's own dtype);
on a CUDA device the linear layers become :class:`spqr_format.gpu.nn.SpQRLinear` modules that
run the fused kernels on the compressed weights (needs CuPy; the rest of the model is moved
to the GPU in float16).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from spqr_format import api
from spqr_format.errors import BadInputError
from spqr_format.models import hf
from spqr_format.models._deps import require_torch, require_transformers
from spqr_format.spec import DType


def _to_torch(torch, arr: np.ndarray, dtype: DType):
    if dtype == DType.BFLOAT16:
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(arr, copy=True))


def build_config(meta: dict, path: str):
    transformers = require_transformers()
    cfg = meta.get("model.config")
    arch = meta.get("model.architecture")
    if not isinstance(cfg, dict) or not isinstance(arch, str):
        raise BadInputError(
            "not a whole-model file: no model.config / model.architecture metadata "
            "(files from `spqr quantize-model` have them)",
            path=path,
        )
    cfg = dict(cfg)
    model_type = cfg.pop("model_type", None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError, TypeError) as err:
        raise BadInputError(f"cannot rebuild the model config: {err}", path=path) from None
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise BadInputError(
            f"architecture {arch!r} is not in this transformers ({transformers.__version__})",
            path=path,
        )
    return config, cls


def load_model(
    path: str | os.PathLike[str],
    model_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
):
    """The model stored in ``path`` (a file from ``spqr quantize-model``), in eval mode.

    ``model_dir`` (optional) is the original model directory: its tokenizer files are
    checked against the sha256 recorded in the file (a mismatch warns). ``device``: ``cpu``
    (dequantized weights, the checkpoint's dtype) or ``cuda[:N]`` (SpQRLinear layers).
    """
    torch = require_torch()
    path = os.fspath(path)
    if not (device == "cpu" or str(device).startswith("cuda")):
        raise BadInputError(f"unknown device {device!r} (expected cpu or cuda)", field="device")
    if str(device).startswith("cuda"):
        _check_cuda(torch)
    with api.open_file(path) as f:
        meta = f.metadata
        config, cls = build_config(meta, path)
        if model_dir is not None:
            _check_tokenizer(meta, os.fspath(model_dir))
        transposed = set(meta.get("model.transposed") or [])
        skipped = set(meta.get("model.skipped") or [])
        state = {}
        for name in f.names():
            info = f.info(name)
            own = DType(f.entry(name).dtype)
            arr = f.decode(name)
            t = _to_torch(torch, arr, own)
            if name in transposed:
                if info.encoding not in ("bilevel", "channel_mixed") or t.ndim != 2:
                    raise BadInputError("model.transposed names a tensor that is not a "
                                        "quantized 2-D weight", path=path, tensor=name)  # fmt: skip
                t = t.t().contiguous()
            state[name] = t
    _stack_experts(torch, state, meta.get("model.stacked") or {}, path)
    for dup, first in (meta.get("model.tied") or {}).items():
        if first in state and dup not in state:
            state[dup] = state[first]  # tied weights share one tensor again
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls._from_config(config, attn_implementation="eager")
    model.eval()
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise BadInputError(
            f"tensor {result.unexpected_keys[0]!r} has no place in {cls.__name__}", path=path
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    loaded = {t.data_ptr() for t in state.values() if t.numel()}
    full = model.state_dict()
    for key in result.missing_keys:
        t = full[key]
        if key in skipped or (t.numel() and t.data_ptr() in loaded):
            continue
        if not t.is_floating_point():
            continue  # integer buffers (position ids) come from the config
        raise BadInputError(f"the file has no tensor {key!r} that {cls.__name__} needs",
                            path=path)  # fmt: skip
    if str(device).startswith("cuda"):
        model = _to_gpu(torch, model, path, device, transposed)
    return model


def _stack_experts(torch, state: dict, stacked: dict, path: str) -> None:
    """Stacked experts (``model.stacked``: ``{parameter: E}``) are stored as one 2-D tensor
    per expert, ``<parameter>[e]``: put them back into the ``[E, ...]`` parameter."""
    for name, count in stacked.items():
        parts = [f"{name}[{e}]" for e in range(count)] if isinstance(count, int) else []
        missing = [p for p in parts if p not in state]
        if not parts or missing or name in state:
            raise BadInputError(f"model.stacked: {name!r} does not name {count!r} expert "
                                "tensors of the file", path=path)  # fmt: skip
        state[name] = torch.stack([state.pop(p) for p in parts])


def _check_tokenizer(meta: dict, model_dir: str) -> None:
    recorded = meta.get("model.tokenizer_sha256") or {}
    found = hf.tokenizer_hashes(model_dir)
    diff = sorted(k for k in recorded if found.get(k) != recorded[k])
    if diff:
        warnings.warn(
            f"{model_dir}: tokenizer files differ from those the model was quantized with: "
            f"{', '.join(diff)}",
            RuntimeWarning,
            stacklevel=3,
        )


def _check_cuda(torch) -> None:
    if not torch.cuda.is_available():
        raise BadInputError("device cuda: torch sees no CUDA device", field="device")
    try:
        import cupy  # noqa: F401
    except ImportError:
        raise BadInputError(
            "device cuda: the SpQRLinear kernels need CuPy (pip install 'spqr-format[gpu]')",
            field="device",
        ) from None


def _to_gpu(torch, model, path: str, device: str, transposed: set[str]):  # pragma: no cover
    """Conv1D layers become nn.Linear (their file weights are already [out, in]), the model
    moves to ``device`` in float16 (bf16 checkpoints stay bf16), and every linear layer with a
    bilevel tensor becomes an SpQRLinear."""
    from spqr_format.gpu.nn import replace_linear

    for name in transposed:
        mod_name = name.removesuffix(".weight")
        conv = model.get_submodule(mod_name)
        if isinstance(conv, torch.nn.Linear):
            continue
        n_in, n_out = conv.weight.shape
        lin = torch.nn.Linear(n_in, n_out, bias=conv.bias is not None)
        with torch.no_grad():
            lin.weight = torch.nn.Parameter(conv.weight.t().contiguous(), requires_grad=False)
            if conv.bias is not None:
                lin.bias = torch.nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        parent_name, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16):
        dtype = torch.float16
    model.to(device=device, dtype=dtype)
    replace_linear(model, path)
    return model
