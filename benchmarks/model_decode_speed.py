"""End-to-end decode speed on a GPU: tokens/s of a Llama model with SpQRLinear layers (our fused
kernels) against the same model in fp16 (cuBLAS), in one process, at batch 1 (and more).

Two sources of models:

- ``--model-dir D --spqr F``: a real model directory and its ``.spqr`` file (``spqr
  quantize-model``); the ``.spqr`` model is loaded with ``load_model(F, device="cuda")``;
- ``--synthetic llama-7b|llama-13b|llama-70b [--layers L]``: a Llama-shaped model with random
  fp16 weights, its linear layers replaced by SpQRLinear layers holding random ``bilevel``
  tensors of the same shapes (``spqr_format.gpu.synth``; spqr-3bit-like layout, 1 % outliers).
  Outputs are meaningless; memory traffic, and hence speed, is that of a real model.

Timing: greedy decode of ``--new-tokens`` tokens after a ``--prompt``-token prefill with a static
KV cache, the decode steps timed alone (CUDA events), median of ``--repeat`` runs. ``eager``
launches every kernel from Python; ``graph`` captures one decode step in a CUDA graph and
replays it (reported as failed, with the reason, where capture does not work).

    python benchmarks/model_decode_speed.py --synthetic llama-7b --out decode.json
    python benchmarks/model_decode_speed.py --model-dir examples/llama-wt2 --spqr q.spqr
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time

SHAPES = {  # hidden, intermediate, heads, kv heads, layers, vocab
    "llama-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama-13b": (5120, 13824, 40, 40, 40, 32000),
    "llama-70b": (8192, 28672, 64, 8, 80, 32000),
}


def synthetic_models(name: str, layers: int | None, args):
    import torch
    import transformers as tf

    from spqr_format.gpu.nn import SpQRLinear
    from spqr_format.gpu.synth import random_packed
    from spqr_format.gpu.tensor import GpuTensor

    hidden, inter, heads, kv, n_layers, vocab = SHAPES[name]
    config = tf.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers or n_layers, num_attention_heads=heads,
        num_key_value_heads=kv, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            fp16 = tf.LlamaForCausalLM(config).eval()
        with torch.device("meta"):
            q = tf.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    t0 = time.perf_counter()
    seed = 0
    for mod_name, module in list(q.named_modules()):
        if not isinstance(module, torch.nn.Linear) or mod_name == "lm_head":
            continue
        seed += 1
        p = random_packed(module.out_features, module.in_features, bits=args.bits,
                          outlier_fraction=args.outliers, seed=seed)  # fmt: skip
        new = SpQRLinear(GpuTensor.from_packed(p, name=mod_name), name=mod_name)
        parent, _, child = mod_name.rpartition(".")
        setattr(q.get_submodule(parent), child, new)
    # the rest (embeddings, norms, lm_head, rotary buffers) as in the fp16 model
    q = q.to_empty(device="cuda")
    q.load_state_dict(fp16.state_dict(), strict=False)
    for buf_name, buf in fp16.named_buffers():
        q.get_buffer(buf_name).copy_(buf)
    print(f"synthetic {name}: {config.num_hidden_layers} layers built in "
          f"{time.perf_counter() - t0:.0f}s", file=sys.stderr)  # fmt: skip
    return fp16, q, config


def real_models(model_dir: str, spqr: str):
    import torch

    from spqr_format.models import hf
    from spqr_format.models.loader import load_model

    fp16 = hf.load_hf_model(model_dir, dtype=torch.float16).to("cuda")
    q = load_model(spqr, model_dir, device="cuda")
    return fp16, q, fp16.config


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "past_key_values" if "past_key_values" in params else "cache"


def _static_cache(config, batch: int, length: int, dtype):
    import torch
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kw = {"config": config, "max_cache_len": length}
    if "max_batch_size" in params:
        kw.update(max_batch_size=batch)
    if "device" in params:
        kw.update(device=torch.device("cuda"))
    if "dtype" in params:
        kw.update(dtype=dtype)
    return StaticCache(**kw)


def _rewind(cache, position: int) -> None:
    """Set the write position of every static cache layer to ``position``. transformers >= 5
    keeps it in a device tensor (``cumulative_length``) that each update advances, ignoring
    ``cache_position``; the warm-up steps before the timed loop would otherwise push it past
    ``max_cache_len`` (an out-of-bounds ``index_copy_``). In place, so a captured graph keeps
    reading the same tensor. Older versions write at ``cache_position`` and have no counter."""
    for layer in getattr(cache, "layers", ()):
        counter = getattr(layer, "cumulative_length", None)
        if counter is not None and hasattr(counter, "fill_"):
            counter.fill_(position)


def decode(model, config, *, batch: int, prompt: int, new: int, graph: bool) -> float:
    """Seconds for ``new`` greedy decode steps after the prefill (CUDA events)."""
    import torch

    ck = _cache_kwarg(model)
    cache = _static_cache(config, batch, prompt + new + 4, torch.float16)
    ids = torch.randint(0, config.vocab_size, (batch, prompt), device="cuda")
    pos = torch.arange(prompt, device="cuda")
    with torch.no_grad():
        out = model(input_ids=ids, cache_position=pos, use_cache=True, **{ck: cache})
        tok = out.logits[:, -1:].argmax(-1)
        step_pos = torch.tensor([prompt], device="cuda")

        def step():
            o = model(input_ids=tok, cache_position=step_pos, use_cache=True, **{ck: cache})
            return o.logits[:, -1:].argmax(-1)

        if graph:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):  # warm-up outside capture (kernel modules compile here)
                    step()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                nxt = step()
        _rewind(cache, prompt)  # the warm-up steps advanced the cache's own write position
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(new):
            step_pos.fill_(prompt + i)  # graph: the captured kernels read these buffers
            if graph:
                g.replay()
                tok.copy_(nxt)
            else:
                tok = step()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", choices=sorted(SHAPES))
    src.add_argument("--model-dir")
    ap.add_argument("--spqr", help="the .spqr file of --model-dir")
    ap.add_argument("--layers", type=int, default=None, help="synthetic: fewer layers")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--outliers", type=float, default=0.01)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.model_dir:
        if not args.spqr:
            ap.error("--model-dir needs --spqr")
        fp16, q, config = real_models(args.model_dir, args.spqr)
        label = args.model_dir
    else:
        fp16, q, config = synthetic_models(args.synthetic, args.layers, args)
        label = f"synthetic {args.synthetic} ({config.num_hidden_layers} layers)"
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for mode in ("eager", "graph"):
            row = {"batch": batch, "mode": mode}
            for which, model in (("fp16", fp16), ("spqr", q)):
                try:
                    times = [decode(model, config, batch=batch, prompt=args.prompt,
                                    new=args.new_tokens, graph=mode == "graph")
                             for _ in range(args.repeat)]  # fmt: skip
                    t = statistics.median(times)
                    row[which] = args.new_tokens * batch / t  # tokens/s
                except Exception as err:  # noqa: BLE001 - reported, not hidden
                    row[which] = None
                    row[f"{which}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
            if row.get("fp16") and row.get("spqr"):
                row["speedup"] = row["spqr"] / row["fp16"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    dev = torch.cuda.get_device_name()
    print(f"\n{label} on {dev}: greedy decode tokens/s (prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, median of {args.repeat})\n")  # fmt: skip
    print("| batch | mode | fp16 tok/s | spqr tok/s | spqr / fp16 |")
    print("|---|---|---|---|---|")
    for r in rows:
        f = f"{r['fp16']:.1f}" if r.get("fp16") else "failed"
        s = f"{r['spqr']:.1f}" if r.get("spqr") else "failed"
        x = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        print(f"| {r['batch']} | {r['mode']} | {f} | {s} | {x} |")
    for r in rows:
        for k in ("fp16_error", "spqr_error"):
            if k in r:
                print(f"batch {r['batch']} {r['mode']} {k}: {r[k]}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"label": label, "device": dev, "args": vars(args), "rows": rows}, fh,
                      indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
