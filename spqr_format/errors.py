"""Typed errors of spqr-format. One class per stable error code of SPEC.md section 9.

Every error names what it can of: the file, the tensor, the field, what was found and what
was expected. ``str(err)`` is a one-line message a user can act on; ``err.code`` is the stable
code that conformance vectors and scripts match on.
"""

from __future__ import annotations

import os


class SpqrError(Exception):
    """Base class: a failure with a stable code from SPEC.md section 9."""

    code = "E_GENERIC"

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        tensor: str | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.tensor = tensor
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.path is not None:
            where.append(f"file {self.path!r}")
        if self.tensor is not None:
            where.append(f"tensor {self.tensor!r}")
        if self.field is not None:
            where.append(f"field {self.field}")
        prefix = f"{self.code}: "
        if where:
            prefix += ", ".join(where) + ": "
        return prefix + self.message

    def with_context(self, *, path=None, tensor=None, field=None) -> SpqrError:
        """Fill in context that the raising layer did not know; returns self."""
        if path is not None and self.path is None:
            self.path = os.fspath(path)
        if tensor is not None and self.tensor is None:
            self.tensor = tensor
        if field is not None and self.field is None:
            self.field = field
        self.args = (self._render(),)
        return self


def _make(code: str, doc: str) -> type[SpqrError]:
    return type(code_to_class_name(code), (SpqrError,), {"code": code, "__doc__": doc})


def code_to_class_name(code: str) -> str:
    """``E_BAD_MAGIC`` -> ``BadMagicError``."""
    parts = code.removeprefix("E_").lower().split("_")
    return "".join(p.capitalize() for p in parts) + "Error"


IoError = _make("E_IO", "The file cannot be opened or read.")
TruncatedError = _make("E_TRUNCATED", "The file ends before the structure it declares.")
BadMagicError = _make("E_BAD_MAGIC", "The first 8 bytes are not the .spqr magic.")
UnsupportedVersionError = _make("E_UNSUPPORTED_VERSION", "Container major version not implemented.")
HeaderCrcError = _make("E_HEADER_CRC", "The header CRC does not match.")
LimitError = _make("E_LIMIT", "A count or size exceeds a cap, or would overflow.")
BadFieldError = _make("E_BAD_FIELD", "A field holds a value outside its allowed set.")
UnknownFeatureError = _make(
    "E_UNKNOWN_FEATURE", "A required feature the reader does not implement."
)
BadNameError = _make("E_BAD_NAME", "A tensor name is invalid.")
DuplicateNameError = _make("E_DUPLICATE_NAME", "Two tensors share a name.")
BadMetadataError = _make("E_BAD_METADATA", "The metadata JSON breaks SPEC C-2.11.")
BadLayoutError = _make("E_BAD_LAYOUT", "Sections or header parts are not where the spec puts them.")
UnknownEncodingError = _make("E_UNKNOWN_ENCODING", "Encoding id not implemented.")
UnsupportedEncodingVersionError = _make(
    "E_UNSUPPORTED_ENCODING_VERSION", "Encoding version not implemented."
)
BadShapeError = _make("E_BAD_SHAPE", "A shape the encoding does not allow.")
SectionCrcError = _make("E_SECTION_CRC", "A section's CRC does not match.")
BadPermutationError = _make("E_BAD_PERMUTATION", "The stored permutation is not a permutation.")
BadOutliersError = _make("E_BAD_OUTLIERS", "The outlier stream breaks SPEC C-6.1/C-6.2.")
NonFiniteError = _make("E_NONFINITE", "A statistic or outlier value is NaN or infinite.")
DigestMismatchError = _make("E_DIGEST_MISMATCH", "Decoded weights do not match the stored digest.")
NotFoundError = _make("E_NOT_FOUND", "The tensor asked for is not in the file.")
BadInputError = _make("E_BAD_INPUT", "An encoder or writer was given input it cannot store.")

ALL_ERRORS: tuple[type[SpqrError], ...] = (
    IoError,
    TruncatedError,
    BadMagicError,
    UnsupportedVersionError,
    HeaderCrcError,
    LimitError,
    BadFieldError,
    UnknownFeatureError,
    BadNameError,
    DuplicateNameError,
    BadMetadataError,
    BadLayoutError,
    UnknownEncodingError,
    UnsupportedEncodingVersionError,
    BadShapeError,
    SectionCrcError,
    BadPermutationError,
    BadOutliersError,
    NonFiniteError,
    DigestMismatchError,
    NotFoundError,
    BadInputError,
)

ERROR_BY_CODE: dict[str, type[SpqrError]] = {cls.code: cls for cls in ALL_ERRORS}

# Errors that mean "the bytes are damaged" (changed or cut short after they were written)
# rather than "the file is not a valid .spqr file" or "this reader does not implement it";
# `spqr verify` exits 1 on these and 2 on everything else.
INTEGRITY_ERRORS = (HeaderCrcError, SectionCrcError, DigestMismatchError, TruncatedError)
