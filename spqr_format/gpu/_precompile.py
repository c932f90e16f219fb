"""Compile the GPU kernel modules ahead of first use (``spqr_format.gpu.precompile``).

The kernels are compiled by NVRTC on first use, one small module per configuration
(:func:`spqr_format.gpu._kernels.kernel_module`), and CuPy keeps every compiled module in its
on-disk cache (``~/.cupy/kernel_cache``, or ``$CUPY_CACHE_DIR``), keyed by the source, the
options, the GPU architecture and the NVRTC version. :func:`precompile` fills that cache in
parallel worker processes, so that a deployment or a test session pays the compile once::

    python -m spqr_format.gpu._precompile            # the presets' configurations
    python -m spqr_format.gpu._precompile 3:3 4:0 -j 8
    python -m spqr_format.gpu._precompile all         # every module (cmpq included)

No CuPy is imported in the calling process (only in the workers). The workers are started
with "spawn" (CUDA does not survive a fork), which imports the caller's main module again: in a
script, call :func:`precompile` under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from spqr_format.gpu import _kernels as K


def _compile(job: tuple[str, str, tuple[str, ...], str, int]) -> tuple[str, float]:
    """Worker: compile one module through CuPy (which stores it in its on-disk cache)."""
    key, code, options, entry, device = job
    import cupy as cp

    t0 = time.perf_counter()
    with cp.cuda.Device(device):
        cp.RawModule(code=code, options=options).get_function(entry)  # compiles (or loads)
    return key, time.perf_counter() - t0


def jobs_for(specs: list[K.ModuleSpec], device: int = 0) -> list[tuple]:
    """(key, code, options, first entry point, device) per module: what the workers get."""
    return [(s.key, s.code(), s.options(), K.module_kernel_names(s)[0], device) for s in specs]


def precompile(
    configs=None,
    jobs: int | None = None,
    *,
    tensor_cores: bool = True,
    cmpq: bool = False,
    device: int = 0,
) -> dict[str, float]:
    """Compile the kernel modules for ``configs`` ((bits, stats_bits) pairs of ``bilevel``
    tensors; default: those of the encoder presets; ``"all"``: every module) on GPU
    ``device`` and let CuPy cache them on disk; ``cmpq=True`` adds the ``channel_mixed``
    kernels. ``jobs`` worker processes (default: one per module, at most the CPU count).
    Returns seconds per module key (a module already in the cache takes well under a
    second)."""
    if configs not in (None, "all"):
        for bits, stats_bits in configs:
            if not (1 <= int(bits) <= 8 and 0 <= int(stats_bits) <= 8):
                raise ValueError(
                    f"precompile: no bilevel configuration bits={bits} stats_bits={stats_bits} "
                    "(bits 1..8, stats_bits 0..8)"
                )
    specs = K.precompile_modules(configs, tensor_cores=tensor_cores, cmpq=cmpq)
    work = jobs_for(specs, device)
    jobs = max(1, min(len(work), jobs or os.cpu_count() or 1))
    if jobs == 1:
        return dict(map(_compile, work))
    # spawn: a forked child of a process that has touched CUDA cannot use it
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return dict(pool.map(_compile, work))


def main(argv: list[str]) -> int:
    configs, jobs, cmpq = [], None, False
    args = iter(argv)
    usage = (
        "usage: python -m spqr_format.gpu._precompile [all | BITS:STATS_BITS ...] [-j N] [--cmpq]"
    )
    for a in args:
        try:
            if a in ("-j", "--jobs"):
                jobs = int(next(args))
                if jobs < 1:
                    raise ValueError
            elif a == "--cmpq":
                cmpq = True
            elif a == "all":
                configs = "all"
            elif a in ("-h", "--help"):
                print(__doc__)
                return 0
            else:
                b, sep, sb = a.partition(":")
                if not sep:
                    raise ValueError
                configs = [*(configs if isinstance(configs, list) else ()), (int(b), int(sb))]
        except (ValueError, StopIteration):
            print(f"error: bad argument {a!r}\n{usage}", file=sys.stderr)
            return 2
    try:
        import cupy  # noqa: F401 - only checked here; the workers compile
    except ImportError as exc:
        print(f"error: precompile needs CuPy ({exc})", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        done = precompile(configs or None, jobs, cmpq=cmpq)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, sec in done.items():
        print(f"{key:14s} {sec:7.1f} s")
    print(f"{len(done)} modules in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
