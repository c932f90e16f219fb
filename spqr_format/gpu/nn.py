"""torch integration: ``SpQRLinear`` runs the fused kernels on torch's current stream.

torch stays optional: it is imported only by this module.

* Inputs and outputs are torch tensors; the kernels receive their device pointers (the
  zero-copy view DLPack would give, without DLPack's stream hand-shake, which is not allowed
  inside CUDA-graph capture) and run on ``torch.cuda.current_stream()`` through
  ``cupy.cuda.Stream.from_external`` (``ExternalStream`` on older CuPy). Workspace comes
  from torch's allocator, so the forward is capturable in a CUDA graph (``torch.cuda.graph``)
  once it has run once outside capture (the first call compiles the kernel module).
* The weights stay in their compressed form (CuPy arrays of the file's sections). They are also
  exposed to torch through DLPack (:meth:`SpQRLinear.sections`), e.g. to count memory.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from spqr_format.gpu import _kernels as K

_TORCH_CODES = {torch.float16: 1, torch.bfloat16: 2}


class SpQRLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear`` whose weight is a ``bilevel`` or ``channel_mixed``
    tensor on the GPU (a ``GpuTensor`` or ``GpuCmpqTensor``).

    ``forward(x)``: ``x[..., in_features]`` in float16 or bfloat16 on the GPU; returns
    ``x @ W^T + bias`` in the dtype of ``x``. The launch plan (:mod:`spqr_format.gpu.plan`)
    picks the path: fused kernels for small batches, dequantize + cuBLAS (on torch's stream,
    into a workspace from torch's allocator) for large ones and for configurations without a
    fused kernel (logged once).
    """

    def __init__(self, weight, bias: torch.Tensor | None = None, name: str | None = None):
        super().__init__()
        self.weight_gpu = weight  # spqr_format.gpu.GpuTensor
        self.out_features, self.in_features = weight.shape
        self.name = name
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_file(cls, path, name: str, bias: torch.Tensor | None = None) -> SpQRLinear:
        from spqr_format.gpu.tensor import GpuTensor

        return cls(GpuTensor.from_file(path, name), bias=bias, name=name)

    def extra_repr(self) -> str:
        g = self.weight_gpu
        if getattr(g, "encoding", "bilevel") == "channel_mixed":
            counts = {b + 1: c for b, c in enumerate(g.width_counts) if c}
            enc = f"channel_mixed, width_counts={counts}, table_rows={g.table_rows}"
        else:
            enc = f"bits={g.bits}, group_size={g.group_size}, stats_bits={g.stats_bits}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {enc}, "
            f"bias={self.bias is not None}"
        )

    def sections(self) -> dict[str, torch.Tensor]:
        """The compressed sections as torch tensors sharing the device memory (DLPack)."""
        g = self.weight_gpu
        out = {}
        keys = ("codes", "stats", "stats2", "perm", "outlier_rows", "outlier_entries")
        if getattr(g, "encoding", "bilevel") == "channel_mixed":
            keys = ("codes", "tables", "perm", "orows", "ocolp", "ocorr")
        for key in keys:
            a = getattr(g, key)
            if a is not None:
                out[key] = torch.from_dlpack(a)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import cupy as cp

        if x.dtype not in _TORCH_CODES:
            raise TypeError(f"SpQRLinear takes float16 or bfloat16 inputs, got {x.dtype}")
        if not x.is_cuda:
            raise ValueError("SpQRLinear needs its input on the GPU")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        batch = x2.shape[0]
        y = torch.empty(batch, self.out_features, dtype=x.dtype, device=x.device)
        if batch > 0:
            g = self.weight_gpu
            code = _TORCH_CODES[x.dtype]
            # the fused kernels' scratch, or (launch plan path "dense", large batches) the
            # dequantized weights; torch's caching allocator reuses it across layers and calls
            ws = torch.empty(
                -(-g.workspace_bytes(batch, code) // 4), dtype=torch.float32, device=x.device
            )
            stream = torch.cuda.current_stream(x.device)
            with cp.cuda.Device(x.device.index), _cupy_stream(stream.cuda_stream):
                g.matmul_into(
                    x2.data_ptr(),
                    self.in_features,
                    code,
                    y.data_ptr(),
                    self.out_features,
                    code,
                    batch,
                    ws.data_ptr(),
                )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class _StreamHandle:
    """A raw ``cudaStream_t`` in the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, ptr: int):
        self.ptr = int(ptr)

    def __cuda_stream__(self):
        return (0, self.ptr)


_STREAMS: dict[int, object] = {}


def _cupy_stream(ptr: int):
    """CuPy's view of another framework's stream: ``Stream.from_external`` (the stream
    protocol) where this CuPy has it, else the older ``ExternalStream``. The view owns nothing
    (it only carries the handle), so one is kept per handle instead of being built on every
    forward (decode calls a linear layer hundreds of times per token)."""
    s = _STREAMS.get(ptr)
    if s is None:
        import cupy as cp

        from_external = getattr(cp.cuda.Stream, "from_external", None)
        if from_external is not None:
            s = from_external(_StreamHandle(ptr))
        else:
            s = cp.cuda.ExternalStream(ptr)
        if len(_STREAMS) > 256:  # streams come and go (one per thread or graph pool)
            _STREAMS.clear()
        _STREAMS[ptr] = s
    return s


def replace_linear(
    model: nn.Module, path: str | os.PathLike[str], *, suffix: str = ".weight", strict: bool = False
) -> list[str]:
    """Swap every ``nn.Linear`` of ``model`` whose weight is a ``bilevel`` or ``channel_mixed``
    tensor of the ``.spqr`` file ``path`` (named ``<module name><suffix>``) for an
    :class:`SpQRLinear` on the linear's device. Returns the names replaced. ``strict``: fail
    when a Linear has no tensor.
    """
    from spqr_format.api import open_file
    from spqr_format.codec.bilevel import PackedBilevel
    from spqr_format.codec.channel_mixed import PackedChannelMixed
    from spqr_format.gpu.tensor import GpuTensor

    replaced = []
    with open_file(path) as f:
        names = set(f.names())
        for mod_name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            key = mod_name + suffix
            if key not in names:
                if strict:
                    raise KeyError(f"{path}: no tensor {key!r} for nn.Linear {mod_name!r}")
                continue
            p = f.read(key)
            if not isinstance(p, (PackedBilevel, PackedChannelMixed)):
                if strict:
                    raise TypeError(f"{key!r} is neither bilevel- nor channel_mixed-encoded")
                continue
            if tuple(p.shape) != (module.out_features, module.in_features):
                raise ValueError(
                    f"{key!r} has shape {p.shape}, the Linear is "
                    f"{(module.out_features, module.in_features)}"
                )
            import cupy as cp

            dev = module.weight.device
            with cp.cuda.Device(dev.index if dev.type == "cuda" else 0):
                g = GpuTensor.from_packed(p, name=key)
            new = SpQRLinear(g, bias=module.bias, name=key)
            parent_name, _, child = mod_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            replaced.append(mod_name)
    K.log.info("replace_linear: %d nn.Linear layers replaced from %s", len(replaced), path)
    return replaced
