"""A .spqr file as an editable image, for building reject vectors.

:func:`parse` turns the bytes of a *valid* file into an :class:`Image` (fixed-header fields,
tensor records, section contents, metadata bytes); :meth:`Image.to_bytes` lays it out again
by SPEC section 2 (names concatenated, sections at their derived offsets, zero padding) and
recomputes every section CRC and the header CRC, unless a field is overridden. So a fault is
built by changing one thing and serializing: the fault is then the only one in the file
(SPEC section 9: each reject vector holds exactly one fault), except when the fault *is* a
CRC (override ``crc32`` / ``header_crc32``).

This module knows the container only (SPEC section 2), never what sections mean; it is
independent of the bilevel layout.
"""

from __future__ import annotations

import copy
import struct
import zlib
from dataclasses import dataclass, field

from spqr_format import spec

FIXED_HEADER = struct.Struct("<8sHHIQIIQQQII")
TENSOR_RECORD = struct.Struct("<IIHHBBHII8Q32s40s")
SECTION_RECORD = struct.Struct("<QQIHHQ")


def align(v: int, a: int) -> int:
    return -(-v // a) * a


@dataclass
class Section:
    role: int
    data: bytes
    # Overrides (None: derived from the layout / computed).
    offset: int | None = None
    length: int | None = None
    crc32: int | None = None
    reserved16: int = 0
    reserved64: int = 0
    pad_fill: bytes | None = None  # bytes written into the padding after this section


@dataclass
class Tensor:
    name: bytes
    encoding: int
    encoding_version: int
    dtype: int
    ndim: int
    dims: list[int]  # all 8 entries
    digest: bytes
    params: bytes
    sections: list[Section]
    reserved: int = 0
    name_offset: int | None = None
    name_length: int | None = None
    first_section: int | None = None
    section_count: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.dims[: self.ndim])

    def section(self, role: int) -> Section:
        for s in self.sections:
            if s.role == role:
                return s
        raise KeyError(f"tensor {self.name!r} has no section with role {role}")


@dataclass
class Image:
    tensors: list[Tensor] = field(default_factory=list)
    metadata: bytes = b""
    magic: bytes = spec.MAGIC
    version_major: int = spec.VERSION_MAJOR
    version_minor: int = spec.VERSION_MINOR
    alignment: int = spec.DEFAULT_ALIGNMENT
    required_features: int = 0
    reserved: int = 0
    # Overrides of declared header fields (None: derived from the content).
    tensor_count: int | None = None
    section_count: int | None = None
    string_table_length: int | None = None
    metadata_length: int | None = None
    data_offset: int | None = None
    header_crc32: int | None = None
    # Layout knobs.
    layout_alignment: int | None = None  # alignment used to place sections (default alignment)
    extra_sections: list[Section] = field(default_factory=list)  # records owned by no tensor
    header_pad_fill: bytes | None = None  # bytes written into the header padding
    trailing: bytes = b""  # bytes after the last section
    crc_mode: str = "spec"  # "spec" | "skip-crc-bytes" | "with-padding": how the header CRC is made

    def copy(self) -> Image:
        return copy.deepcopy(self)

    def tensor(self, name: str | bytes) -> Tensor:
        key = name.encode() if isinstance(name, str) else name
        for t in self.tensors:
            if t.name == key:
                return t
        raise KeyError(name)

    # ----------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        names = b"".join(t.name for t in self.tensors)
        records = []
        sections: list[Section] = []
        name_off = 0
        for t in self.tensors:
            first = len(sections)
            sections.extend(t.sections)
            records.append(
                TENSOR_RECORD.pack(
                    name_off if t.name_offset is None else t.name_offset,
                    len(t.name) if t.name_length is None else t.name_length,
                    t.encoding,
                    t.encoding_version,
                    t.dtype,
                    t.ndim,
                    t.reserved,
                    first if t.first_section is None else t.first_section,
                    len(t.sections) if t.section_count is None else t.section_count,
                    *t.dims,
                    t.digest,
                    t.params,
                )
            )
            name_off += len(t.name)
        sections.extend(self.extra_sections)
        tcount = len(self.tensors) if self.tensor_count is None else self.tensor_count
        scount = len(sections) if self.section_count is None else self.section_count
        stlen = len(names) if self.string_table_length is None else self.string_table_length
        mlen = len(self.metadata) if self.metadata_length is None else self.metadata_length
        actual_hlen = 64 + 160 * len(self.tensors) + 32 * len(sections) + len(names)
        actual_hlen += len(self.metadata)
        lay = self.layout_alignment or self.alignment
        declared_hlen = 64 + 160 * tcount + 32 * scount + stlen + mlen
        data_start = align(actual_hlen, lay)
        # Place sections.
        placed = []
        pos = data_start
        for s in sections:
            placed.append(pos)
            pos = align(pos + len(s.data), lay)
        sec_records = []
        for s, off in zip(sections, placed, strict=True):
            crc = zlib.crc32(s.data) if s.crc32 is None else s.crc32
            sec_records.append(
                SECTION_RECORD.pack(
                    off if s.offset is None else s.offset,
                    len(s.data) if s.length is None else s.length,
                    crc,
                    s.role,
                    s.reserved16,
                    s.reserved64,
                )
            )
        data_offset = align(declared_hlen, self.alignment) if self.alignment else data_start
        if data_offset >= 1 << 64:  # the declared counts overflow: keep the real one
            data_offset = data_start
        if self.data_offset is not None:
            data_offset = self.data_offset
        elif not (
            spec.MIN_ALIGNMENT <= self.alignment <= spec.MAX_ALIGNMENT
            and self.alignment & (self.alignment - 1) == 0
        ):
            data_offset = data_start
        head = FIXED_HEADER.pack(
            self.magic,
            self.version_major,
            self.version_minor,
            self.alignment,
            self.required_features,
            tcount,
            scount,
            stlen,
            mlen,
            data_offset,
            0,
            self.reserved,
        )
        out = bytearray(head + b"".join(records) + b"".join(sec_records) + names + self.metadata)
        assert len(out) == actual_hlen
        pad = data_start - actual_hlen
        out += _fill(self.header_pad_fill, pad)
        for i, s in enumerate(sections):
            assert len(out) == placed[i]
            out += s.data
            end = placed[i] + len(s.data)
            nxt = placed[i + 1] if i + 1 < len(sections) else end
            out += _fill(s.pad_fill, nxt - end)
        out += self.trailing
        # Header CRC (C-2.3) over the declared header length when the file holds it.
        hlen = declared_hlen if declared_hlen <= len(out) else actual_hlen
        if self.crc_mode == "with-padding":
            hlen = data_start
        buf = bytearray(out[:hlen])
        if self.crc_mode == "skip-crc-bytes":
            del buf[56:60]
        crc = zlib.crc32(bytes(buf)) if self.header_crc32 is None else self.header_crc32
        struct.pack_into("<I", out, 56, crc)
        return bytes(out)


