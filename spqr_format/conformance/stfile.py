"""The exact output file format of the conformance protocol: a strict subset of safetensors.

A decoder writes one safetensors file (https://github.com/huggingface/safetensors): an 8-byte
little-endian ``u64 N``, ``N`` bytes of UTF-8 JSON, then the data buffer. The JSON object maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
buffer). The conformance suite accepts the dtypes ``F32``, ``F16``, ``BF16`` (decoded weights,
bf16 as the upper 16 bits of a binary32), ``F64`` (matvec results) and nothing else; an optional
``__metadata__`` entry is ignored. Any writer of safetensors produces this; the reader here is
written out in full so that the judge does not depend on a library's leniency.

This module is also the writer the generator uses for expected outputs and ``x`` inputs:
tensors in the order given, JSON without spaces, padded with spaces to 8 bytes (as
safetensors' own writer does), so the bytes are deterministic.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np

# safetensors dtype -> (numpy storage dtype, element bytes). BF16 is held as uint16 bits.
DTYPES = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
}
SPQR_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MAX_HEADER = 100_000_000  # safetensors' own cap


class StFormatError(ValueError):
    """The decoder's output file is not a valid safetensors file of the accepted subset."""


def dumps(tensors: Mapping[str, tuple[str, np.ndarray]]) -> bytes:
    """``{name: (st_dtype, array)}`` -> safetensors bytes (bf16 arrays hold uint16 bits)."""
    header: dict[str, object] = {}
    blobs = []
    offset = 0
    for name, (dt, arr) in tensors.items():
        storage, size = DTYPES[dt]
        shape = [int(d) for d in arr.shape]  # before asarray: zero-size stand-ins keep theirs
        a = np.asarray(arr)
        if a.dtype.itemsize != size:
            raise ValueError(f"{name}: {a.dtype} is not {dt}")
        data = np.require(a, dtype=np.dtype(storage), requirements="C").reshape(-1).tobytes()
        if len(data) != size * int(np.prod(shape, dtype=object)):
            raise ValueError(f"{name}: {len(data)} bytes for {dt}{shape}")
        header[name] = {
            "dtype": dt,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + b"".join(blobs)


def write(path, tensors: Mapping[str, tuple[str, np.ndarray]]) -> None:
    with open(path, "wb") as f:
        f.write(dumps(tensors))


def _reject_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise StFormatError(f"duplicate key {k!r} in the safetensors header")
        out[k] = v
    return out


def loads(data: bytes) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Parse safetensors bytes strictly: ``{name: (st_dtype, shape, raw little-endian bytes)}``.

    Refuses (StFormatError) a short file, a header over 100 MB or not a JSON object, unknown
    dtypes, non-integer or negative dims, offsets that are not ``[begin, end]`` integers within
    the buffer or do not match shape x dtype. Overlapping ranges are allowed (only reads).
    """
    if len(data) < 8:
        raise StFormatError(f"file is {len(data)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > MAX_HEADER or 8 + n > len(data):
        raise StFormatError(f"header length {n} is over the cap or past the end of the file")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StFormatError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise StFormatError("header is not a JSON object")
    buf = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise StFormatError(f"{name!r}: entry is not an object")
        dt = info.get("dtype")
        if dt not in DTYPES:
            raise StFormatError(f"{name!r}: dtype {dt!r} is not one of {sorted(DTYPES)}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise StFormatError(f"{name!r}: shape {shape!r} is not a list of integers >= 0")
        offs = info.get("data_offsets")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1] <= len(buf)
        ):
            raise StFormatError(f"{name!r}: data_offsets {offs!r} are not within the buffer")
        count = 1
        for d in shape:
            count *= d
        if offs[1] - offs[0] != count * DTYPES[dt][1]:
            raise StFormatError(
                f"{name!r}: {offs[1] - offs[0]} bytes for {dt}{shape} ({count * DTYPES[dt][1]})"
            )
        out[name] = (dt, tuple(shape), bytes(buf[offs[0] : offs[1]]))
    return out


def read(path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    with open(path, "rb") as f:
        return loads(f.read())


def as_array(entry: tuple[str, tuple[int, ...], bytes]) -> np.ndarray:
    """One parsed entry as a numpy array (bf16 as uint16 bits, native byte order)."""
    dt, shape, raw = entry
    arr = np.frombuffer(raw, dtype=np.dtype(DTYPES[dt][0])).reshape(shape)
    return arr.astype(arr.dtype.newbyteorder("="))
