"""Tensor-parallel loading of a ``.spqr`` model over the ranks of a torchrun launch (issue 21).

:func:`load_model_tp` shards every transformer block as Megatron does, for Llama-shaped
models (Llama, Mistral, Qwen2: ``q/k/v/o_proj``, ``gate/up/down_proj``); embeddings, norms and
``lm_head`` are replicated (read whole by every rank; a quantized ``lm_head`` is a whole
``SpQRLinear`` on every GPU). Two ways to hold the shards:

``shards="dense"`` (the CPU default; gloo): every shard dequantized in the tensor's own dtype.

- **column-parallel** ``q_proj``, ``k_proj``, ``v_proj`` (whole attention heads / KV heads per
  rank), ``gate_proj``, ``up_proj``: rank ``r`` holds output rows ``[r*m/N, (r+1)*m/N)`` of
  ``W[m, n]``. Those are row blocks of the stored tensor: read alone (only the rank's part of
  the codes, statistics and outliers is touched) when the boundaries are multiples of 16 and
  of the statistics tile (:mod:`spqr_format.codec.slicing`), else whole rows are decoded.
- **row-parallel** ``o_proj``, ``down_proj``: rank ``r`` holds input columns
  ``[r*n/N, (r+1)*n/N)``; its partial products are summed with ``all_reduce``. A column
  slice of a permuted tensor is scattered over every row's codes, so each rank reads and
  decodes the whole tensor and keeps its columns.

``shards="packed"`` (the GPU way, ``device="cuda"``: NCCL, rank ``r`` on ``cuda:LOCAL_RANK``,
shards are :class:`~spqr_format.gpu.nn.SpQRLinear` layers on compressed sub-tensors, the rest
of the model float16, or bfloat16 for a bf16 checkpoint; on the CPU the same shards are
dequantized, which is how the collectives are tested without GPUs):

- **column-parallel**: the cheap row slice above, kept compressed
  (:func:`~spqr_format.codec.slicing.slice_rows`, zero-copy views of the file's sections).
  A row range that is not a standalone slice (boundaries inside an outlier block or a
  statistics tile) falls back to dense rows (counted in ``model.tp_read["full_rows"]``).
- **row-parallel**: the permutation scatters the original columns ``[r*n/N, (r+1)*n/N)``
  over every row's stored codes (and the statistics are per group of *stored* columns), so
  that block is not a compressed sub-tensor. What is one is a block of *stored* columns at
  group boundaries (:func:`~spqr_format.codec.slicing.slice_stored_columns`: exact, no
  permutation; built by unpacking and repacking the whole tensor, integer work on every
  rank's CPU at load time). Rank ``r`` holds stored columns ``[j0, j1)``
  (:func:`~spqr_format.codec.slicing.column_blocks`) and multiplies them with
  ``x[..., perm[j0:j1]]``: the input shards are first ``all_gather``-ed (a ``batch x n``
  activation: 8 KiB per token for o_proj of a 7B in fp16), then the partial products are
  summed with ``all_reduce``. A tensor without permutation whose blocks coincide with the
  ranks' input shards needs no gather (Megatron's row-parallel layer exactly). The cost of a
  permutation is one extra ``all_gather`` per row-parallel layer (two per block).

Accuracy: ``dense`` logits equal the unsharded model's up to float32 summation order in the two
``all_reduce`` of every block (tested at 1e-5 relative, measured 1.5e-7); ``packed`` on the
CPU likewise (tested at 1e-5). On GPUs the partial products are float16 (bfloat16) and NCCL
sums them in that dtype, as Megatron does: the logits differ from the unsharded fp16 model by
fp16 rounding (tests/test_distributed_gpu.py bounds it at 2e-2 of the logits' magnitude and
95 % equal argmax on a tiny Llama); one rank gives the logits of
``load_model(device="cuda")`` (the same SpQRLinear layers; tested at 1e-3, expected equal).

Needs ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` divisible by
the number of ranks. On the GPU each rank first builds the whole model skeleton in fp16 on its
GPU (random weights, replaced by the shards right away): the peak is one fp16 copy of the
model per GPU at load time (13 GB for a 7B; a 70B would need a meta-device build).
"""

from __future__ import annotations

import os
import warnings

from spqr_format import api
from spqr_format.codec import reference, slicing
from spqr_format.codec.bilevel import PackedBilevel
from spqr_format.errors import BadInputError
from spqr_format.models._deps import require_torch
from spqr_format.models.loader import _check_tokenizer, _to_torch, build_config
from spqr_format.spec import DType

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def _kind(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] == "weight":
        if parts[-2] in COLUMN_PARALLEL:
            return "column"
        if parts[-2] in ROW_PARALLEL:
            return "row"
    return None