def _fill(fill: bytes | None, n: int) -> bytes:
    if fill is None or n <= 0:
        return b"\0" * max(n, 0)
    return (fill * (n // len(fill) + 1))[:n]


def parse(data: bytes) -> Image:
    """The image of a valid file (use only on files the reference reader accepts)."""
    h = FIXED_HEADER.unpack_from(data, 0)
    magic, vmaj, vmin, alignment, feats, tcount, scount, stlen, mlen, _doff, _crc, res = h
    sec_base = 64 + 160 * tcount
    str_base = sec_base + 32 * scount
    meta_base = str_base + stlen
    secs = []
    for j in range(scount):
        off, length, _c, role, r16, r64 = SECTION_RECORD.unpack_from(data, sec_base + 32 * j)
        secs.append(Section(role, bytes(data[off : off + length]), reserved16=r16, reserved64=r64))
    tensors = []
    for i in range(tcount):
        f = TENSOR_RECORD.unpack_from(data, 64 + 160 * i)
        noff, nlen, enc, ever, dtype, ndim, tres, first, nsec = f[:9]
        tensors.append(
            Tensor(
                name=bytes(data[str_base + noff : str_base + noff + nlen]),
                encoding=enc,
                encoding_version=ever,
                dtype=dtype,
                ndim=ndim,
                dims=list(f[9:17]),
                digest=f[17],
                params=f[18],
                sections=secs[first : first + nsec],
                reserved=tres,
            )
        )
    return Image(
        tensors=tensors,
        metadata=bytes(data[meta_base : meta_base + mlen]),
        magic=magic,
        version_major=vmaj,
        version_minor=vmin,
        alignment=alignment,
        required_features=feats,
        reserved=res,
    )


# Offsets of fields inside records, for byte patches.
HEADER_FIELDS = {
    "magic": 0,
    "version_major": 8,
    "version_minor": 10,
    "alignment": 12,
    "required_features": 16,
    "tensor_count": 24,
    "section_count": 28,
    "string_table_length": 32,
    "metadata_length": 40,
    "data_offset": 48,
    "header_crc32": 56,
    "reserved": 60,
}
