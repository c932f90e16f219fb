"""Calibration and evaluation text: where it comes from and how it becomes token windows.

``wikitext2`` is not bundled: it resolves to the WikiText-2 raw token files in a data
directory, given by ``--data-dir`` or the environment variable ``SPQR_DATA_DIR``. The
directory holds ``wikitext-2/wiki.{train,valid,test}.tokens`` (or the files directly).
Calibration uses the train split, or the valid split where there is no train split;
evaluation uses the test split.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from spqr_format.errors import BadInputError, IoError

DATA_ENV = "SPQR_DATA_DIR"
NAMED = ("wikitext2",)


@dataclass
class TextSource:
    name: str  # "wikitext2" or the file name given
    path: str
    split: str | None  # for named sets


def resolve_text(spec: str, *, purpose: str, data_dir: str | None = None) -> TextSource:
    """A text file for ``spec`` (a path, or ``wikitext2``). ``purpose``: calib or eval."""
    if spec in NAMED:
        root = data_dir or os.environ.get(DATA_ENV)
        if not root:
            raise BadInputError(
                f"'{spec}' needs a data directory: pass --data-dir DIR or set {DATA_ENV} "
                "(DIR/wikitext-2/wiki.test.tokens ...), or give a text file"
            )
        splits = ("train", "valid") if purpose == "calib" else ("test",)
        for split in splits:
            for sub in ("wikitext-2", "wikitext-2-raw", ""):
                for ext in ("tokens", "raw"):
                    p = os.path.join(root, sub, f"wiki.{split}.{ext}")
                    if os.path.isfile(p):
                        return TextSource(spec, p, split)
        raise BadInputError(
            f"no WikiText-2 {'/'.join(splits)} split under the data directory "
            "(expected wikitext-2/wiki.<split>.tokens)",
            path=root,
        )
    if not os.path.isfile(spec):
        raise IoError("text file not found", path=spec)
    return TextSource(os.path.basename(spec), spec, None)


def read_text(src: TextSource) -> str:
    try:
        with open(src.path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise BadInputError(f"text is not UTF-8 ({err.reason})", path=src.path) from None


def tokenize(tokenizer, text: str) -> np.ndarray:
    """All token ids of ``text`` (no special tokens), int64. Long texts go in pieces of lines
    so no tokenizer length limit is hit."""
    ids: list[int] = []
    lines = text.splitlines(keepends=True)
    chunk: list[str] = []
    size = 0
    for line in lines + [None]:
        if line is not None:
            chunk.append(line)
            size += len(line)
        if chunk and (line is None or size >= 1 << 16):
            enc = tokenizer("".join(chunk), add_special_tokens=False, verbose=False)
            ids.extend(enc["input_ids"])
            chunk, size = [], 0
    return np.asarray(ids, dtype=np.int64)


def token_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def calibration_windows(
    ids: np.ndarray, samples: int, seq_len: int, seed: int, *, path: str | None = None
) -> np.ndarray:
    """``samples`` distinct, non-overlapping windows of ``seq_len`` tokens, chosen at random
    (seeded) among the ``len(ids) // seq_len`` windows of the text; ``[samples, seq_len]``."""
    if samples < 1 or seq_len < 2:
        raise BadInputError(f"need --samples >= 1 and --seq-len >= 2, got {samples} and {seq_len}")
    available = len(ids) // seq_len
    if available < samples:
        raise BadInputError(
            f"calibration text has {len(ids)} tokens: too short for --samples {samples} x "
            f"--seq-len {seq_len} = {samples * seq_len} tokens",
            path=path,
        )
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(available, size=samples, replace=False)) * seq_len
    return np.stack([ids[s : s + seq_len] for s in starts])
