"""The manifest (``conformance/manifest.json``): schema, loading, validation, hashes.

Schema ``spqr-conformance/1``::

    {
      "schema": "spqr-conformance/1",
      "spec_version": "1.0",
      "generator": "spqr_format.conformance.generate",
      "tolerance": {"rel": 2^-9, "abs": 2^-24, "formula": "..."},   # default of C-7.6
      "untestable": [{"clause": "C-x.y", "reason": "..."}],        # MUST clauses no file can break
      "vectors": [
        {"id": "...", "kind": "decode" | "matvec" | "reject", "suite": "fast" | "full",
         "spec_version": "1.0", "labels": [...], "clauses": ["C-2.3", ...],
         "description": "...",
         "files": {"input.spqr": {"sha256": "...", "bytes": N}, ...},
         "error": "E_..."           # reject only
         "tolerance": {...}         # matvec only
        }, ...
      ]
    }

Vectors of the ``fast`` suite live in ``<root>/vectors/<id>/``; ``full`` vectors are built on
demand into a cache directory and must match the hashes listed here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

SCHEMA = "spqr-conformance/1"
KINDS = ("decode", "matvec", "reject")
SUITES = ("fast", "full")
FILES_BY_KIND = {
    "decode": {"input.spqr", "expected.safetensors"},
    "matvec": {"input.spqr", "x.safetensors", "y_ref.safetensors", "y_absdot.safetensors"},
    "reject": {"input.spqr"},
}
ERROR_CODES = (
    "E_IO",
    "E_TRUNCATED",
    "E_BAD_MAGIC",
    "E_UNSUPPORTED_VERSION",
    "E_HEADER_CRC",
    "E_LIMIT",
    "E_BAD_FIELD",
    "E_UNKNOWN_FEATURE",
    "E_BAD_NAME",
    "E_DUPLICATE_NAME",
    "E_BAD_METADATA",
    "E_BAD_LAYOUT",
    "E_UNKNOWN_ENCODING",
    "E_UNSUPPORTED_ENCODING_VERSION",
    "E_BAD_SHAPE",
    "E_SECTION_CRC",
    "E_BAD_PERMUTATION",
    "E_BAD_OUTLIERS",
    "E_NONFINITE",
    "E_DIGEST_MISMATCH",
)
_ID = re.compile(r"[a-z0-9][a-z0-9.-]*")
_CLAUSE = re.compile(r"C-\d+\.\d+[a-z]?")

# MUST clauses of SPEC.md that no file can violate, so that no vector can cover them. The test
# of the suite fails for every other MUST clause that no vector cites.
UNTESTABLE: list[dict] = []


class ManifestError(ValueError):
    pass


def default_root() -> Path:
    """The conformance directory: $SPQR_CONFORMANCE_DIR, else ``conformance/`` of the source
    tree this package sits in, else ``./conformance``."""
    env = os.environ.get("SPQR_CONFORMANCE_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2] / "conformance"
    if (here / "manifest.json").exists() or (here / "README.md").exists():
        return here
    return Path("conformance")


def resolve_root(path: str | os.PathLike | None) -> Path:
    """``--vectors DIR``: the directory with manifest.json, or its ``vectors/`` subdirectory."""
    if path is None:
        return default_root()
    p = Path(path)
    if not (p / "manifest.json").exists() and (p.parent / "manifest.json").exists():
        return p.parent
    return p


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spqr-format" / "conformance"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validate(doc: dict) -> None:
    """Raise ManifestError unless ``doc`` follows the schema."""
    if doc.get("schema") != SCHEMA:
        raise ManifestError(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    seen = set()
    for v in doc.get("vectors", []):
        vid = v.get("id")
        if not isinstance(vid, str) or not _ID.fullmatch(vid):
            raise ManifestError(f"bad vector id {vid!r}")
        if vid in seen:
            raise ManifestError(f"duplicate vector id {vid!r}")
        seen.add(vid)
        if v.get("kind") not in KINDS or v.get("suite") not in SUITES:
            raise ManifestError(f"{vid}: bad kind or suite")
        files = v.get("files", {})
        if set(files) != FILES_BY_KIND[v["kind"]]:
            raise ManifestError(f"{vid}: files {sorted(files)} for kind {v['kind']}")
        for name, info in files.items():
            if not re.fullmatch(r"[0-9a-f]{64}", str(info.get("sha256", ""))):
                raise ManifestError(f"{vid}/{name}: bad sha256")
        for c in v.get("clauses", []):
            if not _CLAUSE.fullmatch(c):
                raise ManifestError(f"{vid}: bad clause id {c!r}")
        if v["kind"] == "reject" and v.get("error") not in ERROR_CODES:
            raise ManifestError(f"{vid}: bad error code {v.get('error')!r}")
        if v["kind"] == "matvec":
            tol = v.get("tolerance", {})
            if not all(isinstance(tol.get(k), (int, float)) for k in ("rel", "abs")):
                raise ManifestError(f"{vid}: matvec vectors need tolerance rel and abs")


def load(root: Path) -> dict:
    path = Path(root) / "manifest.json"
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ManifestError(
            f"{path} not found (run `spqr conformance generate` in a source checkout, or pass "
            "--vectors DIR)"
        ) from None
    validate(doc)
    return doc


def dump(doc: dict, root: Path) -> None:
    validate(doc)
    text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    (Path(root) / "manifest.json").write_text(text, encoding="utf-8")


def vector_dir(root: Path, cache: Path, v: dict) -> Path:
    return (Path(root) / "vectors" if v["suite"] == "fast" else Path(cache)) / v["id"]


def check_files(directory: Path, v: dict) -> list[str]:
    """Problems with the files of vector ``v`` in ``directory`` (missing, wrong hash)."""
    problems = []
    for name, info in v["files"].items():
        p = directory / name
        if not p.exists():
            problems.append(f"{v['id']}/{name}: missing")
        elif file_sha256(p) != info["sha256"]:
            problems.append(f"{v['id']}/{name}: sha256 differs from the manifest")
    return problems
