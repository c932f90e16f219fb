"""Fixtures shared by test modules."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch's CPU thread pool at one thread for a module of small problems (the pool only
    costs time there, 20x on a busy machine); restored after the module. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gpu_tests_selected(config) -> bool:
    """Whether the command line names a directory or a GPU test module (test_*gpu*)."""
    for arg in config.args:
        path = Path(arg.split("::")[0])
        if path.is_dir() or "gpu" in path.name:
            return True
    return False


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_setupnodes(config, specs):
    """pytest-xdist's controller, before it starts the workers: compile every kernel module
    once, in parallel, into CuPy's on-disk cache (spqr_format.gpu.precompile("all")), instead
    of every worker compiling the same modules at once (a warm cache takes a few seconds).
    Only with a CUDA device and GPU tests selected; SPQR_GPU_PRECOMPILE=0 turns it off, =1 on
    whatever is selected."""
    mode = os.environ.get("SPQR_GPU_PRECOMPILE", "auto")
    if mode == "0" or (mode != "1" and not _gpu_tests_selected(config)):
        return
    from spqr_format.gpu import available, precompile

    if not available():
        return
    tr = config.pluginmanager.get_plugin("terminalreporter")
    t0 = time.perf_counter()
    try:
        done = precompile("all")
    except Exception as exc:  # the workers compile on first use instead
        msg = f"spqr_format.gpu.precompile failed ({type(exc).__name__}: {exc})"
    else:
        msg = f"spqr_format.gpu.precompile: {len(done)} kernel modules"
    if tr is not None:
        tr.write_line(f"{msg} in {time.perf_counter() - t0:.1f} s")
