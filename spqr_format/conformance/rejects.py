"""Reject vectors: one fault each, for every error code of SPEC section 9 that a file can
trigger, with many variants per code. Registered into :data:`generate.REGISTRY` on import.

Every builder starts from a valid file made by the public writer, edits one thing through
:class:`~spqr_format.conformance.image.Image` (which re-derives the layout and re-computes every
section CRC and the header CRC), so the fault is the only one, unless the fault is a CRC.
Faults inside bilevel sections go through :mod:`~spqr_format.conformance.layout_faults`.
"""

from __future__ import annotations

import functools
import struct
import zlib

import numpy as np

from spqr_format.conformance import image as img
from spqr_format.conformance import layout_faults as lf
from spqr_format.conformance.data import make_bilevel
from spqr_format.conformance.generate import reject_vector, vector, write_spqr
from spqr_format.spec import DType, Role

# ---------------------------------------------------------------------------------------------
# Valid base files


@functools.cache
def base_raw() -> bytes:
    """Two raw tensors (60 + 8 bytes of data: padding after each) and metadata."""
    return write_spqr(
        {"w": (np.arange(15, dtype=np.float32) / 4).reshape(3, 5), "b": np.ones(4, np.float16)},
        metadata={"user.note": "base"},
    )


@functools.cache
def base_raw_nometa() -> bytes:
    return write_spqr({"w": np.arange(6, dtype=np.float32), "b": np.ones(4, np.float16)})


@functools.cache
def base_bilevel() -> bytes:
    """40x50, b3 g16 sb2 S16, permutation, ~4 % outliers (none at stored (0, 0)), float16."""
    t = make_bilevel(
        "reject/base", 40, 50, 3, 16, 2, 16, perm="random", outliers=0.04, dtype=DType.FLOAT16
    )
    keep = ~((t.outliers.rows == 0) & (t.outliers.cols == 0))
    t.outliers.rows, t.outliers.cols = t.outliers.rows[keep], t.outliers.cols[keep]
    t.outliers.values = t.outliers.values[keep]
    return write_spqr({"w": t}, metadata={"user.note": "bilevel base"})


@functools.cache
def base_fp16() -> bytes:
    """8x20, b4 g8, fp16 statistics, no permutation, no outliers, float32."""
    return write_spqr({"w": make_bilevel("reject/fp16", 8, 20, 4, 8, 0, 0, dtype=DType.FLOAT32)})


@functools.cache
def base_skips() -> bytes:
    """1x70000 with two outliers 69,000 columns apart: one skip entry (E = 3, K = 2)."""
    t = make_bilevel(
        "reject/skips", 1, 70000, 1, 1024, 0, 0, outliers=[(0, 5), (0, 69005)], dtype=DType.FLOAT16
    )
    return write_spqr({"w": t})


BASES = {
    "raw": base_raw,
    "raw-nometa": base_raw_nometa,
    "bilevel": base_bilevel,
    "fp16": base_fp16,
    "skips": base_skips,
}

CLAUSES = {
    "E_TRUNCATED": ["C-2.3", "C-2.8", "C-2.9"],
    "E_BAD_MAGIC": ["C-2.1"],
    "E_UNSUPPORTED_VERSION": ["C-2.4"],
    "E_HEADER_CRC": ["C-2.3"],
    "E_LIMIT": ["C-2.9", "C-1.4"],
    "E_BAD_FIELD": ["C-1.5"],
    "E_UNKNOWN_FEATURE": ["C-2.5"],
    "E_BAD_NAME": ["C-2.10"],
    "E_DUPLICATE_NAME": ["C-2.10"],
    "E_BAD_METADATA": ["C-2.11"],
    "E_BAD_LAYOUT": ["C-2.8"],
    "E_UNKNOWN_ENCODING": ["C-3.4"],
    "E_UNSUPPORTED_ENCODING_VERSION": ["C-3.5"],
    "E_BAD_SHAPE": ["C-5.1"],
    "E_SECTION_CRC": ["C-2.8a"],
    "E_BAD_PERMUTATION": ["C-5.7"],
    "E_BAD_OUTLIERS": ["C-6.1", "C-6.2"],
    "E_NONFINITE": ["C-5.8"],
    "E_DIGEST_MISMATCH": ["C-2.12"],
}


# The order of checks (SPEC C-9.2: container, C-9.3: tensors) decides the code when one fault
# breaks several rules; every reject vector is an instance of that order.
_CONTAINER = (
    "E_TRUNCATED",
    "E_BAD_MAGIC",
    "E_UNSUPPORTED_VERSION",
    "E_HEADER_CRC",
    "E_UNKNOWN_FEATURE",
    "E_BAD_NAME",
    "E_DUPLICATE_NAME",
    "E_BAD_METADATA",
)
_BOTH = ("E_LIMIT", "E_BAD_FIELD", "E_BAD_LAYOUT")
ORDER_CLAUSES = {
    code: ["C-9.2"] if code in _CONTAINER else ["C-9.2", "C-9.3"] if code in _BOTH else ["C-9.3"]
    for code in CLAUSES
}


def reject(
    code: str, variant: str, base: str, description: str, clauses=(), labels=(),
    spec_version: str = "1.0",
):  # fmt: skip
    """Register ``reject-<code>-<variant>``: ``mutate(image)`` edits the base file's image in
    place (or returns the final bytes)."""
    short = code.removeprefix("E_").lower().replace("_", "-")

    def deco(mutate):
        cl = sorted(set(CLAUSES[code]) | set(clauses) | set(ORDER_CLAUSES[code]) | {"C-9.1"})
        vector(
            f"reject-{short}-{variant}",
            "reject",
            ["reject", code, f"base-{base}", *labels],
            cl,
            description,
            spec_version=spec_version,
        )(lambda: reject_vector(BASES[base](), mutate, code))
        return mutate

    return deco


def _hlen(im: img.Image) -> int:
    n_sec = sum(len(t.sections) for t in im.tensors)
    names = sum(len(t.name) for t in im.tensors)
    return 64 + 160 * len(im.tensors) + 32 * n_sec + names + len(im.metadata)


def _last_section_offset(data: bytes) -> tuple[int, int]:
    h = img.FIXED_HEADER.unpack_from(data, 0)
    tcount, scount = h[5], h[6]
    off, length = struct.unpack_from("<QQ", data, 64 + 160 * tcount + 32 * (scount - 1))
    return off, length


# ---------------------------------------------------------------------------------------------
# E_TRUNCATED
for _n in (0, 7, 8, 63):
    reject(
        "E_TRUNCATED",
        f"file-{_n}-bytes",
        "raw",
        f"only the first {_n} bytes of a valid file (shorter than the 64-byte fixed header)",
    )(lambda im, n=_n: im.to_bytes()[:n])

