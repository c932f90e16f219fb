"""Structure-aware mutation of .spqr files, shared by the atheris target (fuzz_reader.py) and
the bounded hypothesis fuzz of the normal suite (tests/test_fuzz_structure.py).

Seeds are generated at start from the public API (spqr_format.api.save with tensors from the
encoders), never committed as binary files, so they follow the current layout of every
encoding. A mutation changes bytes in ways that aim at fields (tensor and section records,
dims, counts, params, metadata, section contents), then usually FIXES UP the section CRCs and
the header CRC so that the change reaches the checks behind them.

``check_bytes`` is the property: opening the bytes as a .spqr file through the public API,
listing every tensor, reading, decoding (in every dtype) and verifying each one raises
nothing but :class:`~spqr_format.errors.SpqrError`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import spqr_bytes as sb  # noqa: E402  (tests/spqr_bytes.py)

INTERESTING_U64 = (
    0, 1, 2, 7, 8, 63, 64, 65, 127, 128, 255, 256, 4095, 4096, 65535, 65536, 65537,
    2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**40 + 1, 2**48, 2**63 - 1, 2**63, 2**64 - 1,
)  # fmt: skip
INTERESTING_JSON = (
    b"", b"{}", b"[]", b"null", b"1e999", b'{"a.b":1e999}', b'{"a.b":-1e400}',
    b'{"a.b":1' + b"0" * 400 + b"}", b'{"a.b":[' + b"[]," * 200 + b"[]]}",
    b'{"a.b":' + b"[" * 40 + b"]" * 40 + b"}", b'{"a.b":{"x":' * 20 + b"1" + b"}" * 20 + b"}",
    b'\xef\xbb\xbf{"a.b":1}', b'{"a.b":1,"a.b":2}', b'{"a.b":{"a":1,"\\u0061":2}}',
    b'{"a.bX":1}', b'{"Xa.b":1}', b'{"a.b":"\\ud800"}', b'{"a.b":"\\udc00x"}',
    b'{"a.b":"\\ud800\\udc00"}', b'{"a.b":NaN}', b'{"a.b":Infinity}', b'{"a.b":-0.0}',
    b'{"a.b":"\\u0000"}', b'{"a.b":1}   ', b'{"a.b":1}x', b'{"a.b":"\xff"}',
    b'{"a.b":' + b'"' + b"\\\\" * 30 + b'"}', b'{"a.b":[1,2,3,{"k":[true,false,null]}]}',
)  # fmt: skip
NAMES = ("w", "\u202eevil", "a\x85b", "\u2066x", "ok.name", "x" * 1024, "\u061c", "\ud800")


def build_seeds() -> list[bytes]:
    """Small valid files covering raw (f32/f16/bf16, 0-d, empty), bilevel (fp16 and
    two-level statistics, permutation, outliers, a > 65,535-column gap, tails) and metadata."""
    from spqr_format import api
    from spqr_format.codec.rtn import encode_rtn
    from spqr_format.spec import DType

    rng = np.random.default_rng(16)
    w = rng.standard_normal((6, 37)).astype(np.float32)
    t1 = encode_rtn(w, bits=3, group_size=16, stats_bits=3, stats_group_size=4,
                    outlier_fraction=0.05)  # fmt: skip
    t1 = dataclasses.replace(t1, perm=rng.permutation(37).astype(np.uint32))
    t2 = encode_rtn(w[:3, :20], bits=4, group_size=7, dtype=DType.BFLOAT16)
    t3 = encode_rtn(w[:2, :9], bits=1, group_size=128, stats_bits=8, stats_group_size=16,
                    outlier_fraction=0.2, dtype=DType.FLOAT32)  # fmt: skip
    wide = np.zeros((1, 70_000), np.float32)
    wide[0, [3, 69_999]] = 50.0
    t4 = encode_rtn(wide, bits=2, group_size=128, outlier_fraction=2 / 70_000)
    seeds = [
        {"raw.f32": w, "q.bilevel": t1, "s": np.array(1.5, np.float32)},
        {"q.bf16": t2, "raw.f16": w[:2].astype(np.float16), "e": np.zeros((0, 4), np.float32)},
        {
            "q.f32": t3,
            "raw.bf16": api.RawTensor(DType.BFLOAT16, w[0].view(np.uint32).astype(np.uint16)),
        },  # noqa: E501
        {"q.wide": t4},
        {},
    ]
    metas = [
        {"model.arch": "llama", "user.x": [1, {"y": None, "z": "t\u00eate"}], "a.b": 1.5e300},
        None, {"k.v": "\u202e"}, None, {"x.y": [[[]]]},
    ]  # fmt: skip
    out = []
    with tempfile.TemporaryDirectory() as d:
        for i, (tensors, meta) in enumerate(zip(seeds, metas, strict=True)):
            path = os.path.join(d, f"seed{i}.spqr")
            api.save(path, tensors, metadata=meta)
            with open(path, "rb") as f:
                out.append(f.read())
    return out


def _fields(buf) -> list[tuple[int, str]]:
    """(offset, struct format) of every header field worth aiming at."""
    t, s, st_len, md_len = sb.counts(buf)
    out = [(16, "<I"), (20, "<I"), (24, "<I"), (28, "<I"), (32, "<Q"), (40, "<Q"), (48, "<Q")]
    out += [(12, "<H"), (14, "<H"), (8, "<H"), (10, "<H"), (60, "<I")]
    for i in range(min(t, 64)):
        r = sb.tensor_record(i)
        out += [(r, "<I"), (r + 4, "<I"), (r + 8, "<H"), (r + 10, "<H"), (r + 12, "<B"),
                (r + 13, "<B"), (r + 14, "<H"), (r + 16, "<I"), (r + 20, "<I")]  # fmt: skip
        out += [(r + 24 + 8 * k, "<Q") for k in range(8)]
        out += [(r + 120 + 4 * k, "<I") for k in range(10)]
        out += [(r + 120 + k, "<B") for k in range(16)]
    base = sb.FIXED + sb.TREC * t
    for j in range(min(s, 256)):
        r = base + sb.SREC * j
        out += [(r, "<Q"), (r + 8, "<Q"), (r + 16, "<I"), (r + 20, "<H"), (r + 22, "<H")]
    return [(o, f) for o, f in out if o + struct.calcsize(f) <= len(buf)]


def _rebuild(
    buf: bytearray,
    *,
    strtab: bytes | None = None,
    meta: bytes | None = None,
    name_lengths: list[int] | None = None,
) -> bytearray:
    """The file with a new string table and/or metadata: the data region moves to the new
    aligned data_offset and every section offset, name offset and length follows it."""
    t, s, st_len, md_len = sb.counts(buf)
    st_start = sb.FIXED + sb.TREC * t + sb.SREC * s
    old_strtab = bytes(buf[st_start : st_start + st_len])
    old_meta = bytes(buf[st_start + st_len : st_start + st_len + md_len])
    old_doff = struct.unpack_from("<Q", buf, 48)[0]
    align = struct.unpack_from("<I", buf, 12)[0]
    if (
        st_start + st_len + md_len > len(buf)
        or old_doff > len(buf)
        or not align
        or align & (align - 1)
    ):
        return buf
    strtab = old_strtab if strtab is None else strtab
    meta = old_meta if meta is None else meta
    hlen = st_start + len(strtab) + len(meta)
    new_doff = -(-hlen // align) * align
    out = bytearray(buf[:st_start]) + strtab + meta + bytes(new_doff - hlen) + buf[old_doff:]
    struct.pack_into("<QQQ", out, 32, len(strtab), len(meta), new_doff)
    shift = new_doff - old_doff
    for rec, off, _length, _role in sb.section_records(out):
        struct.pack_into("<Q", out, rec, (off + shift) % 2**64)
    if name_lengths is not None:
        pos = 0
        for i, n in enumerate(name_lengths):
            struct.pack_into("<II", out, sb.tensor_record(i), pos, n)
            pos += n
    return out


def _replace_metadata(buf: bytearray, new: bytes) -> bytearray:
    return _rebuild(buf, meta=new)


def _rename(buf: bytearray, rng: random.Random) -> bytearray:
    """Give one tensor another name (often a hostile one)."""
    t, s, st_len, _ = sb.counts(buf)
    st_start = sb.FIXED + sb.TREC * t + sb.SREC * s
    if t == 0 or t > 64 or st_start + st_len > len(buf):
        return buf
    names = []
    for i in range(t):
        off, n = struct.unpack_from("<II", buf, sb.tensor_record(i))
        names.append(bytes(buf[st_start + off : st_start + off + n]))
    k = rng.randrange(t)
    choice = rng.random()
    if choice < 0.2 and t > 1:
        names[k] = names[(k + 1) % t]  # a duplicate
    else:
        names[k] = rng.choice(NAMES).encode("utf-8", "surrogatepass")
    return _rebuild(buf, strtab=b"".join(names), name_lengths=[len(n) for n in names])


def mutate(data: bytes, rng: random.Random, seeds: list[bytes], max_size: int = 1 << 20) -> bytes:
    """One structure-aware mutation of ``data`` (or of a seed when ``data`` is not a file)."""
    if len(data) < sb.FIXED or data[:8] != seeds[0][:8] or rng.random() < 0.05:
        data = rng.choice(seeds)
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        try:
            buf = _mutate_once(buf, rng)
        except (struct.error, ValueError, IndexError, OverflowError):
            pass  # a mutation that no longer fits the (already mutated) bytes
    if rng.random() < 0.9:  # fix the CRCs so the mutation reaches the checks behind them
        try:
            sb.fix_all(buf)
        except struct.error:
            pass
    return bytes(buf[:max_size])


def _mutate_once(buf: bytearray, rng: random.Random) -> bytearray:
    if True:  # (one level kept so the operations read as one table)
        op = rng.randrange(11)
        fields = _fields(buf) if len(buf) >= sb.FIXED else []
        if op <= 2 and fields:  # an interesting value in a header field
            off, fmt = rng.choice(fields)
            bits = 8 * struct.calcsize(fmt)
            v = rng.choice(INTERESTING_U64) if rng.random() < 0.6 else rng.getrandbits(bits)
            if rng.random() < 0.3:
                v = struct.unpack_from(fmt, buf, off)[0] + rng.choice((-1, 1, 2, -2, 64, -64))
            struct.pack_into(fmt, buf, off, v % (1 << bits))
        elif op == 3 and len(buf):  # flip bits anywhere
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif op == 4 and len(buf):  # random bytes somewhere
            pos = rng.randrange(len(buf))
            n = rng.randint(1, 16)
            buf[pos : pos + n] = rng.randbytes(n)
        elif op == 5:  # change section contents (stats, perm, outliers, codes)
            secs = sb.section_records(buf)
            if secs:
                _, off, length, _ = rng.choice(secs)
                if length and off + length <= len(buf):
                    pos = off + rng.randrange(length)
                    width = rng.choice((1, 2, 4))
                    val = rng.choice((0, 1, 0xFF, 0x7C00, 0x7E00, 0xFC00, 0xFFFF, 0xFFFFFFFF,
                                      0x7BFF, 0x8000, rng.getrandbits(32)))  # fmt: skip
                    chunk = (val % (1 << (8 * width))).to_bytes(width, "little")
                    buf[pos : pos + width] = chunk[: max(0, min(width, off + length - pos))]
        elif op == 6:  # swap two elements inside a section (perm, outliers)
            secs = [s for s in sb.section_records(buf) if s[2] >= 8 and s[1] + s[2] <= len(buf)]
            if secs:
                _, off, length, _ = rng.choice(secs)
                w = rng.choice((2, 4))
                i, j = rng.randrange(length // w), rng.randrange(length // w)
                a, b = (
                    bytes(buf[off + i * w : off + i * w + w]),
                    bytes(buf[off + j * w : off + j * w + w]),
                )
                buf[off + i * w : off + i * w + w], buf[off + j * w : off + j * w + w] = b, a
        elif op == 7:  # new metadata
            buf = _replace_metadata(buf, rng.choice(INTERESTING_JSON))
        elif op == 8 and sb.counts(buf)[0]:  # hostile name
            buf = _rename(buf, rng)
        elif op == 9:  # truncate or extend
            if rng.random() < 0.5 and len(buf) > 1:
                del buf[rng.randrange(len(buf)) :]
            else:
                buf += bytes(rng.choice((1, 8, 64, 4096)))
        else:  # zero a dim, or make one huge, on a raw tensor (C-3.1 edge cases)
            t = sb.counts(buf)[0]
            if t:
                r = sb.tensor_record(rng.randrange(min(t, 64)))
                if r + 88 <= len(buf):
                    k = rng.randrange(8)
                    struct.pack_into("<Q", buf, r + 24 + 8 * k, rng.choice((0, 1, 2**40)))
    return buf


DTYPES = (None, "float32", "float16", "bfloat16")


def check_file(path: str) -> None:
    """Everything a user can do with a file; only SpqrError may escape (the property)."""
    from spqr_format import api
    from spqr_format.errors import SpqrError

    try:
        f = api.open_file(path)
    except SpqrError:
        return
    with f:
        _ = f.metadata, f.version, f.file_size
        infos = f.infos()
        for info in infos:
            info.to_dict()
            for step in ("read", *DTYPES, "verify"):
                try:
                    if step == "read":
                        f.read(info.name)
                    elif step == "verify":
                        f.verify(info.name)
                    else:
                        f.decode(info.name, step, verify_digest=True)
                except SpqrError:
                    pass


def check_bytes(data: bytes, directory: str | None = None) -> None:
    fd, path = tempfile.mkstemp(suffix=".spqr", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        check_file(path)
    finally:
        os.unlink(path)
