"""Read and write safetensors files with numpy, bf16 included, one tensor at a time.

Reading goes through the `safetensors` library itself (``safe_open(path, framework="numpy")``),
its maintained and fuzzed parser, which refuses malformed headers (negative or non-integer
dims, unknown dtypes, overlapping or out-of-range data offsets, a non-object ``__metadata__``,
deep JSON...). ``ml_dtypes`` is imported first so that numpy knows ``bfloat16``: BF16 tensors
come back as real ``ml_dtypes.bfloat16`` arrays. Every failure is a typed
:class:`~spqr_format.errors.SpqrError` naming the file (and the tensor where known); only
regular files are opened, so a FIFO or a device never blocks a command.

Writing keeps a streaming, atomic writer (:class:`SafetensorsWriter`): the header is fixed up
front and tensors are appended one at a time, so a model larger than memory can be decoded.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import ml_dtypes  # noqa: F401 - registers numpy's bfloat16 (safetensors' numpy BF16 needs it)
import numpy as np

from spqr_format.atomic import commit, create_temp_beside, remove_quietly
from spqr_format.errors import BadInputError, IoError

# safetensors dtype code -> our dtype name (the numpy dtype name of the arrays returned)
_ST_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_NAME_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
# The name safetensors reserves for its metadata map: a tensor of that name cannot be loaded.
RESERVED_NAME = "__metadata__"


def _library_error(exc: BaseException) -> bool:
    """True for what the safetensors library raises on bad input: its SafetensorError and
    the Python errors of its binding, or a Rust panic surfacing as pyo3's PanicException
    (a BaseException subclass)."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def check_regular_file(path: str, what: str = "input") -> None:
    """E_IO unless ``path`` names a regular file (following symlinks): a FIFO, a socket or a
    device would block or never end when read."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise IoError(f"cannot open {what}: {exc.strerror or exc}", path=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise IoError(f"{what} is not a regular file", path=path)


@dataclass
class StTensor:
    """One tensor of a safetensors file. ``data`` is a numpy array of the stored dtype; BF16
    is an ``ml_dtypes.bfloat16`` array."""

    name: str
    dtype: str  # float32, float16, bfloat16, or another numeric name
    shape: tuple[int, ...]
    data: np.ndarray

    def to_float32(self) -> np.ndarray:
        """The values as float32 (exact for f16, bf16 and f32)."""
        if self.dtype == "bfloat16" and self.data.dtype == np.uint16:  # bit patterns
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(self.data.astype(np.float32))

    def bits(self) -> np.ndarray:
        """bf16 as uint16 bit patterns, other dtypes as they are (the codec's convention)."""
        if self.dtype == "bfloat16" and self.data.dtype != np.uint16:
            return self.data.view(np.uint16)
        return self.data


class SafetensorsFile:
    """A read-only safetensors file opened with the safetensors library; tensors are read
    one at a time, in the order of their data in the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.path = os.fspath(path)
        self._f = None
        check_regular_file(self.path)
        try:
            self._f = safe_open(self.path, framework="numpy")
            names = list(self._f.offset_keys())
            meta = self._f.metadata()
        except OSError as exc:
            raise IoError(f"cannot read: {exc.strerror or exc}", path=self.path) from None
        except BaseException as exc:
            if not _library_error(exc):
                raise
            self.close()
            raise BadInputError(f"not a valid safetensors file: {exc}", path=self.path) from None
        self.metadata: dict[str, str] = dict(meta or {})
        self._names = names
        self._set = frozenset(names)

    def names(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def _handle(self):
        if self._f is None:
            raise IoError("the safetensors file is closed", path=self.path)
        return self._f

    def get(self, name: str) -> StTensor:
        if name not in self._set:
            raise BadInputError("no such tensor", path=self.path, tensor=name)
        f = self._handle()
        try:
            info = f.get_slice(name)
            code, shape = info.get_dtype(), tuple(int(d) for d in info.get_shape())
            data = np.asarray(f.get_tensor(name))
        except OSError as exc:
            raise IoError(
                f"cannot read: {exc.strerror or exc}", path=self.path, tensor=name
            ) from None
        except MemoryError:
            raise
        except BaseException as exc:
            if not _library_error(exc):
                raise
            raise BadInputError(
                f"cannot read tensor: {type(exc).__name__}: {exc}", path=self.path, tensor=name
            ) from None
        dtype = _ST_NAMES.get(code, str(data.dtype))
        if tuple(data.shape) != shape:  # never seen; a guard on the binding
            raise BadInputError(
                f"library returned shape {list(data.shape)} for {list(shape)}",
                path=self.path,
                tensor=name,
            )
        return StTensor(name, dtype, shape, data)

    def __iter__(self) -> Iterator[StTensor]:
        for name in self._names:
            yield self.get(name)

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.__exit__(None, None, None)
            except BaseException as exc:  # closing twice, or a binding without __exit__
                if not _library_error(exc):
                    raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shape_count(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


class SafetensorsWriter:
    """Streaming, atomic safetensors writer: the header is fixed up front from the names,
    dtypes and shapes, then tensors are written one at a time in that order, so a model
    larger than memory can be written. Nothing appears at ``path`` until ``close()``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        layout: list[tuple[str, str, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        header: dict[str, object] = {}
        self._pending: list[tuple[str, str, tuple[int, ...]]] = []
        offset = 0
        for name, dtype_name, shape in layout:
            if name == RESERVED_NAME:
                raise BadInputError(
                    f"a tensor named {RESERVED_NAME!r} cannot be stored in safetensors (the "
                    "format reserves that key for its metadata); decode the other tensors "
                    "with --tensor",
                    path=self.path,
                    tensor=name,
                )
            if dtype_name not in _NAME_TO_ST:
                raise BadInputError(f"cannot write dtype {dtype_name}", tensor=name)
            nbytes = _shape_count(shape) * _ITEMSIZE[dtype_name]
            header[name] = {
                "dtype": _NAME_TO_ST[dtype_name],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            self._pending.append((name, dtype_name, tuple(shape)))
        if metadata:
            bad = [
                k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))
            ]
            if bad:
                raise BadInputError(
                    f"safetensors metadata maps strings to strings; not so for {bad[0]!r}",
                    path=self.path,
                )
            header[RESERVED_NAME] = dict(metadata)
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # the buffer starts 8-byte aligned, as safetensors does
        try:
            fd, self._tmp = create_temp_beside(self.path)
        except OSError as exc:
            raise IoError(f"cannot create a file next to it: {exc}", path=self.path) from exc
        self._file = os.fdopen(fd, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next tensor; its name, dtype and shape must be the next in the layout."""
        exp_name, dtype_name, shape = self._pending[self._next]
        array = np.asarray(array)
        if dtype_name == "bfloat16" and array.dtype.name == "bfloat16":
            array = array.view(np.uint16)  # ml_dtypes.bfloat16 values: the same bytes
        storage = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}[dtype_name]
        # A zero-element tensor whose shape numpy cannot hold arrives with dims of 0
        # (api.array_shape); its header keeps the stored shape and it has no bytes.
        shape_ok = tuple(array.shape) == shape or (
            array.size == 0 and array.ndim == len(shape) and _shape_count(shape) == 0
        )
        if name != exp_name or not shape_ok or array.dtype != np.dtype(storage):
            raise BadInputError(
                f"expected {exp_name} {dtype_name}{list(shape)}, got {name} "
                f"{array.dtype}{list(array.shape)}",
                path=self.path,
                tensor=name,
            )
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._pending):
            self.abort()
            raise BadInputError(
                f"{len(self._pending) - self._next} tensors were never written", path=self.path
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        commit(self._tmp, self.path)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        remove_quietly(self._tmp)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``{name: (dtype_name, array)}`` atomically; bfloat16 data may be an
    ``ml_dtypes.bfloat16`` array or uint16 bit patterns."""
    layout = [(name, d, tuple(a.shape)) for name, (d, a) in tensors.items()]
    with SafetensorsWriter(path, layout, metadata) as writer:
        for name, (_, array) in tensors.items():
            writer.write(name, array)
