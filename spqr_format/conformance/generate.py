"""Deterministic builders of every conformance vector (issue 16, SPEC section 10).

Each vector is a :class:`VectorSpec`: an id, its kind (``decode``, ``matvec``, ``reject``), the
suite it belongs to (``fast``: committed under ``conformance/vectors``; ``full``: too large to
commit, built on demand and checked against the hashes in the manifest), labels, the SPEC
clauses it covers, and a builder returning the files.

Files of a vector directory:

- ``input.spqr``: the file given to the decoder;
- ``expected.safetensors`` (decode): every tensor decoded to its own dtype, exact bits;
- ``x.safetensors`` (matvec): one F32 ``x`` per bilevel tensor, named as the tensor;
  ``y_ref.safetensors``: the F64 reference ``y = W x`` (W the decoded float32 weights, sums
  correctly rounded with ``math.fsum``); ``y_absdot.safetensors``: F64 ``sum_j |W_ij x_j|``,
  the scale of the tolerance.

Valid files are written through the public API (``SpqrWriter``), from the *logical* form of
the tensors, so the vectors follow the physical layout of the codec they are built with. A
reject vector starts from a valid file, changes one thing through
:mod:`~spqr_format.conformance.image` (which re-derives offsets and re-computes every CRC), so
the fault is the only one. Faults inside bilevel sections are in
:mod:`~spqr_format.conformance.layout_faults`.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from spqr_format import api, spec
from spqr_format.api import RawTensor
from spqr_format.codec.bilevel import BilevelTensor
from spqr_format.codec.channel_mixed import ChannelMixedTensor
from spqr_format.conformance import image as img
from spqr_format.conformance import layout_faults as lf
from spqr_format.conformance import manifest, stfile
from spqr_format.conformance.data import (
    as_f16,
    channel_mixed_model_f32,
    convert_f32,
    logical_decode_f32,
    make_bilevel,
    matvec_x,
    rng,
)
from spqr_format.spec import DType, Role

F32, F16, BF16 = DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16
# C-7.6 default tolerance of matvec vectors: |y_i - y_ref_i| <= REL * sum_j |W_ij x_j| + ABS.
TOL_REL = 2.0**-9
TOL_ABS = 2.0**-24
TOLERANCE = {
    "rel": TOL_REL,
    "abs": TOL_ABS,
    "formula": "|y_i - y_ref_i| <= rel * sum_j |W_ij * x_j| + abs, for every row i",
}


@dataclass
class Built:
    files: dict[str, bytes]
    expect: dict = field(default_factory=dict)


@dataclass
class VectorSpec:
    id: str
    kind: str
    suite: str
    labels: list[str]
    clauses: list[str]
    description: str
    build: Callable[[], Built]
    spec_version: str = "1.0"  # the SPEC version that added what the vector covers (C-13.3)


REGISTRY: list[VectorSpec] = []


def vector(id, kind, labels, clauses, description, suite="fast", spec_version="1.0"):
    def deco(fn):
        REGISTRY.append(
            VectorSpec(
                id, kind, suite, list(labels), list(clauses), description, fn, spec_version
            )
        )
        return fn

    return deco


# ---------------------------------------------------------------------------------------------
# Writing valid files and expected outputs
# ---------------------------------------------------------------------------------------------
def write_spqr(tensors, metadata=None, alignment=spec.DEFAULT_ALIGNMENT) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "v.spqr")
        api.save(path, tensors, metadata=metadata, alignment=alignment)
        with open(path, "rb") as f:
            return f.read()


def decode_all(data: bytes) -> dict[str, tuple[str, np.ndarray, tuple]]:
    """Every tensor decoded by the reference, in its own dtype, digests checked."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "v.spqr")
        with open(path, "wb") as f:
            f.write(data)
        out = {}
        with api.open_file(path) as f:
            for name in f.names():
                e = f.entry(name)
                dt = spec.DTYPE_NAMES[DType(e.dtype)]
                arr = f.decode(name, None, verify_crc=True, verify_digest=True)
                out[name] = (dt, np.array(arr, copy=True), tuple(e.shape))
        return out


def expected_file(data: bytes, logical: dict | None = None) -> bytes:
    dec = decode_all(data)
    if logical:
        for name, t in logical.items():
            if isinstance(t, (BilevelTensor, ChannelMixedTensor)):
                f32 = (
                    channel_mixed_model_f32(t)
                    if isinstance(t, ChannelMixedTensor)
                    else logical_decode_f32(t)
                )
                want = convert_f32(f32, DType(t.dtype))
                got = dec[name][1]
                if (
                    want.view(np.uint8).tobytes()
                    != np.ascontiguousarray(got).view(np.uint8).tobytes()
                ):
                    raise AssertionError(f"reference decode of {name!r} differs from the model")
    tensors = {}
    for name, (dt, arr, shape) in dec.items():
        a = np.ascontiguousarray(arr)
        if a.size == 0:
            a = np.zeros(0, dtype=a.dtype)
            tensors[name] = (stfile.SPQR_TO_ST[dt], _ZeroSize(a.dtype, shape))
        else:
            tensors[name] = (stfile.SPQR_TO_ST[dt], a.reshape(shape))
    return stfile.dumps(tensors)


class _ZeroSize:
    """A zero-size array of any declared shape (numpy cannot hold [0, 2^40, 2^40])."""

    def __init__(self, dtype, shape):
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)

    def __array__(self, dtype=None, copy=None):
        return np.zeros(0, dtype=dtype or self.dtype)