reject("E_TRUNCATED", "in-tensor-records", "raw", "the file ends inside the tensor records")(
    lambda im: im.to_bytes()[: 64 + 100]
)
reject("E_TRUNCATED", "in-section-records", "raw", "the file ends inside the section records")(
    lambda im: im.to_bytes()[: 64 + 320 + 40]
)
reject(
    "E_TRUNCATED",
    "in-header-padding",
    "raw",
    "the file ends inside the padding between header_length and data_offset",
)(lambda im: im.to_bytes()[: _hlen(im) + 1])
reject("E_TRUNCATED", "in-last-section", "bilevel", "the file ends inside its last section")(
    lambda im: (lambda d: d[: _last_section_offset(d)[0] + 2])(im.to_bytes())
)
reject(
    "E_TRUNCATED", "before-last-section", "raw", "the file ends where its last section should start"
)(lambda im: (lambda d: d[: _last_section_offset(d)[0]])(im.to_bytes()))
reject("E_TRUNCATED", "last-byte-missing", "bilevel", "the last byte of the file is missing")(
    lambda im: im.to_bytes()[:-1]
)


@reject(
    "E_TRUNCATED",
    "section-length-past-end",
    "raw",
    "the last section's length runs 64 bytes past the end of the file",
    ["C-2.5"],
)
def _(im):
    im.tensors[-1].sections[-1].length = len(im.tensors[-1].sections[-1].data) + 64


@reject(
    "E_TRUNCATED",
    "section-offset-plus-length-overflows",
    "raw",
    "the last section's length is 2^64 - 1: offset + length overflows 64 bits (C-2.9 names "
    "E_TRUNCATED for this, not C-1.4's E_LIMIT)",
    ["C-1.4", "C-2.5"],
)
def _(im):
    im.tensors[-1].sections[-1].length = (1 << 64) - 1


@reject(
    "E_TRUNCATED",
    "string-table-past-end",
    "raw",
    "string_table_length is 1,000,000: header_length is beyond the end of the file",
    ["C-2.2"],
)
def _(im):
    im.string_table_length = 1_000_000


@reject(
    "E_TRUNCATED",
    "metadata-at-cap-past-end",
    "raw",
    "metadata_length is 64 MiB (at the cap): header_length is beyond the end of the file",
    ["C-2.2"],
)
def _(im):
    im.metadata_length = 64 << 20


@reject(
    "E_TRUNCATED",
    "tensor-count-past-end",
    "raw",
    "tensor_count is 1000 (within the caps): the tensor records run past the end of the file",
    ["C-2.2"],
)
def _(im):
    im.tensor_count = 1000


# ---------------------------------------------------------------------------------------------
# E_BAD_MAGIC
_MAGICS = {
    "first-byte": b"\x88SPQR\r\n\x1a",
    "letter": b"\x89SPQT\r\n\x1a",
    "crlf-to-lf": b"\x89SPQR\n\n\x1a",
    "last-byte": b"\x89SPQR\r\n\x00",
    "zeros": b"\0" * 8,
    "ascii-spqr": b"SPQR\r\n\x1a\n",
    "gguf": b"GGUF\x03\x00\x00\x00",
    "lowercase": b"\x89spqr\r\n\x1a",
}
for _v, _m in _MAGICS.items():
    reject("E_BAD_MAGIC", _v, "raw", f"magic {_m!r} instead of 89 53 50 51 52 0D 0A 1A")(
        lambda im, m=_m: setattr(im, "magic", m)
    )

reject(
    "E_BAD_MAGIC",
    "safetensors-file",
    "raw",
    "a safetensors file (64 bytes or more) given as a .spqr file",
)(
    lambda im: (
        struct.pack("<Q", 56)
        + b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
        + b" "
        + b"\0\0\x80?"
    )
)

# ---------------------------------------------------------------------------------------------
# E_UNSUPPORTED_VERSION
for _maj in (0, 2, 255, 65535):
    reject(
        "E_UNSUPPORTED_VERSION",
        f"major-{_maj}",
        "raw",
        f"version_major {_maj} (this is a 1.x reader)",
    )(lambda im, v=_maj: setattr(im, "version_major", v))

# ---------------------------------------------------------------------------------------------
# E_HEADER_CRC


def _patch_after(fn):
    """Build the file (CRCs right), then change bytes without fixing the header CRC."""

    def mutate(im):
        data = bytearray(im.to_bytes())
        fn(im, data)
        return bytes(data)

    return mutate


reject("E_HEADER_CRC", "crc-bit-flipped", "raw", "bit 0 of header_crc32 flipped")(
    _patch_after(lambda im, d: d.__setitem__(56, d[56] ^ 1))
)
reject("E_HEADER_CRC", "crc-zero", "bilevel", "header_crc32 is zero")(
    lambda im: setattr(im, "header_crc32", 0)
)
reject(
    "E_HEADER_CRC",
    "name-byte-changed",
    "raw",
    "a byte of a tensor name changed ('w' to 'v', still a valid name) after the CRC was made",
)(_patch_after(lambda im, d: d.__setitem__(64 + 320 + 64, ord("v"))))
reject(
    "E_HEADER_CRC",
    "metadata-byte-changed",
    "raw",
    "a byte of the metadata changed after the CRC was made (still valid JSON)",
)(_patch_after(lambda im, d: d.__setitem__(_hlen(im) - 3, ord("x"))))
reject(
    "E_HEADER_CRC",
    "minor-version-changed",
    "bilevel",
    "version_minor changed from 0 to 1 after the CRC was made",
)(_patch_after(lambda im, d: d.__setitem__(10, 1)))
reject(
    "E_HEADER_CRC",
    "params-byte-changed",
    "bilevel",
    "stats_group_size changed 16 -> 17 after the CRC was made",
)(_patch_after(lambda im, d: d.__setitem__(64 + 120 + 8, 17)))
reject(
    "E_HEADER_CRC",
    "crc-without-crc-bytes",
    "raw",
    "CRC computed over the header with the four bytes at offset 56 left out, instead of "
    "taken as zero",
)(lambda im: setattr(im, "crc_mode", "skip-crc-bytes"))
reject(
    "E_HEADER_CRC",
    "crc-over-padding",
    "raw",
    "CRC computed over [0, data_offset) instead of [0, header_length)",
)(lambda im: setattr(im, "crc_mode", "with-padding"))

