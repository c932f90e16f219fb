#!/usr/bin/env bash
# The whole GPU verification of this repository in one command, for a machine with one CUDA GPU,
# CuPy, PyTorch, transformers, numba, click, hypothesis, pytest (+ pytest-xdist, pytest-timeout):
#
#     OUT=/tmp/gpu-checks bash benchmarks/gpu_checks.sh
#
# Writes at most 8 files to $OUT. gpu_matvec checks every timed configuration against a
# reference product (exit 1 on a wrong result). Order: the kernel cache is warmed once (precompile, every
# module, in parallel processes), then correctness (GPU conformance, the GPU test files, the
# torch/CUDA model tests) and then timings, one at a time so they do not disturb each other.
# Each step has its own time limit (seconds, overridable) and its exit status in its log.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a directory for the logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} SPQR_GPU_PRECOMPILE=0
JOBS=${JOBS:-8}
T0=$(date +%s)
el() { echo "[t=$(($(date +%s) - T0))s] $*"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)"
  el precompile
  timeout "${T_PRECOMPILE:-400}" python3 -m spqr_format.gpu._precompile all -j "$JOBS" --cmpq
  echo "rc=$?"
  el conformance
  timeout "${T_CONFORMANCE:-200}" python3 -m spqr_format conformance run --backend gpu \
      --suite full --cache /tmp/spqr-conformance
  echo "rc=$?"; el done; } > "$OUT/1-setup-conformance.txt" 2>&1

{ el pytest-gpu
  timeout "${T_PYTEST:-600}" python3 -m pytest -v -p no:cacheprovider -n "$JOBS" --timeout 300 \
      --tb=short -rfE tests/test_gpu_*.py
  echo "rc=$?"
  el pytest-torch-cuda
  timeout "${T_PYTEST_TORCH:-300}" python3 -m pytest -v -p no:cacheprovider -n 2 --timeout 200 \
      --tb=short -rfE tests/test_gptq_torch.py tests/test_models.py tests/test_distributed_gpu.py \
      -k "cuda or gpu or nccl"
  echo "rc=$?"; el done; } > "$OUT/2-tests.txt" 2>&1

{ el quantize-model
  timeout 300 python3 -m spqr_format quantize-model examples/llama-wt2 -o /tmp/llama-wt2-3bit.spqr \
      --preset spqr-3bit --calib wikitext2 --data-dir examples/data --seq-len 512 --device cuda
  echo "rc=$?"
  timeout 120 python3 -m spqr_format eval examples/llama-wt2 /tmp/llama-wt2-3bit.spqr \
      --ppl wikitext2 --data-dir examples/data --device cuda
  echo "rc=$?"
  el block-timing
  timeout 300 python3 benchmarks/model_block_timing.py --blocks 1 --device cuda
  echo "rc=$?"; el done; } > "$OUT/3-models.txt" 2>&1

{ el decode
  timeout "${T_DECODE:-300}" python3 benchmarks/model_decode_speed.py --synthetic llama-7b \
      --layers 8 --batches 1,16 --out "$OUT/4-decode.json"
  echo "rc=$?"; el done; } > "$OUT/4-decode.txt" 2>&1

{ el matvec
  timeout "${T_MATVEC:-400}" python3 benchmarks/gpu_matvec.py --compare-paths \
      --shapes 4096x4096,8192x28672,28672x8192 --batches 1,4,8,16,32,64,128,512,2048 \
      --reps 10 --rotate-gib 0.5 --out "$OUT/5-matvec.json" --plot "$OUT/5-matvec.png"
  echo "rc=$?"
  el matvec-cmpq
  timeout 200 python3 benchmarks/gpu_matvec.py --encoding channel_mixed --target-bits 2.5 \
      --compare-paths --shapes 8192x28672,28672x8192 --batches 1,4,16 --reps 10 \
      --out "$OUT/6-matvec-cmpq.json"
  echo "rc=$?"; el done; } > "$OUT/5-matvec.txt" 2>&1
el "all done; logs in $OUT"
