"""Public API: open, read, decode, verify and write .spqr files.

This layer joins the container (bytes, sections, checksums) and the codec (what the sections
mean). It checks every tensor's section layout against its encoding when a file is opened,
so that by the time a caller touches data, every offset and length has been validated.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from spqr_format import spec
from spqr_format.codec import channel_mixed as cm
from spqr_format.codec import channel_mixed_ref, reference
from spqr_format.codec.bilevel import (
    BilevelHeader,
    BilevelTensor,
    PackedBilevel,
)
from spqr_format.codec.packing import pack
from spqr_format.codec.validation import check_tensor_header
from spqr_format.container import ContainerReader, ContainerWriter, TensorEntry
from spqr_format.errors import (
    BadInputError,
    DigestMismatchError,
    SpqrError,
    UnknownEncodingError,
    UnsupportedEncodingVersionError,
)
from spqr_format.spec import DType, Encoding, Role

DTypeLike = DType | str | None


@dataclass
class RawTensor:
    """A tensor stored as it is (encoding ``raw``). bf16 data is held as uint16 bit patterns."""

    dtype: DType
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @classmethod
    def from_array(cls, array: np.ndarray) -> RawTensor:
        """float32, float16 or ``ml_dtypes.bfloat16`` arrays (bf16 is held as its uint16 bit
        patterns); uint16 bit patterns can also be given as ``RawTensor(DType.BFLOAT16, bits)``."""
        if array.dtype.name == "bfloat16" and array.dtype.itemsize == 2:
            return cls(DType.BFLOAT16, array.view(np.uint16))
        kinds = {np.dtype(np.float32): DType.FLOAT32, np.dtype(np.float16): DType.FLOAT16}
        if array.dtype not in kinds:
            raise BadInputError(
                f"raw tensors are float32, float16 or bfloat16 (ml_dtypes) arrays, "
                f"got {array.dtype}"
            )
        return cls(kinds[array.dtype], array)


_STORAGE = {DType.FLOAT32: "<f4", DType.FLOAT16: "<f2", DType.BFLOAT16: "<u2"}
_EMPTY_DIGEST = hashlib.sha256(b"").digest()


def array_shape(shape: tuple[int, ...], itemsize: int = 4) -> tuple[int, ...]:
    """The shape of the array that :meth:`SpqrFile.read` / :meth:`SpqrFile.decode` return.

    It is the stored shape, except for a tensor with zero elements whose other dims multiply
    past what numpy can index (such as ``[0, 2**40, 2**40]``: numpy refuses any shape whose
    non-zero dims overflow ``intp``, even when another dim is 0). Such a tensor comes back as
    an empty array of the same ndim with every dim 0; ``TensorInfo.shape`` keeps the stored
    shape, and the CLI writes the stored shape to safetensors.
    """
    if 0 not in shape:
        return tuple(shape)
    total = itemsize
    for d in shape:
        if d:
            total *= d
    return tuple(shape) if total < 2**62 else (0,) * len(shape)


def _empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    return np.empty(array_shape(shape, np.dtype(dtype).itemsize), dtype=dtype)


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor; computing it reads no tensor data."""

    name: str
    encoding: str
    encoding_version: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int  # sum of section lengths
    bits_per_weight: float  # 8 * nbytes / elements (SPEC section 8)
    outlier_count: int
    params: dict = field(default_factory=dict)
    # None when this reader implements the tensor's encoding and version; else the code of
    # the error that reading it raises (E_UNKNOWN_ENCODING / E_UNSUPPORTED_ENCODING_VERSION).
    unsupported: str | None = None

    @property
    def supported(self) -> bool:
        return self.unsupported is None

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape, dtype=object)) if self.shape else 1

    @property
    def outlier_fraction(self) -> float:
        return self.outlier_count / self.elements if self.elements else 0.0

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "encoding": self.encoding,
            "encoding_version": self.encoding_version,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "bytes": self.nbytes,
            "bits_per_weight": self.bits_per_weight,
            "outlier_count": self.outlier_count,
            "outlier_fraction": self.outlier_fraction,
            "params": self.params,
            "supported": self.supported,
            **({"error": self.unsupported} if self.unsupported else {}),
        }