# ---------------------------------------------------------------------------------------------
# E_LIMIT
_LIMITS = {
    "tensor-count-over-cap": dict(tensor_count=(1 << 20) + 1),
    "tensor-count-u32-max": dict(tensor_count=0xFFFFFFFF),
    "section-count-over-16x-tensors": dict(section_count=16 * 2 + 1),
    "section-count-u32-max": dict(section_count=0xFFFFFFFF),
    "metadata-length-over-cap": dict(metadata_length=(64 << 20) + 1),
    "metadata-length-u64-max": dict(metadata_length=(1 << 64) - 1),
    "string-table-length-u64-max": dict(string_table_length=(1 << 64) - 1),
    "header-length-over-256mib": dict(string_table_length=256 << 20),
    "header-length-from-counts": dict(tensor_count=1 << 20, section_count=1 << 24),
}
for _v, _kw in _LIMITS.items():
    reject("E_LIMIT", _v, "raw", f"fixed header {_kw}: over a cap of C-2.9", ["C-2.2"])(
        lambda im, kw=_kw: [setattr(im, k, v) for k, v in kw.items()]
    )


def _dims(i, ndim, dims):
    def mutate(im):
        t = im.tensors[i]
        t.ndim = ndim
        t.dims = list(dims) + [0] * (8 - len(dims))

    return mutate


reject("E_LIMIT", "dim-over-2-40", "raw", "a raw tensor of shape [2^40 + 1]", ["C-3.1"])(
    _dims(1, 1, [(1 << 40) + 1])
)
reject("E_LIMIT", "dim-u64-max", "raw", "a raw tensor of shape [2^64 - 1]", ["C-3.1"])(
    _dims(1, 1, [(1 << 64) - 1])
)
reject("E_LIMIT", "elements-over-2-48", "raw", "a raw tensor of shape [2^24 + 1, 2^24]", ["C-3.1"])(
    _dims(1, 2, [(1 << 24) + 1, 1 << 24])
)
reject(
    "E_LIMIT",
    "elements-overflow-u64",
    "raw",
    "a raw tensor of shape [2^40, 2^40, 2^40]: the element count overflows 64 bits",
    ["C-3.1"],
)(_dims(1, 3, [1 << 40] * 3))
reject(
    "E_LIMIT",
    "bilevel-elements-over-2-48",
    "bilevel",
    "a bilevel tensor of shape [2^40, 2^40]",
    ["C-3.1"],
)(_dims(0, 2, [1 << 40, 1 << 40]))


@reject(
    "E_LIMIT",
    "sections-per-tensor-17",
    "raw",
    "a tensor with 17 sections (16 more data sections; the header's section_count is within "
    "16 x tensor_count)",
)
def _(im):
    im.tensors[0].sections += [img.Section(1, b"") for _ in range(16)]


@reject(
    "E_LIMIT",
    "outlier-entries-over-cap",
    "bilevel",
    "outlier_entry_count is 2^32 (the cap is 2^32 - 1)",
    ["C-5.1"],
)
def _(im):
    lf.set_params(im.tensors[0], outlier_entry_count=1 << 32)


@reject(
    "E_LIMIT", "outlier-entries-u64-max", "bilevel", "outlier_entry_count is 2^64 - 1", ["C-5.1"]
)
def _(im):
    lf.set_params(im.tensors[0], outlier_entry_count=(1 << 64) - 1)


# ---------------------------------------------------------------------------------------------
# E_BAD_FIELD
reject("E_BAD_FIELD", "header-reserved-1", "raw", "fixed header reserved field is 1")(
    lambda im: setattr(im, "reserved", 1)
)
reject(
    "E_BAD_FIELD",
    "header-reserved-high-bit",
    "bilevel",
    "fixed header reserved field is 0x80000000",
)(lambda im: setattr(im, "reserved", 1 << 31))
for _a in (0, 32, 96, 1000, 131072, 1 << 31):
    reject(
        "E_BAD_FIELD",
        f"alignment-{_a}",
        "raw",
        f"alignment {_a}: not a power of two in 64..65536 (sections laid out at 64)",
        ["C-2.2", "C-2.8"],
    )(lambda im, a=_a: (setattr(im, "alignment", a), setattr(im, "layout_alignment", 64)))
reject("E_BAD_FIELD", "tensor-reserved", "raw", "a tensor record's reserved u16 is 1")(
    lambda im: setattr(im.tensors[1], "reserved", 1)
)
for _d in (0, 4, 255):
    reject("E_BAD_FIELD", f"dtype-{_d}", "raw", f"dtype {_d}", ["C-3.3"])(
        lambda im, d=_d: setattr(im.tensors[0], "dtype", d)
    )
reject("E_BAD_FIELD", "bilevel-dtype-0", "bilevel", "a bilevel tensor with dtype 0", ["C-3.3"])(
    lambda im: setattr(im.tensors[0], "dtype", 0)
)
reject("E_BAD_FIELD", "encoding-0", "raw", "encoding 0 (never valid)", ["C-3.4"])(
    lambda im: setattr(im.tensors[0], "encoding", 0)
)
reject("E_BAD_FIELD", "ndim-9", "raw", "ndim 9 (the cap is 8)", ["C-2.9"])(
    lambda im: setattr(im.tensors[1], "ndim", 9)
)
reject("E_BAD_FIELD", "ndim-255", "raw", "ndim 255", ["C-2.9"])(
    lambda im: setattr(im.tensors[1], "ndim", 255)
)
reject(
    "E_BAD_FIELD",
    "unused-dim-nonzero",
    "raw",
    "a 1-D tensor whose dims[1] is 1 (unused dims are zero)",
    ["C-3.2"],
)(lambda im: im.tensors[1].dims.__setitem__(1, 1))
reject(
    "E_BAD_FIELD", "unused-dim7-nonzero", "bilevel", "a 2-D tensor whose dims[7] is 5", ["C-3.2"]
)(lambda im: im.tensors[0].dims.__setitem__(7, 5))
reject(
    "E_BAD_FIELD", "section-reserved16", "raw", "a section record's reserved u16 is 1", ["C-2.5"]
)(lambda im: setattr(im.tensors[0].sections[0], "reserved16", 1))
reject(
    "E_BAD_FIELD",
    "section-reserved64",
    "bilevel",
    "a section record's reserved u64 is 2^63",
    ["C-2.5"],
)(lambda im: setattr(im.tensors[0].sections[2], "reserved64", 1 << 63))
for _r in (0, 9, 0xFFFF):  # 8 is `tables` since 1.1 (C-13.3)
    reject("E_BAD_FIELD", f"role-{_r}", "raw", f"a section with role {_r}", ["C-2.7"])(
        lambda im, r=_r: setattr(im.tensors[1].sections[0], "role", r)
    )


@reject("E_BAD_FIELD", "raw-params-nonzero", "raw", "a raw tensor whose params[0] is 1", ["C-4.1"])
def _(im):
    im.tensors[0].params = b"\x01" + bytes(39)


