"""Decoders the runner can judge: a small registry of in-process backends, and the external
command protocol.

A decoder is any object with

- ``name`` (str);
- ``decode(path) -> dict[str, Decoded]``: every tensor of the file decoded to its own dtype.
  To refuse the file it raises an exception whose ``code`` attribute is the SPEC section 9
  code (``SpqrError`` has one; so can any exception class of another implementation);
- ``matvec(path, xs) -> dict[str, numpy array]`` (optional): ``y = W x`` for each bilevel
  tensor named in ``xs`` (float32 ``x`` in original column order); raise
  :class:`Unsupported` (or omit the method) when the decoder has no matvec, and those cases are
  skipped, not failed.

Built-in backends: ``cpu`` (the numba reference codec) and ``gpu`` (the CUDA kernels through
CuPy). Any other decoder is named ``module:attribute`` (``pkg.mod:Decoder`` or
``path/to/file.py:Decoder``); the attribute is a class or factory called with no argument, or
an instance. HOOK: the independent plain-numpy decoder registers itself here as ``numpy``
with ``register_backend("numpy", "<module>:<class>")``, or is added to ``BACKENDS`` below.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

from spqr_format.conformance import stfile

CODE_RE = re.compile(r"\bE_[A-Z0-9_]+\b")


@dataclass
class Decoded:
    dtype: str  # safetensors dtype: F32, F16, BF16
    shape: tuple[int, ...]
    data: bytes  # little-endian elements, C order


class Unsupported(Exception):
    """The decoder does not implement this operation (matvec): the case is skipped."""


class Rejected(Exception):
    """The decoder refused the file; ``code`` is the error code it reported (None if none)."""

    def __init__(self, code: str | None, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Crashed(Exception):
    """The decoder failed in a way that is not a refusal: killed by a signal, timed out, wrote
    an unreadable output, or (in process) raised an exception without an error code."""


class BackendUnavailable(Exception):
    """The backend cannot run here (no CuPy, no GPU, module not importable)."""


# ---------------------------------------------------------------------------------------------
# In-process backends


def _to_decoded(arr: np.ndarray, dtype_name: str, shape) -> Decoded:
    st = stfile.SPQR_TO_ST[dtype_name]
    storage = stfile.DTYPES[st][0]
    a = np.ascontiguousarray(arr)
    data = a.astype(a.dtype.newbyteorder("<")).tobytes() if a.size else b""
    if a.size and a.dtype.itemsize != np.dtype(storage).itemsize:
        raise Crashed(f"decoded array is {a.dtype}, expected {st}")
    return Decoded(st, tuple(int(d) for d in shape), data)


class ReferenceDecoder:
    """The numba reference codec (``spqr_format.api``): CRCs, data checks and digests."""

    name = "cpu"

    def decode(self, path) -> dict[str, Decoded]:
        from spqr_format import api, spec

        out = {}
        with api.open_file(path) as f:
            for n in f.names():
                e = f.entry(n)
                own = spec.DTYPE_NAMES[spec.DType(e.dtype)]
                w = f.decode(n, None, verify_crc=True, verify_digest=True)
                out[n] = _to_decoded(w, own, e.shape)
        return out

    def matvec(self, path, xs) -> dict[str, np.ndarray]:
        from spqr_format import api
        from spqr_format.codec import channel_mixed, channel_mixed_ref, reference

        out = {}
        with api.open_file(path) as f:
            for n, x in xs.items():
                t = f.read(n)
                mv = (
                    channel_mixed_ref.matvec_channel_mixed
                    if isinstance(t, channel_mixed.PackedChannelMixed)
                    else reference.matvec_bilevel
                )
                out[n] = mv(t, np.asarray(x, np.float32))
        return out


class GpuDecoder:
    """The CUDA kernels (``spqr_format.gpu.GpuTensor``): bilevel and channel_mixed tensors are
    dequantized on the GPU (bit-exact paths), raw tensors and all header / data checks stay on
    the CPU."""

    name = "gpu"

    def __init__(self) -> None:
        try:
            import cupy  # noqa: F401
        except Exception as exc:  # ImportError, or CUDA libraries missing
            raise BackendUnavailable(
                f"--backend gpu needs CuPy and a CUDA GPU: cannot import cupy ({exc})"
            ) from None
        from spqr_format import gpu

        if not gpu.available():
            raise BackendUnavailable("--backend gpu needs a CUDA GPU: CuPy sees no device")

    def decode(self, path) -> dict[str, Decoded]:
        import cupy as cp

        from spqr_format import api, spec
        from spqr_format.codec import reference
        from spqr_format.codec.bilevel import PackedBilevel
        from spqr_format.codec.channel_mixed import PackedChannelMixed
        from spqr_format.errors import DigestMismatchError
        from spqr_format.gpu.tensor import GpuTensor

        out = {}
        with api.open_file(path) as f:
            for n in f.names():
                e = f.entry(n)
                own = spec.DTYPE_NAMES[spec.DType(e.dtype)]
                p = f.read(n)  # CRCs (C-2.8a)
                if not isinstance(p, (PackedBilevel, PackedChannelMixed)):
                    out[n] = _to_decoded(f.decode(n, None, verify_digest=True), own, e.shape)
                    continue
                t = GpuTensor.from_packed(p, validate=True, name=n, tensor_cores=False)
                w = cp.asnumpy(t.dequantize(own))
                if own == "bfloat16":
                    w = w.view(np.uint16)
                if reference.tensor_digest(w) != e.digest:  # C-2.12
                    raise DigestMismatchError("decoded weights do not match the digest", tensor=n)
                out[n] = _to_decoded(w, own, e.shape)
        return out

    def matvec(self, path, xs) -> dict[str, np.ndarray]:
        import cupy as cp

        from spqr_format import api
        from spqr_format.gpu.tensor import GpuTensor

        out = {}
        with api.open_file(path) as f:
            for n, x in xs.items():
                t = GpuTensor.from_packed(f.read(n), validate=True, name=n)
                y = t.matvec(cp.asarray(np.asarray(x, np.float32).astype(np.float16)))
                out[n] = cp.asnumpy(y).astype(np.float64)
        return out


class NumpyDecoder:
    """The second, independent decoder: ``conformance/numpy_decoder.py`` of the source tree,
    written from SPEC.md alone (standard library + numpy, nothing from ``spqr_format``), as
    gguf-py is a second implementation next to ggml. Its ``SpecError`` carries the code."""

    name = "numpy"
    SOURCE = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "conformance",
        "numpy_decoder.py",
    )

    def __init__(self) -> None:
        if not os.path.isfile(self.SOURCE):
            raise BackendUnavailable(
                f"--backend numpy needs the source tree's {self.SOURCE} (not installed with the "
                "package): run from a checkout, or pass --decoder with its command line"
            )
        spec = importlib.util.spec_from_file_location("spqr_numpy_decoder", self.SOURCE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self._m = module

    def decode(self, path) -> dict[str, Decoded]:
        # decode_file_info: {name: (dtype name, dims, array in its own dtype)}; it keeps the
        # true shape of zero-size tensors numpy cannot allocate (e.g. [0, 2^40, 2^40])
        out = {}
        for n, (dtype_name, dims, arr) in self._m.decode_file_info(path).items():
            out[n] = _to_decoded(arr, dtype_name, dims)
        return out

    def matvec(self, path, xs) -> dict[str, np.ndarray]:
        return {n: self._m.matvec(path, n, np.asarray(x, np.float32)) for n, x in xs.items()}


BACKENDS: dict[str, str] = {
    "cpu": "spqr_format.conformance.backends:ReferenceDecoder",
    "gpu": "spqr_format.conformance.backends:GpuDecoder",
    "numpy": "spqr_format.conformance.backends:NumpyDecoder",
}


def register_backend(name: str, target: str) -> None:
    """Make ``--backend NAME`` load ``target`` (``module:attribute``)."""
    BACKENDS[name] = target


def load_backend(name: str):
    """An in-process decoder by registry name or ``module:attribute``."""
    target = BACKENDS.get(name, name)
    if ":" not in target:
        raise BackendUnavailable(
            f"unknown backend {name!r}: use one of {sorted(BACKENDS)} or module:attribute"
        )
    mod_name, _, attr = target.rpartition(":")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            spec = importlib.util.spec_from_file_location(
                "spqr_conformance_backend_" + re.sub(r"\W", "_", mod_name), mod_name
            )
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {mod_name}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
        obj = getattr(module, attr)
    except (ImportError, AttributeError, OSError) as exc:
        raise BackendUnavailable(f"cannot load backend {target!r}: {exc}") from None
    dec = obj() if callable(obj) and not hasattr(obj, "decode") or isinstance(obj, type) else obj
    if not hasattr(dec, "name"):
        dec.name = name
    return dec


# ---------------------------------------------------------------------------------------------
# External command protocol


def _command(template: str, **paths: str) -> list[str]:
    words = shlex.split(template)
    if not any("{input}" in w for w in words):
        raise BackendUnavailable(f"decoder command {template!r} has no {{input}} placeholder")
    out = []
    for w in words:
        for key, value in paths.items():
            w = w.replace("{" + key + "}", value)
        out.append(w)
    return out


def find_code(stderr: str, stdout: str) -> str | None:
    """The reported error code: the first ``E_[A-Z0-9_]+`` token of stderr, else of stdout."""
    for text in (stderr, stdout):
        m = CODE_RE.search(text)
        if m:
            return m.group(0)
    return None


class ExternalDecoder:
    """A decoder run as a command per vector (conformance/README.md, "Decoder protocol").

    ``decode_cmd``: ``"CMD ... {input} ... {output}"``; ``matvec_cmd`` (optional):
    ``"CMD ... {input} ... {x} ... {output}"``. Placeholders are replaced inside the words of
    the command line split by POSIX shell rules; no shell runs it.
    """

    def __init__(self, decode_cmd: str | None, matvec_cmd: str | None = None, timeout=120.0):
        self.decode_cmd = decode_cmd
        self.matvec_cmd = matvec_cmd
        self.timeout = timeout
        self.name = decode_cmd or matvec_cmd or "external"
        for cmd in (decode_cmd, matvec_cmd):
            if cmd is not None:
                _command(cmd, input="i", output="o", x="x")
                if "{output}" not in cmd:
                    raise BackendUnavailable(f"decoder command {cmd!r} has no {{output}}")

    def _run(self, argv: list[str]) -> None:
        try:
            proc = subprocess.run(
                argv, capture_output=True, timeout=self.timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise Crashed(f"timed out after {self.timeout:g} s") from None
        except OSError as exc:
            raise Crashed(f"cannot run {argv[0]!r}: {exc}") from None
        err = proc.stderr.decode("utf-8", "replace")
        out = proc.stdout.decode("utf-8", "replace")
        if proc.returncode < 0:
            raise Crashed(f"killed by signal {-proc.returncode}; stderr: {err[-500:]}")
        if proc.returncode != 0:
            code = find_code(err, out)
            raise Rejected(code, (err.strip() or out.strip())[-500:])

    def _read(self, path: str):
        if not os.path.exists(path):
            raise Crashed("exit status 0 but no output file was written")
        try:
            return stfile.read(path)
        except stfile.StFormatError as exc:
            raise Crashed(f"output is not a valid safetensors file: {exc}") from None

    def decode(self, path) -> dict[str, Decoded]:
        if self.decode_cmd is None:
            raise Unsupported("no --decoder command")
        with tempfile.TemporaryDirectory(prefix="spqr-conf-") as d:
            out = os.path.join(d, "output.safetensors")
            self._run(_command(self.decode_cmd, input=os.fspath(path), output=out))
            return {n: Decoded(dt, shape, raw) for n, (dt, shape, raw) in self._read(out).items()}

    def matvec(self, path, xs) -> dict[str, np.ndarray]:
        if self.matvec_cmd is None:
            raise Unsupported("no --matvec-decoder command")
        with tempfile.TemporaryDirectory(prefix="spqr-conf-") as d:
            xpath = os.path.join(d, "x.safetensors")
            stfile.write(xpath, {n: ("F32", np.asarray(x, np.float32)) for n, x in xs.items()})
            out = os.path.join(d, "y.safetensors")
            self._run(_command(self.matvec_cmd, input=os.fspath(path), x=xpath, output=out))
            ys = {}
            for n, entry in self._read(out).items():
                if entry[0] == "BF16":
                    bits = stfile.as_array(entry).astype(np.uint32) << 16
                    ys[n] = bits.view(np.float32).astype(np.float64)
                else:
                    ys[n] = stfile.as_array(entry).astype(np.float64)
            return ys
