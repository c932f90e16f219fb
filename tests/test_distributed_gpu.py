"""Issue 21 on GPUs (NCCL): distributed quantization with ``--device cuda`` and tensor-parallel
``SpQRLinear`` shards. Skipped without CUDA; the multi-rank tests need >= 2 GPUs; the
one-rank tests run the NCCL code (a one-rank NCCL group under torchrun) on a single GPU.
The CPU tests of the same code are in ``tests/test_distributed.py`` (gloo)."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
    pytest.skip("torch.distributed with NCCL is not available", allow_module_level=True)

import tiny_models as tm  # noqa: E402
from test_distributed import SAMPLES, SEQ, torchrun  # noqa: E402

from spqr_format.models.pipeline import quantize_model  # noqa: E402

GPUS = torch.cuda.device_count()
two_gpus = pytest.mark.skipif(GPUS < 2, reason="needs >= 2 GPUs")
IDS = np.arange(3 * 24).reshape(3, 24) % 40 + 5  # the input dist_worker.py's "tp" runs


@pytest.fixture(scope="module")
def gpu_llama(tmp_path_factory):
    """A tiny Llama, its single-process ``--device cuda`` file (one.spqr) and the CPU file
    (cpu.spqr, for the tensor-parallel tests: the CPU encoder)."""
    d = tmp_path_factory.mktemp("dist_gpu")
    text = tm.make_corpus()
    (d / "corpus.txt").write_text(text, encoding="utf-8")
    tm.build_model("llama", d / "llama", text)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, device in (("one.spqr", "cuda"), ("cpu.spqr", "cpu")):
            quantize_model(d / "llama", d / name, calib=str(d / "corpus.txt"), samples=SAMPLES,
                           seq_len=SEQ, device=device)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return d


def _qargs(d, out, *extra):
    return ["quantize", str(d / "llama"), "-o", str(out), "--calib", str(d / "corpus.txt"),
            "--samples", str(SAMPLES), "--seq-len", str(SEQ), "-q", "--device", "cuda",
            *extra]  # fmt: skip


def _quantize_ranks(d, n: int, name: str, env=None):
    out = d / name
    r = torchrun(n, *_qargs(d, out), env=env)
    return out, r


def test_one_rank_nccl_quantize_writes_the_single_process_file(gpu_llama):
    """torchrun --nproc-per-node 1 ... --device cuda: a one-rank NCCL group (gather, object
    collectives on the GPU) gives the bytes of the plain single-process cuda run."""
    out, r = _quantize_ranks(gpu_llama, 1, "nccl1.spqr")
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.read_bytes() == (gpu_llama / "one.spqr").read_bytes()
    assert not os.path.exists(str(out) + ".partial")


@two_gpus
def test_two_gpus_write_the_single_process_file(gpu_llama):
    out, r = _quantize_ranks(gpu_llama, 2, "nccl2.spqr")
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.read_bytes() == (gpu_llama / "one.spqr").read_bytes()
    assert r.stdout.count("quantized layers") == 1


@pytest.mark.skipif(GPUS < 3, reason="needs >= 3 GPUs")
def test_three_gpus_write_the_single_process_file(gpu_llama):
    out, r = _quantize_ranks(gpu_llama, 3, "nccl3.spqr")
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.read_bytes() == (gpu_llama / "one.spqr").read_bytes()


@two_gpus
def test_a_failing_gpu_rank_stops_every_rank_and_leaves_nothing(gpu_llama):
    out, r = _quantize_ranks(gpu_llama, 2, "fail.spqr", env={"SPQR_TEST_FAIL_RANK": "1"})
    assert r.returncode != 0
    assert r.stderr.count("rank 1 of 2 failed: RuntimeError: injected failure") == 2, r.stderr
    assert not out.exists() and not os.path.exists(str(out) + ".partial")


def _reference_logits(path):
    from spqr_format.models.loader import load_model

    model = load_model(path, device="cuda")
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(IDS).cuda(), use_cache=False).logits.float()


def _tp_logits(d, n: int, name: str):
    got = d / name
    r = torchrun(n, "tp", str(d / "cpu.spqr"), str(got), "cuda")
    assert r.returncode == 0, r.stdout + r.stderr
    return np.load(got), r.stdout


def test_one_rank_nccl_tensor_parallel_equals_load_model(gpu_llama):
    """One rank: the same SpQRLinear layers (whole tensors), NCCL all_reduce over one rank;
    the logits of load_model(device="cuda"), expected bit for bit (asserted within 1e-3)."""
    pytest.importorskip("cupy")
    ref = _reference_logits(gpu_llama / "cpu.spqr").cpu().numpy()
    tp, out = _tp_logits(gpu_llama, 1, "tp1.npy")
    assert "'stored_columns': 4, 'gathered_inputs': 0}" in out, out
    diff = float(np.abs(tp - ref).max())
    print(f"\n1 rank: max |tp - load_model| = {diff:.3g} (logits up to {np.abs(ref).max():.3g})")
    assert diff <= 1e-3 * max(1.0, float(np.abs(ref).max()))


@two_gpus
def test_two_gpus_tensor_parallel_logits(gpu_llama):
    """2 ranks: row slices (column-parallel) and stored-column blocks fed the all-gathered
    input (row-parallel), fp16 partial products all-reduced in fp16: within fp16 rounding of
    the unsharded fp16 model (tolerance 2e-2 of the logits' magnitude)."""
    pytest.importorskip("cupy")
    ref = _reference_logits(gpu_llama / "cpu.spqr").cpu().numpy()
    tp, out = _tp_logits(gpu_llama, 2, "tp2.npy")
    assert "'cheap_rows': 10, 'full_rows': 0" in out and "'stored_columns': 4" in out, out
    diff = float(np.abs(tp - ref).max())
    print(f"\n2 ranks: max |tp - load_model| = {diff:.3g} (logits up to {np.abs(ref).max():.3g})")
    assert diff <= 2e-2 * max(1.0, float(np.abs(ref).max()))
    assert (tp.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
