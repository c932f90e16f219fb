"""The encoding layer's validation, in one place and in the order of SPEC C-9.3.

The container layer (``container/reader.py``) checks everything SPEC C-9.2 lists when a file is
opened and knows nothing of encodings. What is left is per tensor, and lives here:

1. :func:`check_tensor_header`, from the tensor record alone (no section byte is read):
   encoding implemented (E_UNKNOWN_ENCODING), encoding version implemented
   (E_UNSUPPORTED_ENCODING_VERSION), ``params`` (C-4.1 / C-5.1, E_BAD_FIELD / E_LIMIT), the
   shape (E_BAD_SHAPE), the section roles and lengths (E_BAD_LAYOUT);
2. the section CRCs, which the container checks as it hands out section bytes (C-2.8a);
3. :func:`check_bilevel_data`, on the sections' contents: the structure of the arrays, the
   permutation (E_BAD_PERMUTATION), finite statistics (E_NONFINITE), the outlier stream in the
   order of C-6.2 (E_BAD_OUTLIERS / E_NONFINITE);
4. the digest, which needs the decoded weights (``api.SpqrFile.decode``).

Every decoder path (CPU reference, GPU upload, the API) goes through these two functions, so
the order the spec states is the order in this file. Pure functions of plain values: the codec
does not import the container.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spqr_format import spec
from spqr_format.codec import channel_mixed as cm
from spqr_format.codec.bilevel import BilevelHeader, Outliers, PackedBilevel, section_layout
from spqr_format.codec.outliers import decode_outlier_stream, decoder_outliers
from spqr_format.codec.packing import check_finite_f16, check_packed_structure, check_permutation
from spqr_format.errors import (
    BadFieldError,
    BadLayoutError,
    UnknownEncodingError,
    UnsupportedEncodingVersionError,
)
from spqr_format.spec import DType, Encoding, Role


@dataclass(frozen=True)
class TensorHeader:
    """What :func:`check_tensor_header` established: the encoding, its decoded ``params``
    (a :class:`BilevelHeader`, or None for ``raw``) and the sections it requires."""

    encoding: Encoding
    bilevel: BilevelHeader | None
    layout: tuple[tuple[Role, int], ...]
    channel_mixed: cm.ChannelMixedHeader | None = None


def check_encoding(encoding: int, encoding_version: int) -> Encoding:
    """C-3.4 / C-3.5: the encoding and its version are ones this reader implements."""
    try:
        enc = Encoding(encoding)
    except ValueError:
        raise UnknownEncodingError(f"encoding id {encoding} is not defined by SPEC 1.0") from None
    if enc not in spec.ENCODING_VERSIONS:
        raise UnknownEncodingError(
            f"encoding {spec.ENCODING_NAMES[enc]!r} (id {int(enc)}) is reserved and not implemented"
        )
    if encoding_version not in spec.ENCODING_VERSIONS[enc]:
        raise UnsupportedEncodingVersionError(
            f"{spec.ENCODING_NAMES[enc]} version {encoding_version} not implemented "
            f"(known: {spec.ENCODING_VERSIONS[enc]})"
        )
    return enc


def check_tensor_header(
    encoding: int,
    encoding_version: int,
    dtype: int,
    shape: Sequence[int],
    params: bytes,
    sections: Sequence[tuple[int, int]],
) -> TensorHeader:
    """SPEC C-9.3, header part, for one tensor record (``sections``: its (role, length) pairs
    in file order; the container has already checked that roles strictly increase)."""
    enc = check_encoding(encoding, encoding_version)
    bilevel = None
    mixed = None
    if enc == Encoding.RAW:
        if any(params):
            raise BadFieldError("raw tensors have all-zero params (C-4.1)", field="params")
        count = int(np.prod(shape, dtype=object)) if len(shape) else 1
        layout = [(Role.DATA, count * spec.DTYPE_SIZES[DType(dtype)])]
    elif enc == Encoding.CHANNEL_MIXED:
        mixed = cm.ChannelMixedHeader.from_bytes(params)  # C-12.1: table_rows
        layout = cm.section_layout(tuple(shape), mixed)  # shape, sum of counts, lengths
    else:
        bilevel = BilevelHeader.from_bytes(params)  # params in C-5.1 order
        layout = section_layout(tuple(shape), bilevel)  # shape, then the derived lengths
    found = [(int(r), int(n)) for r, n in sections]
    if [(int(r), n) for r, n in layout] != found:

        def show(items):
            return ", ".join(f"{spec.ROLE_NAMES.get(r, r)}:{n}" for r, n in items)

        raise BadLayoutError(f"sections [{show(found)}] but the encoding needs [{show(layout)}]")
    return TensorHeader(enc, bilevel, tuple(layout), mixed)


def check_bilevel_data(p: PackedBilevel) -> Outliers | None:
    """SPEC C-9.3, data part, for a bilevel tensor whose sections passed their CRCs.

    Structure (array dtypes and shapes against the header), perm is a permutation
    (E_BAD_PERMUTATION), stats (sb = 0) and stats2 f16 values finite (E_NONFINITE), outlier
    stream valid (E_BAD_OUTLIERS / E_NONFINITE, rules in the order of C-6.2). All checks are
    vectorized numpy. Returns the outliers in coordinate form (None without outliers), which
    the decoders then use instead of parsing the stream a second time.
    """
    check_packed_structure(p)
    if p.perm is not None:
        check_permutation(p.perm, p.shape[1])
    if p.params.stats_bits == 0:
        check_finite_f16(p.stats, "stats")
    else:
        check_finite_f16(p.stats2, "stats2")
    if not p.header.has_outliers:
        return None
    m, n = p.shape
    return decode_outlier_stream(p.outlier_index, p.outlier_entries, m, n, p.header.outlier_count)


def checked_outliers(p: PackedBilevel, validate: bool) -> Outliers | None:
    """The outliers of ``p`` in coordinate form (None without outliers), for a decoder:
    after :func:`check_bilevel_data` when ``validate``, else after the structural checks only
    and from the non-raising parser, so that a bad stream gives unspecified values but every
    index stays in range (decoding unvalidated data must stay memory-safe)."""
    return decoder_outliers(p, validate, check_bilevel_data, check_packed_structure)
