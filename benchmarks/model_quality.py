"""Perplexity and bits/weight of a small Llama-shaped model under each preset, vs fp32.

Trains (or loads, --model-dir) a small Llama-shaped model, a word-level tokenizer trained with
the ``tokenizers`` package on WikiText-2; quantizes it with ``spqr_format.quantize_model`` per
preset; prints one table of WikiText-2 test perplexity and bits/weight.

There is no WikiText-2 train split here (../shared/data/wikitext-2 holds valid and test), so
the model and tokenizer are trained on wiki.valid.tokens, which also serves as calibration
text; evaluation is on wiki.test.tokens. This is a small model trained here for measuring, not
a published one, and at the default size (CPU, minutes) it is far from converged.

    python benchmarks/model_quality.py --data-dir ../shared/data --out-dir /tmp/mq
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PRESETS = ["spqr-3bit", "spqr-4bit", "gptq-4bit-g128", "gptq-3bit-g128", "rtn-4bit-g128",
           "q2-g16", "q3-g128", "q3-g16", "q4-g128", "q4-g16"]  # fmt: skip


def train_model(args, valid_text: str, model_dir: str) -> None:
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(vocab_size=args.vocab, special_tokens=["<unk>", "<pad>"])
    tok.train_from_iterator(valid_text.splitlines(), trainer)
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                           pad_token="<pad>")  # fmt: skip
    vocab = max(len(tokenizer), max(tok.get_vocab().values()) + 1)  # ids may skip one
    ffn = args.hidden * 8 // 3 // 16 * 16
    config = tf.LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=ffn,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = tf.LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(valid_text, add_special_tokens=False)["input_ids"])
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    model.train()
    t0 = time.perf_counter()
    with torch.enable_grad():
        for step in range(args.steps):
            starts = torch.randint(0, len(ids) - args.train_len - 1, (args.batch,), generator=g)
            x = torch.stack([ids[s : s + args.train_len] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0 or step == args.steps - 1:
                print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)",
                      file=sys.stderr)  # fmt: skip
    model.eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("SPQR_DATA_DIR", "../shared/data"))
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--model-dir", help="use this trained model instead of training one")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=None, help="first N test tokens only")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--targets", default="2.5,3.0,3.5,4.0",
                    help="--target-bits runs (comma-separated; empty: none)")  # fmt: skip
    args = ap.parse_args()

    import torch

    from spqr_format.models import data, hf
    from spqr_format.models.evaluate import perplexity
    from spqr_format.models.loader import load_model
    from spqr_format.models.pipeline import quantize_model

    torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    valid = data.resolve_text("wikitext2", purpose="calib", data_dir=args.data_dir)
    test = data.resolve_text("wikitext2", purpose="eval", data_dir=args.data_dir)
    model_dir = args.model_dir or os.path.join(args.out_dir, "model")
    if not args.model_dir:
        t0 = time.perf_counter()
        train_model(args, data.read_text(valid), model_dir)
        print(f"trained in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    tok = hf.load_tokenizer(model_dir)
    ids = data.tokenize(tok, data.read_text(test))
    if args.eval_tokens:
        ids = ids[: args.eval_tokens]

    fp_model = hf.load_hf_model(model_dir, dtype=torch.float32)
    n_params = sum(p.numel() for p in fp_model.parameters())
    rows = [{"model": "fp32", **perplexity(fp_model, ids, seq_len=args.eval_len),
             "bits_linear": 32.0, "bits_all": 32.0, "seconds_quantize": 0.0}]  # fmt: skip
    del fp_model
    runs = [(p, None) for p in args.presets.split(",") if p]
    runs += [(f"target-bits {t}", float(t)) for t in args.targets.split(",") if t]
    for preset, target in runs:
        out = os.path.join(args.out_dir, f"{preset.replace(' ', '-')}.spqr")
        t0 = time.perf_counter()
        try:
            res = quantize_model(model_dir, out, preset="spqr-3bit" if target else preset,
                                 calib="wikitext2", data_dir=args.data_dir,
                                 samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                                 target_bits=target)  # fmt: skip
        except Exception as e:  # an unreachable target is reported, not fatal
            print(f"{preset}: {e}", file=sys.stderr)
            continue
        tq = time.perf_counter() - t0
        q = [r for r in res.reports if r["encoding"] == "bilevel"]
        nq = sum(r["shape"][0] * r["shape"][1] for r in q)
        bits_linear = sum(r["bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in q) / nq
        bits_all = 8 * os.path.getsize(out) / n_params
        ppl = perplexity(load_model(out).float(), ids, seq_len=args.eval_len)
        rows.append({"model": preset, **ppl, "bits_linear": bits_linear, "bits_all": bits_all,
                     "seconds_quantize": tq})  # fmt: skip
        print(f"{preset}: ppl {ppl['perplexity']:.3f} ({tq:.0f}s)", file=sys.stderr)

    cfg = hf.load_config(model_dir)
    print(f"\nLlama-shaped model trained here: {cfg.num_hidden_layers} layers, hidden "
          f"{cfg.hidden_size}, vocab {cfg.vocab_size}, {n_params / 1e6:.2f} M parameters; "
          f"WikiText-2 test, {rows[0]['tokens']} tokens scored, context {args.eval_len}, "
          f"stride {args.eval_len}; calibration {args.samples} x {args.seq_len} tokens of "
          f"wiki.{valid.split}\n")  # fmt: skip
    print("| model | ppl | delta | bits/weight (quantized layers) | bits/weight (whole file) "
          "| quantize s |")
    print("|---|---|---|---|---|---|")
    base = rows[0]["perplexity"]
    for r in rows:
        print(f"| {r['model']} | {r['perplexity']:.3f} | {r['perplexity'] - base:+.3f} | "
              f"{r['bits_linear']:.3f} | {r['bits_all']:.2f} | {r['seconds_quantize']:.0f} |")
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
