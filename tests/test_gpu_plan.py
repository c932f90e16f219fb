"""Launch planning of the tensor-core path (no GPU needed): every batch slice the Python layer
can launch maps to kernels that exist and whose contracts cover it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from spqr_format.gpu import _kernels as K
from spqr_format.gpu import plan as P

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


def _set_plan(monkeypatch, text: str) -> None:
    if text:
        monkeypatch.setenv(P.ENV, text)
    else:
        monkeypatch.delenv(P.ENV, raising=False)


@pytest.mark.parametrize("forced", ["", "tcv", "tc_split", "tcg"])
@pytest.mark.parametrize("m,n", SHAPES)
def test_one_kernel_paths_only_for_slices_they_can_compute(monkeypatch, forced, m, n):
    """spqr_tcv_* has one n-tile (8 batch columns), spqr_tcg_* two columns: the plan never
    gives them wider slices, whatever the shape or the forced path."""
    _set_plan(monkeypatch, f"path={forced}" if forced else "")
    for gpu in P.GPU_CLASSES:
        for nb in range(1, K.TC_MAX_BATCH + 1):
            d = P.decide(gpu, "tc", m, n, nb)
            if d.path == "tcv":
                assert nb <= 8 and K.tc_nt(nb) == 1
            if d.path == "tcg":
                assert nb <= K.TCG_MAX_BATCH
            if forced and P.can_run(forced, "tc", nb):
                assert d.path == forced and d.entry == -1
    assert K.tcv_name(3, 3) in K.tc_kernel_names() and K.tcg_name(3, 3) in K.tc_kernel_names()


@pytest.mark.parametrize("nb", range(1, K.TC_MAX_BATCH + 1))
@pytest.mark.parametrize("m,n", SHAPES)
def test_finish_lanes_are_ones_the_kernel_has(monkeypatch, nb, m, n):
    """The finish kernel's `lanes` argument: 8 or 32 up to pitch 4, 4/8/16/32 for pitch 8 and
    16, 32 above (spqr_gpu.h), whatever the GPU size, outlier count or override."""
    bp = K.tc_xt_pitch(nb)
    allowed = {8, 32} if bp < 8 else {4, 8, 16, 32} if bp <= 16 else {32}
    for force in (0, 4, 16):
        _set_plan(monkeypatch, f"finish_lanes={force}" if force else "")
        for sms in (1, 132, 1000):
            for ents in (0, m * n // 100, m * n):
                lanes = K.tc_finish_lanes(bp, m, ents, sms)
                assert lanes in allowed, (bp, m, ents, sms, force, lanes)
                assert 256 % lanes == 0


# --- the C launcher's plan (kernels/spqr_tc_plan.h) against this module ---------------------
CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
_DRIVER = r"""
#include <stdio.h>
#include "spqr_tc_plan.h"
#include "spqr_launch_plan.h"
int main(void) {
  char op[16], a[200];
  long long m, n, x, y, z;
  int i, j, k;
  while (scanf("%15s", op) == 1) {
    if (!strcmp(op, "decide") && scanf("%d %d %lld %lld %d %199s", &i, &j, &m, &n, &k, a) == 6) {
      spqr_plan_override o;
      const int rc = spqr_plan_parse(strcmp(a, "-") == 0 ? NULL : a, &o);
      printf("%d\n", rc != 0 ? -1 : spqr_plan_decide(i, j, m, n, k, &o));
    } else if (!strcmp(op, "shape") && scanf("%lld %lld", &m, &n) == 2)
      printf("%d\n", spqr_plan_shape_class(m, n));
    else if (!strcmp(op, "gpu") && scanf("%d", &i) == 1)
      printf("%d\n", spqr_plan_gpu_class(i));
    else if (!strcmp(op, "ks") && scanf("%lld %lld %lld %d", &x, &y, &z, &i) == 4)
      printf("%d\n", spqr_plan_tcv_ks(x, y, z, i));
    else if (!strcmp(op, "lanes") && scanf("%d %lld %lld %d %d", &i, &m, &x, &j, &k) == 5)
      printf("%d\n", spqr_plan_finish_lanes(i, m, x, j, k));
    else if (!strcmp(op, "splits") &&
             scanf("%lld %lld %d %lld %lld %d", &x, &y, &i, &n, &z, &j) == 6) {
      spqr_plan_splits(x, y, i, n, z, j, &j, &k);
      printf("%d %d\n", j, k);
    } else if (!strcmp(op, "resident") && scanf("%d %lld", &i, &x) == 2)
      printf("%lld\n", (long long)spqr_plan_resident(i, x));
    else if (!strcmp(op, "pitch") && scanf("%d", &i) == 1)
      printf("%d %d\n", spqr_plan_xt_pitch(i), spqr_plan_nt(i));
    else
      return 2;
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def c_plan(tmp_path_factory):
    if CC is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("plan")
    (d / "driver.c").write_text(_DRIVER)
    exe = d / "driver"
    cmd = [CC, "-std=c99", "-O1", "-Wall", "-Werror", "-I", str(K.KERNEL_DIR)]
    res = subprocess.run(
        [*cmd, str(d / "driver.c"), "-o", str(exe)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr

    def run(lines: list[str]) -> list[str]:
        out = subprocess.run(
            [str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.split("\n")[: len(lines)]

    return run


OVERRIDES = (
    "",
    "path=tcv",
    "path=tcg",
    "path=tc_split",
    "path=dense",
    "path=mv1",
    "path=simt",
    "dense_from=0",
    "dense_from=17",
    "dense_from=200",
    "path=tcv,dense_from=9",
    "dq_rows=1,tcv_ks=2,defines=-DX=1",
)

PLAN_SHAPES = [
    *SHAPES,
    (8192, 8192),
    (14336, 4096),
    (57344, 8192),
    (1, 1),
    (16, 70000),
    (5120, 5120),
    (5120, 5119),
    (5119, 8192),
    (4096, 32768),
    (4096, 32769),
]


def test_c_plan_picks_the_same_kernels_as_python(monkeypatch, c_plan):
    """The C launcher (spqr_launch_plan.h, spqr_tc_plan.h) and the Python layer choose the same
    path, kernel,
    k-split, k-slicing and lanes for every shape, batch, device size and override tried: the
    C example's bit-identity with the Python layer (tests/test_gpu_c_example.py) rests on it."""
    cases, want = [], []
    for m, n in PLAN_SHAPES:
        groups = -(-n // 16)
        rb, nc = -(-m // 16), -(-groups // 20)
        cases.append(f"shape {m} {n}")
        want.append(str(P.SHAPE_CLASSES.index(P.shape_class(m, n))))
        for ov in OVERRIDES:
            _set_plan(monkeypatch, ov)
            for gi, gpu in enumerate(P.GPU_CLASSES):
                for li, layout in enumerate(P.LAYOUTS):
                    for nb in (1, 2, 3, 4, 5, 8, 9, 16, 48, 49, 64, 65, 128, 2048):
                        cases.append(f"decide {gi} {li} {m} {n} {nb} {ov or '-'}")
                        want.append(str(P.PATHS.index(P.decide(gpu, layout, m, n, nb).path)))
        for slots in (1, 264, 1000):
            for ov in (0, 1, 3, 8, 20):
                _set_plan(monkeypatch, f"tc_splits={ov}" if ov else "")
                for nt in (1, 2, 8):
                    for cb in (2336, 2720, 4000):
                        cases.append(f"splits {rb} {nc} {nt} {cb} {slots} {ov}")
                        s, p = K.tc_splits(rb, nc, 1, slots, nt, cb)
                        want.append(f"{s} {p}")
        for sms in (1, 132, 1000):
            for ents in (0, m * n // 100, m * n):
                for ov in (0, 4, 16, 32):
                    _set_plan(monkeypatch, f"finish_lanes={ov}" if ov else "")
                    for nb in range(1, K.TC_MAX_BATCH + 1):
                        bp = K.tc_xt_pitch(nb)
                        cases.append(f"lanes {bp} {m} {ents} {sms} {ov}")
                        want.append(str(K.tc_finish_lanes(bp, m, ents, sms)))
    for rb in (1, 5, 64, 200, 688, 1792, 3584, 10000):
        for nc in (1, 2, 5, 13, 26, 90, 400):
            for slots in (1, 100, 264, 1000):
                for ov in (0, 1, 3, 8):
                    _set_plan(monkeypatch, f"tcv_ks={ov}" if ov else "")
                    cases.append(f"ks {rb} {nc} {slots} {ov}")
                    want.append(str(K.tcv_ks(rb, nc, 1, slots)))
    for cc in (70, 80, 86, 89, 90, 100, 120):
        cases.append(f"gpu {cc}")
        want.append(str(P.GPU_CLASSES.index(P.gpu_class(cc))))
    for regs in (32, 64, 96, 126, 128, 255):
        for smem in (0, K.TCV_SMEM, 20480, 100000):
            cases.append(f"resident {regs} {smem}")
            want.append(str(K.tc_resident_blocks(regs, smem)))
    for nb in range(1, K.TC_MAX_BATCH + 1):
        cases.append(f"pitch {nb}")
        want.append(f"{K.tc_xt_pitch(nb)} {K.tc_nt(nb)}")
    got = c_plan(cases)
    assert len(got) == len(cases)
    bad = [(c, w, g) for c, w, g in zip(cases, want, got, strict=True) if w != g]
    assert not bad, bad[:10]