def decode_vector(tensors, metadata=None, alignment=64, transform=None) -> Built:
    data = write_spqr(tensors, metadata, alignment)
    if transform is not None:
        im = img.parse(data)
        transform(im)
        data = im.to_bytes()
    logical = tensors if isinstance(tensors, dict) else dict(tensors)
    return Built({"input.spqr": data, "expected.safetensors": expected_file(data, logical)})


def matvec_vector(tensors: dict[str, BilevelTensor], key: str) -> Built:
    data = write_spqr(tensors)
    dec = {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "v.spqr")
        with open(path, "wb") as f:
            f.write(data)
        with api.open_file(path) as f:
            for name in f.names():
                dec[name] = f.decode(name, "float32", verify_digest=True)
    xs, ys, absdot = {}, {}, {}
    for name, t in tensors.items():
        w = dec[name]
        model = (
            channel_mixed_model_f32(t)
            if isinstance(t, ChannelMixedTensor)
            else logical_decode_f32(t)
        )
        assert np.array_equal(w.view(np.uint32), model.view(np.uint32))
        x = matvec_x(f"{key}/{name}", t.shape[1])
        prods = w.astype(np.float64) * x.astype(np.float64)  # exact: 24 + 24 bits < 53
        ys[name] = ("F64", np.array([math.fsum(row) for row in prods], dtype=np.float64))
        absdot[name] = (
            "F64",
            np.array([math.fsum(row) for row in np.abs(prods)], dtype=np.float64),
        )
        xs[name] = ("F32", x)
    return Built(
        {
            "input.spqr": data,
            "x.safetensors": stfile.dumps(xs),
            "y_ref.safetensors": stfile.dumps(ys),
            "y_absdot.safetensors": stfile.dumps(absdot),
        },
        {"tolerance": dict(TOLERANCE)},
    )


def reject_vector(base: bytes, mutate, error: str) -> Built:
    im = img.parse(base)
    res = mutate(im)
    data = res if isinstance(res, (bytes, bytearray)) else im.to_bytes()
    return Built({"input.spqr": bytes(data)}, {"error": error})


# ---------------------------------------------------------------------------------------------
# Decode vectors: raw
# ---------------------------------------------------------------------------------------------
_SPECIAL = {
    F32: [
        0x7FC00001,
        0xFFFFFFFF,
        0x7F800001,
        0x7FBFFFFF,
        0x7F800000,
        0xFF800000,
        0x80000000,
        0x00000000,
        0x00000001,
        0x807FFFFF,
        0x7F7FFFFF,
        0x3F800000,
    ],
    F16: [
        0x7C01,
        0xFE00,
        0x7FFF,
        0xFDFF,
        0x7C00,
        0xFC00,
        0x8000,
        0x0000,
        0x0001,
        0x83FF,
        0x7BFF,
        0x3C00,
    ],
    BF16: [
        0x7F81,
        0xFFC1,
        0x7FFF,
        0xFF80,
        0x7F80,
        0xFF80,
        0x8000,
        0x0000,
        0x0001,
        0x807F,
        0x7F7F,
        0x3F80,
    ],
}


def _raw(dt: DType, bits: np.ndarray) -> RawTensor:
    if dt == F32:
        return RawTensor(dt, np.ascontiguousarray(bits, dtype=np.uint32).view(np.float32))
    if dt == F16:
        return RawTensor(dt, np.ascontiguousarray(bits, dtype=np.uint16).view(np.float16))
    return RawTensor(dt, np.ascontiguousarray(bits, dtype=np.uint16))


def _raw_tensors(dt: DType) -> dict:
    r = rng(f"raw/{dt.name}")
    wide = np.uint32 if dt == F32 else np.uint16
    top = 1 << (32 if dt == F32 else 16)
    rand = lambda shape: r.randint(0, top, size=shape, dtype=np.uint64).astype(wide)  # noqa: E731
    return {
        "scalar": _raw(dt, np.array(_SPECIAL[dt][0], dtype=wide).reshape(())),
        "empty": _raw(dt, np.zeros(0, dtype=wide)),
        "empty.2d": _raw(dt, np.zeros((3, 0), dtype=wide)),
        "special": _raw(dt, np.array(_SPECIAL[dt], dtype=wide)),
        "matrix": _raw(dt, rand((5, 7))),
        "nd8": _raw(dt, rand((1, 2, 1, 3, 1, 2, 1, 2))),
        "tensor3d": _raw(dt, rand((2, 3, 4))),
    }


for _dt in (F32, F16, BF16):
    _name = spec.DTYPE_NAMES[_dt]
    vector(
        f"raw-{_name}",
        "decode",
        ["raw", _name, "0-d", "zero-size", "nan-payload", "ndim-8"],
        ["C-4.1", "C-3.1", "C-3.3", "C-2.12", "C-1.1", "C-1.2"],
        f"raw {_name} tensors: 0-D, zero-size, 8-D, NaN payloads (quiet and signalling), "
        "infinities, signed zero, subnormals, random bit patterns; decoded bit for bit",
    )(lambda dt=_dt: decode_vector(_raw_tensors(dt)))


