"""Container layer (SPEC section 2): round trips, writer checks, and every reader refusal.

Negative cases are hand-crafted bytes. ``craft`` below lays a file out from SPEC section 2
alone, independently of ``spqr_format.container``, and ``fix_crc`` recomputes the header CRC
(C-2.3) so that the check under test is the one that fires.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spqr_format.container import ContainerReader, ContainerWriter, SectionInfo, TensorEntry
from spqr_format.errors import SpqrError

MAGIC = b"\x89SPQR\r\n\x1a"
FIXED = struct.Struct("<8sHHIQIIQQQII")
TREC = struct.Struct("<IIHHBBHII8Q32s40s")
SREC = struct.Struct("<QQIHHQ")


# --- an independent implementation of the layout, for crafting bytes ---------------------------


def align(v: int, a: int) -> int:
    return -(-v // a) * a


def tensor(name="w", sections=((1, b"abcd"),), **kw) -> dict:
    t = dict(
        name=name.encode() if isinstance(name, str) else name,
        encoding=1,
        encoding_version=1,
        dtype=1,
        shape=(4,),
        digest=bytes(range(32)),
        params=bytes(40),
        sections=list(sections),
    )
    t.update(kw)
    return t


def canonical(meta: dict | None) -> bytes:
    if not meta:
        return b""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def craft(tensors=(), *, metadata=b"", alignment=64, version=(1, 0), features=0) -> bytearray:
    """A file laid out per SPEC C-2.1 .. C-2.10 (no validation: tests break rules on purpose)."""
    secs = [s for t in tensors for s in t["sections"]]
    strtab = b"".join(t["name"] for t in tensors)
    hlen = 64 + 160 * len(tensors) + 32 * len(secs) + len(strtab) + len(metadata)
    doff = align(hlen, alignment)
    data = bytearray()
    srecs = b""
    for i, (role, payload) in enumerate(secs):
        if i:
            data += bytes(align(len(data), alignment) - len(data))
        srecs += SREC.pack(doff + len(data), len(payload), zlib.crc32(payload), role, 0, 0)
        data += payload
    trecs = b""
    name_off = first = 0
    for t in tensors:
        dims = tuple(t["shape"]) + (0,) * (8 - len(t["shape"]))
        trecs += TREC.pack(
            name_off,
            len(t["name"]),
            t["encoding"],
            t["encoding_version"],
            t["dtype"],
            len(t["shape"]),
            0,
            first,
            len(t["sections"]),
            *dims,
            t["digest"],
            t["params"],
        )
        name_off += len(t["name"])
        first += len(t["sections"])
    fixed = FIXED.pack(
        MAGIC,
        *version,
        alignment,
        features,
        len(tensors),
        len(secs),
        len(strtab),
        len(metadata),
        doff,
        0,
        0,
    )
    buf = bytearray(fixed + trecs + srecs + strtab + metadata)
    buf += bytes(doff - hlen) + data
    return fix_crc(buf)


def header_len(buf) -> int:
    t, s = struct.unpack_from("<II", buf, 24)
    st_len, md_len = struct.unpack_from("<QQ", buf, 32)
    return 64 + 160 * t + 32 * s + st_len + md_len


def fix_crc(buf: bytearray) -> bytearray:
    """Recompute header_crc32 (C-2.3: bytes 56..59 taken as zero)."""
    hlen = min(header_len(buf), len(buf))
    crc = zlib.crc32(bytes(buf[:56]) + b"\0\0\0\0" + bytes(buf[60:hlen]))
    struct.pack_into("<I", buf, 56, crc)
    return buf


def t_off(i: int) -> int:
    return 64 + 160 * i


def s_off(buf, j: int) -> int:
    return 64 + 160 * struct.unpack_from("<I", buf, 24)[0] + 32 * j


def sec_at(buf, j: int) -> int:
    """The offset field of section record ``j``."""
    return struct.unpack_from("<Q", buf, s_off(buf, j))[0]


def put(buf: bytearray, fmt: str, offset: int, *values, crc: bool = True) -> bytearray:
    struct.pack_into(fmt, buf, offset, *values)
    return fix_crc(buf) if crc else buf


def outcome(tmp_path, buf, *, read: bool = True) -> str:
    """'OK' or the error code of opening ``buf`` (and reading every section when ``read``)."""
    path = tmp_path / "crafted.spqr"
    path.write_bytes(bytes(buf))
    try:
        with ContainerReader(path) as r:
            if read:
                for t in r.tensors:
                    for s in t.sections:
                        r.section_bytes(t, s.role)
    except SpqrError as exc:
        assert exc.path == str(path), exc
        return exc.code
    return "OK"


TWO = [
    tensor("layer.0.w", [(2, b"codes" * 20), (3, b"stats"), (5, b"")], encoding=2, shape=(3, 4)),
    tensor("layer.1.w", [(1, b"\x01" * 70)]),
]


def two(**kw) -> bytearray:
    return craft(TWO, metadata=canonical({"model.name": "x"}), **kw)


def write(path, tensors, *, metadata=None, alignment=64) -> None:
    with ContainerWriter(path, metadata=metadata, alignment=alignment) as w:
        for t in tensors:
            w.add_tensor(
                t["name"].decode(),
                encoding=t["encoding"],
                encoding_version=t["encoding_version"],
                dtype=t["dtype"],
                shape=t["shape"],
                params=t["params"],
                sections=t["sections"],
                digest=t["digest"],
            )


# --- round trips -------------------------------------------------------------------------------


def test_round_trip_and_writer_matches_independent_layout(tmp_path):
    meta = {"model.name": "x"}
    write(tmp_path / "a.spqr", TWO, metadata=meta)
    raw = (tmp_path / "a.spqr").read_bytes()
    assert raw == bytes(craft(TWO, metadata=canonical(meta)))
    with ContainerReader(tmp_path / "a.spqr") as r:
        assert r.version == (1, 0) and r.alignment == 64 and r.required_features == 0
        assert r.metadata == meta and r.file_size == len(raw) and len(r) == 2
        e = r.entry("layer.0.w")
        assert isinstance(e, TensorEntry) and e.index == 0 and e.shape == (3, 4)
        assert e.encoding == 2 and e.encoding_version == 1 and e.dtype == 1
        assert e.digest == bytes(range(32)) and e.params == bytes(40) and e.roles == (2, 3, 5)
        assert all(isinstance(s, SectionInfo) and s.offset % 64 == 0 for s in e.sections)
        assert bytes(r.section_bytes(e, 2)) == b"codes" * 20
        assert bytes(r.section_bytes("layer.0.w", 5)) == b""
        view = r.section_bytes(r.tensors[1], 1)
        assert view.readonly and bytes(view) == b"\x01" * 70
        assert "layer.1.w" in r and "nope" not in r


def test_zero_tensors(tmp_path):
    write(tmp_path / "e.spqr", [])
    raw = (tmp_path / "e.spqr").read_bytes()
    assert len(raw) == 64 and raw == bytes(craft([]))  # ends at data_offset (C-2.8)
    with ContainerReader(tmp_path / "e.spqr") as r:
        assert r.tensors == [] and r.metadata == {}


def test_zero_length_sections_everywhere(tmp_path):
    ts = [tensor("a", [(1, b"")]), tensor("b", []), tensor("c", [(2, b"x"), (7, b"")])]
    write(tmp_path / "z.spqr", ts)
    raw = (tmp_path / "z.spqr").read_bytes()
    assert raw == bytes(craft(ts))
    with ContainerReader(tmp_path / "z.spqr") as r:
        c = r.entry("c")
        assert c.sections[1].offset == align(c.sections[0].offset + 1, 64) == r.file_size
        assert [bytes(r.section_bytes(t, s.role)) for t in r.tensors for s in t.sections] == [
            b"",
            b"x",
            b"",
        ]


def test_unicode_names_numpy_buffers_and_alignment_4096(tmp_path):
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    b = np.array(3.5, dtype=np.float32)  # 0-d
    with ContainerWriter(tmp_path / "u.spqr", alignment=4096) as w:
        w.add_tensor(
            "模型.层.0 ünï 🙂",
            encoding=1,
            encoding_version=1,
            dtype=2,
            shape=(3, 4),
            params=bytes(40),
            sections=[(1, a)],
            digest=bytes(32),
        )
        w.add_tensor(
            "scalar",
            encoding=1,
            encoding_version=1,
            dtype=1,
            shape=(),
            params=bytearray(40),
            sections=[(1, memoryview(b))],
            digest=bytes(32),
        )
    with ContainerReader(tmp_path / "u.spqr") as r:
        assert r.alignment == 4096 and r.entry("scalar").shape == ()
        assert all(s.offset % 4096 == 0 for t in r.tensors for s in t.sections)
        got = np.frombuffer(r.section_bytes("模型.层.0 ünï 🙂", 1), dtype="<f2").reshape(3, 4)
        np.testing.assert_array_equal(got, a)
        assert np.frombuffer(r.section_bytes("scalar", 1), "<f4")[0] == 3.5


def test_determinism(tmp_path):
    meta = {"user.z": 1, "model.arch": {"b": [1, 2.5, None, True], "a": "é"}}
    for name in ("one.spqr", "two.spqr"):
        write(tmp_path / name, TWO, metadata=dict(reversed(list(meta.items()))))
    assert (tmp_path / "one.spqr").read_bytes() == (tmp_path / "two.spqr").read_bytes()
    with ContainerReader(tmp_path / "one.spqr") as r:
        assert r.metadata == meta


def test_set_metadata_replaces_and_empty_means_none(tmp_path):
    with ContainerWriter(tmp_path / "m.spqr", metadata={"a.b": 1}) as w:
        w.set_metadata({})
    assert (tmp_path / "m.spqr").read_bytes() == bytes(craft([]))


# C-2.10: C0, DEL, C1 and the bidi formatting characters.
_FORBIDDEN_NAME_CHAR = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
_names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x7f"),
    min_size=1,
    max_size=12,
).filter(lambda s: not _FORBIDDEN_NAME_CHAR.search(s))
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.text(max_size=5),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3)
    ),
    max_leaves=8,
)
_tensor = st.fixed_dictionaries(
    {
        "roles": st.sets(st.integers(1, 7), max_size=7),
        "payload": st.binary(max_size=200),
        "shape": st.lists(st.integers(0, 6), max_size=8),
        "dtype": st.sampled_from([1, 2, 3]),
        "encoding": st.integers(1, 0xFFFF),
    }
)


@settings(
    derandomize=True,
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    names=st.lists(_names, unique=True, max_size=4),
    specs=st.lists(_tensor, min_size=4, max_size=4),
    meta=st.dictionaries(
        st.from_regex(r"[a-z0-9_]{1,4}(\.[a-z0-9_]{1,4}){1,2}", fullmatch=True), _json, max_size=3
    ),
    alignment=st.sampled_from([64, 128, 4096]),
)
def test_round_trip_property(tmp_path, names, specs, meta, alignment):
    ts = [
        tensor(
            n,
            [(r, sp["payload"][: 17 * r]) for r in sorted(sp["roles"])],
            shape=tuple(sp["shape"]),
            dtype=sp["dtype"],
            encoding=sp["encoding"],
        )
        for n, sp in zip(names, specs, strict=False)
    ]
    path = tmp_path / "p.spqr"
    write(path, ts, metadata=meta, alignment=alignment)
    # C-13.1: a file holding a channel_mixed tensor (encoding 3) is marked 1.1
    version = (1, 1) if any(t["encoding"] == 3 for t in ts) else (1, 0)
    expect = craft(ts, metadata=canonical(meta), alignment=alignment, version=version)
    assert path.read_bytes() == bytes(expect)
    with ContainerReader(path) as r:
        assert r.metadata == meta
        for t, e in zip(ts, r.tensors, strict=True):
            assert e.name.encode() == t["name"] and e.shape == tuple(t["shape"])
            for role, payload in t["sections"]:
                assert bytes(r.section_bytes(e, role)) == payload


# --- writer: atomicity, streaming, lifetime ----------------------------------------------------


def test_exception_inside_with_keeps_destination_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "keep.spqr"
    dest.write_bytes(b"precious")
    with pytest.raises(RuntimeError):
        with ContainerWriter(dest) as w:
            w.add_tensor(
                "a",
                encoding=1,
                encoding_version=1,
                dtype=1,
                shape=(1,),
                params=bytes(40),
                sections=[(1, b"abcd")],
                digest=bytes(32),
            )
            raise RuntimeError("boom")
    assert dest.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["keep.spqr"]


def test_failed_replace_keeps_destination(tmp_path, monkeypatch):
    dest = tmp_path / "keep.spqr"
    dest.write_bytes(b"precious")
    w = ContainerWriter(dest)

    def broken_replace(src, dst):
        raise OSError(errno.EIO, "simulated")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(SpqrError) as info:
        w.close()
    assert info.value.code == "E_IO" and str(dest) in str(info.value)
    assert dest.read_bytes() == b"precious" and os.listdir(tmp_path) == ["keep.spqr"]
    with pytest.raises(SpqrError, match="aborted"):
        w.add_tensor(
            "a",
            encoding=1,
            encoding_version=1,
            dtype=1,
            shape=(1,),
            params=bytes(40),
            sections=[],
            digest=bytes(32),
        )


def test_copy_fallbacks_give_identical_bytes(tmp_path, monkeypatch):
    write(tmp_path / "fast.spqr", TWO)

    def nope(*args, **kwargs):
        raise OSError(errno.ENOSYS, "simulated")

    monkeypatch.setattr(os, "copy_file_range", nope, raising=False)
    write(tmp_path / "sendfile.spqr", TWO)
    monkeypatch.setattr(os, "sendfile", nope, raising=False)
    write(tmp_path / "plain.spqr", TWO)
    fast, send, plain = (
        (tmp_path / f"{n}.spqr").read_bytes() for n in ("fast", "sendfile", "plain")
    )
    assert fast == send == plain


def test_dropped_writer_removes_spool_and_close_is_idempotent(tmp_path):
    w = ContainerWriter(tmp_path / "x.spqr")
    assert len(os.listdir(tmp_path)) == 1  # the spool, a hidden file beside the destination
    del w
    gc.collect()
    assert os.listdir(tmp_path) == []
    w = ContainerWriter(tmp_path / "x.spqr")
    w.close()
    w.close()
    w.abort()  # after a successful close: nothing to discard, file stays
    assert os.listdir(tmp_path) == ["x.spqr"]


# --- writer refusals (E_BAD_INPUT naming the tensor) -------------------------------------------

GOOD = dict(
    encoding=1,
    encoding_version=1,
    dtype=1,
    shape=(2,),
    params=bytes(40),
    sections=[(1, b"12345678")],
    digest=bytes(32),
)
BIG_ENDIAN = np.arange(4, dtype=">f4")
STRIDED = np.arange(8, dtype="<f4")[::2]


@pytest.mark.parametrize(
    "name,changes",
    [
        ("", {}),
        ("a\x00b", {}),
        ("tab\tname", {}),
        ("del\x7f", {}),
        ("x" * 1025, {}),
        ("lone\ud800", {}),
        (b"bytes", {}),
        ("t", {"shape": (1,) * 9}),
        ("t", {"shape": (2**40 + 1,)}),
        ("t", {"shape": (2**24, 2**24, 2)}),
        ("t", {"shape": (-1,)}),
        ("t", {"shape": (1.5,)}),
        ("t", {"params": bytes(39)}),
        ("t", {"digest": bytes(31)}),
        ("t", {"dtype": 9}),
        ("t", {"encoding": 0}),
        ("t", {"encoding": 70000}),
        ("t", {"sections": [(2, b""), (1, b"")]}),
        ("t", {"sections": [(2, b""), (2, b"")]}),
        ("t", {"sections": [(0, b"")]}),
        ("t", {"sections": [(9, b"")]}),  # 8 is tables (1.1)
        ("t", {"sections": [(1, b"")] * 17}),
        ("t", {"sections": [(1, BIG_ENDIAN)]}),
        ("t", {"sections": [(1, STRIDED)]}),
        ("t", {"sections": [(1, "text")]}),
        ("t", {"sections": [(1,)]}),
    ],
)
def test_writer_refuses_bad_tensor(tmp_path, name, changes):
    with ContainerWriter(tmp_path / "w.spqr") as w:
        with pytest.raises(SpqrError) as info:
            w.add_tensor(name, **{**GOOD, **changes})
        assert info.value.code == "E_BAD_INPUT"
        assert info.value.tensor == (name if isinstance(name, str) else repr(name))
        assert info.value.path == str(tmp_path / "w.spqr")
    with ContainerReader(tmp_path / "w.spqr") as r:  # a refused tensor leaves no trace
        assert r.tensors == []


def test_writer_refuses_duplicate_name(tmp_path):
    with ContainerWriter(tmp_path / "w.spqr") as w:
        w.add_tensor("same", **GOOD)
        with pytest.raises(SpqrError, match="already") as info:
            w.add_tensor("same", **GOOD)
        assert info.value.code == "E_BAD_INPUT" and info.value.tensor == "same"


def _deep(n: int):
    v: object = 1
    for _ in range(n - 1):
        v = [v]
    return {"a.b": v}


def _cyclic():
    d: dict = {}
    d["x"] = d
    return {"a.b": d}


@pytest.mark.parametrize(
    "meta",
    [
        {"model": 1},
        {"Model.x": 1},
        {"model..x": 1},
        {"model.x ": 1},
        {1: 1},
        {"a.b": {1: 2}},
        {"a.b": float("nan")},
        {"a.b": float("inf")},
        {"a.b": {1, 2}},
        {"a.b": object()},
        pytest.param(_deep(33), id="depth33"),
        pytest.param(_deep(10_000), id="depth10000"),
        pytest.param(_cyclic(), id="cyclic"),
        [1],
        "x",
    ],
)
def test_writer_refuses_bad_metadata(tmp_path, meta):
    with pytest.raises(SpqrError) as info:
        ContainerWriter(tmp_path / "w.spqr", metadata=meta)
    assert info.value.code == "E_BAD_INPUT" and info.value.field == "metadata"
    assert os.listdir(tmp_path) == []


def test_metadata_depth_32_is_accepted(tmp_path):
    write(tmp_path / "d.spqr", [], metadata=_deep(32))
    with ContainerReader(tmp_path / "d.spqr") as r:
        assert r.metadata == _deep(32)


@pytest.mark.parametrize("alignment", [0, 32, 96, 1 << 17, 2.0])
def test_writer_refuses_bad_alignment(tmp_path, alignment):
    with pytest.raises(SpqrError) as info:
        ContainerWriter(tmp_path / "w.spqr", alignment=alignment)
    assert info.value.code == "E_BAD_INPUT"


# --- reader: refusals, each by the code SPEC section 9 names -----------------------------------


def test_valid_crafted_file_is_accepted(tmp_path):
    assert outcome(tmp_path, two()) == "OK"


def _trunc(n):
    return lambda b: b[:n]


@pytest.mark.parametrize(
    "mutate,code",
    [
        (lambda b: bytearray(), "E_TRUNCATED"),
        (_trunc(10), "E_TRUNCATED"),
        (_trunc(63), "E_TRUNCATED"),
        (_trunc(100), "E_TRUNCATED"),
        (lambda b: b[: len(b) - 1], "E_TRUNCATED"),
        (lambda b: put(b, "8s", 0, b"\x89SPQR\n\n\x1a"), "E_BAD_MAGIC"),
        (lambda b: put(b, "<HH", 8, 2, 0), "E_UNSUPPORTED_VERSION"),
        (lambda b: put(b, "<HH", 8, 0, 0), "E_UNSUPPORTED_VERSION"),
        (lambda b: put(b, "<HH", 8, 1, 7), "OK"),  # C-2.4: any minor of major 1
        (lambda b: put(b, "<I", 60, 1), "E_BAD_FIELD"),
        (lambda b: put(b, "<I", 12, 32), "E_BAD_FIELD"),
        (lambda b: put(b, "<I", 12, 96), "E_BAD_FIELD"),
        (lambda b: put(b, "<I", 12, 1 << 17), "E_BAD_FIELD"),
        (lambda b: put(b, "<Q", 16, 1), "E_UNKNOWN_FEATURE"),
        (lambda b: put(b, "<Q", 16, 1 << 63), "E_UNKNOWN_FEATURE"),
        (lambda b: put(b, "<I", 56, 0, crc=False), "E_HEADER_CRC"),
        (lambda b: put(b, "B", 70, b[70] ^ 1, crc=False), "E_HEADER_CRC"),
        (lambda b: put(b, "<Q", 48, header_len(b)), "E_BAD_LAYOUT"),  # data_offset unaligned
        (lambda b: put(b, "<Q", 48, align(header_len(b), 64) + 64), "E_BAD_LAYOUT"),
        (lambda b: put(b, "B", header_len(b), 1), "E_BAD_LAYOUT"),  # header padding
        (lambda b: b + b"\0", "E_BAD_LAYOUT"),  # trailing bytes (C-2.8)
        (lambda b: b + bytes(64), "E_BAD_LAYOUT"),
    ],
)
def test_reader_refuses_header(tmp_path, mutate, code):
    assert outcome(tmp_path, mutate(two())) == code


@pytest.mark.parametrize(
    "counts,code",
    [
        ((2**32 - 1, 0, 0, 0), "E_LIMIT"),  # tensor_count over 2^20
        ((1, 17, 0, 0), "E_LIMIT"),  # section_count over 16 x tensor_count
        ((0, 1, 0, 0), "E_LIMIT"),
        ((2**20, 2**24, 0, 0), "E_LIMIT"),  # header_length over 256 MiB
        ((0, 0, 2**64 - 1, 0), "E_LIMIT"),
        ((0, 0, (256 << 20) - 63, 0), "E_LIMIT"),
        ((0, 0, 0, (64 << 20) + 1), "E_LIMIT"),  # metadata_length over 64 MiB
        ((0, 0, 0, 2**64 - 1), "E_LIMIT"),
        ((1000, 0, 0, 0), "E_TRUNCATED"),  # within the caps, but the file is 64 bytes
    ],
)
def test_caps_are_checked_before_anything_in_a_tiny_file(tmp_path, counts, code):
    buf = bytearray(
        FIXED.pack(MAGIC, 1, 0, 64, 0, counts[0], counts[1], counts[2], counts[3], 0, 0, 0)
    )
    start = time.perf_counter()
    assert outcome(tmp_path, buf) == code
    assert time.perf_counter() - start < 0.5


def _secs(n):
    return [(1, b"")] * n


@pytest.mark.parametrize(
    "mutate,code",
    [
        (lambda b: put(b, "<H", t_off(0) + 14, 1), "E_BAD_FIELD"),  # tensor reserved
        (lambda b: put(b, "B", t_off(0) + 12, 0), "E_BAD_FIELD"),  # dtype 0
        (lambda b: put(b, "B", t_off(0) + 12, 4), "E_BAD_FIELD"),
        (lambda b: put(b, "<H", t_off(0) + 8, 0), "E_BAD_FIELD"),  # encoding 0
        (lambda b: put(b, "<H", t_off(0) + 8, 999), "OK"),  # unknown encoding: the codec's call
        (lambda b: put(b, "B", t_off(0) + 13, 9), "E_BAD_FIELD"),  # ndim 9
        (lambda b: put(b, "<Q", t_off(0) + 24 + 8 * 5, 1), "E_BAD_FIELD"),  # unused dim
        (lambda b: put(b, "<Q", t_off(0) + 24, 2**40 + 1), "E_LIMIT"),
        (lambda b: put(b, "<QQ", t_off(0) + 24, 2**40, 2**40), "E_LIMIT"),  # 2^80 elements
        (
            lambda b: put(put(b, "B", t_off(0) + 13, 3), "<QQQ", t_off(0) + 24, 2**40, 2**40, 0),
            "OK",
        ),  # a zero dim makes 0 elements whatever the others are
        (lambda b: put(b, "<I", t_off(0) + 16, 1), "E_BAD_LAYOUT"),  # first_section
        (lambda b: put(b, "<I", t_off(1) + 16, 2), "E_BAD_LAYOUT"),
        (lambda b: put(b, "<I", t_off(1) + 20, 2), "E_BAD_LAYOUT"),  # past section_count
        (lambda b: put(b, "<I", t_off(1) + 20, 0), "E_BAD_LAYOUT"),  # ends before it
        (lambda b: put(b, "<H", s_off(b, 1) + 22, 1), "E_BAD_FIELD"),  # section reserved
        (lambda b: put(b, "<Q", s_off(b, 1) + 24, 1 << 63), "E_BAD_FIELD"),
        (lambda b: put(b, "<H", s_off(b, 0) + 20, 0), "E_BAD_FIELD"),  # role 0
        (lambda b: put(b, "<H", s_off(b, 0) + 20, 9), "E_BAD_FIELD"),  # 8 is tables (1.1)
        (lambda b: put(b, "<H", s_off(b, 1) + 20, 2), "E_BAD_LAYOUT"),  # repeated role
        (lambda b: put(b, "<H", s_off(b, 1) + 20, 1), "E_BAD_LAYOUT"),  # decreasing role
    ],
)
def test_reader_refuses_records(tmp_path, mutate, code):
    assert outcome(tmp_path, mutate(two())) == code


def test_too_many_sections_in_one_tensor(tmp_path):
    buf = craft([tensor("a", _secs(17)), tensor("b", [])])
    assert outcome(tmp_path, buf) == "E_LIMIT"


@pytest.mark.parametrize(
    "mutate,code",
    [
        (lambda b: put(b, "<Q", s_off(b, 1), sec_at(b, 1) + 1), "E_BAD_LAYOUT"),  # misaligned
        (lambda b: put(b, "<Q", s_off(b, 1), sec_at(b, 0)), "E_BAD_LAYOUT"),  # overlapping
        (lambda b: put(b, "<Q", s_off(b, 1), sec_at(b, 1) + 64), "E_BAD_LAYOUT"),  # a hole
        (lambda b: put(b, "<Q", s_off(b, 3), 2**64 - 64), "E_BAD_LAYOUT"),  # out of range
        (lambda b: put(b, "<Q", s_off(b, 0), 0), "E_BAD_LAYOUT"),  # points into the header
        (lambda b: put(b, "<Q", s_off(b, 3) + 8, 71), "E_TRUNCATED"),  # runs past the end
        (lambda b: put(b, "<Q", s_off(b, 3) + 8, 2**64 - 1), "E_TRUNCATED"),
        (lambda b: put(b, "<Q", s_off(b, 3) + 8, 69), "E_BAD_LAYOUT"),  # one byte left over
        (lambda b: put(b, "<I", s_off(b, 3) + 16, 0), "E_SECTION_CRC"),
        (lambda b: put(b, "B", len(b) - 1, 7, crc=False), "E_SECTION_CRC"),
        (
            lambda b: put(b, "B", sec_at(b, 1) - 1, 1, crc=False),
            "E_BAD_LAYOUT",
        ),  # padding between sections
    ],
)
def test_reader_refuses_section_layout(tmp_path, mutate, code):
    assert outcome(tmp_path, mutate(two())) == code


def test_section_crc_can_be_skipped_when_asked(tmp_path):
    buf = two()
    buf[-1] ^= 0xFF
    (tmp_path / "c.spqr").write_bytes(bytes(buf))
    with ContainerReader(tmp_path / "c.spqr") as r:  # opening never reads section bytes
        with pytest.raises(SpqrError) as info:
            r.section_bytes("layer.1.w", 1)
        assert info.value.code == "E_SECTION_CRC" and info.value.tensor == "layer.1.w"
        assert bytes(r.section_bytes("layer.1.w", 1, verify_crc=False))[-1] == 0x01 ^ 0xFF


def _named(*names, strtab=None):
    buf = craft([tensor(n, []) for n in names])
    if strtab is not None:  # same lengths, different bytes
        start = header_len(buf) - len(strtab)
        buf[start : start + len(strtab)] = strtab
        fix_crc(buf)
    return buf


@pytest.mark.parametrize(
    "buf,code",
    [
        (lambda: _named("aa", "aa"), "E_DUPLICATE_NAME"),
        (lambda: _named("aa", "ab", strtab=b"aaaa"), "E_DUPLICATE_NAME"),
        (lambda: _named(b"\xff"), "E_BAD_NAME"),
        (lambda: _named(b"\xc0\xaf"), "E_BAD_NAME"),  # overlong
        (lambda: _named(b"\xed\xa0\x80"), "E_BAD_NAME"),  # surrogate
        (lambda: _named(b"\xe2\x82"), "E_BAD_NAME"),  # cut short
        (lambda: _named(b"a\x00"), "E_BAD_NAME"),
        (lambda: _named(b"a\x1f"), "E_BAD_NAME"),
        (lambda: _named(b"a\x7f"), "E_BAD_NAME"),
        (lambda: _named(b""), "E_BAD_NAME"),
        (lambda: _named(b"x" * 1025), "E_BAD_NAME"),
        (lambda: _named(b"x" * 1024), "OK"),
        (lambda: _named("a b é\u00a0\u200b"), "OK"),  # NBSP, ZWSP: not excluded
        (lambda: _named("a\u0085b"), "E_BAD_NAME"),  # C1 controls (C-2.10)
        (lambda: _named("a\u0080"), "E_BAD_NAME"),
        (lambda: _named("a\u009f"), "E_BAD_NAME"),
        (lambda: _named("x\u202eevil"), "E_BAD_NAME"),  # bidi formatting characters
        (lambda: _named("x\u202a"), "E_BAD_NAME"),
        (lambda: _named("x\u2066"), "E_BAD_NAME"),
        (lambda: _named("x\u2069"), "E_BAD_NAME"),
        (lambda: _named("x\u200e"), "E_BAD_NAME"),
        (lambda: _named("x\u200f"), "E_BAD_NAME"),
        (lambda: _named("x\u061c"), "E_BAD_NAME"),
        (lambda: _named("x\u2065\u206a\u202f\u200d"), "OK"),  # just outside the ranges
        (lambda: put(_named("ab", "cd"), "<I", t_off(1), 1), "E_BAD_LAYOUT"),  # name_offset
        (lambda: put(_named("ab", "cd"), "<I", t_off(1) + 4, 3), "E_BAD_LAYOUT"),  # past table
        (lambda: put(_named("ab", "cd"), "<I", t_off(1) + 4, 1), "E_BAD_LAYOUT"),  # unused byte
    ],
)
def test_reader_refuses_names(tmp_path, buf, code):
    assert outcome(tmp_path, buf()) == code


def _meta(raw: bytes) -> bytearray:
    return craft([tensor("t", [])], metadata=raw)


@pytest.mark.parametrize(
    "raw,code",
    [
        (b'{"a.b":1,"a.b":2}', "E_BAD_METADATA"),
        (b'{"a.b":{"x":1,"x":1}}', "E_BAD_METADATA"),
        (b'{"a.b":[{"x":1,"x":1}]}', "E_BAD_METADATA"),
        (b'{"a.b":NaN}', "E_BAD_METADATA"),
        (b'{"a.b":Infinity}', "E_BAD_METADATA"),
        (b'{"a.b":-Infinity}', "E_BAD_METADATA"),
        (b'{"a.b":' + b"[" * 10_000 + b"]" * 10_000 + b"}", "E_BAD_METADATA"),
        (b'{"a.b":' + b"[" * 32 + b"]" * 32 + b"}", "E_BAD_METADATA"),  # depth 33
        (b'{"a.b":' + b"[" * 31 + b"]" * 31 + b"}", "OK"),  # depth 32
        (b'{"a.b":"' + b"[" * 100 + b'"}', "OK"),  # brackets inside strings do not nest
        (b'{"a.b":"\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', "OK"),
        (b'{"a.b":' + b"[" * 50_000, "E_BAD_METADATA"),  # unbalanced and deep
        (b"[]", "E_BAD_METADATA"),
        (b'"x"', "E_BAD_METADATA"),
        (b"1", "E_BAD_METADATA"),
        (b"null", "E_BAD_METADATA"),
        (b'{"model":1}', "E_BAD_METADATA"),
        (b'{"Model.x":1}', "E_BAD_METADATA"),
        (b'{"model.":1}', "E_BAD_METADATA"),
        (b'{"model.x-y":1}', "E_BAD_METADATA"),
        (b'{"a.b":"\xff"}', "E_BAD_METADATA"),  # not UTF-8
        (b'\xef\xbb\xbf{"a.b":1}', "E_BAD_METADATA"),  # BOM
        (b'{"a.b":1', "E_BAD_METADATA"),
        (b'{"a.b":1} x', "E_BAD_METADATA"),
        (b'{"a.b":"\x01"}', "E_BAD_METADATA"),  # raw control character in a string
        (b' { "a.b" : { "Any Key": [1e308, -0.5, "\xc3\xa9"] } } ', "OK"),
        (b"{}", "OK"),
        # Numbers must be finite when read as IEEE binary64 (C-2.11).
        (b'{"a.b":1e999}', "E_BAD_METADATA"),
        (b'{"a.b":-1e309}', "E_BAD_METADATA"),
        (b'{"a.b":1.8e308}', "E_BAD_METADATA"),
        (b'{"a.b":1' + b"0" * 400 + b"}", "E_BAD_METADATA"),  # an integer literal too
        (b'{"a.b":-1' + b"0" * 400 + b"}", "E_BAD_METADATA"),
        (b'{"a.b":[1.7976931348623157e308, 1' + b"0" * 300 + b", 1e-400]}", "OK"),
        # Duplicate keys compare after unescaping, at any level.
        (b'{"a.b":1,"\\u0061.b":2}', "E_BAD_METADATA"),
        (b'{"a.b":{"a":1,"\\u0061":2}}', "E_BAD_METADATA"),
        (b'{"a.b":[{"\\u00e9":1,"\xc3\xa9":2}]}', "E_BAD_METADATA"),
        # The key pattern matches the whole key.
        (b'{"a.bX":1}', "E_BAD_METADATA"),
        (b'{"Xa.b":1}', "E_BAD_METADATA"),
        (b'{"a.b\\n":1}', "E_BAD_METADATA"),
        (b'{"a.b.c_9":1}', "OK"),
        # Lone surrogate escapes, in values and keys at any level.
        (b'{"a.b":"\\ud800"}', "E_BAD_METADATA"),
        (b'{"a.b":"\\udc00"}', "E_BAD_METADATA"),
        (b'{"a.b":"\\ud800x"}', "E_BAD_METADATA"),
        (b'{"a.b":"\\ud800\\u0041"}', "E_BAD_METADATA"),
        (b'{"a.b":{"\\udfff":1}}', "E_BAD_METADATA"),
        (b'{"a.b":["\\udbff\\udfff", "\\\\ud800"]}', "OK"),  # a pair; an escaped backslash
        # Objects and arrays both count toward the depth (top-level object = depth 1).
        (b'{"a.b":' + b'{"k":' * 32 + b"1" + b"}" * 32 + b"}", "E_BAD_METADATA"),  # depth 33
        (b'{"a.b":' + b'{"k":' * 31 + b"1" + b"}" * 31 + b"}", "OK"),  # depth 32
        (b'{"a.b":' + b'[{"k":' * 16 + b"1" + b"}]" * 16 + b"}", "E_BAD_METADATA"),  # 33
        (b'{"a.b":' + b'[{"k":' * 15 + b"[]" + b"}]" * 15 + b"}", "OK"),  # 32
    ],
)
def test_reader_metadata(tmp_path, raw, code):
    assert outcome(tmp_path, _meta(raw)) == code


# --- API behaviour -----------------------------------------------------------------------------


def test_not_found_io_and_missing_role(tmp_path):
    write(tmp_path / "a.spqr", TWO)
    with ContainerReader(tmp_path / "a.spqr") as r:
        with pytest.raises(SpqrError) as info:
            r.entry("missing.weight")
        assert info.value.code == "E_NOT_FOUND"
        assert "missing.weight" in str(info.value) and "a.spqr" in str(info.value)
        with pytest.raises(SpqrError) as info:
            r.section_bytes("layer.1.w", 2)
        assert info.value.code == "E_BAD_LAYOUT" and info.value.tensor == "layer.1.w"
        foreign = TensorEntry(0, "layer.0.w", 2, 1, 1, (3, 4), bytes(32), bytes(40), ())
        with pytest.raises(SpqrError):
            r.section_bytes(foreign, 2)
    for bad in (tmp_path / "absent.spqr", tmp_path):
        with pytest.raises(SpqrError) as info:
            ContainerReader(bad)
        assert info.value.code == "E_IO" and info.value.path == str(bad)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(SpqrError) as info:
            ContainerReader(tmp_path / "fifo")  # must not block
        assert info.value.code == "E_IO"


def test_close_while_views_are_alive(tmp_path):
    write(tmp_path / "a.spqr", TWO)
    r = ContainerReader(tmp_path / "a.spqr")
    view = r.section_bytes("layer.1.w", 1)
    arr = np.frombuffer(r.section_bytes("layer.0.w", 2), dtype=np.uint8)
    r.close()
    assert r.closed
    assert bytes(view) == b"\x01" * 70  # still mapped: the views keep the mapping alive
    assert arr.tobytes() == b"codes" * 20
    with pytest.raises(SpqrError) as info:
        r.section_bytes("layer.1.w", 1)
    assert info.value.code == "E_IO"
    r.close()
    del view, arr
    gc.collect()


def test_open_reads_only_the_header_of_a_multi_gib_file(tmp_path, monkeypatch):
    """A 3 GiB section (a sparse file): opening must CRC the header and nothing more."""
    big = 3 << 30
    buf = craft([tensor("big", [(1, b"")], shape=(big // 4,))])
    put(buf, "<Q", s_off(buf, 0) + 8, big)
    path = tmp_path / "big.spqr"
    with open(path, "wb") as f:
        f.write(bytes(buf))
        f.truncate(len(buf) + big)  # sparse: no data is written
    hashed = []
    real_crc32 = zlib.crc32

    def counting_crc32(data, value=0):
        hashed.append(len(memoryview(data)))
        return real_crc32(data, value)

    monkeypatch.setattr(zlib, "crc32", counting_crc32)
    start = time.perf_counter()
    with ContainerReader(path) as r:
        entries = list(r.tensors)
        elapsed = time.perf_counter() - start
        assert entries[0].sections[0].length == big
        assert sum(hashed) <= len(buf)  # the header only
        assert elapsed < 0.2
        assert len(r.section_bytes("big", 1, verify_crc=False)) == big  # zero-copy, no read
    assert sum(hashed) <= len(buf)


def test_adversarial_metadata_is_refused_in_linear_time(tmp_path):
    """Escape-heavy unterminated strings and deep brackets: no quadratic scan, no recursion.
    (No wall-clock assert: a quadratic scan of these 1 MiB inputs would take hours, which
    the suite notices; timing belongs in benchmarks.)"""
    for raw in (
        b'{"a.b":"' + b'\\"' * (1 << 19),
        b'{"a.b":' + b"[" * (1 << 20),
        b'{"a.b":["' + b'\\"' * (1 << 19) + b'"]}',  # terminated: a valid 1 MiB string
    ):
        expected = "OK" if raw.endswith(b"]}") else "E_BAD_METADATA"
        assert outcome(tmp_path, _meta(raw)) == expected


def _depth_reference(raw: bytes, limit: int) -> bool:
    depth, in_string, run = 0, False, 0
    for c in raw.decode("latin-1"):
        if c == "\\":
            run += 1
            continue
        escaped, run = run % 2 == 1, 0
        if c == '"' and not escaped:
            in_string = not in_string
        elif not in_string and c in "[{]}":
            depth += 1 if c in "[{" else -1
            if not 0 <= depth <= limit:
                return False
    return True


@settings(derandomize=True, max_examples=300, deadline=None)
@given(raw=st.binary(max_size=40).map(lambda b: bytes(b'[]{}"\\ax'[x % 8] for x in b)),
       limit=st.integers(0, 4), chunk=st.sampled_from([1, 2, 3, 7, 1 << 20]))  # fmt: skip
def test_bracket_depth_scan_matches_a_plain_scanner(raw, limit, chunk):
    from spqr_format.container import layout

    saved = layout._DEPTH_CHUNK
    layout._DEPTH_CHUNK = chunk
    try:
        assert layout._bracket_depth_ok(raw, limit) == _depth_reference(raw, limit)
    finally:
        layout._DEPTH_CHUNK = saved


# --- the metadata value cap (C-2.11: at most 1,048,576 JSON values, keys not counted) ---------


def _values(n: int, kind: bytes = b"[]") -> bytes:
    """Metadata holding exactly ``n`` JSON values: the object, the array and n - 2 items."""
    return b'{"a.b":[' + b",".join([kind] * (n - 2)) + b"]}"


@pytest.mark.parametrize("kind", [b"[]", b"{}", b"0", b'""', b"null", b'{"k":1}'[:0] or b"true"])
def test_metadata_value_cap_boundary(tmp_path, kind):
    cap = 1 << 20
    assert outcome(tmp_path, _meta(_values(cap, kind))) == "OK"
    assert outcome(tmp_path, _meta(_values(cap + 1, kind))) == "E_BAD_METADATA"


def test_metadata_value_cap_counts_members_not_keys(tmp_path):
    cap = 1 << 20
    # {"a.b": {"k0": 0, ...}}: 2 + members values; keys do not count.
    members = cap - 2
    obj = b'{"a.b":{' + b",".join(b'"k%d":0' % i for i in range(members)) + b"}}"
    assert outcome(tmp_path, _meta(obj)) == "OK"
    obj = b'{"a.b":{' + b",".join(b'"k%d" : [ ]' % i for i in range(members + 1)) + b"}}"
    assert outcome(tmp_path, _meta(obj)) == "E_BAD_METADATA"
    # Strings with commas and brackets inside count one each.
    assert outcome(tmp_path, _meta(b'{"a.b":["[,{,]", "\\",[]"]}')) == "OK"


def test_huge_metadata_is_refused_before_it_is_built(tmp_path):
    """64 MiB of [[],[],...] (22 million values) is refused at open, with the cap and no
    parse: tracemalloc sees far less than the ~2 GB that materializing it took."""
    import tracemalloc

    n = (64 << 20) // 3 - 10
    path = tmp_path / "big.spqr"
    path.write_bytes(bytes(_meta(b'{"a.b":[' + b"[]," * (n - 1) + b"[]]}")))
    tracemalloc.start()
    try:
        with pytest.raises(SpqrError) as info:
            ContainerReader(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code == "E_BAD_METADATA" and "values" in str(info.value)
    assert peak < 512 << 20


@pytest.mark.parametrize(
    "meta",
    [
        pytest.param({"a.b": 10**400}, id="huge-int"),
        pytest.param({"a.b": "\ud800"}, id="lone-surrogate"),
        pytest.param({"a.b": {"\udc00": 1}}, id="lone-surrogate-key"),
        pytest.param({"a.b": [[]] * (1 << 20)}, id="too-many-values"),
        pytest.param({"a.b": [[{"k": []}]] * 10 + [_deep(32)["a.b"]]}, id="depth-33-mixed"),
    ],
)
def test_writer_refuses_metadata_the_reader_refuses(tmp_path, meta):
    with pytest.raises(SpqrError) as info:
        ContainerWriter(tmp_path / "w.spqr", metadata=meta)
    assert info.value.code == "E_BAD_INPUT" and info.value.field == "metadata"


@pytest.mark.parametrize("name", ["x\u202eevil", "a\u0085", "\u2067", "ok\u200f"])
def test_writer_refuses_c1_and_bidi_names(tmp_path, name):
    with ContainerWriter(tmp_path / "w.spqr") as w:
        with pytest.raises(SpqrError) as info:
            w.add_tensor(name, **GOOD)
        assert info.value.code == "E_BAD_INPUT"
