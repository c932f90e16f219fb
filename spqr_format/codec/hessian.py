"""Calibration statistics: the layer Hessian ``H = (2/N) * sum_t x_t x_t^T`` of GPTQ/SpQR.

Accumulation is in float64: the sum of ``N`` outer products loses about ``log2(N)`` bits of an
f32 accumulator (24 bits hold 8,192 tokens of 2^11 relative precision at best), while f64 has 29
bits to spare; the cost is one f64 GEMM per batch, small next to the model's forward pass.
We keep the plain sum and divide once in :meth:`HessianAccumulator.hessian`, instead of SpQR's
running rescale ``H *= n/(n+b)`` (which adds a rounding per batch and counts sequences, not
tokens). ``N`` is the number of token vectors (rows of the flattened input).

Hessians are stored as safetensors so calibration and encoding can run on different machines;
the file is written atomically (temporary file, fsync, rename), so a crash never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np

from spqr_format.atomic import atomic_output
from spqr_format.errors import BadInputError, IoError

# Rows converted to f64 at a time: bounds the temporary copy at 64 MiB for n = 4096 (tokens x n).
_CHUNK_BYTES = 64 << 20
# Relative asymmetry a Hessian may have (f32 storage or another tool's f32 GEMM can leave
# ~1e-7 relative differences); beyond this it is not a Hessian of the form X^T X.
SYMMETRY_RTOL = 1e-4

try:
    from scipy.linalg.blas import dsyrk as _dsyrk
except ImportError:  # pragma: no cover - scipy is optional
    _dsyrk = None

FORMAT_TAG = "spqr-hessians"
FORMAT_VERSION = "1"
META_KEY = "spqr.hessians"


class HessianAccumulator:
    """Streaming ``H = (2/N) * sum x x^T`` over activation batches ``[..., in_features]``."""

    def __init__(self, in_features: int | None = None, *, name: str | None = None) -> None:
        self.name = name
        self.in_features = in_features
        self._sum: np.ndarray | None = None
        self.tokens = 0

    def add(self, batch: np.ndarray) -> None:
        """Add a batch of input activations; the last axis is ``in_features``."""
        x = np.asarray(batch)
        if x.ndim < 1 or x.shape[-1] == 0:
            raise BadInputError(f"activation batch has shape {x.shape}", tensor=self.name)
        if not np.issubdtype(x.dtype, np.floating):
            raise BadInputError(
                f"activations must be floating point, got {x.dtype}", tensor=self.name
            )
        n = x.shape[-1]
        if self.in_features is None:
            self.in_features = n
        if n != self.in_features:
            raise BadInputError(
                f"activation batch has {n} features, expected {self.in_features}", tensor=self.name
            )
        x = x.reshape(-1, n)
        if not np.isfinite(x).all():
            raise BadInputError("activation batch has non-finite values", tensor=self.name)
        if self._sum is None:
            self._sum = np.zeros((n, n), dtype=np.float64)
        rows = max(1, _CHUNK_BYTES // (8 * n))
        for i in range(0, x.shape[0], rows):
            xc = x[i : i + rows].astype(np.float64)
            if _dsyrk is not None:
                # SYRK computes one triangle: half the flops of X^T X. With the C-order chunk
                # seen as the Fortran matrix X^T, A A^T = X^T X; the C-order sum seen as
                # Fortran is its transpose, so the "upper" triangle written is our lower one.
                _dsyrk(1.0, xc.T, beta=1.0, c=self._sum.T, trans=0, lower=0, overwrite_c=1)
            else:  # pragma: no cover - scipy is optional
                self._sum += xc.T @ xc
        self.tokens += x.shape[0]

    def merge(self, partial_sum: np.ndarray | None, tokens: int) -> None:
        """Add another accumulator's plain sum (``sum x x^T`` over ``tokens`` rows, lower
        triangle as :meth:`add` leaves it): how chunk sums are folded in a fixed order so the
        result does not depend on how many processes computed them
        (:mod:`spqr_format.models.distributed`)."""
        if partial_sum is None or tokens == 0:
            return
        if self._sum is None:
            self._sum = np.zeros_like(partial_sum, dtype=np.float64)
        self._sum += partial_sum
        self.tokens += int(tokens)

    def hessian(self) -> np.ndarray:
        """``(2/N) * sum x x^T`` as float64 ``[n, n]`` (exactly symmetric)."""
        if self._sum is None or self.tokens == 0:
            raise BadInputError("no activations were added to the Hessian", tensor=self.name)
        h = self._sum * (2.0 / self.tokens)
        if _dsyrk is not None:
            return _mirror_lower(h)  # SYRK filled the lower triangle only
        # X^T X from BLAS may differ in the last bit between (i, j) and (j, i); make it exact.
        return (h + h.T) * 0.5  # pragma: no cover


def dead_columns(h: np.ndarray) -> np.ndarray:
    """Input columns whose activation was always zero: ``diag(H) == 0`` (bool ``[n]``)."""
    return np.diagonal(h) == 0


def check_hessian(h: object, n: int, *, name: str | None = None) -> np.ndarray:
    """Check a Hessian for a layer with ``n`` input columns without copying it; return it.

    Shape must be ``[n, n]``, values finite, the matrix symmetric (within ``SYMMETRY_RTOL``) with
    a non-negative diagonal. Otherwise :class:`BadInputError` naming the tensor. Whether it is
    positive definite is checked where it is factored (:mod:`gptq`), which damps it further with a
    warning if it is not.
    """
    if not isinstance(h, np.ndarray):
        raise BadInputError(f"Hessian must be a numpy array, got {type(h).__name__}", tensor=name)
    if h.shape != (n, n):
        raise BadInputError(
            f"Hessian shape {h.shape} does not match the weight's {n} input columns", tensor=name
        )
    if not np.issubdtype(h.dtype, np.floating):
        raise BadInputError(f"Hessian dtype must be floating point, got {h.dtype}", tensor=name)
    # Checked in row blocks so no n x n temporary is made (n = 16384 would need 2 GiB each).
    scale = 0.0
    asym = 0.0
    step = max(1, (16 << 20) // (8 * max(n, 1)))
    for i0 in range(0, n, step):
        rows = h[i0 : i0 + step]
        if not np.isfinite(rows).all():
            raise BadInputError("Hessian has non-finite values", tensor=name)
        scale = max(scale, float(np.abs(rows).max()))
        asym = max(asym, float(np.abs(rows - h[:, i0 : i0 + step].T).max()))
    check_hessian_facts(asym, scale, bool((np.diagonal(h) < 0).any()), name)
    return h


def check_hessian_facts(asym: float, scale: float, negative_diagonal: bool, name: str | None):
    """The last checks of a Hessian (numpy or torch) from its measured facts: ``asym`` (max
    ``|H - H^T|``) within ``SYMMETRY_RTOL`` of ``scale`` (max ``|H|``), no negative diagonal
    entry; an all-zero Hessian warns (``RuntimeWarning`` at the checker's caller's caller)."""
    if asym > SYMMETRY_RTOL * scale:
        raise BadInputError(
            f"Hessian is not symmetric (max |H - H^T| = {asym:.3g}, max |H| = {scale:.3g})",
            tensor=name,
        )
    if negative_diagonal:
        raise BadInputError("Hessian has negative diagonal entries", tensor=name)
    if scale == 0:
        warnings.warn(
            f"Hessian of {name or 'tensor'} is all zero (no input ever active); "
            "GPTQ reduces to zeroing the weight",
            RuntimeWarning,
            stacklevel=4,
        )


def validate_hessian(h: object, n: int, *, name: str | None = None) -> np.ndarray:
    """:func:`check_hessian`, then a float64 copy made exactly symmetric (upper from lower)."""
    h64 = np.array(check_hessian(h, n, name=name), dtype=np.float64, order="C", copy=True)
    return _mirror_lower(h64)


def _mirror_lower(h: np.ndarray) -> np.ndarray:
    """Copy the lower triangle of square ``h`` onto the upper one, in place, block by block."""
    n = h.shape[0]
    step = 256
    for i0 in range(0, n, step):
        i1 = min(i0 + step, n)
        blk = h[i0:i1, i0:i1]
        blk[...] = np.tril(blk) + np.tril(blk, -1).T
        h[i0:i1, i1:] = h[i1:, i0:i1].T
    return h


def save_hessians(
    path: str | os.PathLike[str],
    hessians: dict[str, np.ndarray | HessianAccumulator],
    *,
    dtype: str = "float64",
) -> None:
    """Write ``{tensor name: Hessian}`` to a safetensors file, atomically.

    Values may be arrays or :class:`HessianAccumulator` (whose token count is recorded in the
    metadata). ``dtype`` ``"float32"`` halves the file at a relative precision of ~1e-7, enough
    for damped GPTQ; the default keeps float64.
    """
    from safetensors.numpy import save

    if dtype not in ("float64", "float32"):
        raise BadInputError(f"Hessian file dtype must be float64 or float32, got {dtype!r}")
    tensors: dict[str, np.ndarray] = {}
    tokens: dict[str, int] = {}
    for key in sorted(hessians):
        v = hessians[key]
        if isinstance(v, HessianAccumulator):
            tokens[key] = v.tokens
            v = v.hessian()
        v = np.asarray(v)
        if v.ndim != 2 or v.shape[0] != v.shape[1]:
            raise BadInputError(f"Hessian must be square, got shape {v.shape}", tensor=key)
        if not np.isfinite(v).all():
            raise BadInputError("Hessian has non-finite values", tensor=key)
        tensors[key] = np.ascontiguousarray(v, dtype=np.dtype(dtype))
    # One metadata key holding canonical JSON: safetensors writes its metadata map in hash
    # order, so several keys would make the file bytes differ from run to run.
    info = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "tokens": tokens}
    meta = {META_KEY: json.dumps(info, sort_keys=True, separators=(",", ":"))}
    data = save(tensors, metadata=meta)
    with atomic_output(path) as f:
        f.write(data)


def load_hessians(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a file written by :func:`save_hessians` (or any safetensors of square matrices)."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        out: dict[str, np.ndarray] = {}
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[key] = f.get_tensor(key)
    except FileNotFoundError as e:
        raise IoError(f"cannot open Hessian file: {e.strerror or e}", path=path) from None
    except (OSError, ValueError, RuntimeError) as e:
        raise IoError(f"cannot read Hessian file: {e}", path=path) from None
    except Exception as e:  # safetensors raises its own SafetensorError for bad headers
        raise IoError(f"cannot read Hessian file: {e}", path=path) from None
    for key, v in out.items():
        if v.ndim != 2 or v.shape[0] != v.shape[1]:
            raise BadInputError(
                f"Hessian must be square, got shape {v.shape}", path=path, tensor=key
            )
    return out


def hessian_tokens(path: str | os.PathLike[str]) -> dict[str, int]:
    """Token counts recorded by :func:`save_hessians` (empty when none were recorded)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="numpy") as f:
        meta = f.metadata() or {}
    try:
        info = json.loads(meta.get(META_KEY, "{}"))
        return {str(k): int(v) for k, v in dict(info.get("tokens", {})).items()}
    except (ValueError, TypeError, AttributeError):
        return {}
