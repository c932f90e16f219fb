#!/usr/bin/env python3
"""Independent `.spqr` v1.1 decoder in plain Python + numpy, written from SPEC.md alone.

(v1.1: `channel_mixed`, encoding 3, was added from SPEC section 12 alone; see A20-A22.)

Written as an outside implementer would (llama.cpp, a Rust loader): only SPEC.md and
conformance/README.md were read; nothing of spqr_format/ or tests/ was read or imported.
Imports: the Python standard library and numpy.

API
    decode_file(path, check_crc=True, check_digest=True) -> {name: numpy array}
        each tensor in its own dtype (float32, float16; bfloat16 as uint16 bit patterns).
        A zero-element tensor whose shape numpy cannot represent (e.g. [0, 2^40, 2^40]: numpy
        refuses any shape whose nominal byte size overflows) comes back as an empty array of
        shape (0,); `decode_file_info` returns the true shape.
    decode_file_info(path) -> {name: (dtype_name, shape_tuple, array)}
    decode_file_f32(path) -> {name: float32 array}  (C-7.5 conversions to float32)
    matvec(path, name, x) -> float64 array   y = W x, W the decoded float32 weights (C-7.6)
    SpecError(code, message): every refusal; .code is the E_... code of SPEC section 9.

Command line (conformance/README.md, "Decoder protocol")
    python conformance/numpy_decoder.py INPUT OUTPUT
        exit 0 and a safetensors OUTPUT, or exit 1 with "E_CODE: message" on stderr.
    python conformance/numpy_decoder.py --matvec A B OUTPUT
        matvec protocol: A and B are {input} and {x} in either order (README and
        `spqr conformance run --help` disagree on the order; the .spqr file is recognised by
        its magic).

Ambiguities found while implementing from SPEC.md
==================================================

A1. C-2.7 / C-5.1 vs the role table: role 6 is called `outlier_rows` in C-2.7's list and in
    C-5.1 ("`outlier_rows` and `outlier_entries` iff flag `outliers`") but `outlier_index` in
    the role table and in section 6 (C-6.1). The section is a per-16-row-block index, not per
    row; `outlier_rows` is a leftover of the draft layout. Harmless (only the id 6 is in the
    file) but a reader of C-2.7 alone would expect per-row offsets.

A2. C-9.2 step 11, "name_offset and name_length against the string table (E_BAD_LAYOUT)":
    two readings: (a) only that [name_offset, name_offset + name_length) lies inside the
    string table; (b) also that name_offset equals the running offset required by C-2.10
    (tensor 0 at 0, each next one right after the previous name). C-2.10 makes (b) a rule and
    section 9 maps C-2.10 layout faults to E_BAD_LAYOUT, so I check both, before the name
    content. Also unclear: a name_length of 2000 that does not fit in the string table is
    E_BAD_LAYOUT by the order of step 11 but "name length > 1024 is E_BAD_NAME" by the C-2.9
    table; I follow the order of step 11 (bounds first). On crafted files (not vectors) the
    reference `spqr verify` agrees with both choices.

A3. C-9.2 step 10, "roles strictly increasing (E_BAD_LAYOUT); after the last tensor, the
    header's section_count (E_BAD_LAYOUT)": the roles of a tensor whose range
    first_section + section_count runs past the header's section_count cannot be read. I report
    E_BAD_LAYOUT at that tensor (same code as the final check, so no vector can tell).

A4. C-9.2 step 4, "string_table_length (against the header cap)": read as
    string_table_length > 256 MiB -> E_LIMIT before header_length itself is computed (the
    header_length sum is then computed with Python integers, so no overflow is possible).

A5. C-9.3 and C-6.2, order of the outlier rules: "in the order a reader checks them" can mean
    rule by rule over the whole tensor (all of rule 2, then all of rule 3, ...) or entry by
    entry (every rule for entry 0, then entry 1, ...). With one fault they agree (a single
    changed field breaks E_BAD_OUTLIERS rules or rule 7, never both in different entries);
    with two they differ: value inf at entry 0 and delta 0 at entry 1 is E_BAD_OUTLIERS rule
    by rule, E_NONFINITE entry by entry. I check rule by rule (rule 6 is a whole-tensor count
    and rule 7 is explicitly last); the reference (`spqr verify`) gives E_BAD_OUTLIERS on that
    two-fault file too. No vector decides it.

A6. C-6.2 rule 5 says "every outlier cell p"; I apply it to non-skip entries only (a skip is
    not an outlier). A skip is never last in its block (rule 4) and p strictly increases
    (rule 2), so a skip past the block always forces a later non-skip past it too: same code.

A7. C-9.3, "the CRC of each section in section order and the padding after it": the padding
    after the last section of a tensor is the padding before the next tensor's first section;
    I check it together with that last section (after its CRC). The padding after the last
    section of the file cannot exist (C-2.8: the file ends there).

A8. C-9.3, headers of every tensor first or tensor by tensor: the spec says both give the same
    code for one fault; I check every tensor's header (encoding, version, params, shape,
    roles, lengths) first, then every tensor's data, which C-9.3 says spqr-format does "when it
    opens a file". Observed (running `spqr verify`, not reading its source): the reference
    checks params, shape, roles and lengths of every tensor at open, but `encoding` and
    `encoding_version` only when it decodes that tensor. On a two-fault file (tensor 0 with a
    bad section CRC, tensor 1 with encoding 3) it reports E_SECTION_CRC, I report
    E_UNKNOWN_ENCODING; likewise (tensor 1 bad digest, tensor 2 encoding_version 2):
    reference E_DIGEST_MISMATCH, mine E_UNSUPPORTED_ENCODING_VERSION. Not a conformance failure
    (one fault per vector), but C-9.3's description of spqr-format is inaccurate: its header
    pass does not contain the first two items of C-9.3's header list.

A9. C-3.4, unknown encoding: a decoder under the conformance protocol refuses the whole file
    (README: "the protocol decodes files, not tensors"), so E_UNKNOWN_ENCODING is raised when
    the header pass reaches such a tensor (C-9.3 order), even though the API MAY read other
    tensors. decode_file follows the protocol (all or nothing).

A10. C-5.1 parameter range "stats_group_size: 0 when sb = 0, else 1..2^24": read as
    S != 0 with sb = 0 is E_BAD_FIELD (not ignored), checked after stats_bits (C-9.3 order:
    bits, group_size, stats_bits, stats_group_size). `spqr verify` agrees (crafted file).

A11. C-5.1 `outlier_count` K when flag `outliers` is clear: the rules say E = 0 iff the flag
    is clear and K <= E, so K must be 0 (E_BAD_FIELD); nothing says so directly.
    `spqr verify` agrees (crafted file).

A12. C-2.11 "any number that is not finite when read as an IEEE 754 binary64": read with
    round-to-nearest (so 1.7976931348623158e308 rounds to DBL_MAX and is accepted, while
    1.7976931348623159e308 is infinite and refused). Underflow (1e-999 -> 0) is finite and
    accepted. `spqr verify` agrees on both (crafted files).

A13. C-7.6 (SPEC) vs conformance/README.md tolerance: SPEC's default is
    2^-8 * sum|W x| + 2^-24, README's (and the manifest's) rel is 2^-9. The manifest's per-vector
    value is what the runner uses; my matvec is a float64 product of the decoded float32 W,
    so either passes.

A14. Matvec CLI argument order: conformance/README.md shows
    `--matvec-decoder "./mydecoder --matvec {x} {input} {output}"`, `spqr conformance run
    --help` shows "CMD {input} {x} {output}". My CLI accepts both (detects the .spqr magic).

A15. C-2.12 digest for a float16/bfloat16 bilevel tensor: hashed bytes are the C-7.5 rounding
    of the f32 decode; the matvec reference (C-7.6) uses "the decoded f32 W", i.e. before that
    rounding. I use the f32 values for matvec.

A16. C-2.2 / C-9.2 step 7: "the file holds data_offset bytes (E_TRUNCATED)" comes after the
    data_offset equality check; when there are no sections, C-2.8 then requires the file to
    end at data_offset (E_BAD_LAYOUT if longer, step 13).

A17. C-2.2 table, `version_minor` "C-2.4; 0" reads as "must be 0", but C-2.4 says a reader MUST
    accept any minor version of its major. I accept any minor (C-2.4 is the clause);
    decided by vectors container-minor-version-1 and container-minor-version-65535.

A18. C-2.11 (implementation note, not a spec fault): Python's json module accepts "\\ud800"
    (building a str that holds a surrogate), and a first version of this scanner (a
    non-possessive string regex, then json.loads on every escaped string) took 25 s and 6 GB on
    64 MiB of "\\n" escapes: the "bounded cost" rule of C-2.11 also bites string scanning,
    not only value counting. This decoder uses its own iterative scanner with possessive
    regexes that reject a lone surrogate escape in the string grammar itself (a high escape
    must be followed at once by a low escape), counts values and depth as it goes and stops at
    the caps; only keys are unescaped (for duplicate detection). 64 MiB hostile inputs now take
    1-5 s and no more memory than the text.

A19. C-7.5 / numpy: a zero-element raw tensor of shape [0, 2^40, 2^40] is valid (vector
    raw-zero-size-huge-dims) but numpy refuses to create any array whose nominal byte size
    overflows, even with zero elements; decode_file returns such a tensor as shape (0,) and the
    CLI writes the true shape from the record. A limitation of numpy, not of the spec.

A20. SPEC 1.1 section 12 (channel_mixed), written from its text: C-12.8 lists the header
    checks as params (table_rows), shape, width counts against n, roles and lengths; the data
    checks as perm, finite tables, the outlier stream (C-6.2 without rule 6). I reuse the
    bilevel outlier checker with K = the stream's own non-skip count, which makes rule 6
    vacuous, as C-12.1 says.

A21. C-12.2 "the width counts MUST sum to n": the counts are u32, so the sum is computed
    with Python integers (no overflow). C-12.3 runs start at word boundaries; the padding bits
    of each run's last word are ignored (C-5.2).

A22. C-12.5 table blocks: T = 1 when R = 0 else ceil(m / R), row i uses block i // R;
    entry t * L + o_j + q. Nothing says the entries are sorted, so none is assumed.

Conformance results (SPEC 1.0 final, vectors as generated in the working tree):
    fast suite 314/314 (decode 45, matvec 6, reject 263), full suite all pass; no vector failure
    had to be attributed to the spec or the vectors.
"""