@reject(
    "E_BAD_FIELD", "raw-params-last-byte", "raw", "a raw tensor whose params[39] is 0x80", ["C-4.1"]
)
def _(im):
    im.tensors[1].params = bytes(39) + b"\x80"


_PARAM_FAULTS = {
    "bits-0": ("bilevel", dict(bits=0), "bits 0"),
    "bits-9": ("bilevel", dict(bits=9), "bits 9"),
    "stats-bits-9": ("bilevel", dict(stats_bits=9), "stats_bits 9"),
    "flags-bit-2": ("bilevel", dict(flags=3 | 4), "flag bit 2 set"),
    "flags-bit-15": ("fp16", dict(flags=0x8000), "flag bit 15 set"),
    "group-size-0": ("bilevel", dict(group_size=0), "group_size 0"),
    "group-size-over-cap": ("fp16", dict(group_size=(1 << 24) + 1), "group_size 2^24 + 1"),
    "stats-group-size-0": (
        "bilevel",
        dict(stats_group_size=0),
        "stats_group_size 0 with stats_bits 2",
    ),
    "stats-group-size-over-cap": (
        "bilevel",
        dict(stats_group_size=(1 << 24) + 1),
        "stats_group_size 2^24 + 1",
    ),
    "stats-group-size-with-fp16-stats": (
        "fp16",
        dict(stats_group_size=16),
        "stats_group_size 16 with stats_bits 0",
    ),
    "params-reserved-u32": ("bilevel", dict(res0=1), "params reserved u32 at offset 12 is 1"),
    "params-reserved-u64": ("fp16", dict(res1=1 << 40), "params reserved u64 at offset 32"),
    "outlier-count-over-entries": ("bilevel", None, "outlier_count = outlier_entry_count + 1"),
    "outliers-flag-without-entries": (
        "fp16",
        dict(flags=2),
        "flag outliers set with outlier_entry_count 0",
    ),
    "entries-without-outliers-flag": (
        "bilevel",
        dict(flags=1),
        "outlier_entry_count > 0 with flag outliers clear",
    ),
}
for _v, (_base, _kw, _desc) in _PARAM_FAULTS.items():

    def _mut(im, kw=_kw):
        t = im.tensors[0]
        if kw is None:
            p = lf.params(t)
            kw = dict(outlier_count=p[7] + 1)
        lf.set_params(t, **kw)

    reject("E_BAD_FIELD", _v, _base, f"bilevel params: {_desc}", ["C-5.1"])(_mut)

# ---------------------------------------------------------------------------------------------
# E_UNKNOWN_FEATURE
for _v, _bits in (("bit-0", 1), ("bit-63", 1 << 63), ("all-bits", (1 << 64) - 1)):
    reject("E_UNKNOWN_FEATURE", _v, "raw", f"required_features = 0x{_bits:x}")(
        lambda im, b=_bits: setattr(im, "required_features", b)
    )

# ---------------------------------------------------------------------------------------------
# E_BAD_NAME
_BAD_NAMES = {
    "empty": b"",
    "1025-bytes": b"n" * 1025,
    "1026-bytes-utf8": "\u00e9".encode() * 513,
    "invalid-byte-ff": b"w\xff",
    "overlong-slash": b"a\xc0\xafb",
    "utf16-surrogate": b"\xed\xa0\x80",
    "truncated-sequence": b"w\xe2\x82",
    "above-u10ffff": b"\xf4\x90\x80\x80",
    "nul": b"w\x00",
    "newline": b"layer\n0",
    "tab": b"\tw",
    "unit-separator": b"w\x1f",
    "del": b"w\x7f",
    # C-2.10 also forbids C1 controls and the bidirectional formatting characters
    "c1-nel": "w\u0085x".encode(),
    "c1-csi": "w\u009b".encode(),
    "bidi-rlo": "w\u202e.tensor".encode(),
    "bidi-lri": "\u2066w".encode(),
    "bidi-alm": "w\u061c".encode(),
    "bidi-rlm": "w\u200f".encode(),
}
for _v, _nm in _BAD_NAMES.items():
    reject("E_BAD_NAME", _v, "raw", f"tensor 1 is named {_nm[:40]!r}")(
        lambda im, nm=_nm: setattr(im.tensors[1], "name", nm)
    )

# ---------------------------------------------------------------------------------------------
# E_DUPLICATE_NAME
reject("E_DUPLICATE_NAME", "two-raw", "raw", "both tensors are named 'w'")(
    lambda im: setattr(im.tensors[1], "name", b"w")
)


@reject(
    "E_DUPLICATE_NAME",
    "first-and-third",
    "raw",
    "three tensors; the first and the third share a name",
)
def _(im):
    t = img.parse(base_raw()).tensors[1]
    t.name = b"w"
    im.tensors.append(t)


@reject("E_DUPLICATE_NAME", "unicode", "raw", "two tensors named '模型.权重'")
def _(im):
    im.tensors[0].name = im.tensors[1].name = "模型.权重".encode()


@reject(
    "E_DUPLICATE_NAME",
    "raw-and-bilevel",
    "bilevel",
    "a bilevel tensor and a raw tensor with the same name",
)
def _(im):
    t = img.parse(base_raw()).tensors[0]
    im.tensors.append(t)