def _read_shard(f, name: str, kind: str | None, rank: int, world: int, stats: dict):
    """This rank's part of tensor ``name`` as a torch tensor in its own dtype."""
    torch = require_torch()
    own = DType(f.entry(name).dtype)
    if kind is None:
        return _to_torch(torch, f.decode(name), own)
    info = f.info(name)
    m, n = info.shape
    if kind == "column":
        if m % world:
            raise BadInputError(f"{m} rows do not split over {world} ranks", tensor=name)
        r0, r1 = rank * m // world, (rank + 1) * m // world
        if info.encoding == "bilevel":
            p = f.read(name, verify_crc=False)
            cheap = slicing.is_cheap_row_slice(p, r0, r1)
            stats["cheap_rows" if cheap else "full_rows"] += 1
            arr = slicing.decode_rows(p, r0, r1, own)
        else:
            arr = f.decode(name)[r0:r1]
            stats["full_rows"] += 1
    else:
        if n % world:
            raise BadInputError(f"{n} columns do not split over {world} ranks", tensor=name)
        c0, c1 = rank * n // world, (rank + 1) * n // world
        p = f.read(name, verify_crc=False) if info.encoding == "bilevel" else None
        arr = (slicing.decode_columns(p, c0, c1, own) if isinstance(p, PackedBilevel)
               else f.decode(name)[:, c0:c1])  # fmt: skip
        stats["full_columns"] += 1
    import numpy as np

    return _to_torch(torch, np.ascontiguousarray(arr), own)


