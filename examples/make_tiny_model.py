"""Make examples/tiny-llama.safetensors: a small LLaMA-shaped checkpoint for trying the CLI.

The weights are random but shaped like a real model's: Gaussian with heavy (Student-t) tails,
a few input features with large activations folded in as high-magnitude columns, fp16 linear
layers, fp32 norms. Deterministic: the same bytes on every run (seed 0).

    python examples/make_tiny_model.py            # rewrites examples/tiny-llama.safetensors
"""

from __future__ import annotations

import pathlib

import numpy as np

from spqr_format.safetensors_io import write_safetensors

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 128, 352, 2, 512


def linear(rng: np.random.Generator, out_f: int, in_f: int) -> np.ndarray:
    w = rng.standard_t(df=5, size=(out_f, in_f)).astype(np.float32) / np.sqrt(in_f)
    hot = rng.choice(in_f, size=max(1, in_f // 64), replace=False)
    w[:, hot] *= 4.0  # columns that meet large activation features
    return w.astype(np.float16)


def main() -> None:
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": ("float16", linear(rng, VOCAB, HIDDEN))}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name, shape in [
            ("self_attn.q_proj", (HIDDEN, HIDDEN)),
            ("self_attn.k_proj", (HIDDEN, HIDDEN)),
            ("self_attn.v_proj", (HIDDEN, HIDDEN)),
            ("self_attn.o_proj", (HIDDEN, HIDDEN)),
            ("mlp.gate_proj", (INTERMEDIATE, HIDDEN)),
            ("mlp.up_proj", (INTERMEDIATE, HIDDEN)),
            ("mlp.down_proj", (HIDDEN, INTERMEDIATE)),
        ]:
            tensors[p + name + ".weight"] = ("float16", linear(rng, *shape))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[p + norm + ".weight"] = ("float32", np.ones(HIDDEN, np.float32))
    tensors["model.norm.weight"] = ("float32", np.ones(HIDDEN, np.float32))
    tensors["lm_head.weight"] = ("float16", linear(rng, VOCAB, HIDDEN))
    out = pathlib.Path(__file__).with_name("tiny-llama.safetensors")
    write_safetensors(out, tensors, {"format": "pt", "note": "random weights, spqr-format sample"})
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
