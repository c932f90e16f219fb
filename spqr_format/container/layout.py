"""Binary layout of the .spqr container (SPEC section 2): structs, records and shared rules.

This module is the one place that knows the byte positions of the fixed header, the tensor
records and the section records, and the rules that both the reader and the writer apply
(names, shapes, metadata, caps). The reader raises the errors of this module as they are; the
writer turns them into :class:`~spqr_format.errors.BadInputError` so that it can never produce
a file the reader would refuse. Nothing here knows about quantization or does file I/O.
"""

from __future__ import annotations

import json
import math
import operator
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from spqr_format import spec
from spqr_format.errors import (
    BadFieldError,
    BadMetadataError,
    BadNameError,
    LimitError,
)

# C-2.2: magic, version_major, version_minor, alignment, required_features, tensor_count,
# section_count, string_table_length, metadata_length, data_offset, header_crc32, reserved.
FIXED_HEADER = struct.Struct("<8sHHIQIIQQQII")
# C-2.4: name_offset, name_length, encoding, encoding_version, dtype, ndim, reserved,
# first_section, section_count, dims[8], digest[32], params[40].
TENSOR_RECORD = struct.Struct("<IIHHBBHII8Q32s40s")
# C-2.5: offset, length, crc32, role, reserved (u16), reserved (u64).
SECTION_RECORD = struct.Struct("<QQIHHQ")

assert FIXED_HEADER.size == spec.FIXED_HEADER_SIZE
assert TENSOR_RECORD.size == spec.TENSOR_RECORD_SIZE
assert SECTION_RECORD.size == spec.SECTION_RECORD_SIZE

DIGEST_SIZE = 32
PARAMS_SIZE = 40
U16_MAX = 0xFFFF

# C-2.11: top-level metadata keys are namespaced ("model.architecture"); the WHOLE key must
# match (fullmatch).
METADATA_KEY_RE = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)+")
_DEPTH_CHUNK = 1 << 20
# C-2.10: names hold no C0 control (U+0000..U+001F), DEL (U+007F), C1 control
# (U+0080..U+009F), nor bidi formatting character (U+061C, U+200E, U+200F, U+202A..U+202E,
# U+2066..U+2069): they would let a name print as another one.
_NAME_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# A JSON string token (RFC 8259 grammar, unrolled so the regex engine never backtracks), or
# an unterminated one running to the end of the text: every match attempt from a quote then
# succeeds, so the scan is linear (a pattern that could fail would be retried from every
# later quote: quadratic on '"\\"\\"\\"...').
_JSON_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
# A \u escape of a surrogate: the only way a lone surrogate can enter (strict UTF-8 has none).
_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class SectionInfo:
    """One section of a tensor: role (C-2.7), absolute offset, byte length and CRC-32."""

    role: int
    offset: int
    length: int
    crc32: int


@dataclass(frozen=True)
class TensorEntry:
    """What the container says about one tensor. ``params`` is opaque here (the codec's)."""

    index: int
    name: str
    encoding: int
    encoding_version: int
    dtype: int
    shape: tuple[int, ...]
    digest: bytes
    params: bytes
    sections: tuple[SectionInfo, ...]

    @property
    def roles(self) -> tuple[int, ...]:
        return tuple(s.role for s in self.sections)

    def section(self, role: int) -> SectionInfo | None:
        for s in self.sections:
            if s.role == role:
                return s
        return None


@dataclass(frozen=True)
class FixedHeader:
    """The 64-byte fixed header (C-2.2), fields as stored."""

    magic: bytes
    version_major: int
    version_minor: int
    alignment: int
    required_features: int
    tensor_count: int
    section_count: int
    string_table_length: int
    metadata_length: int
    data_offset: int
    header_crc32: int
    reserved: int

    def pack(self) -> bytes:
        return FIXED_HEADER.pack(
            self.magic,
            self.version_major,
            self.version_minor,
            self.alignment,
            self.required_features,
            self.tensor_count,
            self.section_count,
            self.string_table_length,
            self.metadata_length,
            self.data_offset,
            self.header_crc32,
            self.reserved,
        )

    @classmethod
    def unpack(cls, buf: Any) -> FixedHeader:
        return cls(*FIXED_HEADER.unpack_from(buf, 0))


def pack_tensor_record(
    *,
    name_offset: int,
    name_length: int,
    encoding: int,
    encoding_version: int,
    dtype: int,
    shape: tuple[int, ...],
    first_section: int,
    section_count: int,
    digest: bytes,
    params: bytes,
) -> bytes:
    # C-3.2: unused dims entries are zero; reserved u16 is zero (C-1.5).
    dims = tuple(shape) + (0,) * (spec.MAX_NDIM - len(shape))
    return TENSOR_RECORD.pack(
        name_offset,
        name_length,
        encoding,
        encoding_version,
        dtype,
        len(shape),
        0,
        first_section,
        section_count,
        *dims,
        digest,
        params,
    )


