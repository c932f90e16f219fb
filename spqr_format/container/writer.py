"""Write a .spqr container (SPEC section 2), streaming section bytes and replacing atomically.

:class:`ContainerWriter` writes every section to a spool file next to the destination as soon
as it is added (CRC computed on the way), so memory holds only the small records. ``close``
writes the header to a temporary file in the same directory, appends the spool (kernel copy
when available), fsyncs, ``os.replace``-s it onto the destination and fsyncs the directory.
Until that replace, an existing destination is never touched; on any failure the temporary
files are removed.

Every input is checked when it is given, with the rules the reader applies (shared through
:mod:`~spqr_format.container.layout`), and refused with E_BAD_INPUT naming the tensor, so a
writer cannot produce a file that the reader refuses. Output is a function of the input only:
canonical metadata JSON, no time stamps.
"""

from __future__ import annotations

import errno
import operator
import os
import struct
import sys
import weakref
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from spqr_format import spec
from spqr_format.atomic import commit, create_temp_beside, remove_quietly
from spqr_format.container.layout import (
    DIGEST_SIZE,
    PARAMS_SIZE,
    U16_MAX,
    FixedHeader,
    check_alignment,
    check_name,
    element_count,
    encode_metadata,
    header_crc,
    header_length,
    normalize_shape,
    pack_section_record,
    pack_tensor_record,
)
from spqr_format.errors import BadInputError, IoError, SpqrError

_CHUNK = 16 << 20
# errno values meaning "this copy primitive does not work here": fall back to the next one.
_FALLBACK_ERRNOS = frozenset(
    e
    for e in (
        errno.EXDEV,
        errno.ENOSYS,
        errno.EINVAL,
        errno.EOPNOTSUPP,
        getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
    )
)
_VALID_ROLES = frozenset(int(r) for r in spec.Role)
_VALID_DTYPES = frozenset(int(d) for d in spec.DType)


def _discard_spool(spool: Any, path: str) -> None:
    """Close and delete the spool (also run by weakref.finalize if a writer is dropped)."""
    try:
        spool.close()
    except OSError:
        pass
    remove_quietly(path)


