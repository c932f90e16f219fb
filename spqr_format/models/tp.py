"""Tensor-parallel loading of a ``.spqr`` model over the ranks of a torchrun launch (issue 21).

:func:`load_model_tp` shards every transformer block as Megatron does, for Llama-shaped
models (Llama, Mistral, Qwen2: ``q/k/v/o_proj``, ``gate/up/down_proj``):

- **column-parallel** ``q_proj``, ``k_proj``, ``v_proj`` (whole attention heads / KV heads per
  rank), ``gate_proj``, ``up_proj``: rank ``r`` holds output rows ``[r*m/N, (r+1)*m/N)`` of
  ``W[m, n]``. Those are row blocks of the stored tensor: read alone (only the rank's part of
  the codes, statistics and outliers is touched) when the boundaries are multiples of 16 and
  of the statistics tile (:mod:`spqr_format.codec.slicing`), else whole rows are decoded.
- **row-parallel** ``o_proj``, ``down_proj``: rank ``r`` holds input columns
  ``[r*n/N, (r+1)*n/N)``; its partial products are summed with ``all_reduce``. A column
  slice of a permuted tensor is scattered over every row's codes, so each rank reads and
  decodes the whole tensor and keeps its columns (measured in the README).
- embeddings, norms and ``lm_head`` are replicated (read whole by every rank).

On the CPU the shards hold dequantized weights (the tensor's own dtype), the collectives go
through gloo. The logits equal the unsharded model's up to float32 summation order in the two
``all_reduce`` of every block (the test bounds the difference).

Needs ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` divisible by
the number of ranks. GPU tensor parallelism (SpQRLinear shards, NCCL) is not implemented.
"""

from __future__ import annotations

import os
import warnings

from spqr_format import api
from spqr_format.codec import slicing
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


def load_model_tp(path: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None = None,
                  group=None):  # fmt: skip
    """The model in ``path`` sharded over the ranks of ``group`` (default: the torchrun
    process group, initialised with gloo when needed), on the CPU, in eval mode. Every rank
    calls it; the model's forward is collective (every rank must run it on the same input).
    ``model.tp_read`` counts how each sharded tensor was read."""
    torch = require_torch()
    from spqr_format.models.distributed import from_env

    group = group or from_env("cpu")
    dist = group.dist
    rank, world = group.rank, group.world
    path = os.fspath(path)
    stats = {"cheap_rows": 0, "full_rows": 0, "full_columns": 0}
    with api.open_file(path) as f:
        meta = f.metadata
        config, cls = build_config(meta, path)
        if model_dir is not None:
            _check_tokenizer(meta, os.fspath(model_dir))
        if meta.get("model.transposed"):
            raise BadInputError("tensor-parallel loading covers Llama-shaped models only "
                                "(this one has Conv1D layers)", path=path)  # fmt: skip
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
        state = {n: _read_shard(f, n, kinds[n] if world > 1 else None, rank, world, stats)
                 for n in names}  # fmt: skip
    for dup, first in (meta.get("model.tied") or {}).items():
        if first in state and dup not in state:
            state[dup] = state[first]
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
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise BadInputError(f"tensor {result.unexpected_keys[0]!r} has no place in "
                            f"{cls.__name__}", path=path)  # fmt: skip
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.tp_read = stats
    model.tp_rank, model.tp_world = rank, world
    return model


__all__ = ["COLUMN_PARALLEL", "ROW_PARALLEL", "load_model_tp"]