# ---------------------------------------------------------------------------------------------
# E_BAD_METADATA
_BAD_META = {
    "not-utf8": b'{"user.a": "\xff"}',
    "nan": b'{"user.a": NaN}',
    "infinity": b'{"user.a": Infinity}',
    "minus-infinity": b'{"user.a": [-Infinity]}',
    "top-level-array": b'[{"user.a": 1}]',
    "top-level-string": b'"user.a"',
    "top-level-number": b"1",
    "top-level-null": b"null",
    "key-not-namespaced": b'{"model": 1}',
    "key-uppercase": b'{"Model.arch": 1}',
    "key-trailing-dot": b'{"model.": 1}',
    "key-empty-segment": b'{"model..arch": 1}',
    "key-leading-dot": b'{".model.arch": 1}',
    "key-hyphen": b'{"model.arch-x": 1}',
    "key-trailing-space": b'{"model.arch ": 1}',
    "key-empty": b'{"": 1}',
    "duplicate-top-key": b'{"user.a": 1, "user.a": 2}',
    "duplicate-nested-key": b'{"user.a": {"k": 1, "k": 2}}',
    "duplicate-key-after-unescaping": b'{"user.a": 1, "user\\u002ea": 2}',
    "depth-33-objects": None,
    "depth-33-arrays": b'{"user.a": ' + b"[" * 32 + b"]" * 32 + b"}",
    "truncated": b'{"user.a": 1',
    "trailing-garbage": b'{"user.a": 1} x',
    "two-objects": b'{"user.a": 1}{"user.b": 2}',
    "trailing-comma": b'{"user.a": 1,}',
    "single-quotes": b"{'user.a': 1}",
    "comment": b'{"user.a": 1 /* c */}',
    "leading-zero": b'{"user.a": 01}',
    "raw-newline-in-string": b'{"user.a": "a\nb"}',
    "bad-escape": b'{"user.a": "\\x41"}',
    "whitespace-only": b"   ",
    "utf8-bom": b'\xef\xbb\xbf{"user.a": 1}',
    "nul-byte": b'{"user.a": 1}\x00',
    # C-2.11: numbers must be finite binary64, escapes must not leave lone surrogates
    "number-1e999": b'{"user.a": 1e999}',
    "number-minus-1e400": b'{"user.a": [-1e400]}',
    "integer-400-digits": b'{"user.a": 1' + b"0" * 400 + b"}",
    "lone-high-surrogate": b'{"user.a": "x\\ud800"}',
    "lone-low-surrogate": b'{"user.a": "\\udc00x"}',
    "high-surrogate-then-letter": b'{"user.a": "\\ud83dA"}',
    "lone-surrogate-in-key": b'{"user.a": {"\\udfff": 1}}',
    # C-2.11 / C-2.9: at most 1,048,576 JSON values; the object, the array and 1,048,575
    # elements are 1,048,577, one over the cap
    "values-over-cap": b'{"user.a": [' + b",".join([b"0"] * 1_048_575) + b"]}",
    "values-over-cap-empty-arrays": b'{"user.a": [' + b",".join([b"[]"] * 1_048_575) + b"]}",
}
for _v, _meta in _BAD_META.items():
    if _meta is None:
        _meta = b'{"user.a": ' + b'{"k": ' * 32 + b"1" + b"}" * 32 + b"}"
    reject("E_BAD_METADATA", _v, "raw", f"metadata {_meta[:60]!r}")(
        lambda im, m=_meta: setattr(im, "metadata", m)
    )

