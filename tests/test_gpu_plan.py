"""Launch planning of the tensor-core path (no GPU needed): every batch slice the Python layer
can launch maps to kernels that exist and whose contracts cover it."""

from __future__ import annotations

import pytest

from spqr_format.gpu import _kernels as K

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 28672), (28672, 8192), (16, 64)]


@pytest.mark.parametrize("nb", range(1, K.TC_MAX_BATCH + 1))
def test_every_batch_slice_has_a_finish_kernel_that_covers_it(nb):
    names = set(K.tc_kernel_names())
    bp = K.tc_xt_pitch(nb)
    name = K.tc_finish_name(bp)
    assert name in names, (nb, bp, name)
    suffix = int(name.rsplit("_p", 1)[1])
    assert nb <= bp <= suffix
    if bp <= 8:  # pitches up to 8 are powers of two with a kernel of their own
        assert bp == suffix and bp & (bp - 1) == 0
    else:  # larger pitches: multiples of 8 (16-byte row pieces), at most the kernel's columns
        assert bp % 8 == 0
    nt = K.tc_nt(nb)
    assert K.tc_name(3, 3, nt) in names and nb <= 8 * nt


@pytest.mark.parametrize("mode", ["", "0", "1"])
@pytest.mark.parametrize("m,n", SHAPES)
def test_one_kernel_path_only_for_slices_it_can_compute(monkeypatch, mode, m, n):
    """spqr_tcv_* has one n-tile (8 batch columns): never chosen for wider slices, whatever the
    shape or the SPQR_TCV override."""
    monkeypatch.setattr(K, "TCV_MODE", mode)
    for nb in range(1, K.TC_MAX_BATCH + 1):
        if K.tcv_wanted(m, n, nb):
            assert nb <= 8 and K.tc_nt(nb) == 1
            assert K.tcv_name(3, 3) in K.tc_kernel_names()
    if mode == "0":
        assert not any(K.tcv_wanted(m, n, nb) for nb in range(1, 9))
    if mode == "1":
        assert all(K.tcv_wanted(m, n, nb) for nb in range(1, 9))


@pytest.mark.parametrize("nb", range(1, K.TC_MAX_BATCH + 1))
@pytest.mark.parametrize("m,n", SHAPES)
def test_finish_lanes_are_ones_the_kernel_has(monkeypatch, nb, m, n):
    """The finish kernel's `lanes` argument: 8 or 32 up to pitch 4, 4/8/16/32 for pitch 8 and
    16, 32 above (spqr_gpu.h), whatever the GPU size, outlier count or override."""
    bp = K.tc_xt_pitch(nb)
    allowed = {8, 32} if bp < 8 else {4, 8, 16, 32} if bp <= 16 else {32}
    for force in (0, 4, 16):
        monkeypatch.setattr(K, "TC_FINISH_LANES", force)
        for sms in (1, 132, 1000):
            for ents in (0, m * n // 100, m * n):
                lanes = K.tc_finish_lanes(bp, m, ents, sms)
                assert lanes in allowed, (bp, m, ents, sms, force, lanes)
                assert 256 % lanes == 0


@pytest.mark.parametrize("tcv", ["", "0", "1"])
@pytest.mark.parametrize("m,n", SHAPES)
def test_group_separated_path_only_for_two_columns(monkeypatch, tcv, m, n):
    """spqr_tcg_* puts 2 batch columns of 4 groups in the 8 mma columns: only for slices of at
    most 2 columns that take the one-kernel path, never with SPQR_TCG=0, always with =1."""
    monkeypatch.setattr(K, "TCV_MODE", tcv)
    for mode in ("", "0", "1"):
        monkeypatch.setattr(K, "TCG_MODE", mode)
        for nb in range(1, K.TC_MAX_BATCH + 1):
            if K.tcg_wanted(m, n, nb):
                assert mode != "0" and nb <= 2 and K.tcv_wanted(m, n, nb)
                assert K.tcg_name(3, 3) in K.tc_kernel_names()
            elif mode == "1":
                assert nb > 2 or not K.tcv_wanted(m, n, nb)