import hashlib
import json
import re
import struct
import sys
import zlib

import numpy as np

__all__ = ["SpecError", "decode_file", "decode_file_info", "decode_file_f32", "matvec"]

MAGIC = b"\x89SPQR\r\n\x1a"
MiB = 1 << 20
MAX_HEADER = 256 * MiB
MAX_TENSORS = 1048576
MAX_META = 64 * MiB
MAX_DEPTH = 32
MAX_VALUES = 1048576
MAX_DIM = 1 << 40
MAX_ELEMS = 1 << 48
MAX_GROUP = 1 << 24
MAX_OUTLIER_ENTRIES = (1 << 32) - 1

DTYPES = {1: ("float32", 4, "F32"), 2: ("float16", 2, "F16"), 3: ("bfloat16", 2, "BF16")}
ROLE_DATA, ROLE_CODES, ROLE_STATS, ROLE_STATS2, ROLE_PERM, ROLE_OIDX, ROLE_OENT = (
    1,
    2,
    3,
    4,
    5,
    6,
    7,
)
ROLE_TABLES = 8  # SPEC 1.1, C-2.7

_HDR = struct.Struct("<8sHHIQIIQQQII")
_TREC = struct.Struct("<IIHHBBHII8Q32s40s")
_SREC = struct.Struct("<QQIHHQ")
_BPARAMS = struct.Struct("<BBHIIIQQQ")
_CPARAMS = struct.Struct("<8III")  # C-12.1: c[1..8], table_rows, outlier_entry_count

F32 = np.float32


class SpecError(Exception):
    def __init__(self, code, message=""):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _align(v, a):
    return (v + a - 1) // a * a


