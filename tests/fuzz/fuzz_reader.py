"""Coverage-guided fuzz target for the .spqr reader (atheris; ``pip install -e ".[fuzz]"``).

Each input is opened as a .spqr file through the public API: header, infos, then every tensor
is read, decoded in each dtype with the digest checked, and verified. Any exception other than
:class:`spqr_format.errors.SpqrError` is a crash; libFuzzer's ``-timeout`` and
``-rss_limit_mb`` catch hangs and over-allocation, and an address-space limit (RLIMIT_AS,
``SPQR_FUZZ_AS_MB``, default 8192) turns a runaway allocation into a MemoryError crash.

The mutator is structure-aware (spqr_mutator.py): it starts from valid files generated at
start-up from the public API (so they follow the current layout), aims mutations at header
fields, names, metadata and section contents, then fixes up the section and header CRCs so
that mutations reach the checks behind them. libFuzzer's own byte mutations are mixed in.

Run (from the repository root)::

    python tests/fuzz/fuzz_reader.py -atheris_runs=1000000 -timeout=20 -rss_limit_mb=4096 \\
        -max_len=131072 tests/fuzz/corpus-run     # corpus dir is created, seeds added

    # several workers: -workers=2 -jobs=2 (each job runs atheris_runs / jobs executions)
"""

from __future__ import annotations

import os
import random
import resource
import sys
import tempfile

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# Coverage of the pure-Python layers; the numba kernels (codec.reference, codec.quantizer,
# codec.gptq) cannot be instrumented (numba rejects the tracing calls), so they are excluded.
_NUMBA = ["spqr_format.codec.reference", "spqr_format.codec.quantizer", "spqr_format.codec.gptq"]
with atheris.instrument_imports(include=["spqr_format"], exclude=_NUMBA):
    import spqr_format.api  # noqa: F401
    import spqr_format.codec.bilevel  # noqa: F401
    import spqr_format.codec.outliers  # noqa: F401
    import spqr_format.codec.packing  # noqa: F401
    import spqr_format.codec.reference  # noqa: F401
    import spqr_format.container.layout  # noqa: F401
    import spqr_format.container.reader  # noqa: F401

import spqr_mutator  # noqa: E402

SEEDS = spqr_mutator.build_seeds()
TMPDIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
WORK = tempfile.mkdtemp(prefix="spqr-fuzz-", dir=TMPDIR)
PATH = os.path.join(WORK, "input.spqr")


# Peak RSS may not grow by more than this while one input is handled (SPQR_FUZZ_GROWTH_MB):
# libFuzzer's -rss_limit_mb watches the process's peak, so after one spike it blames whatever
# input comes next; this check names the input that made the spike.
GROWTH_LIMIT_KB = int(os.environ.get("SPQR_FUZZ_GROWTH_MB", "256")) << 10


class OverAllocation(Exception):
    """An input made the process's peak memory grow by more than GROWTH_LIMIT_KB."""


def test_one_input(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    spqr_mutator.check_file(PATH)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    if grown > GROWTH_LIMIT_KB:
        raise OverAllocation(f"peak RSS grew by {grown >> 10} MiB on a {len(data)}-byte input")


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if rng.random() < 0.2:  # libFuzzer's own mutations (then CRC fix-up, mostly)
        out = bytearray(atheris.Mutate(data, max_size))
        if len(out) >= 64 and rng.random() < 0.8:
            try:
                spqr_mutator.sb.fix_all(out)
            except Exception:
                pass
        return bytes(out[:max_size])
    return spqr_mutator.mutate(data, rng, SEEDS, max_size)


def main() -> None:
    limit = int(os.environ.get("SPQR_FUZZ_AS_MB", "8192")) << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    for d in corpus[:1]:  # seed the corpus directory with the generated valid files
        os.makedirs(d, exist_ok=True)
        for i, seed in enumerate(SEEDS):
            with open(os.path.join(d, f"seed-{i}.spqr"), "wb") as f:
                f.write(seed)
    atheris.Setup(sys.argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