@vector(
    "raw-zero-size-huge-dims",
    "decode",
    ["raw", "zero-size", "caps"],
    ["C-3.1", "C-4.1", "C-2.9"],
    "zero-size raw tensors whose other dims are at the 2^40 cap ([0, 2^40, 2^40], [2^40, 0]): "
    "0 elements, an empty data section",
)
def _raw_huge_zero():
    def grow(im):
        a, b = im.tensors
        a.ndim, a.dims[:3] = 3, [0, 1 << 40, 1 << 40]
        b.ndim, b.dims[:2] = 2, [1 << 40, 0]

    data = write_spqr({"a": np.zeros((0, 1, 1), np.float32), "b": np.zeros((1, 0), np.float16)})
    im = img.parse(data)
    grow(im)
    data = im.to_bytes()
    return Built(
        {
            "input.spqr": data,
            "expected.safetensors": expected_file_manual(
                {"a": ("F32", (0, 1 << 40, 1 << 40)), "b": ("F16", (1 << 40, 0))}
            ),
        }
    )


def expected_file_manual(zero_size: dict) -> bytes:
    return stfile.dumps(
        {
            n: (dt, _ZeroSize(np.float32 if dt == "F32" else np.uint16, shp))
            for n, (dt, shp) in zero_size.items()
        }
    )


# ---------------------------------------------------------------------------------------------
# Decode vectors: bilevel
# ---------------------------------------------------------------------------------------------
_BILEVEL_CORE = [
    "C-5.1",
    "C-5.2",
    "C-5.3",
    "C-5.4",
    "C-5.5",
    "C-5.6",
    "C-7.1",
    "C-7.2",
    "C-7.5",
    "C-2.12",
]

for _b in range(1, 9):
    vector(
        f"bilevel-bits-{_b}",
        "decode",
        ["bilevel", f"bits-{_b}", "tails", "float32", "float16", "bfloat16"],
        _BILEVEL_CORE,
        f"{_b}-bit codes, 13x37 (tails: n % 16, m % 4), g16, with fp16 statistics and with "
        f"3-bit statistics (S=4), one tensor per decoded dtype",
    )(
        lambda b=_b: decode_vector(
            {
                "fp16stats.f32": make_bilevel(f"bits{b}a", 13, 37, b, 16, 0, 0, dtype=F32),
                "fp16stats.f16": make_bilevel(f"bits{b}b", 13, 37, b, 16, 0, 0, dtype=F16),
                "s3.bf16": make_bilevel(f"bits{b}c", 13, 37, b, 16, 3, 4, dtype=BF16),
                "s3.f32": make_bilevel(f"bits{b}d", 13, 37, b, 16, 3, 4, dtype=F32),
            }
        )
    )

for _sb in range(1, 9):
    vector(
        f"bilevel-stats-{_sb}",
        "decode",
        ["bilevel", f"stats-bits-{_sb}", "stats-group-sizes", "tails"],
        _BILEVEL_CORE,
        f"{_sb}-bit statistics, 21x50, 4-bit codes, g8, stats group sizes 1, 3, 16 and 40 (> m)",
    )(
        lambda sb=_sb: decode_vector(
            {
                f"S{S}": make_bilevel(f"stats{sb}/{S}", 21, 50, 4, 8, sb, S, dtype=F32)
                for S in (1, 3, 16, 40)
            }
        )
    )


@vector(
    "bilevel-stats-fp16-random-bits",
    "decode",
    ["bilevel", "stats-fp16", "subnormal", "overflow", "signed-zero", "float16", "bfloat16"],
    _BILEVEL_CORE,
    "fp16 statistics with arbitrary finite f16 bit patterns (subnormal, negative, up to 65504): "
    "float16 outputs overflow to infinity, subnormal and negative-zero results",
)
def _stats_randbits():
    return decode_vector(
        {
            f"w.{spec.DTYPE_NAMES[dt]}": make_bilevel(
                f"randstats/{dt.name}", 12, 40, 8, 4, 0, 0, dtype=dt, stats_kind="randbits"
            )
            for dt in (F32, F16, BF16)
        }
    )


@vector(
    "bilevel-stats2-random-bits",
    "decode",
    ["bilevel", "stats-bilevel", "subnormal", "overflow", "float16", "bfloat16"],
    _BILEVEL_CORE,
    "bilevel statistics (sb 4 and 8) whose stats2 records are arbitrary finite f16 bit patterns",
)
def _stats2_randbits():
    return decode_vector(
        {
            f"sb{sb}.{spec.DTYPE_NAMES[dt]}": make_bilevel(
                f"randstats2/{sb}/{dt.name}", 10, 24, 5, 4, sb, 3, dtype=dt, stats_kind="randbits"
            )
            for sb in (4, 8)
            for dt in (F32, F16, BF16)
        }
    )


@vector(
    "bilevel-group-sizes",
    "decode",
    ["bilevel", "group-1", "group-3", "group-16", "group-128", "group-gt-n", "group-max", "tails"],
    _BILEVEL_CORE,
    "group sizes 1, 3, 16, 128, n, n+1 and 2^24 (G = 1), on 9x300 with fp16 and 2-bit "
    "statistics; stats group size 2^24",
)
def _groups():
    t = {}
    for g in (1, 3, 16, 128, 300, 301, 1 << 24):
        t[f"g{g}.fp16"] = make_bilevel(f"group{g}a", 9, 300, 3, g, 0, 0, dtype=F32)
        t[f"g{g}.s2"] = make_bilevel(f"group{g}b", 9, 300, 3, g, 2, 4, dtype=F16)
    t["S-max"] = make_bilevel("groupSmax", 9, 300, 3, 16, 3, 1 << 24, dtype=F32)
    return decode_vector(t)


