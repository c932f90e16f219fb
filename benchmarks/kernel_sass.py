"""Static instruction budget of the tensor-core kernels' hot loops, from their SASS (no GPU).

    python benchmarks/kernel_sass.py spqr_tc_b3_s3_nt2 spqr_tc_b3_s3_nt8 spqr_cmpq_tc_b3_nt2
    python benchmarks/kernel_sass.py --measured benchmarks/results/gpu-h100-2026-12-07-paths.json \
        spqr_tc_b3_s3_nt2@8192x28672x16 spqr_tc_b3_s3_nt8@8192x28672x64

Compiles the module that holds each entry point (the options the Python layer gives NVRTC) with
``nvcc -cubin -arch sm_90``, disassembles it with ``cuobjdump -sass`` (on PATH, or from the
``nvidia-cuda-cuobjdump`` wheel: ``pip install nvidia-cuda-cuobjdump``), finds the kernel's hot
loop (the backward branch whose body holds the most HMMA) and prints its instruction mix per
mma tile of weights: how many instructions, tensor-core operations and shared-memory loads
each 16x16 tile of weights costs, and the registers and spills ``ptxas -v`` reports.

With ``NAME@MxNxBATCH`` and ``--measured`` (a ``gpu_matvec.py --out`` JSON) it also turns the
measured time of that shape and batch into the fraction of each throughput limit the loop
would use at that time (issue slots, tensor pipe, shared-memory bandwidth), so a kernel that
uses a small fraction of all of them is shown to be latency bound, not throughput bound. The
limits are per multiprocessor and assumed (H100 SXM, ``--sms 132 --ghz 1.98``): 4 warp
instructions issued per clock; one HMMA.16816 per 2 clocks (mma.sync at half the wgmma rate:
an assumption, not a vendor figure); 128 bytes of shared memory per clock. A lower real clock
raises every fraction by the same factor; the profiler (ncu) measures what this estimates.
For ``spqr_cmpq_tc_*`` the fractions treat the whole tensor as one width (a real tensor splits
its columns over the widths' kernels), so they compare widths, not the tensor's time.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spqr_format.gpu import _kernels as K  # noqa: E402  (no CuPy needed)

_INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRA = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+)")
_PRED = re.compile(r"^@!?U?P[T\d]+\s+")


def tiles_per_hmma(name: str) -> float:
    """Weight tiles (16x16) decoded per HMMA of the kernel ``name``: each decoded A fragment
    feeds one HMMA per n-tile of 8 batch columns the warp owns."""
    if m := re.fullmatch(r"spqr_(?:tc_b\d+_s\d+|cmpq_tc_b\d+)_nt(\d+)", name):
        return 1.0 / int(m[1])
    raise SystemExit(f"error: {name}: not a tensor-core kernel this tool knows (spqr_tc_*_nt*, "
                     "spqr_cmpq_tc_*)")  # fmt: skip


def cuobjdump() -> str:
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    try:  # the nvidia-cuda-cuobjdump wheel
        import nvidia  # type: ignore

        for root in nvidia.__path__:
            for cand in Path(root).glob("cu*/bin/cuobjdump"):
                return str(cand)
    except ImportError:
        pass
    raise SystemExit("error: cuobjdump not found (PATH, or pip install nvidia-cuda-cuobjdump)")


def compile_module(name: str, arch: str, work: Path) -> tuple[Path, str]:
    """The cubin of the module holding ``name`` and ptxas' -v report."""
    spec = K.kernel_module(name)
    src = work / (spec.key.replace(":", "_") + ".cu")
    src.write_text(spec.code())
    cubin = src.with_suffix(".cubin")
    opts = [o for o in spec.options() if o.startswith("-D")]
    cmd = ["nvcc", "-cubin", f"-arch={arch}", "-O3", "--std=c++17", "-Xptxas", "-v", *opts,
           "-o", str(cubin), str(src)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"error: nvcc failed on {spec.key}:\n{r.stderr[-2000:]}")
    return cubin, r.stderr


def resources(ptxas: str, name: str) -> str:
    m = re.search(rf"Compiling entry function '{name}'.*?\n(.*?Used [^\n]*)", ptxas, re.S)
    if not m:
        return "?"
    used = re.search(r"Used (\d+) registers", m[1])
    spill = re.search(r"(\d+) bytes spill stores", ptxas[m.start() : m.end() + 400])
    return f"{used[1] if used else '?'} regs, {spill[1] if spill else 0} B spill stores"


