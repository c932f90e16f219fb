"""SPEC.md and spqr_format.spec / errors must say the same thing."""

from __future__ import annotations

import pathlib
import re

from spqr_format import errors, spec

SPEC_TEXT = (pathlib.Path(__file__).parents[1] / "SPEC.md").read_text(encoding="utf-8")


def table_after(marker: str) -> list[list[str]]:
    """Rows of the first markdown table after the line containing ``marker``."""
    lines = SPEC_TEXT.splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    rows, seen = [], False
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            seen = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif seen:
            break
    return rows[1:]  # drop the header row


def test_dtype_table_matches_enum():
    rows = table_after("**C-3.3**")
    assert {(r[0], int(r[1]), int(r[2])) for r in rows} == {
        (spec.DTYPE_NAMES[d], int(d), spec.DTYPE_SIZES[d]) for d in spec.DType
    }


def test_encoding_table_matches_enum():
    rows = table_after("**C-3.4**")
    assert {(r[0], int(r[1])) for r in rows} == {
        (spec.ENCODING_NAMES[e], int(e)) for e in spec.Encoding
    }
    for r in rows:
        enc = spec.Encoding(int(r[1]))
        if enc in spec.ENCODING_VERSIONS:
            assert r[2] == ", ".join(map(str, spec.ENCODING_VERSIONS[enc]))
        else:
            assert r[2] == "reserved"


def test_role_table_matches_enum():
    rows = table_after("**C-2.7**")
    assert {(r[0], int(r[1])) for r in rows} == {(spec.ROLE_NAMES[r], int(r)) for r in spec.Role}


def test_error_table_matches_error_classes():
    rows = table_after("## 9. Errors")
    codes = [r[0].strip("`") for r in rows]
    assert codes == [cls.code for cls in errors.ALL_ERRORS]


def test_fixed_header_offsets_match_constants():
    rows = table_after("### 2.2 Fixed header")
    fields = {r[2]: int(r[0]) for r in rows}
    assert fields["header_crc32"] == spec.HEADER_CRC_OFFSET
    assert max(fields.values()) + 4 == spec.FIXED_HEADER_SIZE
    assert "`89 53 50 51 52 0D 0A 1A`" in SPEC_TEXT
    assert spec.MAGIC == bytes.fromhex("8953505152 0D0A1A".replace(" ", ""))


def test_record_sizes_match_constants():
    assert f"Tensor records ({spec.TENSOR_RECORD_SIZE} bytes each" in SPEC_TEXT
    assert f"Section records ({spec.SECTION_RECORD_SIZE} bytes each" in SPEC_TEXT
    rows = table_after("### 2.4 Tensor records")
    assert int(rows[-1][0]) + 40 == spec.TENSOR_RECORD_SIZE


def test_caps_table_matches_constants():
    rows = dict((r[0], r[1]) for r in table_after("**C-2.9**"))
    assert rows["tensor_count"] == f"{spec.MAX_TENSOR_COUNT:,}"
    assert rows["name length"] == f"{spec.MAX_NAME_LENGTH} bytes"
    assert rows["metadata JSON nesting depth"] == str(spec.MAX_METADATA_DEPTH)
    assert rows["metadata JSON values"] == f"{spec.MAX_METADATA_VALUES:,}"
    assert rows["ndim"] == str(spec.MAX_NDIM)
    assert rows["header_length"] == f"{spec.MAX_HEADER_LENGTH >> 20} MiB"
    assert rows["metadata_length"] == f"{spec.MAX_METADATA_LENGTH >> 20} MiB"
    assert rows["any dimension"] == "2^40" and spec.MAX_DIM == 2**40
    assert rows["elements of a tensor"] == "2^48" and spec.MAX_ELEMENTS == 2**48
    assert rows["group_size, stats_group_size"] == "2^24" and spec.MAX_GROUP_SIZE == 2**24


def test_every_clause_id_is_unique():
    ids = re.findall(r"\*\*(C-[0-9]+\.[0-9]+[a-z]?)\*\*", SPEC_TEXT)
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