def _ceil(a, b):
    return -(-a // b)


# ----------------------------------------------------------------------------------------
# float conversions on bit patterns (C-7.5)


def f16_bits_to_f32(h):
    """u16 f16 bit patterns -> float32, exact (NaN payload shifted to the top of f32's)."""
    h = np.asarray(h, dtype=np.uint16).astype(np.uint32)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    mant = h & 0x3FF
    out = ((e + 112) << 23) | (mant << 13)
    out = np.where(e == 0x1F, np.uint32(0x7F800000) | (mant << 13), out)
    sub = e == 0
    if np.any(sub):
        # mant * 2^-24, exact in float32 (normal result)
        subv = np.multiply(mant.astype(F32), F32(2.0**-24)).view(np.uint32)
        out = np.where(sub, subv, out)
    return (out | sign).astype(np.uint32).view(F32)


def bf16_bits_to_f32(h):
    return (np.asarray(h, dtype=np.uint16).astype(np.uint32) << 16).view(F32)


def f32_to_f16_bits(x):
    """float32 -> f16 bit patterns, round to nearest even, overflow to inf, subnormals kept,
    NaN -> sign | 0x7E00 | bits 13..22 of the f32 payload."""
    u = np.ascontiguousarray(x, dtype=F32).view(np.uint32).astype(np.uint64)
    sign = (u >> 16) & 0x8000
    e = (u >> 23) & 0xFF
    mant = u & 0x7FFFFF
    # normal f16 results (e >= 113): rebias, keep 10 bits, round on the low 13 bits
    base = ((e - 112) << 10) | (mant >> 13)
    rem = mant & 0x1FFF
    up = (rem > 0x1000) | ((rem == 0x1000) & ((base & 1) == 1))
    normal = base + up.astype(np.uint64)
    normal = np.minimum(normal, 0x7C00)  # carries past the top exponent give exactly inf
    # subnormal f16 results (e <= 112): value = m * 2^(e-150) = h * 2^-24, h = m >> (126-e)
    m = np.where(e > 0, mant | 0x800000, mant)
    shift = np.minimum(np.where(e > 0, 126 - np.minimum(e, 126), 126), 40).astype(np.uint64)
    shift = np.maximum(shift, 1)
    q = m >> shift
    r = m & ((np.uint64(1) << shift) - np.uint64(1))
    half = np.uint64(1) << (shift - np.uint64(1))
    upd = (r > half) | ((r == half) & ((q & 1) == 1))
    subn = q + upd.astype(np.uint64)
    res = np.where(e >= 113, normal, subn)
    res = np.where(e >= 143, 0x7C00, res)
    nan = (e == 0xFF) & (mant != 0)
    inf = (e == 0xFF) & (mant == 0)
    res = np.where(inf, 0x7C00, res)
    res = np.where(nan, 0x7E00 | ((mant >> 13) & 0x3FF), res)
    return (res | sign).astype(np.uint16)


def f32_to_bf16_bits(x):
    """float32 -> bf16 bit patterns, round to nearest even; NaN: upper 16 bits | 0x0040."""
    u = np.ascontiguousarray(x, dtype=F32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = ((u & 0x7F800000) == 0x7F800000) & ((u & 0x7FFFFF) != 0)
    res = np.where(nan, (u >> 16) | 0x40, rounded)
    return (res & 0xFFFF).astype(np.uint16)


def _to_f32(arr, dtype_id):
    if dtype_id == 1:
        return np.asarray(arr, dtype=F32)
    if dtype_id == 2:
        return f16_bits_to_f32(np.asarray(arr).view(np.uint16))
    return bf16_bits_to_f32(arr)


def _from_f32(v, dtype_id):
    """float32 array -> array in the tensor's dtype (float16 view / uint16 bf16 bits)."""
    if dtype_id == 1:
        return np.ascontiguousarray(v, dtype=F32)
    if dtype_id == 2:
        return f32_to_f16_bits(v).view(np.float16)
    return f32_to_bf16_bits(v)


# ----------------------------------------------------------------------------------------
# names (C-2.10)

_BAD_NAME_CP = re.compile(
    "[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def _check_name(raw, idx):
    n = len(raw)
    if n < 1 or n > 1024:
        raise SpecError("E_BAD_NAME", "tensor %d: name length %d not in 1..1024" % (idx, n))
    try:
        s = raw.decode("utf-8", errors="strict")  # RFC 3629: no overlong, surrogate, >10FFFF
    except UnicodeDecodeError as exc:
        raise SpecError("E_BAD_NAME", "tensor %d: name is not UTF-8 (%s)" % (idx, exc)) from exc
    mm = _BAD_NAME_CP.search(s)
    if mm:
        raise SpecError(
            "E_BAD_NAME", "tensor %d: name has forbidden code point U+%04X" % (idx, ord(mm.group()))
        )
    return s


# ----------------------------------------------------------------------------------------
# metadata (C-2.11): own strict, iterative RFC 8259 scanner

_WS = re.compile(r"[ \t\n\r]*")
# An RFC 8259 string whose \\u escapes leave no lone surrogate (a high-surrogate escape must be
# followed at once by a low-surrogate escape). Possessive quantifiers: no backtracking stack, so a
# 64 MiB string of escapes costs linear time and no memory.
_H = "[0-9a-fA-F]"
_STR = re.compile(
    r'"[^"\\\x00-\x1f]*+(?:\\(?:["\\/bfnrt]|u(?![dD][89a-fA-F])' + _H + r"{4}"
    r"|u[dD][89abAB]" + _H + r"{2}\\u[dD][c-fC-F]" + _H + r'{2})[^"\\\x00-\x1f]*+)*+"'
)
_NUM = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_SURR = re.compile("[\ud800-\udfff]")
_TOPKEY = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)+")

_S_VALUE, _S_VALUE_OR_CLOSE, _S_KEY_OR_CLOSE, _S_KEY, _S_COLON, _S_COMMA_OR_CLOSE, _S_END = range(7)


def _meta_err(msg):
    raise SpecError("E_BAD_METADATA", msg)


def _scan_string(text, pos, want_value):
    m = _STR.match(text, pos)
    if not m:
        _meta_err(
            "bad string (syntax, raw control character or lone surrogate escape) at "
            "character %d" % pos
        )
    if not want_value:
        return None, m.end()
    tok = m.group()
    if "\\" in tok:
        val = json.loads(tok)  # a validated RFC 8259 string: safe; joins surrogate pairs
        if _SURR.search(val):  # cannot happen after _STR; kept as a second guard
            _meta_err("lone surrogate in string at character %d" % pos)
    else:
        val = tok[1:-1]
    return val, m.end()


def check_metadata(raw):
    """Validate metadata bytes by C-2.11; raise SpecError(E_BAD_METADATA). Builds no values:
    only the key sets of the open objects (bounded by the value cap)."""
    try:
        text = bytes(raw).decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        _meta_err(f"not UTF-8: {exc}")
    if text.startswith("\ufeff"):
        _meta_err("byte order mark")
    n = len(text)
    pos = 0
    count = 0
    stack = []  # each: None for an array, a set of keys for an object
    state = _S_VALUE
    while True:
        pos = _WS.match(text, pos).end()
        if state == _S_END:
            if pos != n:
                _meta_err("text after the JSON value at character %d" % pos)
            return
        if pos >= n:
            _meta_err("unexpected end of JSON")
        c = text[pos]
        if state == _S_VALUE or state == _S_VALUE_OR_CLOSE:
            if c == "]" and state == _S_VALUE_OR_CLOSE:
                stack.pop()
                pos += 1
                state = _S_COMMA_OR_CLOSE if stack else _S_END
                continue
            count += 1
            if count > MAX_VALUES:
                _meta_err("more than %d JSON values" % MAX_VALUES)
            if not stack and count == 1 and c != "{":
                _meta_err("top level is not an object")
            if c == "{" or c == "[":
                if len(stack) + 1 > MAX_DEPTH:
                    _meta_err("nesting deeper than %d" % MAX_DEPTH)
                if c == "{":
                    stack.append(set())
                    state = _S_KEY_OR_CLOSE
                else:
                    stack.append(None)
                    state = _S_VALUE_OR_CLOSE
                pos += 1
                continue
            if c == '"':
                _, pos = _scan_string(text, pos, False)
            elif c == "-" or "0" <= c <= "9":
                m = _NUM.match(text, pos)
                if not m:
                    _meta_err("bad number at character %d" % pos)
                try:
                    f = float(m.group())
                except (ValueError, OverflowError):
                    _meta_err("bad number at character %d" % pos)
                if f != f or f in (float("inf"), float("-inf")):
                    _meta_err("number not finite as binary64 at character %d" % pos)
                pos = m.end()
            elif text.startswith("true", pos):
                pos += 4
            elif text.startswith("false", pos):
                pos += 5
            elif text.startswith("null", pos):
                pos += 4
            else:
                _meta_err("invalid JSON at character %d" % pos)
            state = _S_COMMA_OR_CLOSE if stack else _S_END
        elif state == _S_KEY_OR_CLOSE or state == _S_KEY:
            if c == "}" and state == _S_KEY_OR_CLOSE:
                stack.pop()
                pos += 1
                state = _S_COMMA_OR_CLOSE if stack else _S_END
                continue
            if c != '"':
                _meta_err("expected a key at character %d" % pos)
            key, pos = _scan_string(text, pos, True)
            keys = stack[-1]
            if key in keys:
                _meta_err(f"duplicate key {key!r}")
            keys.add(key)
            if len(stack) == 1 and not _TOPKEY.fullmatch(key):
                _meta_err(f"top-level key {key!r} is not namespace.name")
            state = _S_COLON
        elif state == _S_COLON:
            if c != ":":
                _meta_err("expected ':' at character %d" % pos)
            pos += 1
            state = _S_VALUE
        else:  # _S_COMMA_OR_CLOSE
            top = stack[-1]
            if c == ",":
                state = _S_KEY if top is not None else _S_VALUE
            elif c == "}" and top is not None or c == "]" and top is None:
                stack.pop()
                state = _S_COMMA_OR_CLOSE if stack else _S_END
            else:
                _meta_err("expected ',' or a closing bracket at character %d" % pos)
            pos += 1


# ----------------------------------------------------------------------------------------
# container (section 2, C-9.2)


class _Tensor:
    pass


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SpecError("E_IO", f"{path}: {exc}") from exc


def _parse_container(buf):
    flen = len(buf)
    mv = memoryview(buf)
    # 1. magic, then length
    k = min(8, flen)
    if bytes(mv[:k]) != MAGIC[:k]:
        raise SpecError("E_BAD_MAGIC", "not a .spqr file")
    if flen < 64:
        raise SpecError("E_TRUNCATED", "file of %d bytes is shorter than the 64-byte header" % flen)
    (
        _,
        vmaj,
        vmin,
        alignment,
        req_features,
        tcount,
        scount,
        stlen,
        mlen,
        data_offset,
        hcrc,
        hres,
    ) = _HDR.unpack_from(buf, 0)
    # 2.
    if vmaj != 1:
        raise SpecError("E_UNSUPPORTED_VERSION", "version %d.%d" % (vmaj, vmin))
    # 3.
    if hres != 0:
        raise SpecError("E_BAD_FIELD", "fixed header reserved field is %d" % hres)
    if alignment < 64 or alignment > 65536 or alignment & (alignment - 1):
        raise SpecError("E_BAD_FIELD", "alignment %d" % alignment)
    # 4.
    if tcount > MAX_TENSORS:
        raise SpecError("E_LIMIT", "tensor_count %d" % tcount)
    if scount > 16 * tcount:
        raise SpecError("E_LIMIT", "section_count %d > 16 x tensor_count" % scount)
    if mlen > MAX_META:
        raise SpecError("E_LIMIT", "metadata_length %d" % mlen)
    if stlen > MAX_HEADER:
        raise SpecError("E_LIMIT", "string_table_length %d" % stlen)
    header_length = 64 + 160 * tcount + 32 * scount + stlen + mlen
    if header_length > MAX_HEADER:
        raise SpecError("E_LIMIT", "header_length %d" % header_length)
    # 5.
    if flen < header_length:
        raise SpecError("E_TRUNCATED", "file ends at %d, header needs %d" % (flen, header_length))
    # 6.
    crc = zlib.crc32(mv[:56])
    crc = zlib.crc32(b"\0\0\0\0", crc)
    crc = zlib.crc32(mv[60:header_length], crc)
    if crc != hcrc:
        raise SpecError("E_HEADER_CRC", f"header crc {hcrc:08x}, computed {crc:08x}")
    # 7.
    want = _align(header_length, alignment)
    if data_offset != want:
        raise SpecError("E_BAD_LAYOUT", "data_offset %d, expected %d" % (data_offset, want))
    if flen < data_offset:
        raise SpecError(
            "E_TRUNCATED", "file ends at %d before data_offset %d" % (flen, data_offset)
        )
    if any(mv[header_length:data_offset]):
        raise SpecError("E_BAD_LAYOUT", "non-zero header padding")
    # 8.
    if req_features != 0:
        raise SpecError("E_UNKNOWN_FEATURE", f"required_features 0x{req_features:x}")
    # 9. section records
    sbase = 64 + 160 * tcount
    sections = []
    for i in range(scount):
        off, length, scrc, role, r1, r2 = _SREC.unpack_from(buf, sbase + 32 * i)
        if r1 or r2:
            raise SpecError("E_BAD_FIELD", "section %d: reserved field not zero" % i)
        if role < 1 or role > 8:
            raise SpecError("E_BAD_FIELD", "section %d: role %d" % (i, role))
        sections.append((off, length, scrc, role))
    # 10. tensor records
    tensors = []
    next_first = 0
    for ti in range(tcount):
        f = _TREC.unpack_from(buf, 64 + 160 * ti)
        t = _Tensor()
        t.index = ti
        (
            t.name_offset,
            t.name_length,
            t.encoding,
            t.encoding_version,
            t.dtype,
            t.ndim,
            tres,
            t.first_section,
            t.section_count,
        ) = f[:9]
        dims = f[9:17]
        t.digest = f[17]
        t.params = f[18]
        if tres != 0:
            raise SpecError("E_BAD_FIELD", "tensor %d: reserved field not zero" % ti)
        if t.dtype not in DTYPES:
            raise SpecError("E_BAD_FIELD", "tensor %d: dtype %d" % (ti, t.dtype))
        if t.encoding == 0:
            raise SpecError("E_BAD_FIELD", "tensor %d: encoding 0" % ti)
        if t.ndim > 8:
            raise SpecError("E_BAD_FIELD", "tensor %d: ndim %d" % (ti, t.ndim))
        if any(dims[t.ndim :]):
            raise SpecError("E_BAD_FIELD", "tensor %d: unused dims not zero" % ti)
        t.dims = tuple(dims[: t.ndim])
        for d in t.dims:
            if d > MAX_DIM:
                raise SpecError("E_LIMIT", "tensor %d: dimension %d > 2^40" % (ti, d))
        count = 1
        for d in t.dims:
            count *= d
        if count > MAX_ELEMS:
            raise SpecError("E_LIMIT", "tensor %d: %d elements > 2^48" % (ti, count))
        t.count = count
        if t.section_count > 16:
            raise SpecError("E_LIMIT", "tensor %d: %d sections" % (ti, t.section_count))
        if t.first_section != next_first:
            raise SpecError(
                "E_BAD_LAYOUT",
                "tensor %d: first_section %d, expected %d" % (ti, t.first_section, next_first),
            )
        end = t.first_section + t.section_count
        if end > scount:
            raise SpecError(
                "E_BAD_LAYOUT",
                "tensor %d: sections %d..%d past section_count %d"
                % (ti, t.first_section, end - 1, scount),
            )
        roles = [sections[s][3] for s in range(t.first_section, end)]
        for a, b in zip(roles, roles[1:], strict=False):
            if b <= a:
                raise SpecError(
                    "E_BAD_LAYOUT", "tensor %d: roles %s not strictly increasing" % (ti, roles)
                )
        t.roles = roles
        next_first = end
        tensors.append(t)
    if next_first != scount:
        raise SpecError(
            "E_BAD_LAYOUT", "tensors cover %d sections, header says %d" % (next_first, scount)
        )
    # 11. names
    stbase = sbase + 32 * scount
    names = set()
    pos = 0
    for t in tensors:
        if t.name_offset != pos or t.name_offset + t.name_length > stlen:
            raise SpecError(
                "E_BAD_LAYOUT",
                "tensor %d: name at %d+%d, string table %d, expected at %d"
                % (t.index, t.name_offset, t.name_length, stlen, pos),
            )
        raw = bytes(mv[stbase + t.name_offset : stbase + t.name_offset + t.name_length])
        t.name = _check_name(raw, t.index)
        if raw in names:
            raise SpecError("E_DUPLICATE_NAME", "tensor %d: duplicate name %r" % (t.index, t.name))
        names.add(raw)
        pos += t.name_length
    if pos != stlen:
        raise SpecError(
            "E_BAD_LAYOUT", "names take %d bytes, string_table_length %d" % (pos, stlen)
        )
    # 12. metadata
    if mlen > 0:
        mbase = stbase + stlen
        check_metadata(mv[mbase : mbase + mlen])
    # 13. section offsets
    expect = data_offset
    for i, (off, length, _, _) in enumerate(sections):
        if off != expect:
            raise SpecError("E_BAD_LAYOUT", "section %d at %d, expected %d" % (i, off, expect))
        if off + length > flen:  # Python ints: also covers > 2^64
            raise SpecError(
                "E_TRUNCATED", "section %d ends at %d, file has %d bytes" % (i, off + length, flen)
            )
        expect = _align(off + length, alignment)
    file_end = sections[-1][0] + sections[-1][1] if sections else data_offset
    if flen != file_end:
        raise SpecError(
            "E_BAD_LAYOUT", "file has %d bytes, structure ends at %d" % (flen, file_end)
        )
    return tensors, sections, alignment


# ----------------------------------------------------------------------------------------
# tensor headers (C-9.3, first half)


def _bilevel_lengths(t):
    p = t.bp
    m, n = t.dims
    b, sb, g, S, E = p["bits"], p["sb"], p["g"], p["S"], p["E"]
    G = _ceil(n, g)
    out = [(ROLE_CODES, 4 * _ceil(m * n * b, 32))]
    if sb == 0:
        out.append((ROLE_STATS, 4 * m * G))
    else:
        T = _ceil(m, S)
        out.append((ROLE_STATS, 4 * _ceil(2 * m * G * sb, 32)))
        out.append((ROLE_STATS2, 8 * T * G))
    if p["perm"]:
        out.append((ROLE_PERM, (2 if n <= 65536 else 4) * n))
    if p["outliers"]:
        NB = _ceil(m, 16)
        out.append((ROLE_OIDX, 4 * (NB + 1)))
        out.append((ROLE_OENT, 4 * E))
    return out


def _check_tensor_header(t, sections):
    if t.encoding not in (1, 2, 3):
        raise SpecError("E_UNKNOWN_ENCODING", "tensor %r: encoding %d" % (t.name, t.encoding))
    if t.encoding_version != 1:
        raise SpecError(
            "E_UNSUPPORTED_ENCODING_VERSION",
            "tensor %r: encoding %d version %d" % (t.name, t.encoding, t.encoding_version),
        )
    secs = [sections[i] for i in range(t.first_section, t.first_section + t.section_count)]
    if t.encoding == 1:
        if any(t.params):
            raise SpecError("E_BAD_FIELD", f"tensor {t.name!r}: raw params not zero")
        want = [(ROLE_DATA, t.count * DTYPES[t.dtype][1])]
    elif t.encoding == 3:
        want = _channel_mixed_header(t)
    else:
        bits, sb, flags, g, S, r1, K, E, r2 = _BPARAMS.unpack_from(t.params, 0)
        if r1 or r2:
            raise SpecError("E_BAD_FIELD", f"tensor {t.name!r}: reserved params not zero")
        if flags & ~3:
            raise SpecError("E_BAD_FIELD", f"tensor {t.name!r}: unknown flags 0x{flags:x}")
        if not 1 <= bits <= 8:
            raise SpecError("E_BAD_FIELD", "tensor %r: bits %d" % (t.name, bits))
        if not 1 <= g <= MAX_GROUP:
            raise SpecError("E_BAD_FIELD", "tensor %r: group_size %d" % (t.name, g))
        if sb > 8:
            raise SpecError("E_BAD_FIELD", "tensor %r: stats_bits %d" % (t.name, sb))
        if (sb == 0 and S != 0) or (sb > 0 and not 1 <= S <= MAX_GROUP):
            raise SpecError(
                "E_BAD_FIELD", "tensor %r: stats_group_size %d with stats_bits %d" % (t.name, S, sb)
            )
        has_out = bool(flags & 2)
        if has_out != (E != 0):
            raise SpecError(
                "E_BAD_FIELD", "tensor %r: flag outliers %d with %d entries" % (t.name, has_out, E)
            )
        if E > MAX_OUTLIER_ENTRIES:
            raise SpecError("E_LIMIT", "tensor %r: %d outlier entries" % (t.name, E))
        if K > E:
            raise SpecError(
                "E_BAD_FIELD", "tensor %r: outlier_count %d > entries %d" % (t.name, K, E)
            )
        if t.ndim != 2 or t.dims[0] < 1 or t.dims[1] < 1:
            raise SpecError("E_BAD_SHAPE", f"tensor {t.name!r}: bilevel shape {list(t.dims)}")
        t.bp = dict(bits=bits, sb=sb, g=g, S=S, K=K, E=E, perm=bool(flags & 1), outliers=has_out)
        want = _bilevel_lengths(t)
    roles = [s[3] for s in secs]
    if roles != [r for r, _ in want]:
        raise SpecError(
            "E_BAD_LAYOUT", f"tensor {t.name!r}: roles {roles}, expected {[r for r, _ in want]}"
        )
    for s, (r, length) in zip(secs, want, strict=False):
        if s[1] != length:
            raise SpecError(
                "E_BAD_LAYOUT",
                "tensor %r: role %d section of %d bytes, expected %d" % (t.name, r, s[1], length),
            )


def _channel_mixed_header(t):
    """C-12.8 header part: table_rows, shape, width counts, then the section lengths."""
    vals = _CPARAMS.unpack_from(t.params, 0)
    c = [0] + list(vals[:8])  # c[b] for b = 1..8
    R, E = vals[8], vals[9]
    if R > MAX_GROUP:
        raise SpecError("E_BAD_FIELD", "tensor %r: table_rows %d" % (t.name, R))
    if t.ndim != 2 or t.dims[0] < 1 or t.dims[1] < 1:
        raise SpecError("E_BAD_SHAPE", f"tensor {t.name!r}: channel_mixed shape {list(t.dims)}")
    m, n = t.dims
    if sum(c) != n:
        raise SpecError(
            "E_BAD_FIELD", "tensor %r: width counts sum to %d, n = %d" % (t.name, sum(c), n)
        )
    T = 1 if R == 0 else _ceil(m, R)
    L = sum(c[b] << b for b in range(1, 9))
    t.cp = dict(c=c, R=R, E=E, T=T, L=L)
    want = [
        (ROLE_CODES, 4 * sum(_ceil(m * c[b] * b, 32) for b in range(1, 9))),
        (ROLE_PERM, (2 if n <= 65536 else 4) * n),
    ]
    if E > 0:
        want.append((ROLE_OIDX, 4 * (_ceil(m, 16) + 1)))
        want.append((ROLE_OENT, 4 * E))
    want.append((ROLE_TABLES, 2 * T * L))
    return want


# ----------------------------------------------------------------------------------------
# bilevel decoding (sections 5-7)


def unpack_stream(data, N, w):
    """Packed stream (C-5.2) of N elements of w (1..8) bits -> uint8 array of N codes."""
    if N == 0:
        return np.zeros(0, np.uint8)
    groups = _ceil(N, 8)  # 8 elements take exactly w bytes
    nbytes = groups * w
    src = np.frombuffer(data, dtype=np.uint8)
    if len(src) >= nbytes:
        buf = src[:nbytes]
    else:
        buf = np.zeros(nbytes, np.uint8)
        buf[: len(src)] = src
    b = buf.reshape(groups, w)
    word = b[:, 0].astype(np.uint64)
    for k in range(1, w):
        word |= b[:, k].astype(np.uint64) << np.uint64(8 * k)
    out = np.empty((groups, 8), np.uint8)
    mask = np.uint64((1 << w) - 1)
    for e in range(8):
        out[:, e] = (word >> np.uint64(e * w)) & mask
    return out.reshape(-1)[:N]


def _expand_cols(a, g, n):
    """(m, G) per-group values -> (m, n) per-column values."""
    G = a.shape[1]
    if g == 1:
        return a
    if G == 1:
        return np.repeat(a, n, axis=1)
    counts = np.full(G, g, dtype=np.int64)
    counts[-1] = n - g * (G - 1)
    return np.repeat(a, counts, axis=1)


def _read_perm(t, secdata, n):
    """C-5.7: perm entries, a permutation of 0..n-1 (E_BAD_PERMUTATION)."""
    perm = np.frombuffer(secdata[ROLE_PERM], dtype="<u2" if n <= 65536 else "<u4").astype(np.int64)
    if perm.size and int(perm.max()) >= n:
        raise SpecError(
            "E_BAD_PERMUTATION", "tensor %r: perm entry %d >= n = %d" % (t.name, int(perm.max()), n)
        )
    seen = np.bincount(perm, minlength=n)
    if np.any(seen != 1):
        raise SpecError(
            "E_BAD_PERMUTATION",
            "tensor %r: column %d appears %d times"
            % (t.name, int(np.argmax(seen != 1)), int(seen[np.argmax(seen != 1)])),
        )
    return perm


def _decode_channel_mixed(t, secdata):
    """C-12.8 data checks and the C-12.7 decode; float32 W[m, n] in original column order."""
    p = t.cp
    m, n = t.dims
    c, R, E, T, L = p["c"], p["R"], p["E"], p["T"], p["L"]
    perm = _read_perm(t, secdata, n)
    tab = np.frombuffer(secdata[ROLE_TABLES], dtype="<u2").reshape(T, L)
    if np.any((tab & 0x7C00) == 0x7C00):
        raise SpecError("E_NONFINITE", f"tensor {t.name!r}: non-finite f16 in tables")
    out = None
    if E > 0:
        ent = np.frombuffer(secdata[ROLE_OENT], dtype="<u4")
        K = int(np.count_nonzero((ent >> 16) != 0xFFFF))  # rule 6 of C-6.2 does not apply
        out = _outlier_stream(t, secdata, m, n, E, K)
    # codes (C-12.3): one packed stream per run, each starting at a word boundary
    q = np.empty((m, n), np.int64)
    offs = np.empty(n, np.int64)  # o_j (C-12.2)
    codes = secdata[ROLE_CODES]
    word = 0
    s = 0
    o = 0
    for b in range(1, 9):
        if c[b] == 0:
            continue
        nw = _ceil(m * c[b] * b, 32)
        run = unpack_stream(codes[4 * word : 4 * (word + nw)], m * c[b], b)
        q[:, s : s + c[b]] = run.reshape(m, c[b])
        offs[s : s + c[b]] = o + (np.arange(c[b], dtype=np.int64) << b)
        word += nw
        s += c[b]
        o += c[b] << b
    blk = np.zeros(m, np.int64) if R == 0 else np.arange(m, dtype=np.int64) // R
    v = f16_bits_to_f32(tab[blk[:, None], offs[None, :] + q])  # C-12.7
    if out is not None and out[0].size:
        v[out[0], out[1]] = out[2]
    W = np.empty_like(v)
    W[:, perm] = v
    return W


def _decode_bilevel(t, secdata):
    """Data checks of C-9.3 (permutation, finite stats, outliers) and the decode of section 7.
    Returns the float32 W[m, n] in original column order."""
    p = t.bp
    m, n = t.dims
    b, sb, g, S = p["bits"], p["sb"], p["g"], p["S"]
    G = _ceil(n, g)
    # permutation (E_BAD_PERMUTATION)
    perm = None
    if p["perm"]:
        perm = _read_perm(t, secdata, n)
    # finite statistics (E_NONFINITE, C-5.8)
    if sb == 0:
        st = np.frombuffer(secdata[ROLE_STATS], dtype="<u2").reshape(m, G, 2)
        if np.any((st & 0x7C00) == 0x7C00):
            raise SpecError("E_NONFINITE", f"tensor {t.name!r}: non-finite f16 in stats")
    else:
        T = _ceil(m, S)
        st2 = np.frombuffer(secdata[ROLE_STATS2], dtype="<u2").reshape(T, G, 4)
        if np.any((st2 & 0x7C00) == 0x7C00):
            raise SpecError("E_NONFINITE", f"tensor {t.name!r}: non-finite f16 in stats2")
    # outlier stream (C-6.1, C-6.2 in order)
    out_rows = out_cols = out_vals = None
    if p["outliers"]:
        out_rows, out_cols, out_vals = _outlier_stream(t, secdata, m, n, p["E"], p["K"])
    return _bilevel_values(
        t,
        secdata,
        p,
        m,
        n,
        b,
        sb,
        g,
        S,
        G,
        st if sb == 0 else st2,
        perm,
        out_rows,
        out_cols,
        out_vals,
    )


def _outlier_stream(t, secdata, m, n, E, K):
    """C-6.1 and C-6.2, rule by rule; (rows, stored cols, f32 values) of the outliers."""
    NB = _ceil(m, 16)
    X = np.frombuffer(secdata[ROLE_OIDX], dtype="<u4").astype(np.int64)
    if X[0] != 0 or X[-1] != E or np.any(np.diff(X) < 0):
        raise SpecError("E_BAD_OUTLIERS", f"tensor {t.name!r}: bad outlier_index")
    ent = np.frombuffer(secdata[ROLE_OENT], dtype="<u4")
    delta = (ent & 0xFFFF).astype(np.int64)
    value = (ent >> 16).astype(np.uint16)
    if np.any(delta < 1):
        i = int(np.argmax(delta < 1))
        raise SpecError("E_BAD_OUTLIERS", "tensor %r: entry %d: delta 0" % (t.name, i))
    skip = value == 0xFFFF
    if np.any(skip & (delta != 65535)):
        i = int(np.argmax(skip & (delta != 65535)))
        raise SpecError(
            "E_BAD_OUTLIERS", "tensor %r: entry %d: skip with delta %d" % (t.name, i, int(delta[i]))
        )
    nonempty = X[1:] > X[:-1]
    last = X[1:][nonempty] - 1
    if last.size and np.any(skip[last]):
        raise SpecError("E_BAD_OUTLIERS", f"tensor {t.name!r}: a block ends with a skip")
    counts = np.diff(X)
    block = np.repeat(np.arange(NB, dtype=np.int64), counts)
    C0 = np.zeros(E + 1, dtype=np.int64)
    np.cumsum(delta, out=C0[1:])
    pcell = C0[1:] - C0[X[:-1]][block] - 1
    rows_in_block = np.minimum(16, m - 16 * block)
    real = ~skip
    bad = real & (pcell >= rows_in_block * n)
    if np.any(bad):
        i = int(np.argmax(bad))
        raise SpecError(
            "E_BAD_OUTLIERS",
            "tensor %r: entry %d: cell %d past its block" % (t.name, i, int(pcell[i])),
        )
    nreal = int(np.count_nonzero(real))
    if nreal != K:
        raise SpecError(
            "E_BAD_OUTLIERS", "tensor %r: %d outliers, outlier_count %d" % (t.name, nreal, K)
        )
    vals = value[real]
    if np.any((vals & 0x7C00) == 0x7C00):
        raise SpecError("E_NONFINITE", f"tensor {t.name!r}: non-finite outlier value")
    pr = pcell[real]
    return 16 * block[real] + pr // n, pr % n, f16_bits_to_f32(vals)


def _bilevel_values(
    t, secdata, p, m, n, b, sb, g, S, G, st_any, perm, out_rows, out_cols, out_vals
):
    st = st2 = st_any
    # statistics (C-7.1)
    if sb == 0:
        s_g = f16_bits_to_f32(st[:, :, 0])
        z_g = f16_bits_to_f32(st[:, :, 1])
    else:
        qsz = unpack_stream(secdata[ROLE_STATS], 2 * m * G, sb).reshape(m, G, 2)
        qs = qsz[:, :, 0].astype(F32)
        qz = qsz[:, :, 1].astype(F32)
        rec = f16_bits_to_f32(st2)  # (T, G, 4)
        tile = np.arange(m) // S
        ss, sbase, zs, zbase = (rec[:, :, c][tile] for c in range(4))
        s_g = np.add(sbase, np.multiply(ss, qs, dtype=F32), dtype=F32)
        z_g = np.add(zbase, np.multiply(zs, qz, dtype=F32), dtype=F32)
    # dense weights (C-7.2)
    q = unpack_stream(secdata[ROLE_CODES], m * n, b).reshape(m, n).astype(F32)
    z = _expand_cols(z_g, g, n)
    np.subtract(q, z, out=q, dtype=F32)
    del z
    s = _expand_cols(s_g, g, n)
    np.multiply(s, q, out=q, dtype=F32)
    del s
    v = q
    # outliers replace (C-7.3)
    if out_rows is not None and out_rows.size:
        v[out_rows, out_cols] = out_vals
    # permutation (C-7.4): W[i, perm[j]] = v[i, j]
    if perm is not None:
        W = np.empty_like(v)
        W[:, perm] = v
        v = W
    return v


# ----------------------------------------------------------------------------------------
# whole file


def _decode(path, check_crc=True, check_digest=True, want_f32=False):
    buf = _read_bytes(path)
    tensors, sections, alignment = _parse_container(buf)
    mv = memoryview(buf)
    for t in tensors:
        _check_tensor_header(t, sections)
    nsec = len(sections)
    results = {}
    for t in tensors:
        secdata = {}
        for si in range(t.first_section, t.first_section + t.section_count):
            off, length, scrc, role = sections[si]
            data = mv[off : off + length]
            if check_crc and zlib.crc32(data) != scrc:
                raise SpecError(
                    "E_SECTION_CRC",
                    "tensor %r: section %d (role %d) crc mismatch" % (t.name, si, role),
                )
            if si + 1 < nsec and any(mv[off + length : sections[si + 1][0]]):
                raise SpecError("E_BAD_LAYOUT", "non-zero padding after section %d" % si)
            secdata[role] = data
        name, dt = t.name, t.dtype
        if t.encoding == 1:
            data = secdata[ROLE_DATA]
            if check_digest and hashlib.sha256(data).digest() != t.digest:
                raise SpecError("E_DIGEST_MISMATCH", f"tensor {name!r}: digest mismatch")
            npdt = {1: "<f4", 2: "<f2", 3: "<u2"}[dt]
            arr = np.frombuffer(data, dtype=npdt)
            f32 = None
        else:
            f32 = (_decode_channel_mixed if t.encoding == 3 else _decode_bilevel)(t, secdata)
            arr = _from_f32(f32, dt)
            if (
                check_digest
                and hashlib.sha256(
                    arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
                ).digest()
                != t.digest
            ):
                raise SpecError("E_DIGEST_MISMATCH", f"tensor {name!r}: digest mismatch")
        try:
            arr = arr.reshape(t.dims)
        except ValueError:
            if t.count != 0:
                raise
            arr = arr.reshape(0)  # numpy cannot represent this zero-size shape
        if want_f32:
            if f32 is None:
                f32 = _to_f32(arr, dt)
            results[name] = (DTYPES[dt][0], t.dims, arr, f32)
        else:
            results[name] = (DTYPES[dt][0], t.dims, arr)
    return results


def decode_file_info(path, check_crc=True, check_digest=True):
    return _decode(path, check_crc, check_digest)


def decode_file(path, check_crc=True, check_digest=True):
    """{name: array in the tensor's own dtype (bf16 as uint16 bit patterns)}."""
    return {k: v[2] for k, v in _decode(path, check_crc, check_digest).items()}


def decode_file_f32(path, check_crc=True, check_digest=True):
    """{name: float32 array}: bilevel W before output rounding, raw converted by C-7.5."""
    return {k: v[3] for k, v in _decode(path, check_crc, check_digest, want_f32=True).items()}


def matvec(path, name, x):
    """y = W x in float64 from the decoded float32 W (C-7.6)."""
    res = _decode(path, want_f32=True)
    if name not in res:
        raise SpecError("E_NOT_FOUND", f"no tensor {name!r}")
    W = res[name][3]
    return W.astype(np.float64) @ np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------------------
# safetensors I/O (conformance/README.md "Output file format")

_ST_DT = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "F64": ("<f8", 8)}


def write_safetensors(path, items):
    """items: list of (name, dtype_code, shape, bytes)."""
    header = {}
    off = 0
    for name, code, shape, data in items:
        header[name] = {
            "dtype": code,
            "shape": [int(d) for d in shape],
            "data_offsets": [off, off + len(data)],
        }
        off += len(data)
    hj = json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    hj += b" " * ((-len(hj)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for _, _, _, data in items:
            f.write(data)


def read_safetensors(path):
    raw = _read_bytes(path)
    if len(raw) < 8:
        raise ValueError("safetensors file too short")
    (hl,) = struct.unpack_from("<Q", raw, 0)
    if 8 + hl > len(raw):
        raise ValueError("safetensors header past the end")
    hdr = json.loads(raw[8 : 8 + hl].decode("utf-8"))
    base = 8 + hl
    out = {}
    for name, d in hdr.items():
        if name == "__metadata__":
            continue
        npdt, size = _ST_DT[d["dtype"]]
        b, e = d["data_offsets"]
        arr = np.frombuffer(raw[base + b : base + e], dtype=npdt)
        out[name] = arr.reshape(d["shape"])
    return out


def _cli_decode(inp, outp):
    res = _decode(inp)
    items = []
    for name, (dtname, dims, arr) in res.items():
        code = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtname]
        le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        items.append((name, code, dims, le.tobytes()))
    write_safetensors(outp, items)


def _cli_matvec(a, b, outp):
    with open(a, "rb") as f:
        a_is_spqr = f.read(8) == MAGIC
    inp, xp = (a, b) if a_is_spqr else (b, a)
    res = _decode(inp, want_f32=True)
    xs = read_safetensors(xp)
    items = []
    for name, x in xs.items():
        if name not in res:
            raise SpecError("E_NOT_FOUND", f"x names tensor {name!r} not in the file")
        W = res[name][3]
        y = W.astype(np.float64) @ x.astype(np.float64)
        items.append((name, "F64", [W.shape[0]], y.astype("<f8").tobytes()))
    write_safetensors(outp, items)


def main(argv):
    try:
        if len(argv) == 4 and argv[0] == "--matvec":
            _cli_matvec(argv[1], argv[2], argv[3])
        elif len(argv) == 2:
            _cli_decode(argv[0], argv[1])
        else:
            sys.stderr.write("usage: numpy_decoder.py INPUT OUTPUT | --matvec INPUT X OUTPUT\n")
            return 2
    except SpecError as exc:
        sys.stderr.write(f"{exc.code}: {exc.message}\n")
        return 1
    except MemoryError:
        sys.stderr.write("internal failure: out of memory\n")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