def hot_loop(sass: str) -> tuple[int, collections.Counter]:
    """(instructions, opcode histogram) of the backward-branch loop holding the most HMMA."""
    ins = [(int(a, 16), s.strip()) for a, s in _INS.findall(sass)]
    index = {a: i for i, (a, _) in enumerate(ins)}
    best = None
    for i, (a, s) in enumerate(ins):
        m = _BRA.search(s)
        if not m or int(m[1], 16) >= a or int(m[1], 16) not in index:
            continue
        body = ins[index[int(m[1], 16)] : i + 1]
        hmma = sum(1 for _, t in body if "HMMA" in t)
        key = (hmma, -len(body))  # most HMMA, then the tightest loop holding them
        if best is None or key > best[0]:
            best = (key, body)
    if best is None or best[0][0] == 0:
        raise SystemExit("error: no loop with HMMA found in the SASS")
    hist = collections.Counter(_PRED.sub("", s).split()[0].split(".")[0] for _, s in best[1])
    return len(best[1]), hist


def measured_us(path: Path, name: str, m: int, n: int, batch: int) -> float:
    """The time gpu_matvec.py measured for the path of kernel ``name`` (cmpq: ``cmpq_v2_us``;
    others: ``fused_us``; else the plan's ``us``)."""
    keys = ("cmpq_v2_us", "us") if "cmpq" in name else ("fused_us", "us")
    data = json.loads(path.read_text())
    for r in data["results"]:
        if list(r["shape"]) == [m, n] and r["batch"] == batch:
            for k in keys:
                if r.get(k):
                    return float(r[k])
    raise SystemExit(f"error: {path}: no {' / '.join(keys)} for {m}x{n} batch {batch}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernels", nargs="+", help="entry point names, optionally NAME@MxNxBATCH")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--measured", type=Path, help="gpu_matvec.py --out JSON with fused_us / us")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--ghz", type=float, default=1.98)
    ap.add_argument("--lds-bytes", type=int, default=256, help="bytes per warp LDS (LDS.64)")
    args = ap.parse_args(argv)
    exe = cuobjdump()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cubins: dict[str, tuple[Path, str]] = {}
        for item in args.kernels:
            name, _, where = item.partition("@")
            key = K.kernel_module(name).key
            if key not in cubins:
                cubins[key] = compile_module(name, args.arch, Path(tmp))
            cubin, ptxas = cubins[key]
            sass = subprocess.run([exe, "-sass", "-fun", name, str(cubin)], capture_output=True,
                                  text=True, check=True).stdout  # fmt: skip
            n_ins, hist = hot_loop(sass)
            hmma = hist["HMMA"]
            tiles = hmma * tiles_per_hmma(name)  # 16x16 weight tiles per loop iteration
            per = {k: v / tiles for k, v in hist.items()}
            row = dict(kernel=name, resources=resources(ptxas, name), loop_instructions=n_ins,
                       per_tile_instructions=n_ins / tiles, per_tile_hmma=hmma / tiles,
                       per_tile_lds=per.get("LDS", 0.0), per_tile_hfma2=per.get("HFMA2", 0.0),
                       per_tile_lop3=per.get("LOP3", 0.0), top=hist.most_common(12))  # fmt: skip
            if where:
                if not args.measured:
                    ap.error(f"{item}: a shape needs --measured")
                m, n, b = (int(v) for v in where.split("x"))
                us = measured_us(args.measured, name, m, n, b)
                clocks = us * 1e-6 * args.ghz * 1e9 * args.sms  # SM-clocks in the measured time
                # every weight tile is decoded once per slice of 8 NT batch columns
                slice_cols = 8 * int(re.search(r"_nt(\d+)$", name)[1])
                total_tiles = m * n / 256 * -(-b // slice_cols)
                row.update(shape=where, us=us,
                           issue_pct=100 * total_tiles * row["per_tile_instructions"] / 4 / clocks,
                           tensor_pct=100 * total_tiles * row["per_tile_hmma"] * 2 / clocks,
                           lds_pct=100 * total_tiles * row["per_tile_lds"] * args.lds_bytes / 128
                           / clocks)  # fmt: skip
            rows.append(row)
    for r in rows:
        print(f"{r['kernel']}: {r['resources']}; hot loop {r['loop_instructions']} instructions")
        print(
            f"  per 16x16 weight tile: {r['per_tile_instructions']:.1f} instructions, "
            f"{r['per_tile_hmma']:.1f} HMMA, {r['per_tile_lds']:.2f} LDS, "
            f"{r['per_tile_hfma2']:.2f} HFMA2, {r['per_tile_lop3']:.2f} LOP3"
        )
        print("  mix: " + ", ".join(f"{k} {v}" for k, v in r["top"]))
        if "us" in r:
            print(
                f"  at {r['shape']} ({r['us']:.1f} us measured): issue {r['issue_pct']:.0f} %, "
                f"tensor pipe {r['tensor_pct']:.0f} %, shared memory {r['lds_pct']:.0f} % "
                f"of the assumed limits"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
