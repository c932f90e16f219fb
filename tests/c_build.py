"""Build the C twins of the repacks (kernels/*.c) with the system C compiler for ctypes tests."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

from spqr_format.gpu import _kernels as K

CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build_shared(src: Path, out: Path) -> ctypes.CDLL:
    """Compile the C99 file ``src`` (headers from kernels/; every warning an error; no
    floating-point contraction, which SPEC section 7's f32 arithmetic needs) into the shared
    library ``out`` and load it. The caller skips when ``CC`` is None."""
    cmd = [CC, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-shared"]
    cmd += ["-fPIC", "-I", str(K.KERNEL_DIR), "-o", str(out), str(src), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return ctypes.CDLL(str(out))