# ---------------------------------------------------------------------------------------------
# E_BAD_LAYOUT
reject("E_BAD_LAYOUT", "data-offset-plus-64", "raw", "data_offset 64 bytes too far", ["C-2.2"])(
    lambda im: setattr(im, "data_offset", 64 * ((_hlen(im) + 63) // 64) + 64)
)
reject(
    "E_BAD_LAYOUT",
    "data-offset-unaligned",
    "raw",
    "data_offset = header_length (unaligned)",
    ["C-2.2"],
)(lambda im: setattr(im, "data_offset", _hlen(im)))
reject("E_BAD_LAYOUT", "data-offset-zero", "bilevel", "data_offset 0", ["C-2.2"])(
    lambda im: setattr(im, "data_offset", 0)
)
reject(
    "E_BAD_LAYOUT",
    "header-padding-nonzero",
    "raw",
    "a non-zero byte in the padding between header_length and data_offset",
    ["C-2.2", "C-1.5"],
)(lambda im: setattr(im, "header_pad_fill", b"\x01"))
reject(
    "E_BAD_LAYOUT",
    "section-padding-nonzero",
    "raw",
    "a non-zero byte in the alignment padding after the first section",
    ["C-1.5"],
)(lambda im: setattr(im.tensors[0].sections[0], "pad_fill", b"\x00\x00\x00\x01"))
reject(
    "E_BAD_LAYOUT",
    "bilevel-section-padding-nonzero",
    "bilevel",
    "a non-zero byte in the alignment padding after the stats2 section",
    ["C-1.5"],
)(lambda im: setattr(im.tensors[0].sections[2], "pad_fill", b"\xff"))
reject("E_BAD_LAYOUT", "trailing-zero-byte", "raw", "one zero byte after the last section")(
    lambda im: setattr(im, "trailing", b"\0")
)
reject("E_BAD_LAYOUT", "trailing-64-bytes", "bilevel", "64 zero bytes after the last section")(
    lambda im: setattr(im, "trailing", b"\0" * 64)
)
reject("E_BAD_LAYOUT", "trailing-garbage", "raw", "text appended after the last section")(
    lambda im: setattr(im, "trailing", b"hello")
)


def _offset(tensor, sec, delta=None, value=None):
    def mutate(im):
        data = im.to_bytes()
        h = img.FIXED_HEADER.unpack_from(data, 0)
        j = sum(len(t.sections) for t in im.tensors[:tensor]) + sec
        off = struct.unpack_from("<Q", data, 64 + 160 * h[5] + 32 * j)[0]
        im.tensors[tensor].sections[sec].offset = value if value is not None else off + delta

    return mutate


reject("E_BAD_LAYOUT", "section-offset-hole", "raw", "the second section starts 64 bytes late")(
    _offset(1, 0, delta=64)
)
reject(
    "E_BAD_LAYOUT",
    "section-offset-overlap",
    "raw",
    "the second section starts at the first one's offset",
)(_offset(1, 0, delta=-64))
reject(
    "E_BAD_LAYOUT",
    "section-offset-misaligned",
    "bilevel",
    "the stats section starts 4 bytes late (misaligned)",
)(_offset(0, 1, delta=4))
reject("E_BAD_LAYOUT", "section-offset-zero", "bilevel", "the perm section's offset is 0")(
    _offset(0, 3, value=0)
)
reject(
    "E_BAD_LAYOUT",
    "first-section-offset-early",
    "raw",
    "the first section starts 64 bytes before data_offset (inside the header)",
)(_offset(0, 0, delta=-64))


@reject(
    "E_BAD_LAYOUT",
    "first-section-shared",
    "raw",
    "tensor 1's first_section is 0 (it would share tensor 0's section)",
    ["C-2.6"],
)
def _(im):
    im.tensors[1].first_section = 0


@reject(
    "E_BAD_LAYOUT",
    "unowned-section",
    "raw",
    "a section record after the last tensor's range (section_count one too large)",
    ["C-2.6"],
)
def _(im):
    im.extra_sections.append(img.Section(1, b"\0\0\0\0"))


@reject(
    "E_BAD_LAYOUT",
    "roles-swapped",
    "bilevel",
    "codes and stats sections in the wrong order (roles 3, 2, ...)",
    ["C-2.6"],
)
def _(im):
    s = im.tensors[0].sections
    s[0], s[1] = s[1], s[0]


@reject("E_BAD_LAYOUT", "role-repeated", "raw", "a raw tensor with two data sections", ["C-2.6"])
def _(im):
    im.tensors[1].sections.append(img.Section(1, b""))


@reject("E_BAD_LAYOUT", "raw-no-section", "raw", "a raw tensor with no section", ["C-2.6", "C-4.1"])
def _(im):
    im.tensors[1].sections = []


@reject(
    "E_BAD_LAYOUT",
    "raw-extra-role",
    "raw",
    "a raw tensor with data and codes sections",
    ["C-2.6", "C-4.1"],
)
def _(im):
    im.tensors[1].sections.append(img.Section(int(Role.CODES), b"\0" * 4))


def _drop_role(role):
    def mutate(im):
        t = im.tensors[0]
        t.sections = [s for s in t.sections if s.role != role]

    return mutate


reject(
    "E_BAD_LAYOUT",
    "missing-stats2",
    "bilevel",
    "a bilevel tensor (stats_bits 2) without its stats2 section",
    ["C-2.6", "C-5.1"],
)(_drop_role(Role.STATS2))
reject(
    "E_BAD_LAYOUT",
    "missing-perm",
    "bilevel",
    "flag perm set but no perm section",
    ["C-2.6", "C-5.1"],
)(_drop_role(Role.PERM))
reject(
    "E_BAD_LAYOUT",
    "missing-outlier-entries",
    "bilevel",
    "flag outliers set but no outlier_entries section",
    ["C-2.6", "C-5.1"],
)(_drop_role(7))


@reject(
    "E_BAD_LAYOUT",
    "extra-stats2",
    "fp16",
    "fp16 statistics and a stats2 section",
    ["C-2.6", "C-5.1"],
)
def _(im):
    im.tensors[0].sections.append(img.Section(int(Role.STATS2), b"\0" * 8))


@reject(
    "E_BAD_LAYOUT", "extra-perm", "fp16", "a perm section without flag perm", ["C-2.6", "C-5.1"]
)
def _(im):
    im.tensors[0].sections.append(img.Section(int(Role.PERM), np.arange(20, dtype="<u4").tobytes()))


@reject(
    "E_BAD_LAYOUT",
    "raw-length-one-more",
    "raw",
    "a raw data section one element longer than the shape says",
    ["C-2.5", "C-4.1"],
)
def _(im):
    im.tensors[0].sections[0].data += b"\0\0\0\0"


@reject(
    "E_BAD_LAYOUT",
    "raw-length-one-less",
    "raw",
    "a raw data section one element shorter than the shape says",
    ["C-2.5", "C-4.1"],
)
def _(im):
    im.tensors[1].sections[0].data = im.tensors[1].sections[0].data[:-2]


@reject(
    "E_BAD_LAYOUT",
    "codes-length-short",
    "bilevel",
    "the codes section is 4 bytes shorter than derived",
    ["C-2.5", "C-5.1"],
)
def _(im):
    s = im.tensors[0].section(Role.CODES)
    s.data = s.data[:-4]


@reject(
    "E_BAD_LAYOUT",
    "stats-length-long",
    "fp16",
    "the stats section is 4 bytes longer than derived",
    ["C-2.5", "C-5.1"],
)
def _(im):
    im.tensors[0].section(Role.STATS).data += b"\0\x3c\0\x3c"


@reject(
    "E_BAD_LAYOUT",
    "outlier-entries-length-long",
    "bilevel",
    "outlier_entries holds one entry more than outlier_entry_count",
    ["C-2.5", "C-5.1"],
)
def _(im):
    im.tensors[0].section(7).data += b"\x01\0\0\x3c"


@reject(
    "E_BAD_LAYOUT",
    "name-offset-overlap",
    "raw",
    "tensor 1's name_offset is 0 (names are concatenated in order)",
    ["C-2.10"],
)
def _(im):
    im.tensors[1].name_offset = 0


@reject(
    "E_BAD_LAYOUT",
    "name-past-string-table",
    "raw",
    "tensor 1's name runs one byte past the string table",
    ["C-2.10"],
)
def _(im):
    im.tensors[1].name_length = len(im.tensors[1].name) + 1


@reject(
    "E_BAD_LAYOUT",
    "string-table-extra-byte",
    "raw-nometa",
    "string_table_length is one more than the names' total length",
    ["C-2.10"],
)
def _(im):
    im.string_table_length = sum(len(t.name) for t in im.tensors) + 1


# ---------------------------------------------------------------------------------------------
# E_UNKNOWN_ENCODING / E_UNSUPPORTED_ENCODING_VERSION
for _e in (4, 0xFFFF):  # id 3 is channel_mixed since 1.1 (C-13.3): see channel_mixed_vectors
    reject(
        "E_UNKNOWN_ENCODING",
        f"raw-as-{_e}",
        "raw",
        f"a raw-like tensor (one data section, zero params) with encoding {_e}",
    )(lambda im, e=_e: setattr(im.tensors[1], "encoding", e))
reject(
    "E_UNKNOWN_ENCODING",
    "opaque-params",
    "raw",
    "encoding 1000 with non-zero params and two sections (roles 2, 3): a reader cannot know "
    "its layout",
)(
    lambda im: (
        setattr(im.tensors[0], "encoding", 1000),
        setattr(im.tensors[0], "params", bytes(range(40))),
        setattr(im.tensors[0], "sections", [img.Section(2, b"\1" * 8), img.Section(3, b"\2" * 8)]),
    )
)
for _v, _b, _ver in (
    ("raw-0", "raw", 0),
    ("raw-2", "raw", 2),
    ("bilevel-0", "bilevel", 0),
    ("bilevel-2", "bilevel", 2),
    ("bilevel-65535", "fp16", 65535),
):
    reject("E_UNSUPPORTED_ENCODING_VERSION", _v, _b, f"encoding_version {_ver}")(
        lambda im, ver=_ver: setattr(im.tensors[0], "encoding_version", ver)
    )

# ---------------------------------------------------------------------------------------------
# E_BAD_SHAPE
reject("E_BAD_SHAPE", "ndim-1", "bilevel", "a bilevel tensor with ndim 1 ([40])")(_dims(0, 1, [40]))
reject("E_BAD_SHAPE", "ndim-3", "bilevel", "a bilevel tensor with ndim 3 ([40, 50, 1])")(
    _dims(0, 3, [40, 50, 1])
)
reject("E_BAD_SHAPE", "ndim-0", "fp16", "a bilevel tensor with ndim 0")(_dims(0, 0, []))
reject("E_BAD_SHAPE", "m-0", "bilevel", "a bilevel tensor of shape [0, 50]")(_dims(0, 2, [0, 50]))
reject("E_BAD_SHAPE", "n-0", "fp16", "a bilevel tensor of shape [8, 0]")(_dims(0, 2, [8, 0]))

# ---------------------------------------------------------------------------------------------
# E_SECTION_CRC
for _i, _role in enumerate(
    ("codes", "stats", "stats2", "perm", "outlier-index", "outlier-entries")
):
    reject(
        "E_SECTION_CRC",
        f"crc-field-{_role}",
        "bilevel",
        f"the {_role} section's crc32 field has one bit flipped",
        ["C-2.5"],
    )(
        lambda im, i=_i: setattr(
            im.tensors[0].sections[i], "crc32", zlib.crc32(im.tensors[0].sections[i].data) ^ 0x100
        )
    )
reject("E_SECTION_CRC", "crc-field-raw", "raw", "a raw data section's crc32 is zero", ["C-2.5"])(
    lambda im: setattr(im.tensors[1].sections[0], "crc32", 0)
)
reject(
    "E_SECTION_CRC", "crc-field-fp16-stats", "fp16", "the fp16 stats section's crc32 + 1", ["C-2.5"]
)(
    lambda im: setattr(
        im.tensors[0].sections[1],
        "crc32",
        zlib.crc32(im.tensors[0].sections[1].data) + 1 & 0xFFFFFFFF,
    )
)


def _data_flip(tensor, sec, byte):
    def mutate(im):
        s = im.tensors[tensor].sections[sec]
        s.crc32 = zlib.crc32(s.data)
        d = bytearray(s.data)
        d[byte] ^= 0x10
        s.data = bytes(d)

    return mutate


reject("E_SECTION_CRC", "raw-data-byte", "raw", "one byte of raw data changed, CRC not updated")(
    _data_flip(0, 0, 5)
)
reject("E_SECTION_CRC", "codes-byte", "bilevel", "one byte of codes changed, CRC not updated")(
    _data_flip(0, 0, 9)
)
reject(
    "E_SECTION_CRC",
    "perm-byte",
    "bilevel",
    "one byte of perm changed (now not a permutation), CRC not updated: the CRC is checked "
    "first (C-2.8a)",
)(_data_flip(0, 3, 0))
reject(
    "E_SECTION_CRC",
    "zero-length-section",
    "raw",
    "a zero-length data section whose crc32 is 1 (the CRC of no bytes is 0)",
    ["C-2.5"],
)(
    lambda im: (
        setattr(im.tensors[1], "dims", [0] + [0] * 7),
        setattr(im.tensors[1].sections[0], "data", b""),
        setattr(im.tensors[1].sections[0], "crc32", 1),
        setattr(im.tensors[1], "digest", __import__("hashlib").sha256(b"").digest()),
    )
)

# ---------------------------------------------------------------------------------------------
# E_BAD_PERMUTATION
reject("E_BAD_PERMUTATION", "duplicate", "bilevel", "perm[1] = perm[0]")(
    lambda im: lf.set_perm_entry(im.tensors[0], 1, int(lf.perm_array(im.tensors[0])[0][0]))
)
reject("E_BAD_PERMUTATION", "duplicate-last", "bilevel", "perm[n-1] = perm[n-2]")(
    lambda im: lf.set_perm_entry(im.tensors[0], 49, int(lf.perm_array(im.tensors[0])[0][48]))
)
reject("E_BAD_PERMUTATION", "value-n", "bilevel", "perm[3] = n (out of range)")(
    lambda im: lf.set_perm_entry(im.tensors[0], 3, 50)
)
reject("E_BAD_PERMUTATION", "value-max", "bilevel", "perm[0] = the largest element value")(
    lambda im: lf.set_perm_entry(im.tensors[0], 0, lf.perm_max_value(im.tensors[0]))
)
reject("E_BAD_PERMUTATION", "all-zero", "bilevel", "every perm entry is 0")(
    lambda im: [lf.set_perm_entry(im.tensors[0], j, 0) for j in range(50)]
)

# ---------------------------------------------------------------------------------------------
# E_BAD_OUTLIERS


def _t0(fn):
    return lambda im: fn(im.tensors[0])


reject(
    "E_BAD_OUTLIERS",
    "index-first-nonzero",
    "bilevel",
    "the first outlier index entry is 1",
    ["C-6.1"],
)(_t0(lambda t: lf.set_index_entry(t, 0, 1)))
reject(
    "E_BAD_OUTLIERS",
    "index-last-below-e",
    "bilevel",
    "the last outlier index entry is E - 1",
    ["C-6.1"],
)(_t0(lambda t: lf.set_index_entry(t, -1, int(lf.outlier_index(t)[-1]) - 1)))
reject(
    "E_BAD_OUTLIERS",
    "index-last-above-e",
    "bilevel",
    "the last outlier index entry is E + 1",
    ["C-6.1"],
)(_t0(lambda t: lf.set_index_entry(t, -1, int(lf.outlier_index(t)[-1]) + 1)))


def _non_monotone(t):
    r = lf.outlier_index(t)
    e = int(r[-1])
    k = next(k for k in range(1, len(r) - 1) if r[k + 1] < e and r[k] <= r[k + 1])
    lf.set_index_entry(t, k, int(r[k + 1]) + 1)


reject(
    "E_BAD_OUTLIERS",
    "index-decreasing",
    "bilevel",
    "an interior outlier index entry is one more than the next (within 0..E)",
    ["C-6.1"],
)(_t0(_non_monotone))
reject(
    "E_BAD_OUTLIERS",
    "index-u32-max",
    "bilevel",
    "the second outlier index entry is 2^32 - 1",
    ["C-6.1"],
)(_t0(lambda t: lf.set_index_entry(t, 1, 0xFFFFFFFF)))


def _second_of_unit(t):
    a, _ = lf.units_with_entries(t, 2)[0]
    return a + 1


reject(
    "E_BAD_OUTLIERS",
    "delta-zero",
    "bilevel",
    "an entry (not the first of its row) with delta 0: a repeated position",
    ["C-6.2"],
)(_t0(lambda t: lf.set_entry(t, _second_of_unit(t), delta=0)))
reject(
    "E_BAD_OUTLIERS",
    "delta-zero-first",
    "bilevel",
    "the first entry of a row with delta 0: position -1",
    ["C-6.2"],
)(_t0(lambda t: lf.set_entry(t, lf.units_with_entries(t, 1)[0][0], delta=0)))
reject(
    "E_BAD_OUTLIERS",
    "column-out-of-range",
    "bilevel",
    "the last entry's delta is 65535 (finite value): its column is past n",
    ["C-6.2"],
)(_t0(lambda t: lf.set_entry(t, len(lf.outlier_entries(t)) - 1, delta=65535)))


def _skip_last(t):
    _, b = lf.units_with_entries(t, 1)[0]
    lf.set_entry(t, b - 1, delta=65535, value=0xFFFF)
    lf.set_params(t, outlier_count=lf.params(t)[6] - 1)


reject(
    "E_BAD_OUTLIERS",
    "skip-last-of-row",
    "bilevel",
    "the last entry of a row is a skip (outlier_count lowered to match)",
    ["C-6.2"],
)(_t0(_skip_last))


def _skip_short(t):
    a, _ = lf.units_with_entries(t, 2)[0]
    lf.set_entry(t, a, value=0xFFFF)
    lf.set_params(t, outlier_count=lf.params(t)[6] - 1)


reject(
    "E_BAD_OUTLIERS",
    "skip-delta-not-65535",
    "bilevel",
    "a skip (value 0xFFFF) whose delta is not 65535 (outlier_count lowered to match)",
    ["C-6.2"],
)(_t0(_skip_short))
reject(
    "E_BAD_OUTLIERS",
    "skip-delta-65534",
    "skips",
    "the skip entry of a 70000-column row has delta 65534",
    ["C-6.2"],
)(_t0(lambda t: lf.set_entry(t, 1, delta=65534)))
reject(
    "E_BAD_OUTLIERS",
    "count-one-less",
    "bilevel",
    "outlier_count is one less than the number of non-skip entries",
    ["C-6.2", "C-5.1"],
)(_t0(lambda t: lf.set_params(t, outlier_count=lf.params(t)[6] - 1)))
reject(
    "E_BAD_OUTLIERS",
    "count-one-more",
    "skips",
    "outlier_count is one more than the number of non-skip entries (still <= outlier_entry_count)",
    ["C-6.2", "C-5.1"],
)(_t0(lambda t: lf.set_params(t, outlier_count=lf.params(t)[6] + 1)))

# ---------------------------------------------------------------------------------------------
# E_NONFINITE
for _v, _k, _bits in (
    ("scale-inf", 0, 0x7C00),
    ("zero-nan", 1, 0x7E00),
    ("last-minus-inf", -1, 0xFC00),
    ("nan-ffff", 5, 0xFFFF),
):
    reject("E_NONFINITE", f"fp16-stats-{_v}", "fp16", f"fp16 stats element {_k} is 0x{_bits:04x}")(
        _t0(lambda t, k=_k, b=_bits: lf.set_f16(t, Role.STATS, k, b))
    )
for _v, _k, _bits in (
    ("scale-step-inf", 0, 0x7C00),
    ("scale-base-nan", 1, 0x7E01),
    ("zero-step-minus-inf", 2, 0xFC00),
    ("zero-base-nan", 3, 0x7FFF),
    ("last-nan", -1, 0xFE00),
):
    reject("E_NONFINITE", f"stats2-{_v}", "bilevel", f"stats2 element {_k} is 0x{_bits:04x}")(
        _t0(lambda t, k=_k, b=_bits: lf.set_f16(t, Role.STATS2, k, b))
    )
for _v, _bits in (("nan", 0x7E00), ("inf", 0x7C00), ("minus-inf", 0xFC00), ("nan-fffe", 0xFFFE)):
    reject(
        "E_NONFINITE", f"outlier-{_v}", "bilevel", f"an outlier value is 0x{_bits:04x}", ["C-6.2"]
    )(_t0(lambda t, b=_bits: lf.set_entry(t, 0, value=b)))

# ---------------------------------------------------------------------------------------------
# E_DIGEST_MISMATCH


def _digest_flip(i, byte=0):
    def mutate(im):
        d = bytearray(im.tensors[i].digest)
        d[byte] ^= 1
        im.tensors[i].digest = bytes(d)

    return mutate


reject("E_DIGEST_MISMATCH", "raw-digest-byte", "raw", "a raw tensor's digest has one bit flipped")(
    _digest_flip(0)
)
reject(
    "E_DIGEST_MISMATCH",
    "bilevel-digest-byte",
    "bilevel",
    "a bilevel tensor's digest has one bit flipped in its last byte",
)(_digest_flip(0, 31))
reject("E_DIGEST_MISMATCH", "digest-zero", "fp16", "a bilevel tensor's digest is all zero")(
    lambda im: setattr(im.tensors[0], "digest", bytes(32))
)


@reject(
    "E_DIGEST_MISMATCH",
    "raw-data-changed",
    "raw",
    "one byte of raw data changed, section CRC updated",
)
def _(im):
    s = im.tensors[1].sections[0]
    s.data = b"\x01" + s.data[1:]


reject(
    "E_DIGEST_MISMATCH",
    "perm-swapped",
    "bilevel",
    "two perm entries swapped (still a permutation), CRC updated: wrong weights",
    ["C-7.4"],
)(_t0(lambda t: lf.swap_perm(t, 0, 1)))
reject(
    "E_DIGEST_MISMATCH",
    "code-changed",
    "bilevel",
    "bit 0 of the first code changed, CRC updated",
    ["C-5.3"],
)(_t0(lambda t: lf.flip_first_bit(t, Role.CODES)))
reject(
    "E_DIGEST_MISMATCH",
    "stats-code-changed",
    "bilevel",
    "bit 0 of the first statistics code changed, CRC updated",
    ["C-5.5"],
)(_t0(lambda t: lf.flip_first_bit(t, Role.STATS)))
reject(
    "E_DIGEST_MISMATCH",
    "stats2-changed",
    "bilevel",
    "a stats2 value changed to another finite value, CRC updated",
    ["C-5.6"],
)(_t0(lambda t: lf.set_f16(t, Role.STATS2, 1, 0x3C00)))
reject(
    "E_DIGEST_MISMATCH",
    "fp16-stats-changed",
    "fp16",
    "an fp16 scale changed to another finite value, CRC updated",
    ["C-5.4"],
)(_t0(lambda t: lf.set_f16(t, Role.STATS, 0, 0x4400)))
reject(
    "E_DIGEST_MISMATCH",
    "outlier-value-changed",
    "bilevel",
    "an outlier value changed to another finite value, CRC updated",
    ["C-7.3"],
)(_t0(lambda t: lf.set_entry(t, 0, value=0x4900)))


@reject(
    "E_DIGEST_MISMATCH",
    "digest-of-float32-bytes",
    "bilevel",
    "a float16 tensor whose digest is the SHA-256 of its float32 decode (the digest covers "
    "the tensor's own dtype)",
    ["C-7.5"],
)
def _(im):
    import hashlib
    import os
    import tempfile

    from spqr_format import api

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "b.spqr")
        with open(p, "wb") as f:
            f.write(im.to_bytes())
        with api.open_file(p) as f:
            w = f.decode("w", "float32", verify_digest=False)  # its digest is being remade
    im.tensors[0].digest = hashlib.sha256(np.ascontiguousarray(w, "<f4").tobytes()).digest()
