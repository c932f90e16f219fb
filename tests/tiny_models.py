"""Tiny Hugging Face models and a tokenizer built offline, for the whole-model tests.

Nothing is downloaded: the corpus is generated from a small seeded grammar, the tokenizer is a
WordLevel model trained on it with the ``tokenizers`` package, and the models are built from
configs with a fixed seed.
"""

from __future__ import annotations

import random

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the bird", "a child", "the teacher",
            "our neighbour", "the farmer", "a student"]
VERBS = ["sees", "likes", "finds", "follows", "paints", "watches", "helps", "calls"]
OBJECTS = ["the river", "a red ball", "the small house", "the garden", "a green tree",
           "the market", "the long road", "a blue boat"]
ENDINGS = ["in the morning", "at night", "every day", "after lunch", "near the school",
           "with great care", "again and again"]


def make_corpus(n_sentences: int = 3000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        if rng.random() < 0.6:
            s += " " + rng.choice(ENDINGS)
        lines.append(s + " .")
    return "\n".join(" ".join(lines[i : i + 4]) for i in range(0, len(lines), 4)) + "\n"


def make_tokenizer(text: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[CLS]", "[SEP]",
                                                        "[MASK]"])
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def make_config(family: str, vocab_size: int):
    import transformers as tf

    common = dict(vocab_size=vocab_size)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=256, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=256, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256,
                            word_embed_proj_dim=64, **common)
    if family == "bert":
        return tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=256, **common)
    # Llama-like families: the same sizes, grouped-query attention
    like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "llama-tied":
        return tf.LlamaConfig(tie_word_embeddings=True, **like)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(pad_token_id=1, **like)
    if family == "gemma2":  # soft-capping, sliding windows, tied embeddings
        return tf.Gemma2Config(head_dim=16, **like)
    if family == "mixtral":  # stacked experts [E, out, in], router a parameter
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **like)
    if family == "qwen2_moe":  # stacked experts, a shared expert and its gate (nn.Linear)
        return tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=64, **like)
    if family == "gpt_oss":  # stacked experts stored [E, in, out], with biases
        return tf.GptOssConfig(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                               pad_token_id=1, **like)
    if family == "jetmoe":  # experts in its own 3-D layout, which the walker does not know
        return tf.JetMoeConfig(hidden_size=64, num_hidden_layers=2, num_key_value_heads=2,
                               kv_channels=16, intermediate_size=128, num_local_experts=4,
                               num_experts_per_tok=2, max_position_embeddings=256, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**{k: v for k, v in like.items() if k != "num_key_value_heads"})
    if family == "falcon":
        return tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               **common)
    if family == "bloom":
        return tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common)
    if family == "gptj":
        return tf.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256,
                             **common)
    if family == "t5":  # encoder-decoder: refused by quantize-model
        return tf.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, **common)
    raise ValueError(family)


ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel",
        "opt": "OPTForCausalLM", "bert": "BertForMaskedLM", "llama-tied": "LlamaForCausalLM",
        "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
        "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
        "gpt_oss": "GptOssForCausalLM", "jetmoe": "JetMoeForCausalLM",
        "gpt_neox": "GPTNeoXForCausalLM", "falcon": "FalconForCausalLM",
        "bloom": "BloomForCausalLM", "gptj": "GPTJForCausalLM",
        "t5": "T5ForConditionalGeneration"}  # fmt: skip


def build_model(family: str, out_dir, text: str, *, seed: int = 0, train_steps: int = 0,
                dtype=None):
    """Save a tiny model of ``family`` and its tokenizer to ``out_dir``; returns the model."""
    import torch
    import transformers as tf

    tokenizer = make_tokenizer(text)
    config = make_config(family, len(tokenizer))
    torch.manual_seed(seed)
    model = getattr(tf, ARCH[family])(config)
    model.eval()
    if train_steps:
        train(model, tokenizer, text, train_steps, seed)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def train(model, tokenizer, text: str, steps: int, seed: int, *, seq_len: int = 64,
          batch: int = 8, lr: float = 1e-2) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is ~20x faster on a busy machine
    try:
        _train(model, tokenizer, text, steps, seed, seq_len, batch, lr)
    finally:
        torch.set_num_threads(threads)


def _train(model, tokenizer, text, steps, seed, seq_len, batch, lr) -> None:
    import torch

    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    with torch.enable_grad():
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=g)
            x = torch.stack([ids[s : s + seq_len] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