@vector(
    "bilevel-shapes-tails",
    "decode",
    ["bilevel", "tails", "1x1", "single-row", "single-column"],
    _BILEVEL_CORE,
    "shapes around every boundary: 1x1, 1x127..129, 130x1, 17x33 (g16, S16), 5x255/256/257, "
    "33x31 with S=16 and g=8",
)
def _tails():
    t = {}
    shapes = [
        (1, 1),
        (1, 127),
        (1, 128),
        (1, 129),
        (130, 1),
        (17, 33),
        (5, 255),
        (5, 256),
        (5, 257),
        (33, 31),
        (16, 64),
        (3, 5),
    ]
    for i, (m, n) in enumerate(shapes):
        b = 1 + i % 8
        t[f"t{m}x{n}.s"] = make_bilevel(
            f"tail{m}x{n}a", m, n, b, 16 if i % 2 else 8, 2, 16, dtype=F32
        )
        t[f"t{m}x{n}.f"] = make_bilevel(f"tail{m}x{n}b", m, n, b, 16, 0, 0, dtype=F16)
    return decode_vector(t)


@vector(
    "bilevel-permutations",
    "decode",
    ["bilevel", "perm", "perm-identity", "perm-reverse"],
    _BILEVEL_CORE + ["C-5.7", "C-7.4"],
    "permutations: random, identity (flag set), reverse, n = 1, with and without outliers",
)
def _perms():
    return decode_vector(
        {
            "random": make_bilevel("perm/r", 7, 45, 3, 16, 2, 4, perm="random", dtype=F32),
            "identity": make_bilevel("perm/i", 7, 45, 3, 16, 0, 0, perm="identity", dtype=F32),
            "reverse": make_bilevel("perm/v", 7, 45, 4, 8, 3, 16, perm="reverse", dtype=F16),
            "n1": make_bilevel("perm/1", 4, 1, 2, 1, 0, 0, perm="identity", dtype=F32),
            "outliers": make_bilevel(
                "perm/o", 9, 40, 3, 16, 3, 4, perm="random", outliers=0.05, dtype=F32
            ),
        }
    )


_OUT = _BILEVEL_CORE + ["C-6.1", "C-6.2", "C-6.3", "C-7.3"]


@vector(
    "bilevel-outliers-density",
    "decode",
    ["bilevel", "outliers", "outliers-none", "outliers-typical", "outliers-dense"],
    _OUT,
    "outlier densities 0 (flag clear), 1 %, 10 %, 50 % on 40x64 and 33x50 (row blocks with and "
    "without entries)",
)
def _outlier_density():
    t = {"none": make_bilevel("od/0", 40, 64, 3, 16, 3, 16, dtype=F32)}
    for d in (0.01, 0.1, 0.5):
        t[f"d{d}"] = make_bilevel(f"od/{d}", 40, 64, 3, 16, 3, 16, outliers=d, dtype=F32)
        t[f"d{d}.perm"] = make_bilevel(
            f"odp/{d}", 33, 50, 4, 16, 0, 0, perm="random", outliers=d, dtype=F16
        )
    return decode_vector(t)


@vector(
    "bilevel-outliers-rows",
    "decode",
    ["bilevel", "outliers", "outliers-whole-rows", "outliers-all", "outliers-edges"],
    _OUT,
    "whole rows of outliers (first, middle, last row), every element an outlier, single "
    "outliers at the first and the last position, outlier values that are subnormal, "
    "negative zero and +-65504",
)
def _outlier_rows():
    t = {
        "rows": make_bilevel("or/rows", 37, 70, 3, 16, 2, 16, outliers="rows", dtype=F32),
        "all": make_bilevel("or/all", 5, 33, 2, 16, 0, 0, outliers="all", dtype=F32),
        "first": make_bilevel("or/first", 20, 30, 3, 8, 0, 0, outliers=[(0, 0)], dtype=F32),
        "last": make_bilevel("or/last", 20, 30, 3, 8, 0, 0, outliers=[(19, 29)], dtype=F32),
        "corners": make_bilevel(
            "or/corners", 33, 30, 3, 8, 0, 0, outliers=[(0, 29), (16, 0), (32, 29)], dtype=F16
        ),
    }
    edge = make_bilevel(
        "or/values",
        4,
        10,
        3,
        8,
        0,
        0,
        outliers=[(0, 1), (1, 2), (2, 3), (3, 4), (3, 9)],
        dtype=F32,
    )
    edge.outliers.values = as_f16(np.array([0x0001, 0x8000, 0x7BFF, 0xFBFF, 0x03FF], np.uint16))
    t["values"] = edge
    return decode_vector(t)


@vector(
    "bilevel-outliers-skips-cells",
    "decode",
    ["bilevel", "outliers", "skips", "row-blocks"],
    _OUT,
    "20x4000 with outliers only at the first and last cells of each 16-row block and of row 7: "
    "gaps of more than 65,535 cells inside a row block",
)
def _skips_cells():
    where = [(0, 0), (7, 0), (7, 3999), (15, 3999), (16, 0), (19, 3999)]
    return decode_vector(
        {"w": make_bilevel("skipcells", 20, 4000, 1, 128, 0, 0, outliers=where, dtype=F16)}
    )


