"""Constants of the .spqr file format: the single source of truth for SPEC.md.

Every number here is normative and appears in SPEC.md; ``tests/test_spec_tables.py`` checks
that the tables in SPEC.md and these values agree. Nothing in this module does I/O.
"""

from __future__ import annotations

import enum

SPEC_VERSION = "1.1"

# C-2.1: eight bytes, PNG-style: a high-bit byte catches 7-bit transfers, CR LF catches
# newline translation, 0x1A stops `type` on Windows.
MAGIC = b"\x89SPQR\r\n\x1a"

VERSION_MAJOR = 1
VERSION_MINOR = 0  # what a writer writes for a file that uses nothing added after 1.0 (C-13.1)
# C-13.1: a file with a channel_mixed tensor (added in 1.1) is written as version 1.1.
VERSION_MINOR_CHANNEL_MIXED = 1

FIXED_HEADER_SIZE = 64
TENSOR_RECORD_SIZE = 160
SECTION_RECORD_SIZE = 32

# Offset of the header CRC field inside the fixed header (C-2.3).
HEADER_CRC_OFFSET = 56

DEFAULT_ALIGNMENT = 64
MIN_ALIGNMENT = 64
MAX_ALIGNMENT = 1 << 16

# Caps (C-2.9). A file that exceeds any of them is refused before anything is allocated.
MAX_HEADER_LENGTH = 256 << 20  # bytes of header region
MAX_TENSOR_COUNT = 1 << 20
MAX_SECTIONS_PER_TENSOR = 16
MAX_NAME_LENGTH = 1024  # bytes of UTF-8
MAX_METADATA_LENGTH = 64 << 20  # bytes of JSON
MAX_METADATA_DEPTH = 32
MAX_METADATA_VALUES = 1 << 20  # JSON values in the metadata (C-2.11)
MAX_NDIM = 8
MAX_DIM = 1 << 40
MAX_ELEMENTS = 1 << 48
MAX_GROUP_SIZE = 1 << 24
MAX_OUTLIER_ENTRIES = (1 << 32) - 1  # index offsets are u32

# Packed streams (C-5.2): elements are packed back to back, with no padding between rows; a
# stream is padded with zero bits only at its end, to a whole u32 word. Alignment for wide
# vector loads belongs to the runtime layouts GPU kernels build at upload, not to the file.

# Permutation entries (C-5.7) are u16 when n <= PERM_U16_MAX_N, else u32.
PERM_U16_MAX_N = 1 << 16

# Outlier index (C-6.1): one u32 offset per block of this many rows.
OUTLIER_BLOCK_ROWS = 16

# Outlier entries (C-6.2).
OUTLIER_SKIP_VALUE = 0xFFFF  # value bits of a skip entry
OUTLIER_MAX_DELTA = 0xFFFF


class DType(enum.IntEnum):
    """Element type of a decoded tensor (C-3.3)."""

    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3


DTYPE_NAMES = {DType.FLOAT32: "float32", DType.FLOAT16: "float16", DType.BFLOAT16: "bfloat16"}
DTYPE_SIZES = {DType.FLOAT32: 4, DType.FLOAT16: 2, DType.BFLOAT16: 2}
DTYPE_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16",
                 "half": "float16", "bf16": "bfloat16"}  # fmt: skip


def parse_dtype(dtype: DType | int | str | None, default: DType | None = None) -> DType:
    """A DType from a DType, its id, its name or an alias ('bf16', 'fp32', ...); None gives
    ``default`` (an error when there is none). The one dtype parser of the package."""
    from spqr_format.errors import BadInputError

    if dtype is None:
        if default is None:
            raise BadInputError("a dtype is required", field="dtype")
        return DType(default)
    if isinstance(dtype, str):
        name = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
        if name not in DTYPE_BY_NAME:
            raise BadInputError(
                f"unknown dtype {dtype!r}; use float32, float16 or bfloat16", field="dtype"
            )
        return DTYPE_BY_NAME[name]
    try:
        return DType(dtype)
    except ValueError:
        raise BadInputError(f"unknown dtype {dtype!r}", field="dtype") from None


class Encoding(enum.IntEnum):
    """Tensor encodings (C-3.4). Values are never reused."""

    RAW = 1
    BILEVEL = 2
    CHANNEL_MIXED = 3  # CMPQ channel-wise mixed precision, added in 1.1 (SPEC section 12)


ENCODING_NAMES = {
    Encoding.RAW: "raw",
    Encoding.BILEVEL: "bilevel",
    Encoding.CHANNEL_MIXED: "channel_mixed",
}

# Encoding versions this reader understands (C-3.5).
ENCODING_VERSIONS = {Encoding.RAW: (1,), Encoding.BILEVEL: (1,), Encoding.CHANNEL_MIXED: (1,)}


class Role(enum.IntEnum):
    """What a section holds (C-2.7). Sections of one tensor appear in increasing role order."""

    DATA = 1  # raw: the elements
    CODES = 2  # bilevel: packed weight codes
    STATS = 3  # bilevel: first-level statistics (packed codes, or fp16 pairs)
    STATS2 = 4  # bilevel: second-level statistics, fp16
    PERM = 5  # bilevel: input permutation (u16 when n <= 65536, else u32)
    OUTLIER_INDEX = 6  # bilevel: u32 offsets of each 16-row block into the outlier entries
    OUTLIER_ENTRIES = 7  # bilevel, channel_mixed: u32 (delta, fp16 value) entries
    TABLES = 8  # channel_mixed: fp16 lookup tables, one per stored column


ROLE_NAMES = {
    Role.DATA: "data",
    Role.CODES: "codes",
    Role.STATS: "stats",
    Role.STATS2: "stats2",
    Role.PERM: "perm",
    Role.OUTLIER_INDEX: "outlier_index",
    Role.OUTLIER_ENTRIES: "outlier_entries",
    Role.TABLES: "tables",
}


class Feature(enum.IntFlag):
    """Required-feature bits (C-2.5). v1.0 defines none; a reader refuses unknown bits."""

    NONE = 0


KNOWN_FEATURES = 0

# Bilevel parameter flags (C-5.1).
BILEVEL_FLAG_PERM = 1
BILEVEL_FLAG_OUTLIERS = 2
BILEVEL_KNOWN_FLAGS = BILEVEL_FLAG_PERM | BILEVEL_FLAG_OUTLIERS

MIN_BITS = 1
MAX_BITS = 8


def align_up(value: int, alignment: int) -> int:
    """Smallest multiple of ``alignment`` that is >= ``value`` (alignment a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1)


def packed_stream_words(count: int, bits: int) -> int:
    """32-bit words of a packed stream of ``count`` elements of ``bits`` bits (C-5.2)."""
    return -(-(count * bits) // 32)


def perm_entry_size(n: int) -> int:
    """Bytes of one ``perm`` entry for ``n`` columns (C-5.7): 2 when n <= 65536, else 4."""
    return 2 if n <= PERM_U16_MAX_N else 4


def outlier_blocks(m: int) -> int:
    """Row blocks of the outlier index (C-6.1): ceil(m / 16)."""
    return -(-m // OUTLIER_BLOCK_ROWS)
