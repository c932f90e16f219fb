"""Quantize a whole Hugging Face model into one ``.spqr`` file, block by block (GPTQ/SpQR).

The loop (the one the CLI's ``spqr quantize-model`` and the Python API both call):

1. the calibration windows go through the embeddings: a pre-hook on the first block stores
   its inputs (hidden states and every other argument, e.g. masks and rotary embeddings) and
   stops the forward;
2. for each block: forward hooks on its linear layers accumulate float64 Hessians
   ``H = (2/N) sum x x^T`` (:mod:`spqr_format.codec.hessian`) over all calibration windows in
   one pass (SpQR's default, not ``--true-sequential``), summed per chunk of 4 windows and
   the chunks in order, on the CPU and on the GPU (:mod:`spqr_format.models.distributed`: the
   same sums for any number of torchrun ranks); each weight is encoded with the
   configuration (:func:`spqr_format.codec.presets.encode_tensor`); the block's weights are
   replaced by the *decoded* quantized weights, exactly what a reader of the file gets; the
   block runs again and its outputs are the next block's inputs;
3. everything outside the blocks (embeddings, norms, ``lm_head`` unless asked) is stored raw in
   its own dtype.

Only one block's activations and Hessians are in memory at a time (the inputs and outputs of
that block for all windows, and the Hessians of its layers). With ``device="cuda"`` the
embeddings still run on the CPU; each block is moved to the GPU while it is processed (its
activations, Hessians and the torch encoder, :mod:`spqr_format.codec.gptq_torch`, live there)
and back afterwards, so the rest of the model never occupies GPU memory.

Each finished block is written to ``OUT.partial/block-NNNNN.spqr`` (atomically);
``resume=True`` reuses the finished blocks of an interrupted run with the same settings (and
the same encoder and device kind), and the final file is assembled from these checkpoints in
either case, so a resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from spqr_format import __version__, api
from spqr_format.codec import allocate, channel_mixed_ref, reference
from spqr_format.codec import channel_mixed as cm
from spqr_format.codec.cmpq import CmpqConfig, encode_cmpq_tensor, reachable_bits
from spqr_format.codec.hessian import HessianAccumulator
from spqr_format.codec.packing import pack
from spqr_format.codec.presets import _LATE_DEFAULTS, EncoderConfig, encode_tensor, get_preset
from spqr_format.errors import BadInputError, SpqrError
from spqr_format.models import data as calib_data
from spqr_format.models import hf
from spqr_format.models._deps import require_torch
from spqr_format.models.distributed import WINDOWS_PER_CHUNK, Group
from spqr_format.models.distributed import collect_hessians as _collect_chunked
from spqr_format.models.tensors import dense_row, encoder_metadata
from spqr_format.models.walker import LinearLayer, find_blocks, find_linears, record_inputs
from spqr_format.spec import DType

PARTIAL_SUFFIX = ".partial"
RUN_FILE = "run.json"
PIPELINE_VERSION = 2  # 2: Hessians summed in fixed window chunks (distributed.py)

ProgressFn = Callable[[dict], None]


@dataclass
class QuantizeResult:
    path: str
    reports: list[dict]  # one row per tensor of the file, in file order
    metadata: dict
    seconds: float
    resumed_blocks: int


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass early."""


