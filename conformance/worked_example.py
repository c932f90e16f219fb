"""Print SPEC.md section 11 (the worked example): a complete .spqr file of one 2x5 bilevel
tensor, its bytes in hex and its decoded values.

    python conformance/worked_example.py            # prints the markdown
    python conformance/worked_example.py --write F  # also writes the example file to F

`tests/test_worked_example.py` checks that SPEC.md contains exactly this output, so the
example in the specification is always what the reference implementation produces.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

import spqr_format
from spqr_format.codec.bilevel import BilevelParams, BilevelTensor, Outliers
from spqr_format.spec import DType

NAME = "w"


def example_tensor() -> BilevelTensor:
    """bits 3, group 4 (G = 2), 2-bit statistics in tiles of 2 rows (T = 1), a permutation and
    one outlier: every feature of the encoding in ten weights."""
    return BilevelTensor(
        shape=(2, 5),
        params=BilevelParams(bits=3, group_size=4, stats_bits=2, stats_group_size=2),
        codes=np.array([[0, 3, 7, 5, 2], [1, 4, 6, 2, 7]], dtype=np.uint8),
        stats=np.array([[[1, 2], [3, 0]], [[0, 1], [2, 3]]], dtype=np.uint8),
        stats2=np.array([[[0.5, 0.25, 1.0, 1.5], [0.125, 1.0, 2.0, -1.0]]], dtype=np.float16),
        perm=np.array([4, 0, 1, 2, 3], dtype=np.uint32),
        outliers=Outliers(
            rows=np.array([1], np.uint32),
            cols=np.array([2], np.uint32),
            values=np.array([10.0], np.float16),
        ),
        dtype=DType.FLOAT32,
    )


def hexdump(data: bytes) -> str:
    """`hexdump -C` style, repeated lines folded into `*`."""
    lines, previous, folded = [], None, False
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        if chunk == previous and off + 16 < len(data):
            if not folded:
                lines.append("*")
                folded = True
            continue
        folded = False
        previous = chunk
        hexes = " ".join(f"{b:02x}" for b in chunk)
        lines.append(f"{off:08x}  {hexes[:23]:<23}  {hexes[24:]}".rstrip())
    lines.append(f"{len(data):08x}")
    return "\n".join(lines)


def render(path: str) -> str:
    data = open(path, "rb").read()
    with spqr_format.open(path) as f:
        entry = f.entry(NAME)
        decoded = f.decode(NAME, "float32")
    sec_rows = "\n".join(
        f"| {s.role} ({spqr_format.spec.ROLE_NAMES[s.role]}) | {s.offset} | {s.length} "
        f"| 0x{s.crc32:08x} |"
        for s in entry.sections
    )
    rows = "\n".join("    [" + ", ".join(f"{v:g}" for v in row) + "]" for row in decoded)
    return f"""The file holds one tensor `w`, shape 2 x 5, dtype float32, encoding `bilevel` with
`bits = 3`, `group_size = 4` (G = 2: columns 0-3 and the one-column tail 4), `stats_bits = 2`,
`stats_group_size = 2` (T = 1), permutation `[4, 0, 1, 2, 3]` and one outlier (row 1, stored
column 2, value 10.0). No metadata, alignment 64. It is produced by
`python conformance/worked_example.py --write example.spqr` ({len(data)} bytes):

```
{hexdump(data)}
```

Header: `header_length` = 417, `data_offset` = {entry.sections[0].offset}, header CRC
`0x{int.from_bytes(data[56:60], "little"):08x}`; the tensor record's params are
`03 02 03 00 | 04 00 00 00 | 02 00 00 00 | 00.. | K = 1 | E = 1 | 00..` (bits, stats_bits, flags
perm|outliers, group_size, stats_group_size, reserved, outlier_count, outlier_entry_count).
Sections:

| role | offset | length | crc32 |
|---|---|---|---|
{sec_rows}

Decoding, by C-5 .. C-7:

- `codes` is one word, 986754008 = `11224 | 30113<<15`: its bits 0..14 are row 0,
  11224 = `0 | 3<<3 | 7<<6 | 5<<9 | 2<<12`, codes `[0, 3, 7, 5, 2]`; bits 15..29 are row 1,
  30113 = `1 | 4<<3 | 6<<6 | 2<<9 | 7<<12`, codes `[1, 4, 6, 2, 7]` (30 bits of 32 used).
- `stats` is one word, 58425 = `57 | 228<<8`: row 0 = 57 = `1 | 2<<2 | 3<<4 | 0<<6`,
  `(qs, qz)` = (1, 2) for group 0 and (3, 0) for group 1; row 1 = 228: (0, 1) and (2, 3).
- `stats2` tile 0: group 0 `(scale_step, scale_base, zero_step, zero_base)` =
  (0.5, 0.25, 1.0, 1.5), group 1 = (0.125, 1.0, 2.0, -1.0).
- Row 0, group 0: `s = 0.25 + 0.5*1 = 0.75`, `z = 1.5 + 1.0*2 = 3.5`, so codes 0, 3, 7, 5 give
  `0.75*(q - 3.5)` = -2.625, -0.375, 2.625, 1.125. Group 1: `s = 1.0 + 0.125*3 = 1.375`,
  `z = -1.0 + 2.0*0 = -1`, code 2 gives 4.125.
- Row 1, group 0: `s = 0.25`, `z = 2.5`: -0.375, 0.375, 0.875, -0.125; group 1: `s = 1.25`,
  `z = 5`, code 7 gives 2.5.
- `perm` holds u16 entries (n <= 65536): `[4, 0, 1, 2, 3]`.
- `outlier_index` = `[0, 1]` (one block of 16 rows); `outlier_entries` = `[0x49000008]`: delta
  8 from the running cell -1 gives cell 7 = row 1 (7 div 5), stored column 2 (7 mod 5), value
  `0x4900` = 10.0, which replaces 0.875 in row 1.
- The permutation puts stored column `j` at original column `perm[j]`, giving `W` =

```
[
{rows}
]
```

All ten values are exact in float16, so a float16 decode gives the same numbers. The digest
in the tensor record is the SHA-256 of
the 40 float32 bytes above: `{entry.digest.hex()}`.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="FILE", help="also keep the example file here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.write or os.path.join(tmp, "example.spqr")
        spqr_format.save(path, {NAME: example_tensor()})
        sys.stdout.write(render(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
