"""Read and write safetensors files with numpy, bf16 included, without loading whole files.

The `safetensors` package's numpy binding cannot represent bfloat16, which most LLM checkpoints
use, so this module reads the (simple) format itself: an 8-byte little-endian header length,
a JSON header, and one byte buffer. bf16 tensors come back as ``uint16`` bit patterns tagged
with their dtype name; float16/float32 come back as numpy views of a read-only mmap.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from spqr_format.atomic import commit, create_temp_beside, remove_quietly
from spqr_format.errors import BadInputError, IoError

# safetensors dtype name -> (numpy storage dtype, our dtype name)
_ST_DTYPES = {
    "F32": ("<f4", "float32"),
    "F16": ("<f2", "float16"),
    "BF16": ("<u2", "bfloat16"),
    "F64": ("<f8", "float64"),
    "I64": ("<i8", "int64"),
    "I32": ("<i4", "int32"),
    "I16": ("<i2", "int16"),
    "I8": ("i1", "int8"),
    "U8": ("u1", "uint8"),
    "BOOL": ("?", "bool"),
}
_NAME_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MAX_HEADER = 100_000_000  # the cap the safetensors project itself applies


@dataclass
class StTensor:
    """One tensor of a safetensors file: ``data`` has the storage dtype (bf16 as uint16)."""

    name: str
    dtype: str  # float32, float16, bfloat16, or another numeric name
    shape: tuple[int, ...]
    data: np.ndarray

    def to_float32(self) -> np.ndarray:
        """The values as float32 (exact for f16, bf16 and f32)."""
        if self.dtype == "bfloat16":
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        return self.data.astype(np.float32)


class SafetensorsFile:
    """A read-only, memory-mapped safetensors file; tensors are read lazily."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as exc:
            raise IoError(f"cannot open: {exc.strerror or exc}", path=self.path) from exc
        if size < 8:
            raise BadInputError("not a safetensors file (shorter than 8 bytes)", path=self.path)
        (hlen,) = struct.unpack_from("<Q", self._mm, 0)
        if hlen > MAX_HEADER or 8 + hlen > size:
            raise BadInputError(
                f"not a safetensors file (header length {hlen} for a {size}-byte file)",
                path=self.path,
            )
        try:
            header = json.loads(bytes(self._mm[8 : 8 + hlen]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadInputError(f"safetensors header is not JSON: {exc}", path=self.path) from exc
        if not isinstance(header, dict):
            raise BadInputError("safetensors header is not a JSON object", path=self.path)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._base = 8 + hlen
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                st_dtype = info["dtype"]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(v) for v in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise BadInputError(
                    f"malformed header entry: {exc}", path=self.path, tensor=name
                ) from None
            if st_dtype not in _ST_DTYPES:
                raise BadInputError(f"unsupported dtype {st_dtype}", path=self.path, tensor=name)
            itemsize = np.dtype(_ST_DTYPES[st_dtype][0]).itemsize
            count = int(np.prod(shape, dtype=object)) if shape else 1
            if (
                begin < 0
                or end < begin
                or self._base + end > size
                or end - begin != count * itemsize
            ):
                raise BadInputError(
                    f"data_offsets [{begin}, {end}) do not match shape {shape} x {st_dtype} "
                    f"within a {size}-byte file",
                    path=self.path,
                    tensor=name,
                )
            self._entries[name] = (st_dtype, shape, begin, end)

    def names(self) -> list[str]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> StTensor:
        if name not in self._entries:
            raise BadInputError("no such tensor", path=self.path, tensor=name)
        st_dtype, shape, begin, end = self._entries[name]
        np_dtype, our_name = _ST_DTYPES[st_dtype]
        buf = self._mm[self._base + begin : self._base + end] if end > begin else b""
        data = np.frombuffer(buf, dtype=np_dtype).reshape(shape)
        return StTensor(name, our_name, shape, data)

    def __iter__(self) -> Iterator[StTensor]:
        for name in self._entries:
            yield self.get(name)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
            if dtype_name not in _NAME_TO_ST:
                raise BadInputError(f"cannot write dtype {dtype_name}", tensor=name)
            nbytes = int(np.prod(shape, dtype=np.int64)) * (4 if dtype_name == "float32" else 2)
            header[name] = {
                "dtype": _NAME_TO_ST[dtype_name],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            self._pending.append((name, dtype_name, tuple(shape)))
        if metadata:
            header["__metadata__"] = dict(metadata)
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
        storage = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}[dtype_name]
        if name != exp_name or tuple(array.shape) != shape or array.dtype != np.dtype(storage):
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
    """Write ``{name: (dtype_name, array)}`` atomically; bfloat16 arrays hold uint16 bits."""
    layout = [(name, d, tuple(a.shape)) for name, (d, a) in tensors.items()]
    with SafetensorsWriter(path, layout, metadata) as writer:
        for name, (_, array) in tensors.items():
            writer.write(name, array)