def unpack_tensor_record(buf: Any, offset: int) -> tuple:
    """(name_offset, name_length, encoding, encoding_version, dtype, ndim, reserved,
    first_section, section_count, dims[8] tuple, digest, params)."""
    f = TENSOR_RECORD.unpack_from(buf, offset)
    return (*f[:9], tuple(f[9:17]), f[17], f[18])


def pack_section_record(*, offset: int, length: int, crc32: int, role: int) -> bytes:
    return SECTION_RECORD.pack(offset, length, crc32, role, 0, 0)


def unpack_section_record(buf: Any, offset: int) -> tuple[int, int, int, int, int, int]:
    """(offset, length, crc32, role, reserved16, reserved64)."""
    return SECTION_RECORD.unpack_from(buf, offset)


def header_crc(buf: Any, header_length: int) -> int:
    """C-2.3: CRC-32 of ``buf[0:header_length]`` with bytes 56..59 taken as zero (no copy)."""
    mv = memoryview(buf)
    try:
        crc = zlib.crc32(mv[: spec.HEADER_CRC_OFFSET])
        crc = zlib.crc32(b"\0\0\0\0", crc)
        return zlib.crc32(mv[spec.HEADER_CRC_OFFSET + 4 : header_length], crc)
    finally:
        mv.release()


def check_alignment(alignment: int) -> None:
    """C-2.8: a power of two, 64 <= a <= 65536 (E_BAD_FIELD)."""
    if (
        not spec.MIN_ALIGNMENT <= alignment <= spec.MAX_ALIGNMENT
        or alignment & (alignment - 1) != 0
    ):
        raise BadFieldError(
            f"alignment must be a power of two in [{spec.MIN_ALIGNMENT}, "
            f"{spec.MAX_ALIGNMENT}], got {alignment}",
            field="alignment",
        )


def header_length(
    tensor_count: int, section_count: int, string_table_length: int, metadata_length: int
) -> int:
    """C-2.2 header_length, after checking every cap of C-2.9 on its terms (E_LIMIT).

    Each term is compared with its cap before anything is summed, so that the arithmetic
    stays within 64 bits for a reader written in C (C-1.4).
    """
    if tensor_count > spec.MAX_TENSOR_COUNT:
        raise LimitError(
            f"tensor_count {tensor_count} exceeds {spec.MAX_TENSOR_COUNT}", field="tensor_count"
        )
    if section_count > spec.MAX_SECTIONS_PER_TENSOR * tensor_count:
        raise LimitError(
            f"section_count {section_count} exceeds 16 x tensor_count ({tensor_count})",
            field="section_count",
        )
    if metadata_length > spec.MAX_METADATA_LENGTH:
        raise LimitError(
            f"metadata_length {metadata_length} exceeds {spec.MAX_METADATA_LENGTH}",
            field="metadata_length",
        )
    if string_table_length > spec.MAX_HEADER_LENGTH:
        raise LimitError(
            f"string_table_length {string_table_length} exceeds the header cap",
            field="string_table_length",
        )
    total = (
        spec.FIXED_HEADER_SIZE
        + spec.TENSOR_RECORD_SIZE * tensor_count
        + spec.SECTION_RECORD_SIZE * section_count
        + string_table_length
        + metadata_length
    )
    if total > spec.MAX_HEADER_LENGTH:
        raise LimitError(
            f"header_length {total} exceeds {spec.MAX_HEADER_LENGTH}", field="header_length"
        )
    return total


def check_name(raw: bytes) -> str:
    """C-2.10: a name is UTF-8, 1..1024 bytes, without C0/C1 controls, DEL or bidi
    formatting characters (E_BAD_NAME)."""
    if not 1 <= len(raw) <= spec.MAX_NAME_LENGTH:
        raise BadNameError(
            f"a name is 1..{spec.MAX_NAME_LENGTH} bytes of UTF-8, got {len(raw)} bytes",
            field="name",
        )
    try:
        # Python's strict UTF-8 codec rejects overlong forms, surrogates and > U+10FFFF.
        name = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise BadNameError(f"name is not valid UTF-8 ({exc.reason})", field="name") from None
    bad = _NAME_CONTROL_RE.search(name)
    if bad is not None:
        raise BadNameError(
            f"name {name!r} contains control or bidi formatting character U+{ord(bad.group()):04X}",
            field="name",
        )
    return name


