"""Issue 21 on the CPU: quantization over torchrun ranks (gloo) gives the single-process file
byte for byte; a rank that raises stops every rank with no output left; tensor-parallel
logits equal the unsharded model's. Each test launches ``torchrun --standalone`` (a free
port is picked by the rendezvous) on ``tests/dist_worker.py``."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import tiny_models as tm  # noqa: E402

from spqr_format.codec import reference, slicing  # noqa: E402
from spqr_format.codec.bilevel import PackedBilevel  # noqa: E402
from spqr_format.models.pipeline import quantize_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")
SAMPLES, SEQ = 12, 32  # 3 chunks of 4 windows


def torchrun(nproc: int, *args, env=None, timeout=240):
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), HERE, e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    e.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", WORKER, *args]  # fmt: skip
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    text = tm.make_corpus()
    (d / "corpus.txt").write_text(text, encoding="utf-8")
    tm.build_model("llama", d / "llama", text)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one = d / "one.spqr"
    quantize_model(d / "llama", one, calib=str(d / "corpus.txt"), samples=SAMPLES, seq_len=SEQ)
    torch.set_num_threads(threads)
    return d


def _qargs(d, out, *extra):
    return ["quantize", str(d / "llama"), "-o", str(out), "--calib", str(d / "corpus.txt"),
            "--samples", str(SAMPLES), "--seq-len", str(SEQ), "-q", *extra]  # fmt: skip


def test_two_ranks_write_the_single_process_file(llama):
    out = llama / "two.spqr"
    r = torchrun(2, *_qargs(llama, out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.read_bytes() == (llama / "one.spqr").read_bytes()
    assert not os.path.exists(str(out) + ".partial")
    assert r.stdout.count("quantized layers") == 1  # rank 0 reports


@pytest.mark.slow
def test_three_ranks_resume_from_two(llama, tmp_path):
    """3 ranks (one of 3 chunks each); resumed from checkpoints of a cut single run."""
    out = tmp_path / "three.spqr"

    class Cut(Exception):
        pass

    def stop(ev):
        if ev["kind"] == "block_done":
            raise Cut

    with pytest.raises(Cut):
        quantize_model(llama / "llama", out, calib=str(llama / "corpus.txt"), samples=SAMPLES,
                       seq_len=SEQ, progress=stop)  # fmt: skip
    r = torchrun(3, *_qargs(llama, out, "--resume"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(1 blocks resumed)" in r.stdout
    assert out.read_bytes() == (llama / "one.spqr").read_bytes()


def test_a_failing_rank_stops_every_rank_and_leaves_nothing(llama):
    out = llama / "fail.spqr"
    r = torchrun(2, *_qargs(llama, out), env={"SPQR_TEST_FAIL_RANK": "1"})
    assert r.returncode != 0
    # both ranks exit with the failing rank's error (torchrun reports each failed rank)
    assert r.stderr.count("rank 1 of 2 failed: RuntimeError: injected failure") == 2, r.stderr
    assert not out.exists() and not os.path.exists(str(out) + ".partial")
    assert not [p for p in os.listdir(llama) if p.startswith("fail")]


def test_gpu_code_path_two_ranks_write_the_single_process_file(llama, tmp_path, monkeypatch):
    """The code ``--device cuda`` runs (torch encoder, float64 chunk sums on the device, folded
    in row pieces through ``gather``), run on the CPU over gloo: 2 ranks give the bytes of one
    process running that same code. On GPUs NCCL carries the same collectives
    (tests/test_distributed_gpu.py)."""
    from spqr_format.models import pipeline

    monkeypatch.setattr(pipeline, "_encoder_device", lambda device: torch.device("cpu"))
    one = tmp_path / "torch1.spqr"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        quantize_model(llama / "llama", one, calib=str(llama / "corpus.txt"), samples=SAMPLES,
                       seq_len=SEQ)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "torch2.spqr"
    # 4 KiB pieces: 4 rows of a 64-column Hessian per gather (several pieces per layer)
    r = torchrun(2, *_qargs(llama, out),
                 env={"SPQR_TEST_TORCH_ENCODER": "1", "SPQR_TEST_FOLD_BYTES": "4096"})  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.read_bytes() == one.read_bytes()
    assert not os.path.exists(str(out) + ".partial")


def test_tensor_parallel_logits(llama):
    """Both shard kinds in one launch. ``dense``: column-parallel layers are cheap row slices,
    row-parallel ones decode whole rows. ``packed`` (what the GPU runs, here dequantized on the
    CPU): row-parallel layers are blocks of stored columns fed the all-gathered input at
    ``perm[j0:j1]``, then all-reduced."""
    from spqr_format.models.loader import load_model

    path = llama / "one.spqr"
    r = torchrun(2, "tp", str(path), str(llama / "tp2.npy"), "cpu", "dense,packed")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dense {'cheap_rows': 10, 'full_rows': 0, 'full_columns': 4}" in r.stdout
    assert ("packed {'cheap_rows': 10, 'full_rows': 0, 'full_columns': 0, "
            "'stored_columns': 4, 'gathered_inputs': 4}") in r.stdout  # fmt: skip
    model = load_model(path)
    ids = torch.from_numpy(np.arange(3 * 24).reshape(3, 24) % 40 + 5)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.numpy()
    for shards in ("dense", "packed"):
        tp = np.load(llama / f"tp2-{shards}.npy")
        # the same weights; only the float32 summation order of the two all_reduce per block
        # differs (measured: 1.5e-7 on logits of magnitude 0.6)
        assert np.abs(tp - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max())), shards


def _bilevel_tensors(path):
    """(packed, decoded) of every bilevel tensor of the file."""
    from spqr_format import api

    with api.open_file(path) as f:
        for name in f.names():
            p = f.read(name)
            if isinstance(p, PackedBilevel):
                yield p, reference.decode_bilevel(p)


def test_stored_column_blocks_are_exact_sub_tensors(llama):
    for p, full in _bilevel_tensors(llama / "one.spqr"):
        for parts in (1, 2, 4):
            blocks = slicing.column_blocks(p, parts)
            assert blocks[0][0] == 0 and blocks[-1][1] == p.shape[1]
            for j0, j1 in blocks:
                sub = slicing.slice_stored_columns(p, j0, j1)
                cols = slicing.stored_columns(p, j0, j1)
                assert sub.perm is None
                assert np.array_equal(reference.decode_bilevel(sub), full[:, cols])
        with pytest.raises(slicing.NotCheapError):
            slicing.slice_stored_columns(p, 8, p.shape[1])  # inside a group


def test_row_slices_decode_like_the_whole_tensor(llama):
    for p, full in _bilevel_tensors(llama / "one.spqr"):
        m, u = p.shape[0], slicing.row_boundary(p)
        for r0 in range(0, m, u):
            for r1 in (r0 + u, m):
                assert np.array_equal(slicing.decode_rows(p, r0, r1), full[r0:r1])
        assert not slicing.is_cheap_row_slice(p, 8, m)  # inside an outlier block
        assert np.array_equal(slicing.decode_rows(p, 8, m), full[8:])
        assert np.array_equal(slicing.decode_columns(p, 5, 40), full[:, 5:40])
