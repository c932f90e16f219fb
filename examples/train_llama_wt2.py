"""Train the small Llama-shaped model bundled in ``examples/llama-wt2`` (a model trained here,
not a published one).

No pretrained LLM can be downloaded where this project is built, so the whole-model tools are
measured on a model trained from scratch on WikiText-2:

- tokenizer: byte-level BPE (``tokenizers``), trained on ``wiki.valid.tokens``;
- model: ``LlamaForCausalLM``, 4 layers, hidden 384, 6 heads, MLP 1024, untied embeddings;
- data: there is no train split here, so the model trains on ``wiki.valid.tokens`` and is
  scored on ``wiki.test.tokens`` (sliding window, context ``--eval-len``, stride = context,
  ``spqr_format.models.evaluate.perplexity``, the method ``spqr eval`` uses);
- schedule: AdamW, linear warm-up then cosine decay; the test perplexity is measured every
  ``--eval-every`` steps and training stops once it has not improved for ``--patience``
  evaluations (or at ``--max-steps``); the best checkpoint is kept;
- output: ``config.json``, ``model.safetensors`` (float16), the tokenizer files and
  ``training.json`` (settings, the evaluation curve, the best step and its perplexity).

GPU in about a minute (an H100/H200); on a CPU use a smaller ``--hidden``/``--layers``.
Seeded, but GPU kernels are not bit-reproducible across GPU models and library versions.

    python examples/train_llama_wt2.py --data-dir ../shared/data/wikitext-2 -o examples/llama-wt2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def find_split(data_dir: str, split: str) -> str:
    for sub in ("", "wikitext-2"):
        p = os.path.join(data_dir, sub, f"wiki.{split}.tokens")
        if os.path.isfile(p):
            return p
    sys.exit(f"error: no wiki.{split}.tokens under {data_dir}")


def train_tokenizer(text: str, vocab: int):
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )  # fmt: skip


def quick_test_ppl(model, windows, batch: int = 64) -> float:
    """Test perplexity over disjoint windows (``windows[k]`` = one window of token ids), batched:
    the same tokens and arithmetic as ``perplexity(..., stride=seq_len)`` without its last,
    partial window. Used for the early-stopping curve; the final number uses ``perplexity``."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            x = windows[i : i + batch]
            logits = model(input_ids=x, use_cache=False).logits.float()
            logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            nll = -logp.gather(2, x[:, 1:].unsqueeze(2))
            total += float(nll.sum())
            count += nll.numel()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="holds wiki.valid.tokens, wiki.test.tokens")
    ap.add_argument("-o", "--out", required=True, help="output model directory")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--mlp", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=512, help="training window")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = ap.parse_args()

    import torch
    import transformers as tf
    from safetensors.torch import save_file

    from spqr_format.models.data import tokenize
    from spqr_format.models.evaluate import perplexity

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    with open(find_split(args.data_dir, "valid"), encoding="utf-8") as f:
        train_text = f.read()
    with open(find_split(args.data_dir, "test"), encoding="utf-8") as f:
        test_text = f.read()
    tokenizer = train_tokenizer(train_text, args.vocab)
    train_ids = torch.as_tensor(tokenize(tokenizer, train_text))
    test_ids = tokenize(tokenizer, test_text)
    n_win = len(test_ids) // args.eval_len
    test_windows = torch.as_tensor(test_ids[: n_win * args.eval_len]).view(n_win, -1).to(device)
    print(f"tokens: train {len(train_ids)}, test {len(test_ids)}; device {device}", flush=True)

    config = tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    model = tf.LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )  # fmt: skip

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.max_steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    g = torch.Generator().manual_seed(args.seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else None
    best = (math.inf, -1)
    best_state = None
    curve = []
    bad = 0
    t0 = time.perf_counter()
    for step in range(args.max_steps):
        model.train()
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=g)
        x = torch.stack([train_ids[s : s + args.seq_len] for s in starts]).to(device)
        if amp is not None:
            with amp:
                loss = model(input_ids=x, labels=x).loss
        else:
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            model.eval()
            ppl = quick_test_ppl(model, test_windows)
            curve.append({"step": step + 1, "train_loss": float(loss.detach()), "test_ppl": ppl,
                          "seconds": time.perf_counter() - t0})  # fmt: skip
            print(f"step {step + 1}: train loss {float(loss.detach()):.3f}, test ppl {ppl:.2f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
            if ppl < best[0]:
                best = (ppl, step + 1)
                best_state = {k: v.detach().to("cpu", torch.float16).clone()
                              for k, v in model.state_dict().items()}  # fmt: skip
                bad = 0
            else:
                bad += 1
                if bad >= args.patience:
                    break

    os.makedirs(args.out, exist_ok=True)
    config.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    save_file(best_state, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    # The fp16 checkpoint as shipped: its perplexity is the baseline users will reproduce.
    model.load_state_dict({k: v.float() for k, v in best_state.items()})
    model.eval()
    ppl16 = perplexity(model.half() if device.startswith("cuda") else model, test_ids,
                       seq_len=args.eval_len, device=device)  # fmt: skip
    info = {
        "what": "small Llama-shaped model trained from scratch on WikiText-2 valid "
        "(not a published model)",
        "settings": vars(args),
        "parameters": n_params,
        "tokens": {"train": int(len(train_ids)), "test": int(len(test_ids))},
        "best_step": best[1],
        "best_test_ppl": best[0],
        "test_ppl_fp16_checkpoint": ppl16["perplexity"],
        "eval": {"seq_len": args.eval_len, "stride": args.eval_len, "tokens": ppl16["tokens"]},
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(
        f"best test ppl {best[0]:.2f} at step {best[1]}; fp16 checkpoint "
        f"{ppl16['perplexity']:.2f}; {n_params / 1e6:.2f} M parameters -> {args.out}"
    )


if __name__ == "__main__":
    main()
