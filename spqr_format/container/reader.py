"""Read a .spqr container (SPEC section 2) through a read-only memory map.

:class:`ContainerReader` checks the whole structure when it opens a file (header, records,
names, metadata, section offsets) and touches no section byte while doing so; section bytes
are read, CRC-checked (C-2.8a) and handed out as zero-copy read-only memoryviews only when
asked for. It knows nothing of encodings: ``params`` is opaque, and an unknown encoding id is
left for the codec layer to refuse (C-3.4).

Closing while section views are alive: :meth:`ContainerReader.close` drops the reader's own
references. If memoryviews returned by :meth:`section_bytes` (or numpy arrays made from them)
are still alive, the mapping stays valid until the last of them is released or collected and
is unmapped then; the views never dangle. The reader itself refuses further use (E_IO).

A file truncated by another process while it is mapped can still raise SIGBUS on access; that
is a property of mmap that no check at open time can rule out.
"""

from __future__ import annotations

import mmap
import os
import stat
import zlib
from typing import Any

from spqr_format import spec
from spqr_format.container.layout import (
    SECTION_RECORD,
    TENSOR_RECORD,
    FixedHeader,
    SectionInfo,
    TensorEntry,
    check_alignment,
    check_name,
    element_count,
    header_crc,
    header_length,
    parse_metadata,
)
from spqr_format.errors import (
    BadFieldError,
    BadInputError,
    BadLayoutError,
    BadMagicError,
    DuplicateNameError,
    HeaderCrcError,
    IoError,
    LimitError,
    NotFoundError,
    SectionCrcError,
    SpqrError,
    TruncatedError,
    UnknownFeatureError,
    UnsupportedVersionError,
)

_VALID_DTYPES = frozenset(int(d) for d in spec.DType)
_VALID_ROLES = frozenset(int(r) for r in spec.Role)
_CRC_CHUNK = 64 << 20  # CRC large sections in chunks so zlib can drop the GIL per chunk


def _crc32(view: memoryview) -> int:
    crc = 0
    for start in range(0, len(view), _CRC_CHUNK):
        crc = zlib.crc32(view[start : start + _CRC_CHUNK], crc)
    return crc


def _all_zero(view: memoryview) -> bool:
    # Only used on padding, which is shorter than the alignment (<= 64 KiB): copying is cheap.
    return view.tobytes().count(0) == len(view)


def _refield(exc: SpqrError, where: str) -> SpqrError:
    """The same error with its field prefixed by the record it came from."""
    return type(exc)(exc.message, field=f"{where}.{exc.field}" if exc.field else where)


def _role_name(role: int) -> str:
    try:
        return spec.ROLE_NAMES[spec.Role(role)]
    except ValueError:
        return f"role {role}"


