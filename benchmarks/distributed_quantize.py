"""Wall time of ``spqr quantize-model`` in 1 process vs N torchrun ranks (CPU, gloo).

    python benchmarks/distributed_quantize.py [--model examples/llama-wt2] [--nproc 1 2]
        [--samples 16] [--seq-len 256] [--preset spqr-3bit]

Each run is a fresh process (the 1-process run is plain ``python -m spqr_format``, the others
``torchrun --standalone``), ``OMP_NUM_THREADS=1`` per process so that N ranks use N cores;
the files are compared byte for byte with the 1-process file. Times include the start
(importing torch and transformers, loading the model), which every rank pays.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(nproc: int, out: str, a) -> float:
    args = ["quantize-model", a.model, "-o", out, "--preset", a.preset, "--calib", a.calib,
            "--data-dir", a.data_dir, "--samples", str(a.samples), "--seq-len", str(a.seq_len),
            "-q"]  # fmt: skip
    if nproc == 1:
        cmd = [sys.executable, "-m", "spqr_format", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "spqr_format", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(ROOT, "examples", "llama-wt2"))
    p.add_argument("--calib", default="wikitext2")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "examples", "data"))
    p.add_argument("--preset", default="spqr-3bit")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    a = p.parse_args()
    print(f"model {a.model}, {a.samples} x {a.seq_len} tokens, {a.preset}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        ref = None
        for n in a.nproc:
            out = os.path.join(d, f"n{n}.spqr")
            s = run(n, out, a)
            data = open(out, "rb").read()
            ref = ref if ref is not None else data
            print(f"{n} process{'es' if n > 1 else ''}: {s:7.1f} s  "
                  f"{'same bytes as the first run' if data == ref else 'FILE DIFFERS'}")


if __name__ == "__main__":
    main()