@vector(
    "bilevel-wide-65537",
    "decode",
    ["bilevel", "wide", "gt-65536-columns", "skips", "perm", "perm-u32"],
    _OUT + ["C-5.7", "C-7.4"],
    "2x65537 with a permutation and outliers whose gaps are 65534, 65535, 65536 and 131071 "
    "columns (entries with delta 65535, one and two skips)",
)
def _wide():
    where = [(0, 65534), (0, 65536), (1, 0), (1, 65536)]
    t = make_bilevel("wide65537", 2, 65537, 2, 128, 0, 0, perm="random", outliers=where, dtype=F16)
    t2 = make_bilevel("wide65537b", 1, 65537, 1, 128, 0, 0, outliers=[(0, 65535)], dtype=F16)
    return decode_vector({"w": t, "row": t2})


@vector(
    "bilevel-wide-65536",
    "decode",
    ["bilevel", "wide", "perm", "perm-u16-max"],
    _BILEVEL_CORE + ["C-5.7", "C-7.4"],
    "1x65536 with a permutation (the widest n whose entries fit 16 bits)",
)
def _wide16():
    return decode_vector(
        {"w": make_bilevel("wide65536", 1, 65536, 1, 128, 0, 0, perm="reverse", dtype=F16)}
    )


def _many(count: int, key: str) -> dict:
    out = {}
    for i in range(count):
        r = rng(f"{key}/{i}")
        kind = i % 3
        name = f"layers.{i // 3}.{['w', 'b', 'q'][kind]}"
        if kind == 1:
            out[name] = (r.randint(-1000, 1000, size=int(r.randint(0, 9))) / 8).astype(np.float16)
        else:
            m, n = int(r.randint(1, 20)), int(r.randint(1, 40))
            out[name] = make_bilevel(
                f"{key}/{i}/t",
                m,
                n,
                int(r.randint(1, 9)),
                int(r.randint(1, 20)),
                int(r.randint(0, 4)),
                int(r.randint(1, 8)),
                dtype=DType(1 + i % 3),
                perm="random" if i % 4 == 0 else None,
                outliers=0.05 if i % 5 == 0 else None,
            )
            if out[name].params.stats_bits == 0:
                t = out[name]
                out[name] = make_bilevel(
                    f"{key}/{i}/t",
                    m,
                    n,
                    t.params.bits,
                    t.params.group_size,
                    0,
                    0,
                    dtype=t.dtype,
                    perm=t.perm,
                    outliers=0.05 if i % 5 == 0 else None,
                )
    return out


@vector(
    "container-many-tensors",
    "decode",
    ["container", "many-tensors", "raw", "bilevel"],
    _BILEVEL_CORE + ["C-2.6", "C-2.8", "C-2.10", "C-4.1"],
    "60 tensors, raw and bilevel mixed, random parameters",
)
def _many_fast():
    return decode_vector(_many(60, "many"))


_UNICODE_NAMES = [
    "模型.层.0.权重",
    "🦙/λ.weight",
    "caf\u00e9",  # NFC
    "cafe\u0301",  # NFD: a different byte string, a different name
    'a b "quoted" \\ back/slash',
    "\u05e9\u05dc\u05d5\u05dd.\u0645\u0631\u062d\u0628\u0627",
    "x",
    "\u00e9" * 512,  # exactly 1024 bytes
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010fffd",
]


@vector(
    "container-unicode-names",
    "decode",
    ["container", "names", "unicode", "name-1024-bytes"],
    ["C-2.10", "C-2.1"],
    "names in CJK, emoji, RTL scripts, NFC and NFD forms of the same word (two different "
    "names), quotes and backslashes, a 1024-byte name, U+10FFFD",
)
def _unicode_names():
    r = rng("names")
    t = {}
    for i, name in enumerate(_UNICODE_NAMES):
        if i % 2:
            t[name] = (r.randint(-99, 99, size=3) / 4).astype(np.float32)
        else:
            t[name] = make_bilevel(f"name{i}", 3, 9, 2, 4, 0, 0, dtype=F16)
    return decode_vector(t)


_META_PRETTY = (
    '{\n  "user.z": {"Nested Key": [1, 2.5e-3, -0, 1e308, 18446744073709551617, true, null]},\n'
    '  "model.architecture": "caf\u00e9 \U0001f999 \\u00e9\\ud83e\\udd99 \\"q\\" \\/",\n'
    '  "provenance.tool": "elsewhere", "zz.unknown_namespace.key": {}, "a.b": []\n}'
)


def _deep(depth: int) -> str:
    s = "1"
    for i in range(depth - 1):
        s = f'{{"k{i}": {s}}}' if i % 2 else f"[{s}]"
    return '{"user.deep": ' + s + "}"


@vector(
    "container-metadata",
    "decode",
    ["container", "metadata", "unicode", "metadata-depth-32", "unknown-keys"],
    ["C-2.11"],
    "metadata that is valid but not canonical: white space, unsorted keys, raw UTF-8 and "
    "\\u escapes (surrogate pairs), big and tiny numbers, unknown namespaces; must be "
    "ignored by decoding",
)
def _metadata():
    def meta(im):
        im.metadata = _META_PRETTY.encode("utf-8")

    return decode_vector({"w": np.ones(3, np.float32)}, transform=meta)


@vector(
    "container-metadata-depth-32",
    "decode",
    ["container", "metadata", "metadata-depth-32"],
    ["C-2.11"],
    "metadata nested exactly 32 deep (objects and arrays; the top-level object is depth 1)",
)
def _metadata_deep():
    def meta(im):
        im.metadata = _deep(32).encode()

    return decode_vector({"w": np.ones(2, np.float16)}, transform=meta)


