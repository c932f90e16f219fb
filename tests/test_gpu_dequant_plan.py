"""Launch planning of the dequantizers (no GPU needed): every block size and shared-memory size
the Python layer asks for is within the kernels' launch bounds and the H100/H200 limits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spqr_format.gpu import _kernels as K

SRC = (Path(K.__file__).parent / "kernels" / "spqr_kernels.cu").read_text()
SMEM_PER_SM = 228 * 1024  # H100 / H200: shared memory per multiprocessor
SMEM_OPTIN = 227 * 1024  # ... and the most one block may opt in to
COLUMNS = [1, 15, 16, 257, 4096, 8192, 8193, 11008, 16384, 20000, 28672, 28928, 40000, 70000]


def _define(name: str) -> int:
    return int(re.search(rf"#define {name} (\d+)", SRC).group(1))


@pytest.mark.parametrize("n", COLUMNS)
def test_octet_kernel_blocks_fit_its_launch_bounds_without_opt_in(n):
    threads = K.dequant_oct_geometry(n)
    assert threads % 32 == 0 and 64 <= threads <= 256  # __launch_bounds__(256, ...), 2 rows
    for bits in K.DEQUANT_BITS:
        for sb in (0, 3):
            assert K.dequant_oct_smem(bits, sb, threads) <= 48 * 1024


def test_octet_ring_stages_match_the_kernel():
    assert _define("SPQR_DQO_STAGES") == K.DQO_STAGES


@pytest.mark.parametrize("n", COLUMNS)
def test_two_row_kernel_blocks_fit(n):
    smem = K.dequant_row2_smem(n)
    if smem > min(SMEM_OPTIN - 1024, K.DQ2_WIDE_SMEM_MAX):
        return  # the one-row kernel takes these rows
    threads = K.dequant_row2_threads(n, smem)
    assert threads % 32 == 0 and 64 <= threads <= _define("SPQR_DQ2_MAXT")
    if smem > K.DQ2_SMEM_MAX:  # wide rows: two 512-thread blocks per multiprocessor
        assert threads == 512 and 2 * (smem + 1024) <= SMEM_PER_SM
    # the gather's u16 staging slots address every staged column
    assert n <= 65536 and smem >= 4 * n


def test_rows_wider_than_the_two_row_limit_use_the_one_row_kernel():
    assert K.dequant_row2_smem(28672) <= K.DQ2_WIDE_SMEM_MAX < K.dequant_row2_smem(40000)
