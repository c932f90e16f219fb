"""Perplexity and bits/weight of a model under each preset, against the unquantized model.

By default the model is the one bundled in ``examples/llama-wt2`` (a small Llama-shaped model
trained here by ``examples/train_llama_wt2.py`` on WikiText-2 valid, not a published model);
``--model-dir`` takes any local Hugging Face causal LM. Each preset runs through
``spqr_format.quantize_model`` with WikiText-2 valid as calibration text (the split the model
trained on: there is no train split here); perplexity is measured on WikiText-2 test with
``spqr_format.models.evaluate_models`` (the method of ``spqr eval``: disjoint windows of
``--eval-len`` tokens). Prints one table; ``results.json`` in ``--out-dir`` keeps every number.

    python benchmarks/model_quality.py --out-dir /tmp/mq
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PRESETS = ["spqr-3bit", "spqr-4bit", "gptq-4bit-g128", "gptq-3bit-g128", "rtn-4bit-g128",
           "q2-g16", "q3-g128", "q3-g16", "q4-g128", "q4-g16"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("SPQR_DATA_DIR", "examples/data"))
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--model-dir", default="examples/llama-wt2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=None, help="first N test tokens only")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--device", default="cpu", help="where the encoder runs (cpu or cuda)")
    ap.add_argument("--eval-device", default="cpu", help="where perplexity runs (cpu or cuda)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--targets", default="2.5,3.0,3.5,4.0",
                    help="--target-bits runs (comma-separated; empty: none)")  # fmt: skip
    ap.add_argument("--cmpq-targets", default="3.0,3.5,4.0",
                    help="--method cmpq --target-bits runs (comma-separated; empty: none)")
    ap.add_argument("--cmpq-percdamp", type=float, default=None,
                    help="CMPQ gptq solver: Hessian dampening (default: CmpqConfig's)")
    ap.add_argument("--cmpq-solvers", default="",
                    help="CMPQ solvers of each --cmpq-targets run (comma-separated, gptq / "
                    "kmeans; empty: the CmpqConfig default, unlabelled)")
    args = ap.parse_args()

    import torch

    from spqr_format.models import hf
    from spqr_format.models.evaluate import evaluate_models
    from spqr_format.models.pipeline import quantize_model

    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    model_dir = args.model_dir
    files, extra = [], {}
    from spqr_format.codec.cmpq import CmpqConfig

    runs = [(p, None, None) for p in args.presets.split(",") if p]
    runs += [(f"target-bits {t}", float(t), None) for t in args.targets.split(",") if t]
    solvers = [v for v in args.cmpq_solvers.split(",") if v] or [None]
    runs += [(f"cmpq {t}" + (f" {s}" if s else ""), None,
              CmpqConfig(target_bits=float(t), **({"solver": s} if s else {}),
                         **({"percdamp": args.cmpq_percdamp} if args.cmpq_percdamp else {})))
             for t in args.cmpq_targets.split(",") if t for s in solvers]  # fmt: skip
    for preset, target, config in runs:
        out = os.path.join(args.out_dir, f"{preset.replace(' ', '-')}.spqr")
        t0 = time.perf_counter()
        try:
            plain = target is None and config is None
            res = quantize_model(model_dir, out, preset=preset if plain else "spqr-3bit",
                                 config=config, calib="wikitext2", data_dir=args.data_dir,
                                 samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                                 device=args.device, target_bits=target)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - an unreachable target is reported, not fatal
            print(f"{preset}: {e}", file=sys.stderr)
            continue
        q = [r for r in res.reports if r["encoding"] in ("bilevel", "channel_mixed")]
        nq = sum(r["shape"][0] * r["shape"][1] for r in q)
        bits_linear = sum(r["bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in q) / nq
        files.append(out)
        extra[out] = {"name": preset, "bits_linear": bits_linear,
                      "seconds_quantize": time.perf_counter() - t0}  # fmt: skip
        print(f"{preset}: quantized in {extra[out]['seconds_quantize']:.0f}s", file=sys.stderr)
    fp = hf.load_hf_model(model_dir)
    n_params = sum(p.numel() for p in fp.parameters())
    ckpt_dtype = str(next(fp.parameters()).dtype).removeprefix("torch.")
    del fp
    extra[model_dir] = {"name": f"unquantized ({ckpt_dtype} checkpoint)",
                        "bits_linear": float(torch.finfo(getattr(torch, ckpt_dtype)).bits),
                        "seconds_quantize": 0.0}  # fmt: skip
    rows = evaluate_models([model_dir, *files], "wikitext2", data_dir=args.data_dir,
                           seq_len=args.eval_len, max_tokens=args.eval_tokens,
                           device=args.eval_device,
                           on_result=lambda r: print(f"{r['model']}: ppl {r['perplexity']:.3f}",
                                                     file=sys.stderr))  # fmt: skip
    for r in rows:
        r.update(extra[r["model"]])
        r["bits_all"] = 8 * sum(
            os.path.getsize(os.path.join(r["model"], f)) for f in os.listdir(r["model"])
            if f.endswith(".safetensors")
        ) / n_params if os.path.isdir(r["model"]) else 8 * os.path.getsize(r["model"]) / n_params

    cfg = hf.load_config(model_dir)
    print(f"\n{model_dir}: {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden "
          f"{cfg.hidden_size}, vocab {cfg.vocab_size}, {n_params / 1e6:.2f} M parameters; "
          f"WikiText-2 test, {rows[0]['tokens']} tokens scored, context {args.eval_len}, "
          f"stride {args.eval_len}; calibration {args.samples} x {args.seq_len} tokens of "
          f"WikiText-2 valid; encoder on {args.device}, perplexity on "
          f"{args.eval_device}\n")  # fmt: skip
    print("| model | ppl | delta | bits/weight (quantized layers) | bits/weight (whole file) "
          "| quantize s |")
    print("|---|---|---|---|---|---|")
    base = rows[0]["perplexity"]
    for r in rows:
        print(f"| {r['name']} | {r['perplexity']:.3f} | {r['perplexity'] - base:+.3f} | "
              f"{r['bits_linear']:.3f} | {r['bits_all']:.2f} | {r['seconds_quantize']:.0f} |")
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