@vector(
    "container-metadata-empty-object",
    "decode",
    ["container", "metadata"],
    ["C-2.11"],
    "metadata_length 2: the empty object {}",
)
def _metadata_empty():
    def meta(im):
        im.metadata = b"{}"

    return decode_vector({"w": np.ones(2, np.float16)}, transform=meta)


@vector(
    "container-empty",
    "decode",
    ["container", "no-tensors"],
    ["C-1.3", "C-2.1", "C-2.2", "C-2.8"],
    "no tensors, no metadata: a 64-byte file",
)
def _empty():
    return decode_vector({})


@vector(
    "container-metadata-only",
    "decode",
    ["container", "no-tensors", "metadata"],
    ["C-2.2", "C-2.8", "C-2.11"],
    "no tensors, only metadata; header padding to 64 bytes",
)
def _meta_only():
    return decode_vector({}, metadata={"user.note": "only metadata", "model.source": "none"})


for _a in (128, 4096, 65536):
    vector(
        f"container-alignment-{_a}",
        "decode",
        ["container", "alignment"],
        ["C-1.3", "C-2.2", "C-2.8"],
        f"alignment {_a}: raw and bilevel sections each on a {_a}-byte boundary",
    )(
        lambda a=_a: decode_vector(
            {
                "a": np.arange(5, dtype=np.float32),
                "w": make_bilevel(
                    f"align{a}", 5, 20, 3, 8, 2, 4, perm="random", outliers=0.1, dtype=F32
                ),
            },
            alignment=a,
        )
    )

for _minor in (1, 65535):
    vector(
        f"container-minor-version-{_minor}",
        "decode",
        ["container", "version"],
        ["C-2.4", "C-13.1"],
        f"version 1.{_minor}: a reader of 1.0 must accept any minor version of major 1",
    )(
        lambda v=_minor: decode_vector(
            {"w": make_bilevel(f"minor{v}", 3, 9, 3, 4, 0, 0, dtype=F32)},
            transform=lambda im: setattr(im, "version_minor", v),
        )
    )


@vector(
    "container-zero-length-sections",
    "decode",
    ["container", "zero-size", "raw"],
    ["C-2.8", "C-4.1"],
    "zero-size raw tensors between others: sections of length 0 that share their offset with "
    "the next section",
)
def _zero_len():
    return decode_vector(
        {
            "z0": np.zeros(0, np.float32),
            "a": np.arange(3, dtype=np.float16),
            "z1": np.zeros((2, 0), np.float16),
            "z2": np.zeros((0,), np.float32),
            "b": np.arange(2, dtype=np.float32),
            "z3": np.zeros((0, 5), np.float16),
        }
    )


@vector(
    "bilevel-rounding-edges",
    "decode",
    ["bilevel", "rounding", "ties", "subnormal", "signed-zero", "float16", "bfloat16"],
    _BILEVEL_CORE,
    "values built to be exact ties of float16 and bfloat16 rounding (round half to even), "
    "float16 subnormal results, negative zero from a negative scale",
)
def _rounding():
    t = {}
    # bfloat16 ties: s = 1, q - z = 1 + k * 2^-8, exact in f32; odd k is a tie of bf16.
    # float16 ties: s = 1.5, q - z = 1 + k * 2^-10: v = 1.5 + k * 2^-10 + k * 2^-11, odd k ties.
    for dt, scale, step in ((BF16, 1.0, 2.0**-8), (F16, 1.5, 2.0**-10)):
        m, n = 4, 16
        b = make_bilevel(f"ties/{dt.name}", m, n, 4, 1, 0, 0, dtype=dt)
        ks = np.arange(m * n).reshape(m, n)
        z64 = 3 - (1 + ks * step)
        z = z64.astype(np.float16)
        assert np.array_equal(z.astype(np.float64), z64)
        b.codes = np.full((m, n), 3, np.uint8)
        b.stats = np.stack([np.full((m, n), scale, np.float16), z], axis=-1)
        t[f"ties.{spec.DTYPE_NAMES[dt]}"] = b
    # subnormal float16 results: s = 2^-20, q - z small
    b = make_bilevel("sub", 4, 16, 8, 16, 0, 0, dtype=F16)
    b.stats[..., 0] = np.float16(2.0**-20)
    t["subnormal.float16"] = b
    # negative zero: negative scale times (q - z) = 0
    b = make_bilevel("negzero", 2, 8, 3, 8, 0, 0, dtype=F32)
    b.codes[:] = 5
    b.stats[..., 0] = np.float16(-1.5)
    b.stats[..., 1] = np.float16(5.0)
    t["negzero.float32"] = b
    b16 = make_bilevel("negzero16", 2, 8, 3, 8, 0, 0, dtype=BF16)
    b16.codes, b16.stats = b.codes.copy(), b.stats.copy()
    t["negzero.bfloat16"] = b16
    return decode_vector(t)


@vector(
    "bilevel-padding-ignored",
    "decode",
    ["bilevel", "padding"],
    ["C-5.2"],
    "the unused high bit of the last word of codes (and of bilevel stats) is set; decoders "
    "must ignore padding bits (the CRC covers them, the digest does not)",
)
def _padding():
    # 3x5 with 3-bit codes and 2-bit stats: bits that do not fill the last word in any layout
    t = {"w": make_bilevel("pad", 3, 5, 3, 4, 2, 2, dtype=F32)}
    data = write_spqr(t)
    im = img.parse(data)
    lf.set_codes_padding_bit(im.tensor("w"))
    lf.set_stats_padding_bit(im.tensor("w"))
    out = im.to_bytes()
    assert decode_all(out)["w"][1].tobytes() == decode_all(data)["w"][1].tobytes()
    return Built({"input.spqr": out, "expected.safetensors": expected_file(out, t)})