def _row_parallel_module(torch, dist, linear):
    """``nn.Linear`` over this rank's input columns; outputs summed over ranks (all_reduce)."""

    class RowParallelLinear(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            y = torch.nn.functional.linear(x, self.lin.weight)
            dist.all_reduce(y)
            if self.lin.bias is not None:
                y = y + self.lin.bias
            return y

    return RowParallelLinear(linear)


def _row_shard_module(torch, dist, world: int, inner, cols, bias):
    """A row-parallel layer over a block of *stored* columns (``shards="packed"``):
    ``inner`` multiplies them; ``cols`` (the original columns they hold, ``perm[j0:j1]``, or
    None when they are this rank's own input shard) selects them from the input gathered
    from every rank; the partial products are summed over ranks (``all_reduce``)."""

    class RowShard(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner
            if cols is None:
                self.cols = None
            else:
                self.register_buffer("cols", cols, persistent=False)
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

        def forward(self, x):
            if self.cols is not None:
                x = x.contiguous()
                parts = [torch.empty_like(x) for _ in range(world)]
                dist.all_gather(parts, x)
                x = torch.cat(parts, dim=-1).index_select(-1, self.cols)
            y = self.inner(x)
            dist.all_reduce(y)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y

    return RowShard()


def _packed_shard(torch, f, name, kind, rank, world, stats, make_linear, dtype, dev):
    """This rank's module for a quantized Llama layer under ``shards="packed"``: the
    compressed sub-tensor of its rows (column-parallel) or of its block of stored columns
    (row-parallel), through ``make_linear(packed, bias)``; ``(module, kind)``. Slices that are
    not standalone sub-tensors fall back to dense weights (counted in ``stats``)."""
    import numpy as np

    own = DType(f.entry(name).dtype)
    p = f.read(name, verify_crc=False)
    m, n = p.shape
    dense = not isinstance(p, PackedBilevel)

    def dense_linear(w):
        w = _to_torch(torch, np.ascontiguousarray(w), own).to(dev, dtype)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
        return lin

    if kind == "column":
        if m % world:
            raise BadInputError(f"{m} rows do not split over {world} ranks", tensor=name)
        r0, r1 = rank * m // world, (rank + 1) * m // world
        if not dense and slicing.is_cheap_row_slice(p, r0, r1):
            stats["cheap_rows"] += 1
            return make_linear(slicing.slice_rows(p, r0, r1)), (r0, r1)
        stats["full_rows"] += 1
        w = f.decode(name)[r0:r1] if dense else slicing.decode_rows(p, r0, r1, own)
        return dense_linear(w), (r0, r1)
    if n % world:
        raise BadInputError(f"{n} columns do not split over {world} ranks", tensor=name)
    c0, c1 = rank * n // world, (rank + 1) * n // world
    if dense:
        stats["full_columns"] += 1
        return dense_linear(f.decode(name)[:, c0:c1]), None
    j0, j1 = slicing.column_blocks(p, world)[rank]
    if j1 <= j0:
        raise BadInputError(f"{n} columns in groups of {p.params.group_size} do not give "
                            f"{world} ranks a block each", tensor=name)  # fmt: skip
    stats["stored_columns"] += 1
    if (j0, j1) == (0, n):  # one rank: the tensor itself, permutation and all
        return make_linear(p), None
    sub = slicing.slice_stored_columns(p, j0, j1)
    if p.perm is None and (j0, j1) == (c0, c1):
        return make_linear(sub), None  # Megatron's row-parallel: this rank's own columns
    stats["gathered_inputs"] += 1
    cols = torch.from_numpy(slicing.stored_columns(p, j0, j1)).to(dev)
    return make_linear(sub), cols


def load_model_tp(path: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None = None,
                  group=None, *, device: str = "cpu", shards: str | None = None):  # fmt: skip
    """The model in ``path`` sharded over the ranks of ``group`` (default: the torchrun
    process group, initialised when needed: gloo on the CPU, NCCL with ``device="cuda"``),
    in eval mode. Every rank calls it; the model's forward is collective (every rank must run
    it on the same input). ``model.tp_read`` counts how each sharded tensor was read.

    ``device``: ``cpu`` or ``cuda`` (each rank on ``cuda:LOCAL_RANK``; the quantized layers
    become :class:`~spqr_format.gpu.nn.SpQRLinear` shards, the rest of the model float16, or
    bfloat16 for a bf16 checkpoint). ``shards``: ``dense`` (the CPU default: every shard
    dequantized; row-parallel layers decode whole tensors and keep their columns) or
    ``packed`` (the only choice on the GPU: each shard is a compressed sub-tensor, see the
    module text; on the CPU its dequantized form runs the same collectives, for tests)."""
    torch = require_torch()
    from spqr_format.models.distributed import from_env, local_device

    cuda = str(device).startswith("cuda")
    if not (cuda or device == "cpu"):
        raise BadInputError(f"unknown device {device!r} (expected cpu or cuda)", field="device")
    shards = shards or ("packed" if cuda else "dense")
    if shards not in ("dense", "packed") or (cuda and shards != "packed"):
        raise BadInputError(f"shards={shards!r}: dense (CPU) or packed (CPU, GPU)",
                            field="shards")  # fmt: skip
    if cuda:
        from spqr_format.models.loader import _check_cuda

        _check_cuda(torch)
    group = group or from_env(device)
    dev = group.device if cuda and group.dist is not None else torch.device(
        local_device(device) if cuda else "cpu")  # fmt: skip
    if cuda and dev.type != "cuda":
        raise BadInputError("device cuda needs an NCCL process group (torchrun)", field="device")
    if cuda:
        torch.cuda.set_device(dev)
    if group.dist is None and shards == "packed":
        raise BadInputError("shards='packed' runs under torchrun (a process group)",
                            field="shards")  # fmt: skip
    if shards == "dense":
        return _load_dense(torch, path, model_dir, group)
    return _load_packed(torch, path, model_dir, group, dev)


def _open_checked(torch, f, path, model_dir, world):
    meta = f.metadata
    config, cls = build_config(meta, path)
    if model_dir is not None:
        _check_tokenizer(meta, os.fspath(model_dir))
    if meta.get("model.transposed"):
        raise BadInputError("tensor-parallel loading covers Llama-shaped models only "
                            "(this one has Conv1D layers)", path=path)  # fmt: skip
    if meta.get("model.stacked"):
        raise BadInputError("tensor-parallel loading covers Llama-shaped models only "
                            "(this one has stacked mixture-of-experts weights)",
                            path=path)  # fmt: skip
    for what in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        v = getattr(config, what, None)
        if not isinstance(v, int) or v % world:
            raise BadInputError(f"{what} = {v} does not split over {world} ranks",
                                path=path)  # fmt: skip
    names = f.names()
    kinds = {n: _kind(n) for n in names}
    if not any(kinds.values()):
        raise BadInputError("no q/k/v/o/gate/up/down_proj layers: not a Llama-shaped model",
                            path=path)  # fmt: skip
    return meta, config, cls, names, kinds


def _assign_state(model, state, meta, cls, path, stats, rank, world):
    """Put ``state`` (the rank's tensors; tied duplicates filled from the file's
    ``model.tied``) into ``model``, refuse a tensor with no place in it, tie, and record
    what was read and the rank."""
    for dup, first in (meta.get("model.tied") or {}).items():
        if first in state and dup not in state:
            state[dup] = state[first]
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise BadInputError(f"tensor {result.unexpected_keys[0]!r} has no place in "
                            f"{cls.__name__}", path=path)  # fmt: skip
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.tp_read = stats
    model.tp_rank, model.tp_world = rank, world
    return model


def _load_dense(torch, path, model_dir, group):
    dist = group.dist
    rank, world = group.rank, group.world
    path = os.fspath(path)
    stats = {"cheap_rows": 0, "full_rows": 0, "full_columns": 0}
    with api.open_file(path) as f:
        meta, config, cls, names, kinds = _open_checked(torch, f, path, model_dir, world)
        state = {n: _read_shard(f, n, kinds[n] if world > 1 else None, rank, world, stats)
                 for n in names}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls._from_config(config, attn_implementation="eager")
    model.eval()
    # local shapes: the sharded nn.Linear modules are rebuilt at their shard's size
    for n, kind in kinds.items():
        if kind is None or world == 1:
            continue
        mod_name = n.removesuffix(".weight")
        old = model.get_submodule(mod_name)
        w = state[n]
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, dtype=w.dtype)
        bias_name = mod_name + ".bias"
        if old.bias is not None and bias_name in state:
            b = state.pop(bias_name)
            if kind == "column":
                b = b[rank * w.shape[0] : (rank + 1) * w.shape[0]]
            lin.bias = torch.nn.Parameter(b, requires_grad=False)
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
        del state[n]
        new = lin if kind == "column" else _row_parallel_module(torch, dist, lin)
        parent, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return _assign_state(model, state, meta, cls, path, stats, rank, world)


def _build(torch, cls, config, dev, dtype):
    """The model skeleton on ``dev`` in ``dtype`` (random weights, replaced afterwards);
    float32 buffers are cast as :func:`spqr_format.models.loader.load_model` casts them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device(dev):
            try:
                model = cls._from_config(config, attn_implementation="eager", dtype=dtype)
            except TypeError:  # transformers < 4.56 names it torch_dtype
                model = cls._from_config(config, attn_implementation="eager", torch_dtype=dtype)
    return model.to(device=dev, dtype=dtype).eval()


def _load_packed(torch, path, model_dir, group, dev):
    dist = group.dist
    rank, world = group.rank, group.world
    path = os.fspath(path)
    cuda = dev.type == "cuda"
    stats = {"cheap_rows": 0, "full_rows": 0, "full_columns": 0, "stored_columns": 0,
             "gathered_inputs": 0}  # fmt: skip

    if cuda:
        import cupy as cp

        from spqr_format.gpu.nn import SpQRLinear
        from spqr_format.gpu.tensor import GpuTensor

        def make_linear(p, name):
            with cp.cuda.Device(dev.index):
                return SpQRLinear(GpuTensor.from_packed(p, name=name), name=name)
    else:

        def make_linear(p, name):
            w = _to_torch(torch, reference.decode_bilevel(p, p.dtype), DType(p.dtype))
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
            return lin

    with api.open_file(path) as f:
        meta, config, cls, names, kinds = _open_checked(torch, f, path, model_dir, world)
        raw = [n for n in names if kinds[n] is None]
        own = {n: DType(f.entry(n).dtype) for n in names}
        if cuda:
            dtype = torch.bfloat16 if DType.BFLOAT16 in own.values() else torch.float16
        else:
            dtype = torch.float32
        model = _build(torch, cls, config, dev, dtype)
        state = {}
        for n in raw:
            t = _to_torch(torch, f.decode(n), own[n])
            state[n] = t.to(dev, dtype) if cuda and t.is_floating_point() else t
        # quantized layers outside the Megatron pattern (lm_head): replicated
        for n in raw:
            mod = _linear_of(torch, model, n)
            if mod is None or f.info(n).encoding not in ("bilevel", "channel_mixed") or not cuda:
                continue
            p = f.read(n)
            new = make_linear(p, n)
            if mod.bias is not None:
                new.bias = torch.nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
            _replace(model, n, new)
            del state[n]
        for n, kind in kinds.items():
            if kind is None:
                continue
            mod_name = n.removesuffix(".weight")
            old = model.get_submodule(mod_name)
            inner, extra = _packed_shard(torch, f, n, kind, rank, world, stats,
                                         lambda p, n=n: make_linear(p, n), dtype, dev)  # fmt: skip
            b = state.pop(mod_name + ".bias", None)
            if kind == "column":
                if b is not None:
                    r0, r1 = extra
                    inner.bias = torch.nn.Parameter(b[r0:r1].contiguous(), requires_grad=False)
                new = inner
            else:
                new = _row_shard_module(torch, dist, world, inner, extra, b)
            del old
            _replace(model, n, new)
    return _assign_state(model, state, meta, cls, path, stats, rank, world)


def _linear_of(torch, model, name: str):
    if not name.endswith(".weight"):
        return None
    try:
        mod = model.get_submodule(name.removesuffix(".weight"))
    except AttributeError:
        return None
    return mod if isinstance(mod, torch.nn.Linear) else None


def _replace(model, weight_name: str, new) -> None:
    parent, _, child = weight_name.removesuffix(".weight").rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


__all__ = ["COLUMN_PARALLEL", "ROW_PARALLEL", "load_model_tp"]
