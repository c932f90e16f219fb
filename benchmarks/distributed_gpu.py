"""Issue 21 on N GPUs: quantization time over 1, 2, 4, 8 GPUs and tensor-parallel decode
tokens/s (SpQRLinear shards vs fp16 shards), one command:

    PYTHONPATH=. python benchmarks/distributed_gpu.py --gpus 1 2 4 8 --json out.json

The driver launches ``torchrun --standalone --nproc-per-node N`` on this file for every N (the
workers are the ``_quantize`` and ``_tp`` sub-commands) and prints one table of each.

**Quantization** (``--quant-blocks`` blocks of a Llama-7B-shaped model with random fp16
weights, built by ``benchmarks/model_block_timing.py``'s builder; ``--samples`` x
``--seq-len`` calibration tokens, ``--preset``): ``spqr quantize-model --device cuda`` through
``quantize_model_distributed`` on N ranks (NCCL; N = 1 is a one-rank NCCL group). Reported:
seconds of the block loop per block (rank 0's ``block_done`` events; the start, loading the
model on the CPU and embedding the windows are reported apart as ``setup``), the whole run,
the wall time of the torchrun launch, the block time extrapolated to 32 blocks (an estimate:
every 7B block has the same shapes), and whether the file is byte-identical to the first N's.

**Tensor-parallel decode** (``--tp-layers`` blocks, default 32: a full Llama-7B shape): a
``.spqr`` file of random spqr-3bit-like tensors (``spqr_format.gpu.synth``: b=3, g=16, 3-bit
statistics, permutation, 1% outliers; embeddings, norms and lm_head raw fp16) loaded with
``load_model_tp(device="cuda")``, against the same architecture with fp16 ``nn.Linear``
shards (Megatron: column-parallel q/k/v/gate/up, row-parallel o/down + all_reduce). Greedy
decode after a ``--prompt``-token prefill, eager, HF's dynamic KV cache, the
``--new-tokens`` decode steps timed alone (median of ``--repeat``); tokens/s = batch x new
tokens / seconds. Weights and outputs are meaningless; memory traffic and collectives are
those of the real shape.

``--device cpu --shape tiny`` runs everything on the CPU over gloo (a smoke test of the
script; ``shards="packed"`` dequantized, fp32 baseline).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

SHAPES = {  # hidden, intermediate, heads, kv heads, vocab
    "llama-7b": (4096, 11008, 32, 32, 32000),
    "tiny": (256, 512, 8, 8, 1000),
}


# -- workers (one process per rank, under torchrun) -----------------------------------------
def worker_quantize(a) -> None:
    import torch

    from spqr_format.models.distributed import quantize_model_distributed

    rank = int(os.environ.get("RANK", "0"))
    events = []
    t0 = time.perf_counter()

    def progress(ev):
        events.append(dict(ev, t=time.perf_counter() - t0))

    if a.device == "cpu":
        torch.set_num_threads(1)
    res = quantize_model_distributed(a.model, a.out, preset=a.preset, calib=a.calib,
                                     samples=a.samples, seq_len=a.seq_len, device=a.device,
                                     progress=progress)  # fmt: skip
    run = time.perf_counter() - t0
    if rank != 0:
        return
    blocks = [e for e in events if e["kind"] == "block_done"]
    starts = [e for e in events if e["kind"] == "block_start"]
    loop = blocks[-1]["t"] - starts[0]["t"]
    with open(a.json, "w") as fh:
        json.dump({"seconds": run, "pipeline_seconds": res.seconds, "setup_seconds": starts[0]["t"],
                   "block_seconds": [e["seconds"] for e in blocks], "loop_seconds": loop,
                   "device_name": (torch.cuda.get_device_name() if a.device != "cpu" else "cpu")},
                  fh)  # fmt: skip


def _fp16_tp_model(torch, config, dist, world: int, dev, dtype):
    """The architecture with dense shards (random weights): Megatron's tensor parallelism."""
    from spqr_format.models.tp import _build, _kind, _replace, _row_shard_module

    model = _build(torch, _model_cls(), config, dev, dtype)
    for name, mod in list(model.named_modules()):
        kind = _kind(name + ".weight")
        if kind is None:
            continue
        o, i = mod.weight.shape
        shape = (o // world, i) if kind == "column" else (o, i // world)
        lin = torch.nn.Linear(shape[1], shape[0], bias=False, device=dev, dtype=dtype)
        torch.nn.init.normal_(lin.weight, std=0.02)
        lin.requires_grad_(False)
        new = lin if kind == "column" else _row_shard_module(torch, dist, world, lin, None, None)
        _replace(model, name + ".weight", new)
    return model


def _model_cls():
    import transformers as tf

    return tf.LlamaForCausalLM


def _decode_seconds(torch, model, vocab, batch, prompt, new, dev, dist) -> float:
    """Seconds of ``new`` greedy decode steps after the prefill (every rank runs it)."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, prompt), generator=g).to(dev)
    cuda = dev.type == "cuda"
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(new):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t


def worker_tp(a) -> None:
    import torch

    from spqr_format.models.distributed import from_env
    from spqr_format.models.tp import load_model_tp

    group = from_env(a.device)
    dist, rank, world = group.dist, group.rank, group.world
    dev = group.device
    if a.device == "cpu":
        torch.set_num_threads(1)
    t = time.perf_counter()
    kw = {} if a.device != "cpu" else {"shards": "packed"}
    spqr = load_model_tp(a.spqr, group=group, device=a.device, **kw)
    load_s = time.perf_counter() - t
    config = spqr.config
    dtype = next(p for p in spqr.parameters() if p.is_floating_point()).dtype
    rows = {}
    for which in ("spqr", "fp16"):
        if which == "fp16":
            del spqr
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            model = _fp16_tp_model(torch, config, dist, world, dev, dtype)
        else:
            model = spqr
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        for batch in a.batches:
            _decode_seconds(torch, model, config.vocab_size, batch, a.prompt, 4, dev, dist)
            times = [_decode_seconds(torch, model, config.vocab_size, batch, a.prompt,
                                     a.new_tokens, dev, dist) for _ in range(a.repeat)]  # fmt: skip
            rows.setdefault(batch, {})[which] = batch * a.new_tokens / statistics.median(times)
        if dev.type == "cuda":
            rows.setdefault("peak_gb", {})[which] = torch.cuda.max_memory_allocated(dev) / 2**30
        if which == "spqr":
            read = model.tp_read
        del model
    if rank == 0:
        with open(a.json, "w") as fh:
            json.dump({"rows": {str(k): v for k, v in rows.items()}, "load_seconds": load_s,
                       "tp_read": read, "world": world,
                       "device_name": (torch.cuda.get_device_name() if dev.type == "cuda"
                                       else "cpu")}, fh)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


# -- the driver -------------------------------------------------------------------------------
def synthetic_file(path: str, shape: str, layers: int) -> None:
    """A whole-model ``.spqr`` file of random spqr-3bit-like tensors (one random tensor per
    distinct shape, stored for every layer of that shape)."""
    import numpy as np
    import transformers as tf

    from spqr_format import api
    from spqr_format.gpu.synth import random_packed
    from spqr_format.models import hf
    from spqr_format.spec import DType

    hidden, inter, heads, kv, vocab = SHAPES[shape]
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=4096,
                         tie_word_embeddings=False)  # fmt: skip
    hd = hidden // heads
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv * hd, hidden),
              "self_attn.v_proj": (kv * hd, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}  # fmt: skip
    packed = {}
    for k, (m, n) in enumerate(sorted(set(shapes.values()))):
        packed[(m, n)] = random_packed(m, n, seed=k)
    rng = np.random.default_rng(0)

    def raw(*shape, scale=0.02, one=False):
        a = np.ones(shape, np.float16) if one else (rng.standard_normal(shape, np.float32)
                                                    * scale).astype(np.float16)  # fmt: skip
        return api.RawTensor(DType.FLOAT16, a)

    meta = {"model.config": hf.config_json(cfg), "model.architecture": "LlamaForCausalLM",
            "model.tied": {}, "model.transposed": []}  # fmt: skip
    with api.SpqrWriter(path, metadata=meta) as w:
        w.add("model.embed_tokens.weight", raw(vocab, hidden))
        for i in range(layers):
            p = f"model.layers.{i}."
            w.add(p + "input_layernorm.weight", raw(hidden, one=True))
            for name, s in shapes.items():
                w.add(f"{p}{name}.weight", packed[s])
            w.add(p + "post_attention_layernorm.weight", raw(hidden, one=True))
        w.add("model.norm.weight", raw(hidden, one=True))
        w.add("lm_head.weight", raw(vocab, hidden))


def launch(n: int, args: list[str], device: str) -> float:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if device == "cpu":
        env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={n}", os.path.abspath(__file__), *args]  # fmt: skip
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-8000:])
        raise SystemExit(f"torchrun --nproc-per-node {n} {args[0]} failed ({r.returncode})")
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--gpus",
        type=int,
        nargs="+",
        default=None,
        help="rank counts (default: 1 2 4 8 up to the GPUs of this host)",
    )
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    ap.add_argument("--quant-blocks", type=int, default=2)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--preset", default="spqr-3bit")
    ap.add_argument("--tp-layers", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-quantize", action="store_true")
    ap.add_argument("--skip-tp", action="store_true")
    ap.add_argument("--workdir", default=None, help="keep the files here (default: a temp dir)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch

    if a.gpus is None:
        have = torch.cuda.device_count() if a.device == "cuda" else 2
        a.gpus = [n for n in (1, 2, 4, 8) if n <= have]
    if a.device == "cuda" and (not torch.cuda.is_available()
                               or max(a.gpus) > torch.cuda.device_count()):  # fmt: skip
        print(f"error: needs {max(a.gpus)} CUDA GPUs, this host has "
              f"{torch.cuda.device_count()}", file=sys.stderr)  # fmt: skip
        return 2
    hidden, inter, heads, kv, _ = SHAPES[a.shape]
    out = {"args": vars(a), "quantize": {}, "tp": {}}
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        if not a.skip_quantize:
            from model_block_timing import build_random_llama

            t = time.perf_counter()
            model_dir, calib = build_random_llama(tmp, blocks=a.quant_blocks, hidden=hidden,
                                                  mlp=inter, heads=heads, samples=a.samples,
                                                  seq_len=a.seq_len)  # fmt: skip
            print(f"built {a.quant_blocks}-block {a.shape} model in "
                  f"{time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)  # fmt: skip
            first = None
            for n in a.gpus:
                f, j = os.path.join(tmp, f"q{n}.spqr"), os.path.join(tmp, f"q{n}.json")
                wall = launch(n, ["_quantize", "--model", model_dir, "--calib", calib,
                                  "--out", f, "--json", j, "--preset", a.preset,
                                  "--samples", str(a.samples), "--seq-len", str(a.seq_len),
                                  "--device", a.device], a.device)  # fmt: skip
                with open(j) as fh:
                    r = json.load(fh)
                with open(f, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
                first = first or digest
                r.update(wall_seconds=wall, sha256=digest, same_file_as_first=digest == first,
                         per_block=statistics.mean(r["block_seconds"]))  # fmt: skip
                r["extrapolated_32_blocks_minutes"] = 32 * r["per_block"] / 60
                out["quantize"][n] = r
                os.remove(f)
                print(json.dumps({"ranks": n, **r}), file=sys.stderr, flush=True)
        if not a.skip_tp:
            f = os.path.join(tmp, "tp.spqr")
            t = time.perf_counter()
            synthetic_file(f, a.shape, a.tp_layers)
            print(f"wrote synthetic {a.tp_layers}-block {a.shape} file in "
                  f"{time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)  # fmt: skip
            for n in a.gpus:
                j = os.path.join(tmp, f"tp{n}.json")
                launch(n, ["_tp", "--spqr", f, "--json", j, "--device", a.device,
                           "--prompt", str(a.prompt), "--new-tokens", str(a.new_tokens),
                           "--repeat", str(a.repeat), "--batches", *map(str, a.batches)],
                       a.device)  # fmt: skip
                with open(j) as fh:
                    out["tp"][n] = json.load(fh)
                print(json.dumps({"ranks": n, **out["tp"][n]}), file=sys.stderr, flush=True)
    dev = next((r["device_name"] for r in [*out["quantize"].values(), *out["tp"].values()]),
               a.device)  # fmt: skip
    if out["quantize"]:
        print(f"\nQuantization, {a.quant_blocks} blocks of {a.shape}, {a.preset}, "
              f"{a.samples} x {a.seq_len} tokens, {dev}\n")  # fmt: skip
        print(
            "| ranks | s/block | block loop s | setup s | torchrun wall s | 32 blocks (est.) "
            "| speed-up/block | same file |"
        )
        print("|---|---|---|---|---|---|---|---|")
        base = out["quantize"][a.gpus[0]]["per_block"]
        for n, r in out["quantize"].items():
            print(f"| {n} | {r['per_block']:.1f} | {r['loop_seconds']:.1f} | "
                  f"{r['setup_seconds']:.1f} | {r['wall_seconds']:.1f} | "
                  f"{r['extrapolated_32_blocks_minutes']:.1f} min | "
                  f"{base / r['per_block']:.2f}x | {r['same_file_as_first']} |")  # fmt: skip
    if out["tp"]:
        print(
            f"\nTensor-parallel greedy decode, {a.tp_layers} blocks of {a.shape} (random "
            f"spqr-3bit-like), prompt {a.prompt}, {a.new_tokens} new tokens, eager, {dev}\n"
        )
        print("| ranks | batch | fp16 tok/s | spqr tok/s | spqr / fp16 |")
        print("|---|---|---|---|---|")
        for n, r in out["tp"].items():
            for b in a.batches:
                row = r["rows"][str(b)]
                print(
                    f"| {n} | {b} | {row['fp16']:.1f} | {row['spqr']:.1f} | "
                    f"{row['spqr'] / row['fp16']:.2f}x |"
                )
        for n, r in out["tp"].items():
            print(
                f"{n} ranks: load {r['load_seconds']:.1f}s, reads {r['tp_read']}, "
                f"peak GB {r['rows'].get('peak_gb')}"
            )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


def worker_main(argv) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["_quantize", "_tp"])
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--out")
    ap.add_argument("--spqr")
    ap.add_argument("--json")
    ap.add_argument("--preset", default="spqr-3bit")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--repeat", type=int)
    ap.add_argument("--batches", type=int, nargs="+")
    a = ap.parse_args(argv)
    (worker_quantize if a.what == "_quantize" else worker_tp)(a)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        worker_main(sys.argv[1:])
    else:
        sys.exit(main())