# ---------------------------------------------------------------------------------------------
# Matvec vectors
# ---------------------------------------------------------------------------------------------
_MV = ["C-7.6"] + _BILEVEL_CORE


def _mv(id, labels, desc, tensors_fn, suite="fast", clauses=()):
    vector(id, "matvec", ["matvec", *labels], _MV + list(clauses), desc, suite=suite)(
        lambda: matvec_vector(tensors_fn(), id)
    )


_mv(
    "matvec-spqr-3bit",
    ["spqr-3bit", "perm", "outliers"],
    "SpQR 3-bit: b3 g16 sb3 S16, permutation, 1 % outliers; 64x96 and 50x130 (tails)",
    lambda: {
        "a": make_bilevel("mv3a", 64, 96, 3, 16, 3, 16, perm="random", outliers=0.01),
        "b": make_bilevel("mv3b", 50, 130, 3, 16, 3, 16, perm="random", outliers=0.01),
    },
    clauses=["C-6.1", "C-6.2", "C-7.3", "C-7.4"],
)
_mv(
    "matvec-spqr-4bit",
    ["spqr-4bit", "perm", "outliers"],
    "SpQR 4-bit: b4 g16 sb3 S16, permutation, 2 % outliers; 48x160",
    lambda: {"w": make_bilevel("mv4", 48, 160, 4, 16, 3, 16, perm="random", outliers=0.02)},
    clauses=["C-6.1", "C-6.2", "C-7.3", "C-7.4"],
)
_mv(
    "matvec-gptq-4bit-g128",
    ["gptq", "fp16-stats", "perm"],
    "GPTQ 4-bit g128 with fp16 statistics and act-order permutation; 32x384",
    lambda: {"w": make_bilevel("mvg", 32, 384, 4, 128, 0, 0, perm="random")},
    clauses=["C-7.4"],
)
_mv(
    "matvec-bits",
    ["bits-1", "bits-2", "bits-8", "group-1", "group-3"],
    "1-, 2- and 8-bit codes, group sizes 1, 3 and 32, with tails; 24x100",
    lambda: {
        "b1": make_bilevel("mvb1", 24, 100, 1, 32, 0, 0),
        "b2": make_bilevel("mvb2", 24, 100, 2, 3, 2, 5),
        "b8": make_bilevel("mvb8", 24, 100, 8, 1, 0, 0),
    },
)
_mv(
    "matvec-outlier-rows",
    ["outliers-whole-rows", "outliers"],
    "rows made entirely of outliers next to rows without any; 40x64",
    lambda: {"w": make_bilevel("mvor", 40, 64, 3, 16, 2, 16, outliers="rows", perm="random")},
    clauses=["C-6.1", "C-6.2", "C-7.3", "C-7.4"],
)
_mv(
    "matvec-wide",
    ["wide", "gt-65536-columns", "skips", "perm"],
    "4x70000 with a permutation and outliers 66,000 columns apart (skips)",
    lambda: {
        "w": make_bilevel(
            "mvwide",
            4,
            70000,
            3,
            128,
            0,
            0,
            perm="random",
            outliers=[(0, 5), (0, 66005), (2, 69999), (3, 0)],
        )
    },
    clauses=["C-6.1", "C-6.2", "C-7.3", "C-7.4"],
)


# ---------------------------------------------------------------------------------------------
# Full suite: large vectors, generated on demand
# ---------------------------------------------------------------------------------------------
@vector(
    "full-wide-131073",
    "decode",
    ["bilevel", "wide", "gt-65536-columns", "skips", "perm", "large"],
    _OUT + ["C-5.7", "C-7.4"],
    "64x131073 (more than 2^17 columns), SpQR 3-bit with a permutation, 0.5 % outliers and "
    "rows with gaps over 65,535 columns",
    suite="full",
)
def _full_wide():
    t = make_bilevel("fullwide", 64, 131073, 3, 16, 3, 16, perm="random", outliers=0.005, dtype=F16)
    return decode_vector({"w": t})


@vector(
    "full-tall-70000",
    "decode",
    ["bilevel", "tall", "large", "outliers"],
    _OUT,
    "70000x24: more than 65,536 rows, 4-bit codes, 2-bit statistics in 16-row tiles, 1 % outliers",
    suite="full",
)
def _full_tall():
    return decode_vector(
        {"w": make_bilevel("fulltall", 70000, 24, 4, 8, 2, 16, outliers=0.01, dtype=BF16)}
    )


@vector(
    "full-many-tensors",
    "decode",
    ["container", "many-tensors", "large"],
    _BILEVEL_CORE + ["C-2.6", "C-2.8", "C-2.10", "C-4.1"],
    "1500 tensors, raw and bilevel mixed",
    suite="full",
)
def _full_many():
    return decode_vector(_many(1500, "manyfull"))


_mv(
    "full-matvec-wide",
    ["wide", "gt-65536-columns", "large", "perm", "outliers"],
    "16x131073 SpQR 3-bit with a permutation and 0.5 % outliers",
    lambda: {"w": make_bilevel("fullmv", 16, 131073, 3, 16, 3, 16, perm="random", outliers=0.005)},
    suite="full",
    clauses=["C-6.1", "C-6.2", "C-7.3", "C-7.4"],
)
_mv(
    "full-matvec-4096",
    ["spqr-3bit", "large", "perm", "outliers"],
    "1024x4096 SpQR 3-bit with a permutation and 1 % outliers (a real layer's width)",
    lambda: {
        "w": make_bilevel("fullmv4096", 1024, 4096, 3, 16, 3, 16, perm="random", outliers=0.01)
    },
    suite="full",
    clauses=["C-6.1", "C-6.2", "C-7.3", "C-7.4"],
)