def _check_header(entry: TensorEntry) -> None:
    """The encoding layer's header checks (C-9.3) of one record: codec/validation.py."""
    check_tensor_header(
        entry.encoding,
        entry.encoding_version,
        entry.dtype,
        entry.shape,
        entry.params,
        [(s.role, s.length) for s in entry.sections],
    )


class SpqrFile:
    """An open .spqr file: header validated at open, tensors read lazily from a mmap.

    >>> with spqr_format.open("model.spqr") as f:          # doctest: +SKIP
    ...     w = f.decode("model.layers.0.mlp.down_proj.weight", "float16")
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._reader = ContainerReader(self.path)
        self._entries = {e.name: e for e in self._reader.tensors}
        self._layout_errors: dict[str, SpqrError] = {}
        try:
            for entry in self._reader.tensors:
                try:
                    _check_header(entry)
                except (UnknownEncodingError, UnsupportedEncodingVersionError) as err:
                    # C-3.4: the other tensors stay readable; this one fails when asked for.
                    self._layout_errors[entry.name] = err.with_context(
                        path=self.path, tensor=entry.name
                    )
                except SpqrError as err:
                    raise err.with_context(path=self.path, tensor=entry.name) from None
        except BaseException:
            self._reader.close()
            raise

    # -- header-only queries ------------------------------------------------------------
    @property
    def version(self) -> tuple[int, int]:
        return self._reader.version

    @property
    def metadata(self) -> dict:
        return self._reader.metadata

    @property
    def file_size(self) -> int:
        return self._reader.file_size

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> TensorEntry:
        return self._reader.entry(name)

    def info(self, name: str) -> TensorInfo:
        entry = self.entry(name)
        nbytes = sum(s.length for s in entry.sections)
        count = int(np.prod(entry.shape, dtype=object)) if entry.shape else 1
        params: dict = {}
        outliers = 0
        enc_name = spec.ENCODING_NAMES.get(entry.encoding, f"unknown({entry.encoding})")
        if entry.encoding == Encoding.BILEVEL and name not in self._layout_errors:
            header = BilevelHeader.from_bytes(entry.params)
            p = header.params
            params = {
                "bits": p.bits,
                "group_size": p.group_size,
                "stats_bits": p.stats_bits,
                "stats_group_size": p.stats_group_size,
                "permutation": header.has_perm,
                "outlier_entries": header.outlier_entry_count,
            }
            outliers = header.outlier_count
        elif entry.encoding == Encoding.CHANNEL_MIXED and name not in self._layout_errors:
            h = cm.ChannelMixedHeader.from_bytes(entry.params)
            params = {
                "width_counts": {
                    str(b): c for b, c in zip(cm.WIDTHS, h.width_counts, strict=False) if c
                },
                "table_rows": h.table_rows,
                "permutation": True,
                "outlier_entries": h.outlier_entry_count,
            }
            # no outlier_count in the params (C-12.1): entries, skips included (an upper bound)
            outliers = h.outlier_entry_count
        return TensorInfo(
            name=name,
            encoding=enc_name,
            encoding_version=entry.encoding_version,
            dtype=spec.DTYPE_NAMES.get(entry.dtype, str(entry.dtype)),
            shape=tuple(entry.shape),
            nbytes=nbytes,
            bits_per_weight=8.0 * nbytes / count if count else 0.0,
            outlier_count=outliers,
            params=params,
            unsupported=self._layout_errors[name].code if name in self._layout_errors else None,
        )

    def infos(self) -> list[TensorInfo]:
        return [self.info(n) for n in self._entries]

    # -- data access ---------------------------------------------------------------------
    def read(
        self, name: str, *, verify_crc: bool = True
    ) -> RawTensor | PackedBilevel | cm.PackedChannelMixed:
        """The tensor in its physical form, as zero-copy views of the file (C-2.8a: CRCs
        checked unless ``verify_crc=False``)."""
        entry = self.entry(name)
        if name in self._layout_errors:
            raise self._layout_errors[name]
        try:
            sections = {
                Role(s.role): self._reader.section_bytes(entry, s.role, verify_crc=verify_crc)
                for s in entry.sections
            }
            dtype = DType(entry.dtype)
            if entry.encoding == Encoding.RAW:
                data = np.frombuffer(sections[Role.DATA], dtype=_STORAGE[dtype])
                if data.size == 0:
                    return RawTensor(dtype, _empty(entry.shape, _STORAGE[dtype]))
                return RawTensor(dtype, data.reshape(entry.shape))
            if entry.encoding == Encoding.CHANNEL_MIXED:
                mh = cm.ChannelMixedHeader.from_bytes(entry.params)
                return cm.PackedChannelMixed.from_sections(entry.shape, mh, sections, dtype)
            header = BilevelHeader.from_bytes(entry.params)
            return PackedBilevel.from_sections(entry.shape, header, sections, dtype)
        except SpqrError as err:
            raise err.with_context(path=self.path, tensor=name) from None

    def decode(
        self,
        name: str,
        dtype: DTypeLike = None,
        *,
        verify_crc: bool = True,
        verify_digest: bool = True,
    ) -> np.ndarray:
        """Dense weights in ``dtype`` (default: the tensor's own). bf16 comes back as uint16
        bit patterns (``.view(ml_dtypes.bfloat16)`` gives real bfloat16 values).

        The stored SHA-256 of the decoded weights is checked (C-2.12: a decoder MUST, unless
        its user asks not to: ``verify_digest=False``; E_DIGEST_MISMATCH). It covers the
        tensor's own dtype: a bilevel tensor decoded to another dtype is decoded once in f32
        and rounded to both (C-7.5), a raw tensor's stored bytes are hashed as they are. A
        zero-element tensor whose shape numpy cannot hold comes back as described in
        :func:`array_shape`."""
        tensor = self.read(name, verify_crc=verify_crc)
        entry = self.entry(name)
        own = DType(entry.dtype)
        out_dtype = spec.parse_dtype(dtype, own)
        dec = (
            channel_mixed_ref.decode_channel_mixed
            if isinstance(tensor, cm.PackedChannelMixed)
            else reference.decode_bilevel
        )
        try:
            if isinstance(tensor, RawTensor):
                out = convert(tensor.data, tensor.dtype, out_dtype)
                own_bytes = tensor.data
            elif out_dtype == own or not verify_digest:
                out = dec(tensor, out_dtype)
                own_bytes = out
            else:
                # one decode: v in f32, then the C-7.5 rounding to each dtype (v is finite)
                v = dec(tensor, DType.FLOAT32)
                own_bytes = convert(v, DType.FLOAT32, own)
                out = convert(v, DType.FLOAT32, out_dtype)
            if verify_digest:
                if reference.tensor_digest(own_bytes) != entry.digest:
                    raise DigestMismatchError(
                        "decoded weights do not match the stored SHA-256 digest (C-2.12)"
                    )
        except SpqrError as err:
            raise err.with_context(path=self.path, tensor=name) from None
        return out

    def verify(self, name: str) -> None:
        """Check CRCs, data-dependent validity and the decoded digest of one tensor; raises
        an SpqrError (see ``errors.INTEGRITY_ERRORS``) on failure."""
        self.decode(name, None, verify_crc=True, verify_digest=True)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> SpqrFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_file(path: str | os.PathLike[str]) -> SpqrFile:
    """Open a .spqr file (validates the whole header; reads no tensor data)."""
    return SpqrFile(path)


def convert(data: np.ndarray, src: DType, dst: DType) -> np.ndarray:
    """Convert stored elements between float dtypes with round-to-nearest-even (C-7.5)."""
    data = np.asarray(data)
    if src == dst:
        return np.array(data, copy=True)
    # Arithmetic on a 0-d array gives a numpy scalar and f32_to_bf16_bits flattens, so every
    # result is brought back to an array of the input's shape (0-d tensors stay 0-d).
    as_f32 = np.asarray(
        (data.astype(np.uint32) << 16).view(np.float32)
        if src == DType.BFLOAT16
        else data.astype(np.float32)
    ).reshape(data.shape)
    if dst == DType.FLOAT32:
        return as_f32
    if dst == DType.FLOAT16:
        return reference.f32_to_f16(as_f32)
    return reference.f32_to_bf16_bits(as_f32).reshape(data.shape)


TensorLike = (
    np.ndarray
    | RawTensor
    | BilevelTensor
    | PackedBilevel
    | cm.ChannelMixedTensor
    | cm.PackedChannelMixed
)


class SpqrWriter:
    """Streaming, atomic writer: tensors are added one at a time and only the final
    ``close()`` makes the file appear (temp file + fsync + rename). Identical input gives
    identical bytes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        metadata: Mapping | None = None,
        alignment: int = spec.DEFAULT_ALIGNMENT,
    ) -> None:
        self.path = os.fspath(path)
        self._writer = ContainerWriter(
            self.path, metadata=dict(metadata or {}), alignment=alignment
        )

    def add(self, name: str, tensor: TensorLike) -> None:
        try:
            if isinstance(tensor, np.ndarray):
                tensor = RawTensor.from_array(tensor)
            if isinstance(tensor, RawTensor):
                bits = tensor.data
                if tensor.dtype == DType.BFLOAT16 and bits.dtype.name == "bfloat16":
                    tensor = RawTensor(tensor.dtype, bits.view(np.uint16))  # same bytes
                # np.require keeps 0-d arrays 0-d (ascontiguousarray makes them 1-d).
                data = np.require(tensor.data, dtype=_STORAGE[tensor.dtype], requirements="C")
                self._writer.add_tensor(
                    name,
                    encoding=int(Encoding.RAW),
                    encoding_version=1,
                    dtype=int(tensor.dtype),
                    shape=tuple(data.shape),
                    params=bytes(40),
                    sections=[(int(Role.DATA), data)],
                    digest=reference.tensor_digest(data),
                )
                return
            if isinstance(tensor, (cm.ChannelMixedTensor, cm.PackedChannelMixed)):
                pm = cm.pack(tensor) if isinstance(tensor, cm.ChannelMixedTensor) else tensor
                decoded = channel_mixed_ref.decode_channel_mixed(pm, pm.dtype)
                self._writer.add_tensor(
                    name,
                    encoding=int(Encoding.CHANNEL_MIXED),
                    encoding_version=1,
                    dtype=int(pm.dtype),
                    shape=tuple(pm.shape),
                    params=pm.header.to_bytes(),
                    sections=[(int(r), np.ascontiguousarray(a)) for r, a in pm.sections()],
                    digest=reference.tensor_digest(decoded),
                )
                return
            packed = pack(tensor) if isinstance(tensor, BilevelTensor) else tensor
            decoded = reference.decode_bilevel(packed, packed.dtype)
            self._writer.add_tensor(
                name,
                encoding=int(Encoding.BILEVEL),
                encoding_version=1,
                dtype=int(packed.dtype),
                shape=tuple(packed.shape),
                params=packed.header.to_bytes(),
                sections=[(int(r), np.ascontiguousarray(a)) for r, a in packed.sections()],
                digest=reference.tensor_digest(decoded),
            )
        except SpqrError as err:
            raise err.with_context(path=self.path, tensor=name) from None

    def set_metadata(self, metadata: Mapping) -> None:
        self._writer.set_metadata(dict(metadata))

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        self._writer.abort()

    def __enter__(self) -> SpqrWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save(
    path: str | os.PathLike[str],
    tensors: Mapping[str, TensorLike] | Iterable[tuple[str, TensorLike]],
    *,
    metadata: Mapping | None = None,
    alignment: int = spec.DEFAULT_ALIGNMENT,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Write tensors to ``path`` atomically. numpy float16/float32 arrays are stored ``raw``;
    ``BilevelTensor`` / ``PackedBilevel`` as ``bilevel``; ``ChannelMixedTensor`` /
    ``PackedChannelMixed`` as ``channel_mixed``."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    with SpqrWriter(path, metadata=metadata, alignment=alignment) as writer:
        for name, tensor in items:
            writer.add(name, tensor)
            if progress is not None:
                progress(name)
