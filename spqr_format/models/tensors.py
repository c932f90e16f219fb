"""Encode the tensors of a safetensors file into one ``.spqr`` file: the loop behind
``spqr encode`` and :func:`encode_safetensors` (no torch needed).

Each tensor is stored ``raw`` when it is not 2-D or its name matches one of ``keep_dense``
(embeddings, norms and ``lm_head`` by default), else quantized with the encoder configuration
(:func:`spqr_format.codec.presets.encode_tensor`), with its Hessian when the Hessian file has
one of that name. Whole Hugging Face models, calibrated block by block, go through
:mod:`spqr_format.models.pipeline` instead; both write the same per-tensor report rows.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from spqr_format import __version__, api, spec
from spqr_format.codec.allocate import config_label
from spqr_format.codec.cmpq import CmpqConfig
from spqr_format.codec.presets import EncoderConfig, encode_tensor
from spqr_format.errors import BadInputError
from spqr_format.models import DEFAULT_KEEP_DENSE
from spqr_format.safetensors_io import SafetensorsFile


@dataclass
class EncodeResult:
    """What :func:`encode_safetensors` wrote: one report row per tensor (file order), the
    encoder's warnings (deduplicated), and the file's metadata."""

    rows: list[dict]
    notices: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def dense_row(name: str, shape, dtype: spec.DType) -> dict:
    """The report row of a tensor stored ``raw``."""
    return {
        "name": name,
        "encoding": "raw",
        "shape": list(shape),
        "bits_per_weight": float(8 * spec.DTYPE_SIZES[dtype]),
        "outliers": 0,
        "outlier_percent": 0.0,
        "relative_weight_error": 0.0,
        "relative_output_error": None,
    }


def encoder_metadata(config: EncoderConfig | CmpqConfig) -> dict:
    """The metadata keys every encoder run writes (SPEC C-2.11 namespaces ``provenance.`` and
    ``encoder.``): the tool, its version and the configuration."""
    return {
        "provenance.tool": "spqr-format",
        "provenance.tool_version": __version__,
        "encoder.method": config.method,
        "encoder.preset": config.preset,
        "encoder.settings": config.to_dict(),
    }


def _hessian_for(hessians: SafetensorsFile | None, name: str, path: str | None):
    """The Hessian of tensor ``name`` (read lazily from the mmap'd file) or None."""
    if hessians is None or name not in hessians.names():
        return None
    h = hessians.get(name)
    if h.dtype not in ("float32", "float64") or len(h.shape) != 2:
        raise BadInputError(
            f"Hessian must be a 2-D float32/float64 matrix, got {h.dtype}{list(h.shape)}",
            path=path,
            tensor=name,
        )
    return h.data


def allocation_metadata(alloc) -> dict:
    """Metadata keys of a ``--target-bits`` run: the allocation, and the encoder keys saying
    that no single preset was used."""
    return {
        "encoder.preset": f"target-bits {alloc.target_bits:g}",
        "encoder.settings": {"target_bits": alloc.target_bits, "allocator": "rate-distortion"},
        "encoder.allocation": alloc.to_metadata(),
    }


def _is_quantized(name: str, shape, patterns) -> bool:
    return len(shape) == 2 and not any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _allocate(src, hessians, input_path, hessian_path, patterns, target_bits, candidates):
    """Checks (target reachable, a Hessian per quantized tensor: before any encode), then the
    allocation of :mod:`spqr_format.codec.allocate`."""
    from spqr_format.codec import allocate

    cands = tuple(candidates or allocate.DEFAULT_CANDIDATES)
    names = [n for n in src.names() if _is_quantized(n, src.get(n).shape, patterns)]
    for n in names:
        if hessians is None or n not in hessians.names():
            raise BadInputError(
                "--target-bits needs a Hessian for every quantized tensor (the allocator "
                "measures output errors); "
                + ("no --hessians file given" if hessians is None else "none in the Hessian file"),
                path=hessian_path or input_path,
                tensor=n,
                field="hessians",
            )
        h = hessians.get(n)
        k = src.get(n).shape[1]
        if h.dtype not in ("float32", "float64"):
            raise BadInputError(
                f"Hessian must be float32/float64, got {h.dtype}", path=hessian_path, tensor=n
            )
        if src.get(n).dtype not in ("float32", "float16", "bfloat16"):
            raise BadInputError(
                f"dtype {src.get(n).dtype} cannot be quantized", path=input_path, tensor=n
            )
        if list(h.shape) != [k, k]:
            raise BadInputError(
                f"Hessian shape {list(h.shape)} does not match the tensor's {k} input columns",
                path=hessian_path,
                tensor=n,
            )
    target = allocate.check_target(target_bits, {n: tuple(src.get(n).shape) for n in names}, cands)

    def get(n):
        return src.get(n).to_float32(), _hessian_for(hessians, n, hessian_path)

    return allocate.plan(names, get, target, cands)


def encode_safetensors(
    input_path: str,
    output: str,
    config: EncoderConfig | CmpqConfig,
    *,
    hessian_path: str | None = None,
    keep_dense: Sequence[str] | None = None,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
    target_bits: float | None = None,
    candidates=None,
) -> EncodeResult:
    """Quantize the 2-D weights of the safetensors file ``input_path`` into ``output``
    (written atomically: nothing appears unless every tensor was encoded).

    ``keep_dense``: glob patterns of tensor names stored raw (default
    :data:`DEFAULT_KEEP_DENSE`). ``progress`` wraps the iteration over tensor names (a
    progress bar); the default iterates silently.

    ``target_bits``: instead of one ``config`` for all, allocate a configuration per tensor
    among ``candidates`` (default :data:`~spqr_format.codec.allocate.DEFAULT_CANDIDATES`) so
    that the quantized tensors take ``target_bits`` bits/weight (within 0.01 below; see
    :mod:`spqr_format.codec.allocate`). Needs a Hessian for every quantized tensor; the target
    and the Hessians are checked before anything is encoded. The allocation is recorded in
    the ``encoder.allocation`` metadata."""
    patterns = tuple(keep_dense or DEFAULT_KEEP_DENSE)
    hessians = SafetensorsFile(hessian_path) if hessian_path else None
    rows: list[dict] = []
    notices: list[str] = []
    alloc = None
    try:
        with SafetensorsFile(input_path) as src:
            if target_bits is not None:
                alloc = _allocate(src, hessians, input_path, hessian_path, patterns,
                                  target_bits, candidates)  # fmt: skip
            metadata = {**encoder_metadata(config), "encoder.keep_dense": list(patterns)}
            if alloc is not None:
                metadata.update(allocation_metadata(alloc))
            if src.metadata:
                metadata["model.safetensors_metadata"] = dict(src.metadata)
            names = src.names()
            with api.SpqrWriter(output, metadata=metadata) as writer:
                for name in progress(names) if progress else names:
                    st = src.get(name)
                    if st.dtype not in ("float32", "float16", "bfloat16"):
                        raise BadInputError(
                            f"dtype {st.dtype} cannot be stored: .spqr holds float32, float16 "
                            "and bfloat16 tensors (SPEC C-3.3)",
                            path=input_path,
                            tensor=name,
                        )
                    dtype = spec.DTYPE_BY_NAME[st.dtype]
                    quantize = _is_quantized(name, st.shape, patterns)
                    if not quantize:
                        writer.add(name, api.RawTensor(dtype, st.bits()))
                        rows.append(dense_row(name, st.shape, dtype))
                        continue
                    hessian = _hessian_for(hessians, name, hessian_path)
                    cfg = config if alloc is None else alloc.choice[name]
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        if config.method == "cmpq":
                            from spqr_format.codec.cmpq import encode_cmpq_tensor

                            tensor, report = encode_cmpq_tensor(
                                st.to_float32(), config, hessian, name, dtype=dtype
                            )
                            encoding = "channel_mixed"
                        else:
                            tensor, report = encode_tensor(
                                st.to_float32(), cfg, hessian, name, dtype=dtype
                            )
                            encoding = "bilevel"
                    notices.extend(str(w.message) for w in caught)
                    writer.add(name, tensor)
                    if alloc is not None:
                        report["config"] = config_label(cfg)
                    rows.append({"name": name, "encoding": encoding, **report})
                metadata["encoder.report"] = rows
                writer.set_metadata(metadata)
    finally:
        if hessians is not None:
            hessians.close()
    return EncodeResult(rows, list(dict.fromkeys(notices)), metadata)