def _write_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _copy_fd(src: int, dst: int, src_off: int, dst_off: int, count: int) -> None:
    """Copy ``count`` bytes: copy_file_range, else sendfile, else pread/pwrite, resuming."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < count:
                n = os.copy_file_range(src, dst, count - done, src_off + done, dst_off + done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if exc.errno not in _FALLBACK_ERRNOS:
                raise
    if done < count and hasattr(os, "sendfile"):
        try:
            os.lseek(dst, dst_off + done, os.SEEK_SET)  # sendfile writes at the file position
            while done < count:
                n = os.sendfile(dst, src, src_off + done, count - done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if exc.errno not in _FALLBACK_ERRNOS:
                raise
    while done < count:
        chunk = os.pread(src, min(_CHUNK, count - done), src_off + done)
        if not chunk:
            raise OSError(errno.EIO, "spool file is shorter than the data written to it")
        _write_all(dst, chunk, dst_off + done)
        done += len(chunk)


def _byte_view(buf: Any) -> memoryview:
    """The bytes of a section buffer as a flat memoryview, without copying.

    numpy arrays must be C-contiguous and little-endian (C-1.1); other objects must expose a
    C-contiguous buffer (bytes, bytearray, memoryview, array.array...).
    """
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError("numpy array is not C-contiguous")
        dt = buf.dtype
        if dt.hasobject:
            raise ValueError("numpy array holds Python objects")
        if dt.byteorder == ">" or (dt.byteorder == "=" and sys.byteorder != "little"):
            raise ValueError(f"numpy array is big-endian ({dt.str}); the format is little-endian")
        return memoryview(buf.reshape(-1).view(np.uint8))
    try:
        view = memoryview(buf)
    except TypeError:
        raise ValueError(f"{type(buf).__name__} does not expose a buffer") from None
    if not view.c_contiguous:
        raise ValueError("buffer is not C-contiguous")
    try:
        return view.cast("B")
    except TypeError as exc:
        raise ValueError(f"buffer cannot be viewed as bytes: {exc}") from None


class _Record:
    """What close() needs to write one tensor record (kept in memory; small)."""

    __slots__ = (
        "name",
        "encoding",
        "encoding_version",
        "dtype",
        "shape",
        "digest",
        "params",
        "first",
        "sections",
    )

    def __init__(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self, k, v)


class ContainerWriter:
    """Write a .spqr container; use as a context manager (aborts on exception)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        metadata: dict[str, Any] | None = None,
        alignment: int = spec.DEFAULT_ALIGNMENT,
    ) -> None:
        self.path = os.fspath(path)
        self._dir = os.path.dirname(os.path.abspath(self.path))
        self._base = os.path.basename(self.path)
        try:
            check_alignment(operator.index(alignment))
        except (SpqrError, TypeError) as exc:
            raise BadInputError(str(exc), path=self.path, field="alignment") from None
        self.alignment = operator.index(alignment)
        self._records: list[_Record] = []
        self._names: set[bytes] = set()
        self._section_total = 0
        self._string_table_length = 0
        self._metadata = b""
        self._pos = 0  # bytes of the data region spooled so far (relative to data_offset)
        self._state = "open"
        if metadata is not None:
            self.set_metadata(metadata)
        try:
            # Named after its owner (PID, host), so a later writer of the same destination can
            # remove it if this process is killed (atomic.clean_stale_temps). Mode 0600.
            fd, self._spool_path = create_temp_beside(self.path, kind="spool", mode=0o600)
        except OSError as exc:
            raise IoError(
                f"cannot create a spool file: {exc.strerror or exc}", path=self.path
            ) from exc
        self._spool = open(fd, "w+b")  # lives until close()/abort()
        self._finalizer = weakref.finalize(self, _discard_spool, self._spool, self._spool_path)

    # --- input ---------------------------------------------------------------------------------

    def _check_open(self, tensor: str | None = None) -> None:
        if self._state != "open":
            raise BadInputError(f"the writer is {self._state}", path=self.path, tensor=tensor)

    def _check_header_fits(self, tensors: int, sections: int, strtab: int, meta: int) -> None:
        header_length(tensors, sections, strtab, meta)  # LimitError when over a cap (C-2.9)

    def set_metadata(self, metadata: dict[str, Any] | None) -> None:
        """Replace the metadata (C-2.11). ``None`` or ``{}`` writes none."""
        self._check_open()
        try:
            raw = encode_metadata(metadata)
            self._check_header_fits(
                len(self._records), self._section_total, self._string_table_length, len(raw)
            )
        except SpqrError as exc:
            raise BadInputError(exc.message, path=self.path, field="metadata") from None
        self._metadata = raw

    def add_tensor(
        self,
        name: str,
        *,
        encoding: int,
        encoding_version: int,
        dtype: int,
        shape: tuple[int, ...],
        params: bytes,
        sections: Sequence[tuple[int, Any]],
        digest: bytes,
    ) -> None:
        """Check one tensor's record and stream its sections to the spool file.

        ``sections`` are ``(role, buffer)`` pairs in strictly increasing role order; a buffer
        is bytes, a memoryview or a C-contiguous little-endian numpy array. Which roles and
        lengths an encoding needs is the codec's business, not checked here.
        """
        label = name if isinstance(name, str) else repr(name)
        self._check_open(label)

        def bad(message: str, field: str | None = None) -> BadInputError:
            return BadInputError(message, path=self.path, tensor=label, field=field)

        if not isinstance(name, str):
            raise bad(f"name must be a str, got {type(name).__name__}", "name")
        try:
            raw_name = name.encode("utf-8")
            check_name(raw_name)  # C-2.10, the reader's rule
        except UnicodeEncodeError:
            raise bad("name cannot be encoded as UTF-8", "name") from None
        except SpqrError as exc:
            raise bad(exc.message, "name") from None
        if raw_name in self._names:
            raise bad("a tensor of that name was already added", "name")

        fields: dict[str, int] = {}
        for key, value, low in (
            ("encoding", encoding, 1),  # no encoding has id 0
            ("encoding_version", encoding_version, 0),
            ("dtype", dtype, 1),
        ):
            try:
                fields[key] = operator.index(value)
            except TypeError:
                raise bad(f"{key} must be an integer, got {value!r}", key) from None
            if not low <= fields[key] <= U16_MAX:
                raise bad(f"{key} {value} is out of range", key)
        if fields["dtype"] not in _VALID_DTYPES:  # C-3.3
            raise bad(f"dtype {dtype} is not one of {sorted(_VALID_DTYPES)}", "dtype")

        try:
            shape_t = normalize_shape(shape)
            element_count(shape_t)  # C-3.1, C-2.9
        except SpqrError as exc:
            raise bad(exc.message, "shape") from None

        blobs = {}
        for key, value, size in (("params", params, PARAMS_SIZE), ("digest", digest, DIGEST_SIZE)):
            try:
                blobs[key] = bytes(_byte_view(value))
            except ValueError as exc:
                raise bad(str(exc), key) from None
            if len(blobs[key]) != size:
                raise bad(f"{key} must be {size} bytes, got {len(blobs[key])}", key)

        sections = list(sections)
        if len(sections) > spec.MAX_SECTIONS_PER_TENSOR:  # C-2.9
            raise bad(f"{len(sections)} sections exceed {spec.MAX_SECTIONS_PER_TENSOR}", "sections")
        views: list[tuple[int, memoryview]] = []
        previous = 0
        for k, item in enumerate(sections):
            try:
                role_value, buf = item
                role = operator.index(role_value)
            except (TypeError, ValueError):
                raise bad(f"sections[{k}] is not a (role, buffer) pair", "sections") from None
            if role not in _VALID_ROLES:  # C-2.7
                raise bad(f"sections[{k}] role {role} is not 1..7", "sections")
            if role <= previous:  # C-2.6
                raise bad(f"sections[{k}] role {role} does not increase", "sections")
            previous = role
            try:
                views.append((role, _byte_view(buf)))
            except ValueError as exc:
                raise bad(f"sections[{k}]: {exc}", "sections") from None

        if len(self._records) + 1 > spec.MAX_TENSOR_COUNT:
            raise bad(f"a file holds at most {spec.MAX_TENSOR_COUNT} tensors")
        try:
            self._check_header_fits(
                len(self._records) + 1,
                self._section_total + len(views),
                self._string_table_length + len(raw_name),
                len(self._metadata),
            )
        except SpqrError as exc:
            raise bad(exc.message) from None

        written = []
        try:
            for role, view in views:
                written.append(self._spool_section(role, view))
        except OSError as exc:
            self.abort()
            raise IoError(
                f"cannot write the spool file: {exc.strerror or exc}", path=self.path, tensor=label
            ) from exc
        finally:
            for _, view in views:
                view.release()

        self._records.append(
            _Record(
                name=raw_name,
                encoding=fields["encoding"],
                encoding_version=fields["encoding_version"],
                dtype=fields["dtype"],
                shape=shape_t,
                digest=blobs["digest"],
                params=blobs["params"],
                first=self._section_total,
                sections=written,
            )
        )
        self._names.add(raw_name)
        self._section_total += len(written)
        self._string_table_length += len(raw_name)

    def _spool_section(self, role: int, view: memoryview) -> tuple[int, int, int, int]:
        # C-2.8: each section starts at the aligned end of the previous one. data_offset is a
        # multiple of the alignment, so aligning relative positions aligns absolute offsets.
        start = spec.align_up(self._pos, self.alignment)
        if start > self._pos:
            self._spool.write(bytes(start - self._pos))
        crc = 0
        for i in range(0, len(view), _CHUNK):
            chunk = view[i : i + _CHUNK]
            crc = zlib.crc32(chunk, crc)
            self._spool.write(chunk)
        self._pos = start + len(view)
        return (role, start, len(view), crc)

    # --- output --------------------------------------------------------------------------------

    def _header(self) -> bytes:
        strtab = b"".join(r.name for r in self._records)
        hlen = header_length(
            len(self._records), self._section_total, len(strtab), len(self._metadata)
        )
        data_offset = spec.align_up(hlen, self.alignment)
        parts = [
            FixedHeader(
                magic=spec.MAGIC,
                version_major=spec.VERSION_MAJOR,
                # C-13.1: the lowest minor version whose additions the file uses
                version_minor=(
                    spec.VERSION_MINOR_CHANNEL_MIXED
                    if any(r.encoding == spec.Encoding.CHANNEL_MIXED for r in self._records)
                    else spec.VERSION_MINOR
                ),
                alignment=self.alignment,
                required_features=0,
                tensor_count=len(self._records),
                section_count=self._section_total,
                string_table_length=len(strtab),
                metadata_length=len(self._metadata),
                data_offset=data_offset,
                header_crc32=0,
                reserved=0,
            ).pack()
        ]
        name_offset = 0
        for r in self._records:
            parts.append(
                pack_tensor_record(
                    name_offset=name_offset,
                    name_length=len(r.name),
                    encoding=r.encoding,
                    encoding_version=r.encoding_version,
                    dtype=r.dtype,
                    shape=r.shape,
                    first_section=r.first,
                    section_count=len(r.sections),
                    digest=r.digest,
                    params=r.params,
                )
            )
            name_offset += len(r.name)
        for r in self._records:
            for role, rel, length, crc in r.sections:
                parts.append(
                    pack_section_record(
                        offset=data_offset + rel, length=length, crc32=crc, role=role
                    )
                )
        parts += [strtab, self._metadata, bytes(data_offset - hlen)]
        header = bytearray(b"".join(parts))
        assert len(header) == data_offset
        crc = header_crc(header, hlen)  # C-2.3
        struct.pack_into("<I", header, spec.HEADER_CRC_OFFSET, crc)
        return bytes(header)

    def close(self) -> None:
        """Write the file and put it in place atomically. A second call does nothing."""
        if self._state == "closed":
            return
        self._check_open()
        tmp_path = None
        done = False
        try:
            header = self._header()
            fd, tmp_path = create_temp_beside(self.path)
            try:
                _write_all(fd, header, 0)
                self._spool.flush()
                _copy_fd(self._spool.fileno(), fd, 0, len(header), self._pos)
                os.fsync(fd)
            finally:
                os.close(fd)
            commit(tmp_path, self.path)
            tmp_path = None
            done = True
        except OSError as exc:
            raise IoError(f"cannot write: {exc.strerror or exc}", path=self.path) from exc
        finally:
            remove_quietly(tmp_path)
            self._finalizer()
            self._state = "closed" if done else "aborted"

    def abort(self) -> None:
        """Discard everything written so far; the destination is left as it was."""
        if self._state == "open":
            self._state = "aborted"
        self._finalizer()

    def __len__(self) -> int:
        return len(self._records)

    def __enter__(self) -> ContainerWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
