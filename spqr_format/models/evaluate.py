"""Perplexity of a causal language model on a text: the standard sliding-window method.

Windows of ``seq_len`` tokens start every ``stride`` tokens; each window scores only the
tokens that no earlier window scored (all of them in the first window except its first
token), every scored token seeing up to ``seq_len - 1`` tokens of context. With
``stride == seq_len`` the windows are disjoint and, as in Hugging Face's perplexity guide, the
first token of each window (which has no context in it) is not scored.
``ppl = exp(sum NLL / tokens scored)``, the sum in float64.
"""

from __future__ import annotations

import math
import time

import numpy as np

from spqr_format.errors import BadInputError
from spqr_format.models._deps import require_torch


def is_causal_lm(model) -> bool:
    name = type(model).__name__
    return "CausalLM" in name or "LMHead" in name


def perplexity(model, ids: np.ndarray, *, seq_len: int = 512, stride: int | None = None,
               device: str = "cpu", batch_size: int = 8) -> dict:  # fmt: skip
    """Sliding-window perplexity of ``model`` on token ids ``ids``; returns a dict with
    ``perplexity``, ``nll`` (mean), ``tokens`` (scored), ``seq_len``, ``stride``, ``windows``.

    Windows of equal length run in batches of up to ``batch_size`` (fewer when the logits
    would pass 2^26 values); log-probabilities in float32, their sum in float64."""
    torch = require_torch()
    stride = seq_len if stride is None else stride
    if not is_causal_lm(model):
        raise BadInputError(
            f"perplexity needs a causal language model; {type(model).__name__} is not one"
        )
    if seq_len < 2 or stride < 1 or stride > seq_len:
        raise BadInputError(
            f"need seq_len >= 2 and 1 <= stride <= seq_len, got {seq_len} and {stride}"
        )
    if len(ids) < 2:
        raise BadInputError(f"the text has {len(ids)} tokens; perplexity needs at least 2")
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n = len(ids_t)
    # The windows and, in each, the first position scored (tokens no earlier window scored).
    spans = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        spans.append((begin, end, max(1, (end - begin) - (end - prev_end))))
        prev_end = end
        if end == n:
            break
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1
    per_batch = max(1, min(batch_size, (1 << 26) // max(1, seq_len * vocab)))
    total = 0.0
    count = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        i = 0
        while i < len(spans):
            # consecutive windows of one length run as one batch
            length = spans[i][1] - spans[i][0]
            j = i
            while j < len(spans) and j - i < per_batch and spans[j][1] - spans[j][0] == length:
                j += 1
            x = torch.stack([ids_t[b:e] for b, e, _ in spans[i:j]]).to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(2, x[:, 1:].unsqueeze(2)).squeeze(2).double()  # target j+1 from j
            for k, (b, e, first) in enumerate(spans[i:j]):
                total += float(nll[k, first - 1 :].sum())
                count += (e - b) - first
            i = j
    windows = len(spans)
    return {
        "perplexity": math.exp(total / count),
        "nll": total / count,
        "tokens": count,
        "text_tokens": n,
        "seq_len": seq_len,
        "stride": stride,
        "windows": windows,
        "seconds": time.perf_counter() - t0,
    }


def evaluate_models(models, text: str, *, model_dir: str | None = None,
                    data_dir: str | None = None, seq_len: int = 512,
                    stride: int | None = None, max_tokens: int | None = None,
                    device: str = "cpu", on_result=None) -> list[dict]:  # fmt: skip
    """Perplexity of each of ``models`` (Hugging Face model directories and/or ``.spqr`` files)
    on one text, tokenized once, with the same windows: the rows of a before/after table.

    A ``.spqr`` file needs the original model directory for its tokenizer: ``model_dir``, else
    the first directory among ``models``; every model is scored with that one tokenizer.
    ``text``: a file or ``wikitext2`` (its test split, in ``data_dir`` or $SPQR_DATA_DIR).
    ``device``: ``cpu`` (float32; a ``.spqr`` model with dequantized weights) or ``cuda[:N]``
    (float16; a ``.spqr`` model with SpQRLinear layers running our kernels).
    ``on_result(row)`` is called after each model. Each row is :func:`perplexity`'s dict plus
    ``model``, ``source``, ``text``, ``text_path``, ``split``, ``device``."""
    import os

    from spqr_format.models import data, hf
    from spqr_format.models.loader import load_model

    torch = require_torch()
    models = [os.fspath(m) for m in models]
    if not models:
        raise BadInputError("no model to evaluate")
    stride = seq_len if stride is None else stride
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise BadInputError(f"need --seq-len >= 2 and 1 <= --stride <= --seq-len, got "
                            f"{seq_len} and {stride}", field="--stride")  # fmt: skip
    if max_tokens is not None and max_tokens < 2:
        raise BadInputError(f"--max-tokens must be at least 2, got {max_tokens}")
    cuda = str(device).startswith("cuda")
    if not (device == "cpu" or cuda):
        raise BadInputError(f"unknown device {device!r} (expected cpu or cuda)", field="device")
    if cuda and not torch.cuda.is_available():
        raise BadInputError("device cuda: torch sees no CUDA device", field="device")
    for m in models:
        if not os.path.exists(m):
            raise BadInputError("no such file or directory", path=m)
    dirs = [m for m in models if os.path.isdir(m)]
    tok_dir = os.fspath(model_dir) if model_dir is not None else (dirs[0] if dirs else None)
    if tok_dir is None:
        raise BadInputError("a .spqr model needs --model-dir (its tokenizer)", path=models[0])
    src = data.resolve_text(text, purpose="eval", data_dir=data_dir)
    ids = data.tokenize(hf.load_tokenizer(tok_dir), data.read_text(src))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    rows = []
    for m in models:
        if os.path.isdir(m):
            source = "model directory"
            net = hf.load_hf_model(m, dtype=torch.float16 if cuda else torch.float32)
            if cuda:
                net = net.to(device)
        else:
            source = ".spqr file"
            net = load_model(m, tok_dir, device=device)
            if not cuda:
                net = net.float()
        row = perplexity(net, ids, seq_len=seq_len, stride=stride, device=device)
        del net
        row.update(model=m, source=source, text=src.name, text_path=src.path, split=src.split,
                   device=str(device))  # fmt: skip
        rows.append(row)
        if on_result is not None:
            on_result(row)
    return rows
