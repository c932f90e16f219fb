"""Bounded, deterministic structure-aware fuzz of the reader (the atheris target's property,
tests/fuzz/fuzz_reader.py, on a few hundred inputs): valid files from the public API are
mutated at their fields, names, metadata and sections, the CRCs are fixed up so the changes
reach the checks behind them, and opening, listing, reading, decoding and verifying must
raise nothing but SpqrError."""

from __future__ import annotations

import pathlib
import random
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(pathlib.Path(__file__).parent / "fuzz"))
import spqr_mutator  # noqa: E402


@pytest.fixture(scope="module")
def seeds() -> list[bytes]:
    return spqr_mutator.build_seeds()


def test_seeds_are_valid_files(seeds, tmp_path):
    from spqr_format import api

    for i, data in enumerate(seeds):
        path = tmp_path / f"s{i}.spqr"
        path.write_bytes(data)
        with api.open_file(path) as f:
            for name in f.names():
                f.verify(name)


@settings(
    derandomize=True,
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 4))
def test_mutated_files_raise_only_spqr_errors(seeds, tmp_path, seed, steps):
    rng = random.Random(seed)
    data = rng.choice(seeds)
    for _ in range(steps):  # stacked mutations, each followed by the CRC fix-up (mostly)
        data = spqr_mutator.mutate(data, rng, seeds)
    spqr_mutator.check_bytes(data, str(tmp_path))
