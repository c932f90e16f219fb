"""GPU decoder and fused matvec/matmul for ``bilevel`` and ``channel_mixed`` tensors.

The kernels are plain CUDA C (``kernels/spqr_kernels.cu``, ``spqr_tc.cu``, and
``spqr_cmpq.cu`` for ``channel_mixed``, documented in ``kernels/spqr_gpu.h``) and have no
Python dependency. This package adds:

* :class:`GpuTensor` (CuPy): upload a tensor's sections, ``dequantize``, ``matvec``, ``matmul``
  (a ``channel_mixed`` tensor gives a :class:`spqr_format.gpu.cmpq.GpuCmpqTensor`, same
  interface);
* :mod:`spqr_format.gpu.nn` (torch): ``SpQRLinear`` and ``replace_linear``.

The kernels are compiled by NVRTC on first use, one small module per configuration, and cached
on disk by CuPy; :func:`precompile` warms that cache ahead of time.

Importing this package needs neither CuPy nor torch; using :class:`GpuTensor` needs CuPy and a
CUDA device, and raises ImportError with an explanation otherwise.
"""

from __future__ import annotations

from spqr_format.gpu._kernels import KERNEL_DIR, KERNEL_SOURCE, all_kernel_names, matvec_supported

__all__ = [
    "GpuTensor",
    "KERNEL_DIR",
    "KERNEL_SOURCE",
    "all_kernel_names",
    "available",
    "matvec_supported",
    "precompile",
]


def available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def __getattr__(name: str):
    if name == "GpuTensor":
        from spqr_format.gpu.tensor import GpuTensor

        return GpuTensor
    raise AttributeError(f"module 'spqr_format.gpu' has no attribute {name!r}")


def precompile(*args, **kwargs):
    """Compile kernel modules ahead of first use; see
    :func:`spqr_format.gpu._precompile.precompile` (imported on call, so that ``python -m
    spqr_format.gpu._precompile`` does not import that module twice)."""
    from spqr_format.gpu._precompile import precompile as _precompile

    return _precompile(*args, **kwargs)