def _run_to_hook(torch, model, module, hook, windows, *, with_kwargs: bool = False) -> None:
    """Run every calibration window through ``model`` with ``hook`` as a forward pre-hook of
    ``module``; the hook records what it needs and raises :class:`_Stop`, so nothing after
    ``module`` is computed."""
    handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    try:
        for w in windows:
            try:
                model(input_ids=torch.from_numpy(w).unsqueeze(0), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()


def _torch_dtype_to_spqr(torch, dt) -> DType:
    if dt == torch.float16:
        return DType.FLOAT16
    if dt == torch.bfloat16:
        return DType.BFLOAT16
    return DType.FLOAT32


def raw_tensor(torch, t, dt) -> api.RawTensor:
    """A torch tensor as a RawTensor in torch dtype ``dt`` (float32/float16/bfloat16)."""
    t = t.detach().to("cpu", dtype=dt).contiguous()
    if dt == torch.bfloat16:
        return api.RawTensor(DType.BFLOAT16, t.view(torch.int16).numpy().view(np.uint16).copy())
    if dt == torch.float16:
        return api.RawTensor(DType.FLOAT16, t.numpy().copy())
    return api.RawTensor(DType.FLOAT32, t.to(torch.float32).numpy().copy())


def decoded_f32(packed) -> np.ndarray:
    """The weights a reader of the file gets (decoded in the tensor's own dtype), as f32."""
    own = packed.dtype
    if isinstance(packed, cm.PackedChannelMixed):
        dec = channel_mixed_ref.decode_channel_mixed(packed, own)
    else:
        dec = reference.decode_bilevel(packed, own)
    return api.convert(dec, own, DType.FLOAT32)


def _fmt_s(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _unique_state(model, torch) -> list[tuple[str, object]]:
    """``state_dict`` entries, tied duplicates dropped (first name kept)."""
    return [(n, t) for n, t in model.state_dict(keep_vars=True).items() if n not in _tied(model)]


def _tied(model) -> dict[str, str]:
    """``{name: first name}`` of state_dict entries that share another entry's storage."""
    seen: dict = {}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if not t.numel():
            continue
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in seen:
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


def _block_call(block, entry):
    args, kwargs = entry
    out = block(*args, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    return out


def _with_hidden(entry, hidden):
    args, kwargs = entry
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _encoder_device(device):
    """None for the CPU reference encoder, else the ``torch.device`` of the GPU encoder."""
    if device is None or str(device) == "cpu":
        return None
    if not (isinstance(device, str) and device.split(":")[0] == "cuda") and not (
        hasattr(device, "type") and device.type == "cuda"
    ):
        raise BadInputError(f"unknown device {device!r} (expected cpu or cuda[:N])",
                            field="device")  # fmt: skip
    require_torch()
    from spqr_format.codec.gptq_torch import resolve_device

    return resolve_device(device)


def _implementation(torch, dev) -> dict:
    """What encoded the file: the solver, the device kind (both in the checkpoints'
    fingerprint: a run is resumed only with the same encoder) and, for the GPU, its name."""
    if dev is None:
        return {"solver": "spqr_format.codec.gptq (numpy + numba)", "device": "cpu"}
    from spqr_format.codec.gptq_torch import IMPLEMENTATION

    out = {"solver": IMPLEMENTATION, "device": dev.type, "torch_version": torch.__version__}
    if dev.type == "cuda":
        out.update(device_name=torch.cuda.get_device_name(dev), cuda_version=torch.version.cuda)
    return out


def _to_device(torch, obj, dev):
    """Tensors inside ``obj`` (nested tuples, lists, dicts) moved to ``dev``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, tuple):
        return tuple(_to_device(torch, o, dev) for o in obj)
    if isinstance(obj, list):
        return [_to_device(torch, o, dev) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(torch, v, dev) for k, v in obj.items()}
    return obj


def quantize_model(
    model_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    preset: str = "spqr-3bit",
    config: EncoderConfig | None = None,
    calib: str,
    data_dir: str | None = None,
    samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    device: str = "cpu",
    resume: bool = False,
    quantize_lm_head: bool = False,
    progress: ProgressFn | None = None,
    target_bits: float | None = None,
    group: Group | None = None,
) -> QuantizeResult:
    """Quantize the model in ``model_dir`` into ``output`` (a ``.spqr`` file, atomically).

    ``config`` (default: the preset ``preset``) sets the encoder; ``calib`` is a text file or
    ``wikitext2`` (resolved in ``data_dir`` / ``$SPQR_DATA_DIR``); ``samples`` windows of
    ``seq_len`` tokens are drawn with ``seed``. ``progress`` receives event dicts (``kind``:
    ``stage``, ``block_start``, ``layer_done``, ``block_done``, ``done``). ``device``:
    ``cpu`` (the numba reference encoder) or ``cuda[:N]`` (the torch encoder; each block is
    processed on the GPU, the rest of the model stays on the CPU).
    ``target_bits``: allocate a configuration per block layer instead of ``config`` (see
    :func:`_allocation_pass`); not combined with ``quantize_lm_head``.
    ``group``: the ranks of a torchrun launch (:mod:`spqr_format.models.distributed`, which
    calls this with it); None is one process. The file is the same bytes for any number of
    ranks: the Hessians are summed in a fixed chunk order in every case.
    """
    t_start = time.perf_counter()
    model_dir = os.fspath(model_dir)
    output = os.fspath(output)
    emit = progress or (lambda ev: None)

    dev = _encoder_device(device)  # None: the numba reference on the CPU
    for what, v in (("samples", samples), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BadInputError(f"{what} must be a positive integer, got {v!r}", field=what)
    if seq_len < 2:
        raise BadInputError(f"seq_len must be >= 2, got {seq_len}", field="seq_len")
    if config is None:
        config = get_preset(preset)
    if not isinstance(config, (EncoderConfig, CmpqConfig)):
        raise BadInputError(
            f"config must be an EncoderConfig or a CmpqConfig, got {type(config).__name__}"
        )
    if isinstance(config, CmpqConfig) and (dev is not None or target_bits is not None):
        raise BadInputError(
            "CMPQ (channel_mixed) sets its bits per layer from its own target "
            "(CmpqConfig.target_bits) and runs on the CPU encoder: no --target-bits allocation "
            "or --device cuda with it",
            field="device" if dev is not None else "target_bits",
        )
    if dev is not None:
        # The torch encoder implements the SpQR/GPTQ solver (min-max statistics, tau or
        # column-budget outliers); the clipped statistics, impact outliers and the allocator's
        # measurements of issue 18 run on the CPU encoder only.
        late = [f"{k}={getattr(config, k)!r}" for k, v in _LATE_DEFAULTS.items()
                if getattr(config, k) != v]  # fmt: skip
        if late or target_bits is not None:
            what = ", ".join(late) if late else "--target-bits"
            raise BadInputError(
                f"--device cuda: the GPU encoder does not implement {what} yet; "
                "use --device cpu, or a spqr-*/gptq-*/rtn-* preset on the GPU",
                field="device",
            )
    if os.path.isdir(output):
        raise BadInputError("output is a directory", path=output)
    group = group or Group()
    if group.dist is not None and target_bits is not None:
        raise BadInputError(
            "torchrun: --target-bits is not distributed yet (its allocation pass needs every "
            "window's activations; see spqr_format.models.distributed)",
            field="target_bits",
        )

    torch = require_torch()
    implementation = _implementation(torch, dev)
    weight_files = hf.check_model_dir(model_dir)
    hf_config = hf.load_config(model_dir)
    if getattr(hf_config, "is_encoder_decoder", False):
        arch = ", ".join(getattr(hf_config, "architectures", None) or []) or hf_config.model_type
        raise BadInputError(
            f"{arch} is an encoder-decoder model: quantize-model walks one stack of repeated "
            "blocks fed by the input tokens (decoder-only or encoder-only models), so it "
            "does not support encoder-decoder models",
            path=model_dir,
        )
    max_pos = getattr(hf_config, "max_position_embeddings", None) or getattr(
        hf_config, "n_positions", None
    )
    if isinstance(max_pos, int) and seq_len > max_pos:
        raise BadInputError(
            f"--seq-len {seq_len} exceeds the model's {max_pos} positions", path=model_dir
        )

    # Calibration tokens (before the model is loaded: a bad text fails fast).
    emit({"kind": "stage", "stage": "tokenizing calibration text"})
    tokenizer = hf.load_tokenizer(model_dir)
    src = calib_data.resolve_text(calib, purpose="calib", data_dir=data_dir)
    ids = calib_data.tokenize(tokenizer, calib_data.read_text(src))
    windows = calib_data.calibration_windows(ids, samples, seq_len, seed, path=src.path)
    vocab = getattr(hf_config, "vocab_size", None)
    if isinstance(vocab, int) and windows.size and int(windows.max()) >= vocab:
        raise BadInputError(
            f"tokenizer produced id {int(windows.max())} >= the model's vocab_size {vocab}",
            path=model_dir,
        )

    emit({"kind": "stage", "stage": "loading model"})
    model = hf.load_hf_model(model_dir)
    prefix, blocks = find_blocks(model)
    state = _unique_state(model, torch)
    orig_dtypes = {name: t.dtype for name, t in state}
    model.float()

    layers_per_block = [find_linears(b) for b in blocks]
    unknown = _unknown_stacked(prefix, blocks, layers_per_block)
    if unknown:  # not silent: the user sees which weights of the blocks stay raw
        emit({"kind": "stage", "stage": f"note: {len(unknown)} weights of 3 or more dimensions "
              "in the blocks, in an expert layout the walker does not know, stay raw: "
              + ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")})  # fmt: skip
    lm_head_name = None
    lm_head_layer = None
    if quantize_lm_head:
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out_emb is None or not isinstance(out_emb, torch.nn.Linear):
            raise BadInputError(
                f"--quantize-lm-head: {type(model).__name__} has no linear output layer"
            )
        lm_head_name = next(n for n, m in model.named_modules() if m is out_emb)
        in_emb = model.get_input_embeddings()
        if in_emb is not None and out_emb.weight is in_emb.weight:
            out_emb.weight = torch.nn.Parameter(out_emb.weight.detach().clone())  # untie
            hf_config.tie_word_embeddings = False
            state = _unique_state(model, torch)
            orig_dtypes.setdefault(
                lm_head_name + ".weight",
                orig_dtypes.get(next(n for n, t in state if t is in_emb.weight), torch.float32),
            )
        lm_head_layer = LinearLayer(lm_head_name, out_emb, transposed=False)

    quant_names: dict[str, tuple[int | str, LinearLayer]] = {}
    state_of: dict[str, str] = {}  # tensor name -> the state_dict entry holding it
    stacked: dict[str, list[str]] = {}  # 3-D expert parameter -> its slices' tensor names
    for i, layers in enumerate(layers_per_block):
        for lay, name in zip(layers, _tensor_names(prefix, i, layers), strict=True):
            quant_names[name] = (i, lay)
            state_of[name] = f"{prefix}.{i}.{lay.state_key}"
            if lay.expert is not None:
                stacked.setdefault(state_of[name], []).append(name)
    if lm_head_layer is not None:
        quant_names[f"{lm_head_name}.weight"] = ("lm_head", lm_head_layer)
        state_of[f"{lm_head_name}.weight"] = f"{lm_head_name}.weight"
    state_names = {n for n, _ in state}
    for n in quant_names:
        if state_of[n] not in state_names:  # a tied or non-parameter weight: cannot store it
            raise BadInputError(f"layer weight {state_of[n]!r} is not in the model's state dict")
    state_shapes = {n: t.shape for n, t in state}
    for n, names in stacked.items():
        if len(names) != state_shapes[n][0]:
            raise BadInputError(f"experts of {n!r} are not all walked")  # pragma: no cover
    if isinstance(config, CmpqConfig):  # an unreachable target fails before any work
        for n, (_, lay) in quant_names.items():
            m_out, n_in = lay.shape_out_in
            lo, hi = reachable_bits(m_out, n_in, config)
            if not lo - 1e-9 <= config.target_bits <= hi + 1e-9:
                raise BadInputError(
                    f"CMPQ target {config.target_bits} bits/weight is unreachable on this "
                    f"{m_out}x{n_in} layer: widths {list(config.widths)} with the configured "
                    f"outliers reach {lo:.4f} to {hi:.4f}",
                    tensor=n, field="target_bits",
                )  # fmt: skip

    if target_bits is not None:
        if quantize_lm_head:
            raise BadInputError("--target-bits does not cover --quantize-lm-head yet",
                                field="target_bits")  # fmt: skip
        shapes = {n: lay.shape_out_in for n, (_, lay) in quant_names.items()}
        target_bits = allocate.check_target(target_bits, shapes)
    model_config = hf.config_json(hf_config)
    tok_sha = hf.tokenizer_hashes(model_dir)
    weights_sha = {os.path.basename(p): hf.sha256_file(p) for p in weight_files}
    calibration = {
        "name": src.name,
        "split": src.split,
        "sha256": hf.sha256_file(src.path),
        "text_tokens": int(len(ids)),
        "samples": samples,
        "seq_len": seq_len,
        "tokens": int(samples * seq_len),
        "seed": seed,
        "windows_sha256": calib_data.token_digest(windows),
        "sampling": "distinct non-overlapping windows, numpy default_rng(seed)",
    }
    run_info = {
        "pipeline_version": PIPELINE_VERSION,
        "tool_version": __version__,
        "encoder": config.to_dict(),
        "encoder_implementation": {k: implementation[k] for k in ("solver", "device")},
        "calibration": calibration,
        "weights_sha256": weights_sha,
        "quantize_lm_head": bool(quantize_lm_head),
        "blocks": f"{prefix}[{len(blocks)}]",
    }
    if dev is not None:  # GPU Hessians are chunk sums since issue 21 (older checkpoints: not)
        run_info["hessian_chunks"] = WINDOWS_PER_CHUNK
    fingerprint = hashlib.sha256(
        json.dumps(run_info, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()

    partial = output + PARTIAL_SUFFIX
    resumed = 0

    def setup_partial():  # rank 0 owns the checkpoints
        if os.path.isdir(partial):
            if resume:
                _check_run(partial, fingerprint)
            else:
                shutil.rmtree(partial)
        os.makedirs(partial, exist_ok=True)
        _write_json_atomic(os.path.join(partial, RUN_FILE),
                           {"fingerprint": fingerprint, **run_info})  # fmt: skip

    group.run(setup_partial, on=0)
    group.owns_partial = True

    # -- 1. inputs of the first block ------------------------------------------------------
    emit({"kind": "stage", "stage": "embedding calibration windows"})
    captured: list = []

    def catcher(module, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise _Stop

    my_ids = group.window_ids(len(windows))  # this rank's windows (all of them in one process)
    group.run(lambda: _run_to_hook(torch, model, blocks[0], catcher, [windows[g] for g in my_ids],
                                   with_kwargs=True))  # fmt: skip
    inputs = captured
    if dev is not None:
        inputs = [_to_device(torch, e, dev) for e in captured]
        captured.clear()  # the CPU copies
    if len(inputs) != len(my_ids):
        raise BadInputError(
            f"cannot walk {type(model).__name__}: its forward did not reach {prefix}.0"
        )
    configs: dict[str, EncoderConfig] = {}
    alloc = None
    if target_bits is not None:
        alloc = _allocation_pass(torch, blocks, layers_per_block, prefix, inputs, target_bits,
                                 emit)  # fmt: skip
        configs = alloc.choice
        run_info["allocation"] = {n: c.to_dict() for n, c in sorted(configs.items())}
        fingerprint = hashlib.sha256(
            json.dumps(run_info, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        _write_json_atomic(os.path.join(partial, RUN_FILE),
                           {"fingerprint": fingerprint, **run_info})  # fmt: skip

    # -- 2. block by block -----------------------------------------------------------------
    nblocks = len(blocks)
    reports: dict[str, dict] = {}
    t_loop = time.perf_counter()
    encoded_blocks = 0
    for i, block in enumerate(blocks):
        layers = layers_per_block[i]
        ckpt = os.path.join(partial, f"block-{i:05d}.spqr")
        t_block = time.perf_counter()
        emit({"kind": "block_start", "block": i, "blocks": nblocks, "layers": len(layers)})
        if dev is not None:
            block.to(dev)
        if resume and group.broadcast(os.path.isfile(ckpt) if group.rank == 0 else None):
            reports.update(_apply_checkpoint(ckpt, fingerprint, prefix, i, layers, group=group))
            resumed += 1
        else:
            names = _tensor_names(prefix, i, layers)
            # chunked (CPU and GPU): the same sums for any number of ranks
            mods = list(zip(names, layers, strict=True))
            hess = _collect_chunked(torch, group, mods,
                                    lambda k, b=block, e=inputs: _block_call(b, e[k]),
                                    my_ids, len(windows), dev)  # fmt: skip
            by_name = dict(zip(names, layers, strict=True))
            group.run(lambda h=hess, by_name=by_name: _check_seen(h, by_name))
            mine = {}

            def encode_mine(i=i, layers=layers, names=names, hess=hess, mine=mine):
                for j, (lay, name) in enumerate(zip(layers, names, strict=True)):
                    if group.owner(j) != group.rank:
                        continue
                    t_layer = time.perf_counter()
                    packed, rep = _encode_layer(torch, lay, name, hess.pop(name),
                                                configs.get(name, config),
                                                orig_dtypes[state_of[name]], dev)  # fmt: skip
                    if name in configs:
                        rep["config"] = allocate.config_label(configs[name])
                    mine[name] = (packed, rep)
                    emit({"kind": "layer_done", "block": i, "blocks": nblocks, "layer": lay.name,
                          "index": j, "layers": len(layers), "report": rep,
                          "seconds": time.perf_counter() - t_layer})  # fmt: skip

            group.run(encode_mine)
            del hess
            done = group.merge(mine)  # every rank gets every layer's packed tensor
            for lay, name in zip(layers, names, strict=True):
                if name not in mine:
                    lay.set_weight_out_in(torch.from_numpy(decoded_f32(done[name][0])))
            block_reports = {name: done[name][1] for name in names}

            def write_ckpt(ckpt=ckpt, names=names, done=done, block_reports=block_reports):
                with api.SpqrWriter(ckpt, metadata={}) as writer:
                    for name in names:
                        writer.add(name, done[name][0])
                    writer.set_metadata({"checkpoint.fingerprint": fingerprint,
                                         "checkpoint.reports": block_reports})  # fmt: skip

            group.run(write_ckpt, on=0)
            del done, mine
            reports.update(block_reports)
            encoded_blocks += 1
        # the quantized block's outputs feed the next block
        if i + 1 < nblocks or lm_head_layer is not None:
            inputs = group.run(lambda block=block, inputs=inputs: [
                _with_hidden(e, _block_call(block, e)) for e in inputs])  # fmt: skip
        if dev is not None:
            block.to("cpu")
        elapsed = time.perf_counter() - t_loop
        per_block = elapsed / max(1, i + 1 - resumed) if encoded_blocks else 0.0
        emit({"kind": "block_done", "block": i, "blocks": nblocks,
              "seconds": time.perf_counter() - t_block, "elapsed": elapsed,
              "eta": per_block * (nblocks - i - 1)})  # fmt: skip
    del inputs
    if dev is not None:
        torch.cuda.empty_cache()

    # -- lm_head (optional): its inputs come from the model with all blocks quantized -------
    if lm_head_layer is not None:
        name = f"{lm_head_name}.weight"
        ckpt = os.path.join(partial, "lm_head.spqr")
        if resume and group.broadcast(os.path.isfile(ckpt) if group.rank == 0 else None):
            reports.update(_apply_checkpoint(ckpt, fingerprint, None, None, [lm_head_layer],
                                             names=[name], group=group))  # fmt: skip
        else:
            emit({"kind": "stage", "stage": f"calibrating {lm_head_name}"})
            head = lm_head_layer.module

            def head_window(k):  # stops the forward once lm_head's input is recorded
                def stop(module, args, out):
                    raise _Stop

                handle = head.register_forward_hook(stop)
                try:
                    model(input_ids=torch.from_numpy(windows[my_ids[k]]).unsqueeze(0),
                          use_cache=False)  # fmt: skip
                except _Stop:
                    pass
                finally:
                    handle.remove()

            accs = _collect_chunked(torch, group, [(name, lm_head_layer)],
                                    head_window, my_ids, len(windows))  # fmt: skip

            def encode_head():
                acc = accs[name]
                _check_seen(accs)
                packed, rep = _encode_layer(torch, lm_head_layer, name, acc, config,
                                            orig_dtypes[name], dev)  # fmt: skip
                with api.SpqrWriter(ckpt) as writer:
                    writer.add(name, packed)
                    writer.set_metadata(
                        {"checkpoint.fingerprint": fingerprint, "checkpoint.reports": {name: rep}}
                    )
                return rep

            reports[name] = group.broadcast(group.run(encode_head, on=0))

    # -- 3. the file (rank 0) --------------------------------------------------------------
    def write_output():
        emit({"kind": "stage", "stage": f"writing {output}"})
        transposed = sorted(n for n, (_, lay) in quant_names.items() if lay.transposed)
        skipped = []
        rows = []
        metadata = {
            **encoder_metadata(config),
            "encoder.implementation": implementation,
            "model.config": model_config,
            "model.architecture": type(model).__name__,
            "model.blocks": {"prefix": prefix, "count": nblocks,
                             "layers": [lay.name for lay in layers_per_block[0]]},  # fmt: skip
            "model.transposed": transposed,
            "model.tied": _tied(model),
            "model.tokenizer_sha256": tok_sha,
            "model.weights_sha256": weights_sha,
            "model.lm_head_quantized": lm_head_name if lm_head_layer is not None else None,
            "calibration.set": calibration,
            "pipeline.settings": {
                "version": PIPELINE_VERSION, "order": "sequential, one pass per block",
                "hessian": "float64, H = (2/N) sum x x^T over all calibration tokens, "
                       "summed per chunk of 4 windows, chunks in order",
                "device": implementation["device"]},
        }  # fmt: skip
        if stacked:  # 3-D expert parameters, stored one 2-D tensor per expert
            metadata["model.stacked"] = {n: len(names) for n, names in stacked.items()}
        ckpt_files = {}
        with api.SpqrWriter(output, metadata=metadata) as writer:
            for name, t in state:
                if name in quant_names or name in stacked:
                    for qname in stacked.get(name, [name]):
                        owner = quant_names[qname][0]
                        fname = ("lm_head.spqr" if owner == "lm_head"
                                 else f"block-{owner:05d}.spqr")  # fmt: skip
                        if fname not in ckpt_files:
                            for f in ckpt_files.values():
                                f.close()
                            ckpt_files = {fname: api.open_file(os.path.join(partial, fname))}
                        packed = ckpt_files[fname].read(qname)
                        writer.add(qname, packed)
                        enc = "channel_mixed" if isinstance(config, CmpqConfig) else "bilevel"
                        rows.append({"name": qname, "encoding": enc, **reports[qname]})
                    continue
                if not t.is_floating_point() or t.dtype not in (
                    torch.float32,
                    torch.float16,
                    torch.bfloat16,
                    torch.float64,
                ):
                    skipped.append(name)  # integer buffers (position ids...) rebuilt from config
                    continue
                dt = orig_dtypes.get(name, t.dtype)
                if dt == torch.float64:
                    dt = torch.float32
                raw = raw_tensor(torch, t, dt)
                writer.add(name, raw)
                rows.append(dense_row(name, t.shape, raw.dtype))
            for f in ckpt_files.values():
                f.close()
            if alloc is not None:
                from spqr_format.models.tensors import allocation_metadata

                metadata.update(allocation_metadata(alloc))
            metadata["model.skipped"] = skipped
            metadata["encoder.report"] = rows
            writer.set_metadata(metadata)
        return rows, metadata

    rows, metadata = group.broadcast(group.run(write_output, on=0))
    group.run(lambda: shutil.rmtree(partial, ignore_errors=True), on=0)
    seconds = time.perf_counter() - t_start
    emit({"kind": "done", "seconds": seconds, "path": output})
    return QuantizeResult(output, rows, metadata, seconds, resumed)


def _allocation_pass(torch, blocks, layers_per_block, prefix, inputs, target_bits, emit):
    """``--target-bits``: one pass over the *unquantized* blocks (the calibration inputs
    propagate through the original weights), measuring every candidate configuration of every
    layer on its Hessian (:mod:`spqr_format.codec.allocate`), then the allocation. The
    Hessians are kept (float32) until the outlier fill is done: n^2 x 4 bytes per layer."""
    hs: dict[str, np.ndarray] = {}
    ws: dict[str, LinearLayer] = {}
    for i, block in enumerate(blocks):
        emit({"kind": "stage", "stage": f"measuring candidates, block {i + 1}/{len(blocks)}"})
        names = _tensor_names(prefix, i, layers_per_block[i])
        accs = _collect_hessians(torch, block, layers_per_block[i], names, inputs)
        for lay, n in zip(layers_per_block[i], names, strict=True):
            hs[n] = _hessian(torch, accs.pop(n)).astype(np.float32)
            ws[n] = lay
        if i + 1 < len(blocks):
            with torch.no_grad():
                inputs = [_with_hidden(e, _block_call(block, e)) for e in inputs]

    def get(n):
        return ws[n].weight_out_in().numpy().astype(np.float32), hs[n]

    return allocate.plan(list(hs), get, target_bits)


def _check_run(partial: str, fingerprint: str) -> None:
    p = os.path.join(partial, RUN_FILE)
    try:
        with open(p, encoding="utf-8") as f:
            found = json.load(f).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != fingerprint:
        raise BadInputError(
            "checkpoints were made by a run with other settings, model or calibration "
            "(remove the directory or run without --resume)",
            path=partial,
        )


def _unknown_stacked(prefix: str, blocks, layers_per_block) -> list[str]:
    """Parameters of the blocks with 3 or more dimensions that no walked layer covers: expert
    weights in a layout :mod:`spqr_format.models.walker` does not recognise (JetMoE's, Llama
    4's), which stay raw."""
    out = []
    for i, (block, layers) in enumerate(zip(blocks, layers_per_block, strict=True)):
        walked = {lay.state_key for lay in layers}
        out += [f"{prefix}.{i}.{n}" for n, p in block.named_parameters()
                if p.ndim >= 3 and n not in walked]  # fmt: skip
    return out


def _tensor_names(prefix: str, i: int, layers: list[LinearLayer]) -> list[str]:
    """The file's names of block ``i``'s layers (``model.layers.3.self_attn.q_proj.weight``,
    ``model.layers.3.mlp.experts.down_proj[7]``)."""
    return [f"{prefix}.{i}.{lay.key}" for lay in layers]


def _collect_hessians(torch, block, layers, names, inputs) -> dict:
    """One pass of all calibration inputs through ``block`` (original weights), recording the
    input of every linear layer into its Hessian."""
    accs = {n: HessianAccumulator(lay.in_features, name=n)
            for lay, n in zip(layers, names, strict=True)}  # fmt: skip

    def record(name, x):
        accs[name].add(x.detach().reshape(-1, accs[name].in_features).float().numpy())

    handles = record_inputs(layers, names, record)
    try:
        for e in inputs:
            _block_call(block, e)
    finally:
        for h in handles:
            h.remove()
    _check_seen(accs, dict(zip(names, layers, strict=True)))
    return accs


def _check_seen(accs: dict, layers: dict | None = None) -> None:
    """A layer that saw no input is an error, unless it is an expert of a mixture of experts
    (``layers[name].routed``): the router may choose some experts for no calibration token;
    those are encoded with an identity Hessian (:func:`_hessian`)."""
    for n, acc in accs.items():
        if acc.tokens == 0 and not (layers and layers[n].routed):
            raise BadInputError(
                "this layer saw no input in its block's forward (the block does not use it)",
                tensor=n,
            )


NO_TOKENS_WARNING = (
    "no calibration token was routed to this expert: encoded with an identity Hessian "
    "(every input direction weighted equally, i.e. the weight error is minimised; GPTQ then "
    "reduces to round-to-nearest plus the configured outliers)"
)


def _hessian(torch, acc, dev=None):
    """The Hessian of accumulator ``acc``; the identity (float64, ``n x n``, on ``dev`` when
    given) when it saw no token: an expert the router never chose for the calibration text
    has no activation statistics, and the identity makes every encoder minimise the plain
    weight error instead (an all-zero Hessian would make GPTQ zero the weight, and CMPQ
    cannot rank columns without statistics)."""
    if acc.tokens:
        return acc.hessian()
    if dev is None:
        return np.eye(acc.in_features, dtype=np.float64)
    return torch.eye(acc.in_features, dtype=torch.float64, device=dev)


def _encode_layer(torch, lay: LinearLayer, name: str, acc, config, orig_dtype, dev=None):
    """Encode one layer, put its decoded weights into the model; returns (packed, report).

    With ``dev`` the torch encoder runs there; the weights put back are its reconstruction
    (equal to the decoded tensor) rounded to the tensor's own dtype, exactly what
    :func:`decoded_f32` gives a reader of the file (and a resumed run).

    ``acc``: the layer's Hessian accumulator; its token count goes into the report
    (``calibration_tokens``). One that saw no token (an expert no calibration token was routed
    to) is encoded with an identity Hessian, reported as a fallback with a warning and no
    output error (there is no activation statistic to measure it with)."""
    tokens = int(acc.tokens)
    packed, report = _encode_with(torch, lay, name, _hessian(torch, acc, dev), config,
                                  orig_dtype, dev)  # fmt: skip
    report["calibration_tokens"] = tokens
    if tokens == 0:
        report.update(fallback=True, warning=f"tensor {name}: {NO_TOKENS_WARNING}",
                      relative_output_error=None)  # fmt: skip
    return packed, report


def _encode_with(torch, lay: LinearLayer, name: str, h, config, orig_dtype, dev=None):
    """:func:`_encode_layer` with the Hessian ``h`` given."""
    dtype = _torch_dtype_to_spqr(torch, orig_dtype)
    if dev is not None:
        from spqr_format.codec.gptq_torch import encode_tensor_torch

        info: dict = {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                _, report = encode_tensor_torch(lay.weight_out_in(), config, h, name,
                                                dtype=dtype, info=info, device=dev)  # fmt: skip
        except SpqrError as err:
            raise err.with_context(tensor=name) from None
        del h
        rec = info["reconstruction"]
        if dtype != DType.FLOAT32:
            rec = rec.to(torch.float16 if dtype == DType.FLOAT16 else torch.bfloat16).float()
        lay.set_weight_out_in(rec)
        return info["packed"], report
    w = lay.weight_out_in().numpy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if isinstance(config, CmpqConfig):
                tensor, report = encode_cmpq_tensor(w, config, h, name, dtype=dtype)
            else:
                tensor, report = encode_tensor(w, config, h, name, dtype=dtype)
    except SpqrError as err:
        raise err.with_context(tensor=name) from None
    packed = cm.pack(tensor) if isinstance(config, CmpqConfig) else pack(tensor)
    lay.set_weight_out_in(torch.from_numpy(decoded_f32(packed)))
    return packed, report


def _apply_checkpoint(ckpt, fingerprint, prefix, i, layers, names=None, group=None) -> dict:
    """Put a finished block's decoded weights into the model; returns its reports. With
    several ranks, rank 0 reads the checkpoint and sends it to the others."""
    torch = require_torch()
    group = group or Group()
    if names is None:
        names = _tensor_names(prefix, i, layers)

    def read():
        with api.open_file(ckpt) as f:
            meta = f.metadata
            if meta.get("checkpoint.fingerprint") != fingerprint:
                raise BadInputError("checkpoint is from another run", path=ckpt)
            return [f.read(n) for n in names], dict(meta["checkpoint.reports"])

    packed_list, reps = group.broadcast(group.run(read, on=0))
    for lay, packed in zip(layers, packed_list, strict=True):
        lay.set_weight_out_in(torch.from_numpy(decoded_f32(packed)))
    return reps


def _write_json_atomic(path: str, doc: dict) -> None:
    from spqr_format.atomic import atomic_output

    with atomic_output(path, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)


def format_event(ev: dict) -> str | None:
    """One progress line for an event of :func:`quantize_model` (None: nothing to print)."""
    k = ev["kind"]
    if k == "stage":
        return ev["stage"]
    if k == "layer_done":
        r = ev["report"]
        return (
            f"  block {ev['block'] + 1}/{ev['blocks']} layer {ev['index'] + 1}/{ev['layers']} "
            f"{ev['layer']}: {r['bits_per_weight']:.3f} bits/w, "
            f"{r['outlier_percent']:.2f}% outliers, rel. out err "
            f"{r['relative_output_error'] if r['relative_output_error'] is None else format(r['relative_output_error'], '.4g')}"  # noqa: E501
            f" ({ev['seconds']:.1f}s)"
            + (", no calibration tokens: identity Hessian" if r.get("calibration_tokens") == 0
               else "")
        )  # fmt: skip
    if k == "block_done":
        return (
            f"block {ev['block'] + 1}/{ev['blocks']} done in {ev['seconds']:.1f}s; "
            f"elapsed {_fmt_s(ev['elapsed'])}, ETA {_fmt_s(ev['eta'])}"
        )
    if k == "done":
        return f"wrote {ev['path']} in {_fmt_s(ev['seconds'])}"
    return None


__all__ = ["QuantizeResult", "format_event", "quantize_model"]
