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
               device: str = "cpu") -> dict:  # fmt: skip
    """Sliding-window perplexity of ``model`` on token ids ``ids``; returns a dict with
    ``perplexity``, ``nll`` (mean), ``tokens`` (scored), ``seq_len``, ``stride``, ``windows``."""
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
    total = 0.0
    count = 0
    windows = 0
    prev_end = 0
    t0 = time.perf_counter()
    n = len(ids_t)
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + seq_len, n)
            new = end - prev_end  # tokens not scored yet
            x = ids_t[begin:end].unsqueeze(0).to(device)
            logits = model(input_ids=x, use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits[:-1].double(), dim=-1)
            nll = -logp.gather(1, x[0, 1:].unsqueeze(1)).squeeze(1)  # target j+1 from j
            first = max(1, (end - begin) - new)  # first scored position in the window
            total += float(nll[first - 1 :].sum())
            count += (end - begin) - first
            windows += 1
            prev_end = end
            if end == n:
                break
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
