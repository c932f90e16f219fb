"""Conformance vectors of ``channel_mixed`` (SPEC 1.1, section 12): decode, matvec, reject.

All carry ``spec_version`` 1.1 (C-13.3: vectors added for a minor version cover only what it
adds). Valid files come from the logical form (:class:`ChannelMixedTensor`) through the public
writer and are checked against the numpy model of C-12.7 (``data.channel_mixed_model_f32``);
each reject changes one thing of a valid file through :mod:`~spqr_format.conformance.image`.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

from spqr_format.codec.bilevel import Outliers
from spqr_format.codec.channel_mixed import WIDTHS, ChannelMixedGeometry, ChannelMixedTensor
from spqr_format.conformance.data import as_f16, f16_bits, rng
from spqr_format.conformance.generate import decode_vector, matvec_vector, vector, write_spqr
from spqr_format.conformance.rejects import BASES, reject
from spqr_format.spec import DType, Role

V = "1.1"
F32, F16, BF16 = DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16


def make_cm(key, m, n, widths, *, table_rows=0, outliers=0.0, perm="random", dtype=F32,
            exps=(0, 30)):  # fmt: skip
    """A channel_mixed tensor: ``widths`` a list of (width, count) or an array of n widths;
    random codes, any finite f16 table values, outliers a fraction or a list of (row, col)."""
    r = rng(f"cm/{key}")
    if isinstance(widths, list):
        w = np.concatenate([np.full(c, b, np.uint8) for b, c in widths])
    else:
        w = np.asarray(widths, np.uint8)
    w = np.sort(w)
    assert w.shape == (n,)
    counts = tuple(int((w == b).sum()) for b in WIDTHS)
    geo = ChannelMixedGeometry.of((m, n), counts, table_rows)
    codes = (r.randint(0, 256, size=(m, n)) % (1 << w.astype(np.int64))).astype(np.uint8)
    tables = as_f16(f16_bits(r, (geo.table_blocks, geo.table_entries), *exps))
    p = r.permutation(n) if perm == "random" else np.arange(n)
    if isinstance(outliers, list):
        cells = sorted(outliers)
        rows = np.array([c[0] for c in cells], np.uint32)
        cols = np.array([c[1] for c in cells], np.uint32)
    elif outliers > 0:
        mask = r.random_sample((m, n)) < outliers
        rows, cols = (a.astype(np.uint32) for a in np.nonzero(mask))
    else:
        rows = cols = np.zeros(0, np.uint32)
    out = None
    if rows.size:
        out = Outliers(rows, cols, as_f16(f16_bits(r, rows.size, *exps)))
    return ChannelMixedTensor((m, n), w, p.astype(np.uint32), codes, tables, out, dtype,
                              table_rows)  # fmt: skip


_DECODE = ["C-12.2", "C-12.3", "C-12.4", "C-12.5", "C-12.7", "C-2.12", "C-7.5"]


def _dv(id, desc, tensors_fn, clauses=(), suite="fast"):
    vector(f"decode-channel-mixed-{id}", "decode", ["decode", "channel_mixed"],
           _DECODE + list(clauses), desc, suite=suite, spec_version=V)(
        lambda: decode_vector(tensors_fn())
    )  # fmt: skip


_dv("all-widths", "every width 1..8 in one tensor (runs not word-aligned), random perm, f32",
    lambda: {"w": make_cm("all", 19, 61, [(b, 3 + b) for b in range(1, 9)] + [(3, 1)])})  # fmt: skip  # noqa: E501
_dv("one-width", "a single width-8 column of 1 row (a 256-entry table), identity perm, f16",
    lambda: {"w": make_cm("one", 1, 1, [(8, 1)], perm="identity", dtype=F16)})  # fmt: skip
_dv("table-rows", "tables per block of 16 rows (T = 3, last block 5 rows), outliers, f16",
    lambda: {"w": make_cm("trows", 37, 20, [(2, 9), (3, 7), (5, 4)], table_rows=16,
                          outliers=0.05, dtype=F16)},
    ["C-12.1", "C-12.6", "C-6.1", "C-6.2"])  # fmt: skip
_dv("table-rows-1", "one table per row and column (R = 1), bf16 output",
    lambda: {"w": make_cm("trows1", 6, 11, [(1, 5), (2, 6)], table_rows=1, dtype=BF16)},
    ["C-12.1"])  # fmt: skip
_dv("outlier-skips", "17 x 4200, widths {1, 2}, outliers 69,000 cells apart (skip entries), "
    "an outlier in row 16 (second block), bf16",
    lambda: {"w": make_cm("skips", 17, 4200, [(1, 4000), (2, 200)],
                          outliers=[(0, 3), (16, 0), (16, 4199), (15, 1000)], dtype=BF16)},
    ["C-12.6", "C-6.1", "C-6.2", "C-6.3"])  # fmt: skip
_dv("mixed-with-bilevel", "a channel_mixed tensor next to raw and encoder-made tensors",
    lambda: {"a.raw": np.arange(12, dtype=np.float32).reshape(3, 4),
             "b.cm": make_cm("mix", 40, 33, [(2, 20), (3, 10), (4, 3)], outliers=0.01)})  # fmt: skip  # noqa: E501


def _encoded():
    from spqr_format.codec.cmpq import CmpqConfig, encode_cmpq

    r = rng("cm/encoded")
    w = (r.standard_t(4, size=(96, 128)) * 0.02).astype(np.float32)
    x = r.standard_normal((300, 128))
    x[:, :4] *= 8
    # pinned to the solver the vector was made with (the bytes are committed)
    t, _ = encode_cmpq(w, x.T @ x, CmpqConfig(target_bits=3.5, solver="kmeans"), dtype=F16)
    return {"model.layers.0.mlp.down_proj.weight": t}


_dv("encoder", "what the CMPQ encoder writes: 96 x 128 at 3.5 counted bits, widths {2,3,4}, "
    "activation + sensitive outliers, f16", _encoded, ["C-12.6", "C-12.9"])  # fmt: skip

vector(
    "matvec-channel-mixed", "matvec", ["matvec", "channel_mixed"],
    ["C-12.7", "C-7.6"], "y = W x for two channel_mixed tensors (one with table blocks)",
    spec_version=V,
)(lambda: matvec_vector({
    # values 2^-6 .. 2^1 (weights of a model): an f16-output kernel must pass (C-7.6)
    "a": make_cm("mv-a", 33, 70, [(2, 40), (3, 20), (4, 10)], outliers=0.02, exps=(9, 15)),
    "b": make_cm("mv-b", 20, 9, [(1, 3), (6, 6)], table_rows=8, dtype=F16, exps=(9, 15)),
}, "matvec-channel-mixed"))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# reject vectors


@functools.cache
def base_channel_mixed() -> bytes:
    """24 x 30, widths {2: 12, 3: 10, 4: 8}, R = 0, ~5 % outliers (none at stored (0, 0)), f16."""
    t = make_cm("reject/base", 24, 30, [(2, 12), (3, 10), (4, 8)], outliers=0.05, dtype=F16)
    keep = ~((t.outliers.rows == 0) & (t.outliers.cols == 0))
    t.outliers = Outliers(t.outliers.rows[keep], t.outliers.cols[keep], t.outliers.values[keep])
    return write_spqr({"w": t})


BASES["channel-mixed"] = base_channel_mixed
B = "channel-mixed"


def _params(fn):
    def mutate(im):
        t = im.tensors[0]
        vals = list(struct.unpack("<8III", t.params))
        fn(vals)
        t.params = struct.pack("<8III", *vals)

    return mutate


def _sec(role, dt, fn):
    def mutate(im):
        s = im.tensors[0].section(role)
        a = np.frombuffer(s.data, dt).copy()
        fn(a)
        s.data = a.tobytes()

    return mutate


def _set(a, i, v):
    a[i] = v


rj = functools.partial(reject, spec_version=V)

# C-12.1 / C-12.2: params, shape, width counts (header part of C-12.8)
rj("E_BAD_FIELD", "cm-table-rows-cap", B, "table_rows = 2^24 + 1", ["C-12.1", "C-12.8"])(
    _params(lambda v: _set(v, 8, (1 << 24) + 1))
)
rj("E_BAD_FIELD", "cm-table-rows-max", B, "table_rows = 2^32 - 1", ["C-12.1", "C-12.8"])(
    _params(lambda v: _set(v, 8, 0xFFFFFFFF))
)
rj("E_BAD_FIELD", "cm-counts-over", B, "width counts sum to n + 1 (one more 1-bit column)",
   ["C-12.2", "C-12.8"])(_params(lambda v: _set(v, 0, 1)))  # fmt: skip
rj("E_BAD_FIELD", "cm-counts-under", B, "width counts sum to n - 1", ["C-12.2", "C-12.8"])(
    _params(lambda v: _set(v, 3, v[3] - 1))
)
rj("E_BAD_FIELD", "cm-raw-params", "raw",
   "a raw 3 x 5 tensor (one data section, zero params) with encoding 3: the width counts sum "
   "to 0, not n", ["C-12.2", "C-12.8", "C-13.3"])(
    lambda im: setattr(im.tensors[0], "encoding", 3))  # fmt: skip
rj("E_BAD_SHAPE", "cm-raw-1d", "raw",
   "a raw 1-D tensor (one data section, zero params) with encoding 3: not 2-D",
   ["C-12.2", "C-12.8", "C-13.3"])(lambda im: setattr(im.tensors[1], "encoding", 3))  # fmt: skip
rj("E_BAD_FIELD", "cm-bilevel-params", "bilevel",
   "a bilevel tensor's encoding set to 3: its params read as channel_mixed have width counts "
   "that do not sum to n", ["C-12.2", "C-12.8", "C-13.3"])(lambda im: setattr(im.tensors[0], "encoding", 3))  # fmt: skip  # noqa: E501
rj("E_BAD_SHAPE", "cm-ndim-1", B, "a channel_mixed tensor with ndim 1 ([24])",
   ["C-12.2", "C-12.8"])(lambda im: (setattr(im.tensors[0], "ndim", 1),
                                     im.tensors[0].dims.__setitem__(1, 0)))  # fmt: skip
rj("E_BAD_SHAPE", "cm-m-0", B, "a channel_mixed tensor of shape [0, 30]", ["C-12.2", "C-12.8"])(
    lambda im: im.tensors[0].dims.__setitem__(0, 0)
)
rj("E_UNSUPPORTED_ENCODING_VERSION", "cm-2", B, "channel_mixed encoding_version 2", ["C-3.5"])(
    lambda im: setattr(im.tensors[0], "encoding_version", 2)
)
# roles and lengths
rj("E_BAD_LAYOUT", "cm-table-rows-length", B,
   "table_rows = 7 (T = 4) with the tables section of T = 1", ["C-12.5", "C-12.8"])(
    _params(lambda v: _set(v, 8, 7)))  # fmt: skip
rj("E_BAD_LAYOUT", "cm-e-0-with-sections", B,
   "outlier_entry_count 0 but the outlier sections are there", ["C-12.1", "C-12.8"])(
    _params(lambda v: _set(v, 9, 0)))  # fmt: skip
rj("E_BAD_LAYOUT", "cm-no-perm", B, "the perm section is missing", ["C-12.2", "C-12.4"])(
    lambda im: setattr(im.tensors[0], "sections",
                       [s for s in im.tensors[0].sections if s.role != Role.PERM])
)  # fmt: skip
rj("E_BAD_LAYOUT", "cm-codes-short", B, "the codes section is 4 bytes short",
   ["C-12.3", "C-12.8"])(lambda im: setattr(im.tensors[0].section(Role.CODES), "data",
                                           im.tensors[0].section(Role.CODES).data[:-4]))  # fmt: skip  # noqa: E501
rj("E_BAD_LAYOUT", "role-8-on-raw", "raw", "a raw tensor whose data section has role 8 (tables)",
   ["C-2.7", "C-4.1"])(lambda im: setattr(im.tensors[1].sections[0], "role", 8))  # fmt: skip
# data part
rj("E_SECTION_CRC", "cm-tables", B, "the tables section's CRC is off by one", ["C-2.8a"])(
    lambda im: setattr(im.tensors[0].section(Role.TABLES), "crc32",
                       (__import__("zlib").crc32(im.tensors[0].section(Role.TABLES).data) + 1)
                       & 0xFFFFFFFF)
)  # fmt: skip
rj("E_BAD_PERMUTATION", "cm-duplicate", B, "perm[1] = perm[0]", ["C-12.4", "C-12.8"])(
    _sec(Role.PERM, "<u2", lambda a: _set(a, 1, a[0]))
)
rj("E_BAD_PERMUTATION", "cm-out-of-range", B, "perm[5] = n", ["C-12.4", "C-12.8"])(
    _sec(Role.PERM, "<u2", lambda a: _set(a, 5, 30))
)
rj("E_NONFINITE", "cm-table-inf", B, "a table entry is +inf", ["C-12.5", "C-12.8"])(
    _sec(Role.TABLES, "<u2", lambda a: _set(a, 7, 0x7C00))
)
rj("E_NONFINITE", "cm-table-nan", B, "the last table entry is a NaN", ["C-12.5", "C-12.8"])(
    _sec(Role.TABLES, "<u2", lambda a: _set(a, -1, 0xFE01))
)
rj("E_NONFINITE", "cm-outlier-inf", B, "an outlier value is -inf", ["C-12.6", "C-6.2"])(
    _sec(Role.OUTLIER_ENTRIES, "<u4", lambda a: _set(a, 2, (a[2] & 0xFFFF) | (0xFC00 << 16)))
)
rj("E_BAD_OUTLIERS", "cm-delta-0", B, "an outlier entry with delta 0", ["C-12.6", "C-6.2"])(
    _sec(Role.OUTLIER_ENTRIES, "<u4", lambda a: _set(a, 0, a[0] & 0xFFFF0000))
)
rj("E_BAD_OUTLIERS", "cm-index", B, "outlier_index[0] = 1", ["C-12.6", "C-6.1"])(
    _sec(Role.OUTLIER_INDEX, "<u4", lambda a: _set(a, 0, 1))
)
rj("E_DIGEST_MISMATCH", "cm-code", B, "one code bit flipped (stored (0, 0), not an outlier)",
   ["C-12.7", "C-2.12"])(_sec(Role.CODES, "<u4", lambda a: _set(a, 0, a[0] ^ 1)))  # fmt: skip


def _used_table_entry(im):
    """Flip the last mantissa bit of the table entry that stored (0, 0) uses (column 0 is in
    the 2-bit run, o_0 = 0, its code is bits 0..1 of codes word 0)."""
    t = im.tensors[0]
    q = np.frombuffer(t.section(Role.CODES).data, "<u4")[0] & 3
    _sec(Role.TABLES, "<u2", lambda a: _set(a, q, a[q] ^ 1))(im)


rj("E_DIGEST_MISMATCH", "cm-table-value", B,
   "the table entry stored (0, 0) uses changed by one ulp (still finite)",
   ["C-12.5", "C-2.12"])(_used_table_entry)  # fmt: skip