def element_count(shape: tuple[int, ...]) -> int:
    """C-3.1 / C-2.9: element count of a shape, refusing shapes over the caps.

    ndim > 8 is E_BAD_FIELD (the tensor record's ndim rule, see the report on C-2.9), a dim
    over 2^40 or a count over 2^48 is E_LIMIT. A zero dim makes the count 0 whatever the other
    dims are; every partial product is checked against the cap, so the arithmetic is bounded.
    """
    if len(shape) > spec.MAX_NDIM:
        raise BadFieldError(f"ndim {len(shape)} exceeds {spec.MAX_NDIM}", field="ndim")
    for i, d in enumerate(shape):
        if d < 0:
            raise BadFieldError(f"dims[{i}] is negative ({d})", field=f"dims[{i}]")
        if d > spec.MAX_DIM:
            raise LimitError(f"dims[{i}] = {d} exceeds 2^40", field=f"dims[{i}]")
    if 0 in shape:
        return 0
    count = 1
    for d in shape:
        count *= d
        if count > spec.MAX_ELEMENTS:
            raise LimitError(f"shape {tuple(shape)} has more than 2^48 elements", field="dims")
    return count


def normalize_shape(shape: Any) -> tuple[int, ...]:
    """A shape given by a caller as a tuple of Python ints (accepts numpy integers)."""
    try:
        return tuple(operator.index(d) for d in shape)
    except TypeError:
        raise BadFieldError(f"shape must be a sequence of integers, got {shape!r}") from None


# --- metadata (C-2.11) -----------------------------------------------------------------------


def _bracket_depth_ok(raw: bytes, limit: int) -> bool:
    """True when no bracket nesting in ``raw`` (outside JSON strings) is deeper than ``limit``.

    Runs before json parses anything, in linear time, without recursion and in bounded
    memory, so that deep input can neither exhaust the stack nor take long. Works on UTF-8
    bytes (multi-byte sequences contain no ASCII byte): a quote preceded by an even run of
    backslashes opens or closes a string, and brackets outside strings change the depth. Up to
    the first syntax error this classification is exact, so json can never recurse deeper than
    what is measured here; text whose depth goes negative is unbalanced and refused too.
    """
    depth = in_string = run = 0  # carried across chunks; run = trailing backslashes
    data = np.frombuffer(raw, dtype=np.uint8)
    for start in range(0, len(data), _DEPTH_CHUNK):
        b = data[start : start + _DEPTH_CHUNK]
        quote = b == 0x22
        backslash = b == 0x5C
        if run or backslash.any():
            idx = np.arange(len(b), dtype=np.int32)
            # last[i]: index of the last non-backslash at or before i (-1 - run when none).
            last = np.maximum.accumulate(np.where(backslash, np.int32(-1 - run), idx))
            before = np.concatenate((np.array([-1 - run], np.int32), last[:-1]))
            quote &= (idx - before) % 2 == 1  # an even run of backslashes before the quote
            run = len(b) - 1 - int(last[-1])
        else:
            run = 0
        # opens - closes outside strings; "[" 0x5B, "{" 0x7B, "]" 0x5D, "}" 0x7D
        step = ((b == 0x5B) | (b == 0x7B)).view(np.int8) - ((b == 0x5D) | (b == 0x7D)).view(np.int8)
        inside = np.bitwise_xor.accumulate(quote) ^ bool(in_string)
        step[inside] = 0
        running = np.cumsum(step, dtype=np.int32)
        if depth + int(running.max()) > limit or depth + int(running.min()) < 0:
            return False
        depth += int(running[-1])
        in_string = int(inside[-1])
    return True


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json hands the keys over unescaped: {"a":1,"\\u0061":2} is a duplicate here.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadMetadataError(f"duplicate key {key!r}", field="metadata")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise BadMetadataError(f"{name} is not JSON (RFC 8259)", field="metadata")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadMetadataError(
            f"number {text[:40]!r} is not finite as an IEEE binary64 value", field="metadata"
        )
    return value


def _finite_int(text: str) -> int:
    value = int(text)
    try:
        float(value)  # rounds to nearest; OverflowError exactly when that is infinite
    except OverflowError:
        raise BadMetadataError(
            f"number {text[:40]}... ({len(text)} digits) is not finite as an IEEE binary64 value",
            field="metadata",
        ) from None
    return value