class ContainerReader:
    """A validated, memory-mapped .spqr file.

    Attributes: ``path``, ``version`` ``(major, minor)``, ``alignment``,
    ``required_features``, ``metadata`` (dict, ``{}`` when none), ``tensors``
    (list of :class:`TensorEntry` in file order), ``file_size``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._closed = False
        self.file_size = 0
        self.version = (0, 0)
        self.alignment = 0
        self.required_features = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: list[TensorEntry] = []
        self._by_name: dict[str, TensorEntry] = {}
        try:
            self._map()
            self._parse()
        except SpqrError as exc:
            self.close()
            exc.with_context(path=self.path)
            raise
        except BaseException:
            self.close()
            raise

    # --- opening -----------------------------------------------------------------------------

    def _map(self) -> None:
        # O_NONBLOCK: opening a FIFO must not hang; it is then refused as not a regular file.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags)
        except OSError as exc:
            raise IoError(f"cannot open: {exc.strerror or exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IoError("not a regular file")
            if st.st_size < spec.FIXED_HEADER_SIZE:
                # Also covers the empty file, which mmap cannot map. C-9.2 step 1: the bytes
                # there are must be a prefix of the magic (else E_BAD_MAGIC), then E_TRUNCATED.
                head = os.pread(fd, len(spec.MAGIC), 0)
                if head != spec.MAGIC[: len(head)]:
                    raise BadMagicError(
                        f"first {len(head)} bytes are {head.hex(' ')}, not the .spqr magic"
                    )
                raise TruncatedError(
                    f"file is {st.st_size} bytes, shorter than the {spec.FIXED_HEADER_SIZE}-byte"
                    " fixed header"
                )
            try:
                self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except ValueError as exc:  # emptied between fstat and mmap
                raise TruncatedError(f"cannot map: {exc}") from exc
        except OSError as exc:
            raise IoError(f"cannot read: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)  # mmap keeps its own descriptor
        self._view = memoryview(self._mm)
        self.file_size = len(self._mm)
        if self.file_size < spec.FIXED_HEADER_SIZE:
            raise TruncatedError(f"file is {self.file_size} bytes, shorter than the fixed header")

    def _parse(self) -> None:
        view = self._view
        assert view is not None
        size = self.file_size
        h = FixedHeader.unpack(view)
        if h.magic != spec.MAGIC:  # C-2.1
            raise BadMagicError(f"first 8 bytes are {h.magic.hex(' ')}, not the .spqr magic")
        if h.version_major != spec.VERSION_MAJOR:  # C-2.4: any minor of major 1 is accepted
            raise UnsupportedVersionError(
                f"version {h.version_major}.{h.version_minor}; this reader implements "
                f"{spec.VERSION_MAJOR}.x",
                field="version_major",
            )
        if h.reserved != 0:  # C-1.5
            raise BadFieldError(f"reserved is 0x{h.reserved:08x}, not zero", field="reserved")
        check_alignment(h.alignment)
        # C-2.9 / C-1.4: caps first, then header_length; no allocation has happened yet.
        hlen = header_length(
            h.tensor_count, h.section_count, h.string_table_length, h.metadata_length
        )
        if size < hlen:
            raise TruncatedError(f"file is {size} bytes, the header declares {hlen}")
        crc = header_crc(view, hlen)  # C-2.3: before any record is interpreted
        if crc != h.header_crc32:
            raise HeaderCrcError(
                f"header CRC is 0x{crc:08x}, the file says 0x{h.header_crc32:08x}",
                field="header_crc32",
            )
        data_offset = spec.align_up(hlen, h.alignment)
        if h.data_offset != data_offset:  # C-2.2
            raise BadLayoutError(
                f"data_offset is {h.data_offset}, expected align({hlen}, {h.alignment}) = "
                f"{data_offset}",
                field="data_offset",
            )
        if size < data_offset:
            raise TruncatedError(f"file is {size} bytes, data_offset is {data_offset}")
        if not _all_zero(view[hlen:data_offset]):  # C-2.2 / C-1.5: header padding is zero
            raise BadLayoutError("non-zero byte in the padding before data_offset")
        if h.required_features & ~spec.KNOWN_FEATURES:  # C-2.5
            raise UnknownFeatureError(
                f"required feature bits 0x{h.required_features & ~spec.KNOWN_FEATURES:x} are not"
                " implemented",
                field="required_features",
            )
        self.version = (h.version_major, h.version_minor)
        self.alignment = h.alignment
        self.required_features = h.required_features

        sec_base = spec.FIXED_HEADER_SIZE + spec.TENSOR_RECORD_SIZE * h.tensor_count
        str_base = sec_base + spec.SECTION_RECORD_SIZE * h.section_count
        meta_base = str_base + h.string_table_length
        # Every count below was bounded by header_length <= file size above (C-2.9).
        sections = self._parse_sections(view, sec_base, h.section_count)
        records = self._parse_tensor_records(view, h.tensor_count, h.section_count, sections)
        names = self._parse_names(view, records, str_base, h.string_table_length)
        self.metadata = parse_metadata(view[meta_base : meta_base + h.metadata_length])
        self._check_offsets(sections, records, names, data_offset)

        for i, (rec, name) in enumerate(zip(records, names, strict=True)):
            first, count = rec[7], rec[8]
            entry = TensorEntry(
                index=i,
                name=name,
                encoding=rec[2],
                encoding_version=rec[3],
                dtype=rec[4],
                shape=rec[9][: rec[5]],
                digest=rec[10],
                params=rec[11],
                sections=tuple(sections[first : first + count]),
            )
            self.tensors.append(entry)
            self._by_name[name] = entry

    @staticmethod
    def _parse_sections(view: memoryview, base: int, count: int) -> list[SectionInfo]:
        out = []
        region = view[base : base + SECTION_RECORD.size * count]
        for j, (offset, length, crc, role, res16, res64) in enumerate(
            SECTION_RECORD.iter_unpack(region)
        ):
            if res16 or res64:  # C-1.5
                raise BadFieldError("reserved bytes are not zero", field=f"sections[{j}].reserved")
            if role not in _VALID_ROLES:  # C-2.7
                raise BadFieldError(f"role {role} is not 1..7", field=f"sections[{j}].role")
            out.append(SectionInfo(role, offset, length, crc))
        return out

    @staticmethod
    def _parse_tensor_records(
        view: memoryview, count: int, total_sections: int, sections: list[SectionInfo]
    ) -> list[tuple]:
        out = []
        region = view[spec.FIXED_HEADER_SIZE : spec.FIXED_HEADER_SIZE + TENSOR_RECORD.size * count]
        next_section = 0
        for i, f in enumerate(TENSOR_RECORD.iter_unpack(region)):
            (_, _, encoding, _, dtype, ndim, reserved, first, nsec) = f[:9]
            dims = tuple(f[9:17])
            where = f"tensors[{i}]"
            if reserved:  # C-1.5
                raise BadFieldError("reserved is not zero", field=f"{where}.reserved")
            if dtype not in _VALID_DTYPES:  # C-3.3
                raise BadFieldError(f"dtype {dtype} is not 1..3", field=f"{where}.dtype")
            if encoding == 0:  # no encoding has id 0; other unknown ids are the codec's (C-3.4)
                raise BadFieldError("encoding 0 is not an encoding", field=f"{where}.encoding")
            if ndim > spec.MAX_NDIM:
                raise BadFieldError(f"ndim {ndim} exceeds {spec.MAX_NDIM}", field=f"{where}.ndim")
            if any(dims[ndim:]):  # C-3.2
                raise BadFieldError("unused dims are not zero", field=f"{where}.dims")
            try:
                element_count(dims[:ndim])  # C-3.1: dims <= 2^40, count <= 2^48
            except SpqrError as exc:
                raise _refield(exc, where) from None
            if nsec > spec.MAX_SECTIONS_PER_TENSOR:  # C-2.9
                raise LimitError(
                    f"{nsec} sections exceed {spec.MAX_SECTIONS_PER_TENSOR}",
                    field=f"{where}.section_count",
                )
            if first != next_section or first + nsec > total_sections:  # C-2.6
                raise BadLayoutError(
                    f"sections {first}..{first + nsec - 1} do not follow the previous tensor's"
                    f" (expected first_section {next_section}, {total_sections} sections in all)",
                    field=f"{where}.first_section",
                )
            roles = [sections[j].role for j in range(first, first + nsec)]
            if any(roles[k] >= roles[k + 1] for k in range(len(roles) - 1)):  # C-2.6
                raise BadLayoutError(
                    f"roles {roles} are not strictly increasing", field=f"{where}.sections"
                )
            next_section = first + nsec
            out.append((*f[:9], dims, f[17], f[18]))
        if next_section != total_sections:  # C-2.6: the last range ends at section_count
            raise BadLayoutError(
                f"tensors use {next_section} sections, the header declares {total_sections}",
                field="section_count",
            )
        return out

    @staticmethod
    def _parse_names(
        view: memoryview, records: list[tuple], base: int, table_length: int
    ) -> list[str]:
        names: list[str] = []
        seen: set[str] = set()
        expected = 0
        for i, rec in enumerate(records):
            offset, length = rec[0], rec[1]
            if offset != expected:  # C-2.10: exact concatenation
                raise BadLayoutError(
                    f"name_offset is {offset}, expected {expected}",
                    field=f"tensors[{i}].name_offset",
                )
            if length > table_length - offset:
                raise BadLayoutError(
                    f"name ({length} bytes at {offset}) runs past the {table_length}-byte string"
                    " table",
                    field=f"tensors[{i}].name_length",
                )
            try:
                name = check_name(bytes(view[base + offset : base + offset + length]))
            except SpqrError as exc:
                raise _refield(exc, f"tensors[{i}]") from None
            if name in seen:  # C-2.10; valid UTF-8 maps bytes to strings one to one
                raise DuplicateNameError(
                    "name used by two tensors", tensor=name, field=f"tensors[{i}].name"
                )
            seen.add(name)
            names.append(name)
            expected = offset + length
        if expected != table_length:
            raise BadLayoutError(
                f"names fill {expected} bytes of the {table_length}-byte string table",
                field="string_table_length",
            )
        return names

    def _check_offsets(
        self,
        sections: list[SectionInfo],
        records: list[tuple],
        names: list[str],
        data_offset: int,
    ) -> None:
        """C-2.8: every offset is derived; the file ends exactly at the last section."""
        owner = [names[i] for i, rec in enumerate(records) for _ in range(rec[8])]
        size = self.file_size
        expected = data_offset
        end = data_offset
        for j, s in enumerate(sections):
            if s.offset != expected:
                raise BadLayoutError(
                    f"offset is {s.offset}, expected {expected}",
                    tensor=owner[j],
                    field=f"sections[{j}].offset",
                )
            if s.length > size - s.offset:
                raise TruncatedError(
                    f"section of {s.length} bytes at {s.offset} runs past the end of the"
                    f" {size}-byte file",
                    tensor=owner[j],
                    field=f"sections[{j}].length",
                )
            end = s.offset + s.length
            expected = spec.align_up(end, self.alignment)
        if size != end:
            raise BadLayoutError(f"{size - end} bytes after the end of the last section")

    # --- access --------------------------------------------------------------------------------

    def _check_open(self) -> memoryview:
        if self._closed or self._view is None:
            raise IoError("the reader is closed", path=self.path)
        return self._view

    def entry(self, name: str) -> TensorEntry:
        """The tensor called ``name`` (E_NOT_FOUND when the file has none)."""
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise NotFoundError("no tensor of that name", path=self.path, tensor=name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.tensors)

    def section_bytes(
        self, entry: TensorEntry | str, role: int, verify_crc: bool = True
    ) -> memoryview:
        """The bytes of the section ``role`` of ``entry``: a read-only view of the map.

        With ``verify_crc`` (the default, C-2.8a) the CRC is checked (E_SECTION_CRC) and so are
        the alignment padding bytes after the section (E_BAD_LAYOUT, C-2.8); they are checked
        here rather than at open so that opening never reads the data region.
        """
        view = self._check_open()
        if isinstance(entry, str):
            entry = self.entry(entry)
        elif not (0 <= entry.index < len(self.tensors) and self.tensors[entry.index] == entry):
            raise BadInputError(
                "entry does not belong to this file", path=self.path, tensor=entry.name
            )
        info = entry.section(role)
        if info is None:
            raise BadLayoutError(
                f"tensor has no {_role_name(role)} section (it has "
                f"{[_role_name(r) for r in entry.roles]})",
                path=self.path,
                tensor=entry.name,
                field="role",
            )
        end = info.offset + info.length
        data = view[info.offset : end]
        if verify_crc:
            crc = _crc32(data)
            if crc != info.crc32:
                data.release()
                raise SectionCrcError(
                    f"{_role_name(role)} section CRC is 0x{crc:08x}, the record says "
                    f"0x{info.crc32:08x}",
                    path=self.path,
                    tensor=entry.name,
                    field=_role_name(role),
                )
            # The file ends at the last section (checked at open), so this is exactly the
            # padding between this section and the next one.
            pad_end = min(spec.align_up(end, self.alignment), self.file_size)
            if not _all_zero(view[end:pad_end]):
                data.release()
                raise BadLayoutError(
                    f"non-zero padding after the {_role_name(role)} section",
                    path=self.path,
                    tensor=entry.name,
                    field=_role_name(role),
                )
        return data

    # --- lifetime -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release the map. Views still alive keep it mapped until they go (module doc)."""
        if self._closed:
            return
        self._closed = True
        view, mm = self._view, self._mm
        self._view = self._mm = None
        if view is not None:
            view.release()
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # Exported views exist: dropping our reference leaves the mapping to them; it
                # is unmapped when the last one is released. Never a dangling pointer.
                pass

    def __enter__(self) -> ContainerReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.tensors)} tensors"
        return f"<ContainerReader {self.path!r} v{self.version[0]}.{self.version[1]} {state}>"
