"""Quantization time and peak memory per transformer block of a Llama-7B-shaped model, on CPU
or GPU, extrapolated to 7B (32 blocks) and 70B (80 blocks of hidden 8192 / MLP 28672).

    python benchmarks/model_block_timing.py [--blocks 1] [--hidden 4096] [--mlp 11008] \\
        [--samples 16] [--seq-len 512] [--preset spqr-3bit] [--device cpu|cuda] [--json out.json]

Builds a model with random weights (``LlamaConfig``, fp16 weights on disk, a small word-level
tokenizer trained on generated text: weights and activations are random, which is fine for
timing), runs ``spqr_format.quantize_model`` on it, and reports per block: seconds (Hessians,
encoding of each linear layer, the forward that feeds the next block), and the process's peak
RSS above the loaded model; with ``--device cuda`` (the torch GPU encoder) also the peak GPU
memory of each block (``torch.cuda.max_memory_allocated``, reset at every block start; CUDA,
cuBLAS and cuSOLVER are initialised before the clock starts). Needs the ``models`` extra
(torch, transformers).

The extrapolation is linear in blocks, and for 70B scales each layer's GPTQ time by
(n_out * n_in^2) (the column solve with blocked updates) relative to the measured layer of the
same kind; it is an estimate, stated as one. On the GPU the column loop is bound by kernel
launches (one short sequence of vector kernels per column), so its time grows with n_in, not
n_out * n_in^2: the GPU result gives both, ``extrapolated_70b_hours`` scaled by n_in and
``extrapolated_70b_hours_flops_bound`` by n_out * n_in^2 (an upper estimate).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_random_llama(
    tmp: str,
    *,
    blocks: int,
    hidden: int = 4096,
    mlp: int = 11008,
    heads: int = 32,
    samples: int = 16,
    seq_len: int = 512,
):
    """A Llama-shaped model with random fp16 weights in ``tmp/model`` (and a word-level
    tokenizer trained on generated text) and a calibration text ``tmp/calib.txt`` long enough
    for ``samples`` x ``seq_len`` tokens; returns ``(model_dir, calib)``."""
    import torch
    import transformers as tf
    from tiny_models import make_corpus, make_tokenizer

    torch.manual_seed(0)
    text = make_corpus(n_sentences=samples * seq_len // 4 + 2000, seed=1)
    calib = os.path.join(tmp, "calib.txt")
    with open(calib, "w") as fh:
        fh.write(text)
    tok = make_tokenizer(text)
    cfg = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp,
        num_hidden_layers=blocks, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=max(2048, seq_len),
    )  # fmt: skip
    model = tf.LlamaForCausalLM(cfg).to(torch.float16)
    model_dir = os.path.join(tmp, "model")
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    del model
    return model_dir, calib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--mlp", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--preset", default="spqr-3bit")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu (numba encoder) or cuda[:N] (torch)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)

    import torch

    import spqr_format

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            print(f"error: --device {args.device}: CUDA is not available", file=sys.stderr)
            return 2
        dev = torch.device(args.device)
        # Context, cuBLAS and cuSOLVER handles before the clock starts.
        a = torch.eye(64, dtype=torch.float64, device=dev)
        torch.linalg.cholesky_ex(a)
        torch.linalg.solve_triangular(a, a, upper=False)
        (a.float() @ a.float()).sum().item()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, calib = build_random_llama(
            tmp,
            blocks=args.blocks,
            hidden=args.hidden,
            mlp=args.mlp,
            heads=args.heads,
            samples=args.samples,
            seq_len=args.seq_len,
        )
        base_rss = _rss_mb()
        events = []
        t0 = time.perf_counter()

        def progress(ev):
            ev = dict(ev, t=time.perf_counter() - t0, rss_mb=_rss_mb())
            if cuda:
                if ev["kind"] == "block_start":
                    torch.cuda.reset_peak_memory_stats(dev)
                ev["gpu_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
                ev["gpu_reserved_mb"] = torch.cuda.max_memory_reserved(dev) / 2**20
            events.append(ev)
            if ev["kind"] in ("block_done", "layer_done", "stage"):
                what = ev.get("layer") or ev.get("stage") or f"block {ev.get('block')}"
                gpu = f"  gpu peak {ev['gpu_peak_mb']:7.0f} MB" if cuda else ""
                print(f"  {ev['t']:8.1f} s  rss {ev['rss_mb']:8.0f} MB{gpu}  {ev['kind']}: "
                      f"{what}", flush=True)  # fmt: skip

        spqr_format.quantize_model(
            model_dir, os.path.join(tmp, "m.spqr"), preset=args.preset, calib=calib,
            samples=args.samples, seq_len=args.seq_len, progress=progress, device=args.device,
        )  # fmt: skip
    total = time.perf_counter() - t0
    blocks = [e for e in events if e["kind"] == "block_done"]
    layers = [e for e in events if e["kind"] == "layer_done"]
    per_block = sum(e["seconds"] for e in blocks) / len(blocks)
    peak = max(e["rss_mb"] for e in events) - base_rss
    enc = {}
    for e in layers:
        enc.setdefault(e["layer"], []).append(e["seconds"])
    enc = {k: sum(v) / len(v) for k, v in enc.items()}
    # 70B: hidden 8192, MLP 28672, 8 KV heads of 128 (k/v_proj 1024 x 8192); GPTQ ~ n_out n_in^2
    h, m = args.hidden, args.mlp
    shapes7 = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
               "gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}  # fmt: skip
    shapes70 = {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192),
                "o_proj": (8192, 8192), "gate_proj": (28672, 8192), "up_proj": (28672, 8192),
                "down_proj": (8192, 28672)}  # fmt: skip
    enc_block = sum(enc.values())
    other = per_block - enc_block  # Hessians, forwards, writing the checkpoint
    llama7 = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
              "o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096),
              "down_proj": (4096, 11008)}  # fmt: skip

    def block_seconds(target: dict, hidden: int, by_columns: bool = False) -> float:
        """A block of ``target`` shapes, scaled from the measured one layer by layer (by
        n_out * n_in^2, or by n_in with ``by_columns``)."""
        sec = 0.0
        for name, measured in enc.items():
            key = name.rsplit(".", 1)[-1]
            (o, i), (to, ti) = shapes7[key], target[key]
            sec += measured * ((ti / i) if by_columns else (to * ti * ti) / (o * i * i))
        return sec + other * (hidden * hidden) / (h * h)  # Hessians ~ tokens x n_in^2

    block7 = block_seconds(llama7, 4096)
    block70_flops = block_seconds(shapes70, 8192)
    block70 = block_seconds(shapes70, 8192, by_columns=cuda)
    result = {
        "shape": {"hidden": h, "mlp": m, "blocks_measured": len(blocks)},
        "calibration_tokens": args.samples * args.seq_len,
        "preset": args.preset,
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "seconds_per_block": per_block,
        "seconds_per_block_each": [e["seconds"] for e in blocks],
        "encode_seconds_per_layer": enc,
        "other_seconds_per_block": other,
        "peak_rss_above_model_mb": peak,
        "total_seconds": total,
        "extrapolated_7b_minutes": 32 * block7 / 60,
        "extrapolated_70b_hours": 80 * block70 / 3600,
    }
    if cuda:
        result["gpu_peak_allocated_mb_per_block"] = [e["gpu_peak_mb"] for e in blocks]
        result["gpu_peak_reserved_mb_per_block"] = [e["gpu_reserved_mb"] for e in blocks]
        # peak since the block started, read after each layer (cumulative within the block)
        result["gpu_peak_allocated_mb_after_layer"] = {
            e["layer"]: e["gpu_peak_mb"] for e in layers if e["block"] == blocks[-1]["block"]
        }
        result["extrapolated_70b_hours_flops_bound"] = 80 * block70_flops / 3600
        result["extrapolation"] = (
            "7B: 32 blocks of the measured block; 70B: 80 blocks, each layer's encode time "
            "scaled by n_in (launch-bound column loop) or by n_out*n_in^2 (flops bound), the "
            "rest by hidden^2; an estimate, not a measurement"
        )
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