def count_json_values(raw: bytes) -> int:
    """How many JSON values the text ``raw`` holds (exact for valid JSON), without parsing.

    C-speed byte operations only, so text of any size is measured before anything is built:
    strings are replaced by ``""`` (one regex pass), white space is dropped, then in valid
    JSON every value is the top-level one, follows a comma, or is the first element of a
    non-empty array or object: ``1 + commas + opens - empty containers``. For invalid JSON the
    count is meaningless, but such text is refused by the parser anyway.
    """
    stripped = _JSON_STRING_RE.sub(b'""', raw).translate(None, b" \t\n\r")
    opens = stripped.count(b"[") + stripped.count(b"{")
    empty = stripped.count(b"[]") + stripped.count(b"{}")
    return 1 + stripped.count(b",") + opens - empty


def _check_no_lone_surrogates(obj: Any) -> None:
    """Every string and key is valid Unicode: no surrogate code point survived the parse."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, child in value.items():
                _check_string(key)
                stack.append(child)
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            _check_string(value)


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadMetadataError(
            f"string {text[:40]!r} holds a lone surrogate U+{ord(text[exc.start]):04X}",
            field="metadata",
        ) from None


def check_metadata_keys(obj: Any) -> None:
    """C-2.11: the top level is an object and its keys are namespaced (E_BAD_METADATA)."""
    if not isinstance(obj, dict):
        raise BadMetadataError(
            f"top level must be an object, got {type(obj).__name__}", field="metadata"
        )
    for key in obj:
        if not isinstance(key, str) or not METADATA_KEY_RE.fullmatch(key):
            raise BadMetadataError(
                f"top-level key {key!r} is not namespaced ([a-z0-9_]+(.[a-z0-9_]+)+)",
                field="metadata",
            )


def parse_metadata(raw: bytes | memoryview) -> dict[str, Any]:
    """Parse and check the metadata bytes (C-2.11); every failure is E_BAD_METADATA."""
    if len(raw) == 0:
        return {}
    raw = bytes(raw)
    if raw.startswith(_UTF8_BOM):
        raise BadMetadataError("starts with a UTF-8 byte order mark", field="metadata")
    values = count_json_values(raw)  # before json builds a single object
    if values > spec.MAX_METADATA_VALUES:
        raise BadMetadataError(
            f"{values} JSON values, over the cap of {spec.MAX_METADATA_VALUES}",
            field="metadata",
        )
    if not _bracket_depth_ok(raw, spec.MAX_METADATA_DEPTH):
        raise BadMetadataError(
            f"nesting deeper than {spec.MAX_METADATA_DEPTH} (objects and arrays both count) "
            "or unbalanced brackets",
            field="metadata",
        )
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise BadMetadataError(f"not UTF-8 ({exc.reason})", field="metadata") from None
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_finite_int,
        )
    except BadMetadataError:
        raise
    except RecursionError:  # cannot happen after the depth scan; kept as a safety net
        raise BadMetadataError("nesting too deep", field="metadata") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise BadMetadataError(f"invalid JSON: {exc}", field="metadata") from None
    if _SURROGATE_ESCAPE_RE.search(raw) is not None:  # only then can a lone surrogate exist
        _check_no_lone_surrogates(obj)
    check_metadata_keys(obj)
    return obj


def _check_python_metadata(obj: Any) -> None:
    """Depth and key types of a metadata value given by a caller, iteratively (no recursion).

    Counts depth the way the reader's bracket scan does (the top-level object is depth 1), and
    stops descending past the cap, so self-referencing containers end as "too deep".
    """
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
            for key in value:
                if not isinstance(key, str):
                    raise BadMetadataError(f"key {key!r} is not a string", field="metadata")
        elif isinstance(value, (list, tuple)):
            children = value
        else:
            continue
        if depth > spec.MAX_METADATA_DEPTH:
            raise BadMetadataError(
                f"nesting deeper than {spec.MAX_METADATA_DEPTH}", field="metadata"
            )
        stack.extend((child, depth + 1) for child in children)


def encode_metadata(obj: dict[str, Any] | None) -> bytes:
    """Canonical metadata bytes (C-2.11 SHOULD): sorted keys, no white space, ASCII only.

    ``None`` and ``{}`` give ``b""`` (metadata_length 0). The result is parsed back with
    :func:`parse_metadata`, so what a writer stores is exactly what a reader accepts.
    """
    if obj is None or (isinstance(obj, dict) and not obj):
        return b""
    check_metadata_keys(obj)
    _check_python_metadata(obj)
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise BadMetadataError(f"not JSON-serializable: {exc}", field="metadata") from None
    raw = text.encode("ascii")
    if len(raw) > spec.MAX_METADATA_LENGTH:
        raise LimitError(
            f"metadata is {len(raw)} bytes, over {spec.MAX_METADATA_LENGTH}",
            field="metadata_length",
        )
    parse_metadata(raw)
    return raw