from spqr_format.conformance import (  # noqa: E402,F401  (registers channel_mixed vectors)
    channel_mixed_vectors as _cmv,
)
from spqr_format.conformance import rejects as _rejects  # noqa: E402,F401  (registers rejects)


def manifest_entry(v: VectorSpec, built: Built) -> dict:
    entry = {
        "id": v.id,
        "kind": v.kind,
        "suite": v.suite,
        "spec_version": v.spec_version,
        "labels": v.labels,
        "clauses": sorted(set(v.clauses), key=_clause_key),
        "description": v.description,
        "files": {
            name: {"sha256": manifest.sha256(data), "bytes": len(data)}
            for name, data in sorted(built.files.items())
        },
    }
    entry.update(built.expect)
    return entry


def _clause_key(c: str):
    major, minor = c[2:].split(".")
    return (int(major), int("".join(ch for ch in minor if ch.isdigit())), minor)


def write_vector(directory, built: Built) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, data in built.files.items():
        tmp = os.path.join(directory, f".{name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(directory, name))


def generate(root, cache=None, *, ids=None, progress=None) -> dict:
    """Build every vector: fast ones into ``root/vectors/<id>``, full ones into ``cache``,
    and write ``root/manifest.json``. Directories of vectors that no longer exist are removed.
    Returns the manifest."""
    import shutil
    from pathlib import Path

    root = Path(root)
    cache = Path(cache) if cache is not None else manifest.default_cache()
    entries = []
    for v in REGISTRY:
        built = v.build()
        directory = (root / "vectors" if v.suite == "fast" else cache) / v.id
        write_vector(directory, built)
        entries.append(manifest_entry(v, built))
        if progress:
            progress(v.id)
    known = {v.id for v in REGISTRY if v.suite == "fast"}
    vec_root = root / "vectors"
    for d in sorted(vec_root.iterdir()) if vec_root.exists() else []:
        if d.is_dir() and d.name not in known:
            shutil.rmtree(d)
    doc = {
        "schema": manifest.SCHEMA,
        "spec_version": spec.SPEC_VERSION,
        "generator": "spqr_format.conformance.generate",
        "tolerance": dict(TOLERANCE),
        "untestable": list(manifest.UNTESTABLE),
        "vectors": entries,
    }
    manifest.dump(doc, root)
    return doc


def check(root, *, suite="fast", out=None, progress=None) -> list[str]:
    """Rebuild the vectors of ``suite`` (into ``out``, default a temporary directory) and
    compare every file's sha256 with the committed manifest. Returns the mismatches."""
    import tempfile as _tf
    from pathlib import Path

    doc = manifest.load(Path(root))
    listed = {v["id"]: v for v in doc["vectors"]}
    problems = []
    wanted = [v for v in REGISTRY if suite == "full" or v.suite == "fast"]
    for v in wanted:
        if v.id not in listed:
            problems.append(f"{v.id}: built by the generator but not in the manifest")
    for vid, v in listed.items():
        if (suite == "full" or v["suite"] == "fast") and vid not in by_id():
            problems.append(f"{vid}: in the manifest but the generator has no such vector")
    with _tf.TemporaryDirectory() as tmp:
        base = Path(out) if out is not None else Path(tmp)
        for v in wanted:
            if v.id not in listed:
                continue
            built = v.build()
            if out is not None:
                write_vector(base / v.id, built)
            want = listed[v.id]["files"]
            got = {n: manifest.sha256(d) for n, d in built.files.items()}
            if set(got) != set(want):
                problems.append(f"{v.id}: files {sorted(got)} != manifest {sorted(want)}")
            for name in sorted(set(got) & set(want)):
                if got[name] != want[name]["sha256"]:
                    problems.append(f"{v.id}/{name}: rebuilt sha256 differs from the manifest")
            if progress:
                progress(v.id)
    return problems


def ensure_full(root, cache, doc: dict, progress=None) -> list[str]:
    """Make sure every ``full`` vector of ``doc`` is in ``cache`` with the committed hashes,
    building the missing or stale ones. Returns problems (hash mismatches after building)."""
    from pathlib import Path

    problems = []
    specs_by_id = by_id()
    for v in doc["vectors"]:
        if v["suite"] != "full":
            continue
        directory = Path(cache) / v["id"]
        if not manifest.check_files(directory, v):
            continue
        if v["id"] not in specs_by_id:
            problems.append(f"{v['id']}: no builder for this full vector")
            continue
        if progress:
            progress(v["id"])
        write_vector(directory, specs_by_id[v["id"]].build())
        problems += manifest.check_files(directory, v)
    return problems


def specs(suite: str = "full") -> list[VectorSpec]:
    """The vectors of a suite (``full`` includes ``fast``), in registry order."""
    return [v for v in REGISTRY if suite == "full" or v.suite == "fast"]


def by_id() -> dict[str, VectorSpec]:
    return {v.id: v for v in REGISTRY}


__all__ = ["REGISTRY", "TOLERANCE", "Built", "VectorSpec", "specs", "by_id", "struct", "Role"]
