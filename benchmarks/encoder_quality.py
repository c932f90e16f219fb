"""Encoder quality: relative output error and bits/weight of every preset (issue 3).

Two workloads:

(a) ``synthetic``: heavy-tailed weights (Student-t, 4 d.o.f., per-row log-normal scales) and
    correlated activations (random mixing with a decaying spectrum) with a few high-magnitude
    input features; Hessian from calibration tokens, error also on held-out tokens.
(b) ``text``: a small pre-LN transformer built from ``TEXT_CONFIG`` with a fixed seed (numpy,
    no torch), run over WikiText-2 (word-level tokens, vocabulary = most frequent words of the
    calibration text): valid split for calibration Hessians, test split for held-out error.
    Every linear layer (q, k, v, o, up, down of each block) is encoded from the *original*
    model's activations (not sequentially), and errors are aggregated over layers:
    ``sum_l tr(D_l H_l D_l^T) / sum_l tr(W_l H_l W_l^T)``.

Run: ``python benchmarks/encoder_quality.py [--workload synthetic|text|both] [--json out.json]``.
``--cmpq`` instead compares CMPQ (encoding ``channel_mixed``, issue 19) with bilevel RTN / GPTQ /
SpQR at equal counted bits (SPEC sections 8 and 12.4: every section counted): each bilevel row
is followed by CMPQ at exactly that row's bits per weight, then CMPQ alone at 2.2 / 2.5 / 3.0 /
3.5 bits.
A random-init model has Gaussian weights and none of the massive activation channels trained
LLMs grow (LLM.int8, Dettmers et al. 2022), so ``TEXT_CONFIG`` plants ``hot_channels`` residual
channels with a large LayerNorm gain; the weights stay Gaussian. Read (b) with that in mind.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import time
import warnings

import numpy as np

from spqr_format.codec.hessian import HessianAccumulator
from spqr_format.codec.packing import pack
from spqr_format.codec.presets import PRESETS, encode_tensor, get_preset
from spqr_format.codec.reference import decode_bilevel_f32

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2")

TEXT_CONFIG = dict(
    vocab=8192, d_model=1024, n_heads=16, d_ff=4096, n_layers=2, seq_len=128,
    calib_seqs=64, eval_seqs=64, hot_channels=4, hot_gain=8.0, seed=0,
)  # fmt: skip


def configs():
    """(label, config) rows of the table: every preset plus the comparisons the issue asks for."""
    return [
        ("spqr-3bit", PRESETS["spqr-3bit"]),
        ("spqr-3bit, outliers off", get_preset("spqr-3bit", outlier_threshold=None)),
        ("spqr-3bit, tau 0.2 cap 0.5%", get_preset("spqr-3bit", outlier_budget=0.005)),
        ("spqr-3bit, tau 0.2 cap 0.2%", get_preset("spqr-3bit", outlier_budget=0.002)),
        ("spqr-3bit, percdamp 0.01", get_preset("spqr-3bit", percdamp=0.01)),
        (
            "spqr-3bit, percdamp 0.01, cap 0.5%",
            get_preset("spqr-3bit", percdamp=0.01, outlier_budget=0.005),
        ),
        (
            "spqr-3bit, percdamp 0.01, outl. off",
            get_preset("spqr-3bit", percdamp=0.01, outlier_threshold=None),
        ),
        ("spqr-4bit", PRESETS["spqr-4bit"]),
        ("spqr-4bit, outliers off", get_preset("spqr-4bit", outlier_threshold=None)),
        ("gptq-4bit-g128", PRESETS["gptq-4bit-g128"]),
        ("gptq-3bit-g128", PRESETS["gptq-3bit-g128"]),
        ("rtn-4bit-g128", PRESETS["rtn-4bit-g128"]),
        ("rtn-3bit-g16-bilevel", PRESETS["rtn-3bit-g16-bilevel"]),
        (
            "rtn-3bit-g16-bilevel, 0.5% outl.",
            get_preset("rtn-3bit-g16-bilevel", outlier_budget=0.005),
        ),
    ] + new_configs()


def new_configs():
    """The issue-18 presets (clipped statistics, impact outliers, percdamp 0.01)."""
    return [(name, PRESETS[name]) for name in ("q2-g16", "q3-g128", "q3-g16", "q4-g128", "q4-g16")]


OLD_SHORT = ("spqr-3bit", "spqr-4bit", "gptq-4bit-g128", "gptq-3bit-g128")
TARGETS = (2.5, 3.0, 3.5, 4.0)


# ---- workloads ------------------------------------------------------------------------------


def synthetic_layers(size: int, tokens: int, seed: int = 0):
    """One layer: (name, W, H_calib, H_heldout)."""
    rng = np.random.default_rng(seed)
    m = n = size
    w = rng.standard_t(4, size=(m, n)) * 0.02 * np.exp(0.3 * rng.standard_normal((m, 1)))
    spec = 1.0 / np.sqrt(1.0 + np.arange(n) / 16.0)  # decaying spectrum: correlated features
    mix = rng.standard_normal((n, n)) / np.sqrt(n) * spec[:, None] + np.eye(n) * 0.3
    hot = rng.choice(n, 8, replace=False)

    def hess(k):
        x = rng.standard_normal((k, n)) @ mix
        x[:, hot] *= 20.0
        acc = HessianAccumulator(n)
        acc.add(x)
        return acc.hessian()

    return [("synthetic", w.astype(np.float32), hess(tokens), hess(tokens))]


def _words(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [t for line in f for t in (line.split() + ["<eos>"]) if line.strip()]


def _layernorm(x, gain):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * gain


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x**3)))


class TinyTransformer:
    """Pre-LN decoder: ``h += Attn(LN(h)); h += MLP(LN(h))``, weights N(0, 0.02) from ``seed``."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        rng = np.random.default_rng(cfg["seed"])
        d, f = cfg["d_model"], cfg["d_ff"]
        self.emb = rng.standard_normal((cfg["vocab"], d)).astype(np.float32) * 0.02
        self.pos = rng.standard_normal((cfg["seq_len"], d)).astype(np.float32) * 0.01
        hot = rng.choice(d, cfg["hot_channels"], replace=False)
        self.layers = []
        for i in range(cfg["n_layers"]):
            gain = np.ones(d, np.float32)
            gain[hot] = cfg["hot_gain"]
            lin = {
                k: (rng.standard_normal(shape) * 0.02).astype(np.float32)
                for k, shape in (
                    ("q", (d, d)), ("k", (d, d)), ("v", (d, d)), ("o", (d, d)),
                    ("up", (f, d)), ("down", (d, f)),
                )
            }  # fmt: skip
            self.layers.append((f"layers.{i}", gain, lin))

    def run(self, tokens: np.ndarray, hook) -> None:
        """Forward ``tokens[B, T]``; ``hook(layer, linear, inputs)`` sees each linear's input."""
        cfg = self.cfg
        B, T = tokens.shape
        H = cfg["n_heads"]
        d = cfg["d_model"]
        hd = d // H
        x = self.emb[tokens] + self.pos[:T]
        mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)
        for name, gain, lin in self.layers:
            a = _layernorm(x, gain)
            for k in ("q", "k", "v"):
                hook(name, k, a)
            q, k_, v = (
                (a @ lin[k].T).reshape(B, T, H, hd).transpose(0, 2, 1, 3) for k in ("q", "k", "v")
            )
            att = q @ k_.transpose(0, 1, 3, 2) / np.sqrt(hd) + mask
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            ctx = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, d)
            hook(name, "o", ctx)
            x = x + ctx @ lin["o"].T
            b = _layernorm(x, gain)
            hook(name, "up", b)
            u = _gelu(b @ lin["up"].T)
            hook(name, "down", u)
            x = x + u @ lin["down"].T


def text_layers(cfg: dict, data: str = DATA):
    """Every linear of the tiny transformer: (name, W, H_valid, H_test)."""
    valid = _words(os.path.join(data, "wiki.valid.tokens"))
    test = _words(os.path.join(data, "wiki.test.tokens"))
    vocab = [w for w, _ in collections.Counter(valid).most_common(cfg["vocab"] - 1)]
    index = {w: i + 1 for i, w in enumerate(vocab)}  # 0 = <unk>
    model = TinyTransformer(cfg)

    def hessians(words, nseq):
        ids = np.array([index.get(w, 0) for w in words[: nseq * cfg["seq_len"]]], np.int64)
        ids = ids.reshape(nseq, cfg["seq_len"])
        accs: dict[tuple[str, str], HessianAccumulator] = {}

        def hook(layer, lin, inp):
            accs.setdefault((layer, lin), HessianAccumulator(inp.shape[-1])).add(inp)

        for i in range(0, nseq, 8):
            model.run(ids[i : i + 8], hook)
        return {k: a.hessian() for k, a in accs.items()}

    hc = hessians(valid, cfg["calib_seqs"])
    ht = hessians(test, cfg["eval_seqs"])
    out = []
    for name, _gain, lin in model.layers:
        for k, w in lin.items():
            out.append((f"{name}.{k}", w, hc[(name, k)], ht[(name, k)]))
    return out


# ---- measurement ----------------------------------------------------------------------------


def _trace(d: np.ndarray, h: np.ndarray) -> float:
    d = d.astype(np.float64)
    return float(np.einsum("ij,ij->", d @ h, d))


def evaluate(layers, rows):
    return _evaluate_with(layers, rows, None)


def _evaluate_with(layers, rows, per_layer):
    results = []
    for label, cfg in rows:
        num_c = num_t = den_c = den_t = 0.0
        wsq = dsq = 0.0
        bits = 0.0
        outl = 0
        count = 0
        t0 = time.perf_counter()
        for name, w, hc, ht in layers:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t, rep = encode_tensor(w, per_layer[name] if per_layer else cfg, hc, name=name)
            d = w - decode_bilevel_f32(pack(t))
            num_c += _trace(d, hc)
            den_c += _trace(w, hc)
            num_t += _trace(d, ht)
            den_t += _trace(w, ht)
            wsq += float((w.astype(np.float64) ** 2).sum())
            dsq += float((d.astype(np.float64) ** 2).sum())
            bits += rep["bits_per_weight"] * w.size
            outl += rep["outliers"]
            count += w.size
        results.append(
            dict(
                config=label,
                bits_per_weight=bits / count,
                outlier_percent=100.0 * outl / count,
                relative_weight_error=float(np.sqrt(dsq / wsq)),
                relative_output_error=num_c / den_c,
                relative_output_error_heldout=num_t / den_t,
                seconds=time.perf_counter() - t0,
                settings=None if cfg is None else cfg.to_dict(),
            )
        )
        print(f"  {label}: done in {results[-1]['seconds']:.1f} s", file=sys.stderr)
    return results


def cmpq_configs():
    """(label, bilevel config) pairs of the CMPQ comparison: 2-bit and 3-bit RTN / GPTQ at
    g128 and g64 (fp16 statistics), SpQR-style 2- and 3-bit (3-bit statistics, outliers)."""
    g = get_preset
    return [
        ("rtn b2 g128", g("rtn-4bit-g128", bits=2, group_size=128)),
        ("gptq b2 g128", g("gptq-3bit-g128", bits=2)),
        ("rtn b2 g64", g("rtn-4bit-g128", bits=2, group_size=64)),
        ("gptq b2 g64", g("gptq-3bit-g128", bits=2, group_size=64)),
        ("spqr b2 g16 s3", g("spqr-3bit", bits=2)),
        ("rtn b3 g128", g("rtn-4bit-g128", bits=3)),
        ("gptq b3 g128", g("gptq-3bit-g128")),
        ("gptq b3 g64", g("gptq-3bit-g128", group_size=64)),
        ("spqr b3 g16 s3", PRESETS["spqr-3bit"]),
    ]


def _measure(layers, encode_one):
    num_c = num_t = den_c = den_t = bits = 0.0
    count = 0
    for name, w, hc, ht in layers:
        q, b = encode_one(name, w, hc)
        d = w - q
        num_c += _trace(d, hc)
        den_c += _trace(w, hc)
        num_t += _trace(d, ht)
        den_t += _trace(w, ht)
        bits += b
        count += w.size
    return bits / count, num_c / den_c, num_t / den_t


def evaluate_cmpq(
    layers,
    targets=(2.2, 2.5, 3.0, 3.5),
    allocators=("norm", "rd"),
    solvers=(None,),
    bilevel_rows=True,
):
    """Rows (label, counted bits, rel. output error calib, held-out, seconds). CMPQ meets the
    bilevel row's bits per weight over the whole workload (each tensor at that target).
    ``solvers``: CmpqConfig.solver of each CMPQ row (None: the default, unlabelled);
    ``bilevel_rows=False``: only the CMPQ rows at ``targets``."""
    from spqr_format.codec import channel_mixed as cm
    from spqr_format.codec.channel_mixed_ref import decode_channel_mixed_f32
    from spqr_format.codec.cmpq import CmpqConfig, encode_cmpq

    def bilevel(cfg):
        def one(name, w, hc):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t, rep = encode_tensor(w, cfg, hc, name=name)
            return decode_bilevel_f32(pack(t)), rep["bits_per_weight"] * w.size

        return one

    def cmpq(target, allocator, solver=None):
        cfg = CmpqConfig(target_bits=target, allocator=allocator,
                         **({"solver": solver} if solver else {}))  # fmt: skip

        def one(name, w, hc):
            t, _ = encode_cmpq(w, hc, cfg, name=name)
            p = cm.pack(t)
            return decode_channel_mixed_f32(p), sum(cm.section_bits(p).values())

        return one

    rows = []

    def run(label, fn):
        t0 = time.perf_counter()
        try:
            b, ec, et = _measure(layers, fn)
        except Exception as exc:  # an unreachable target: say so in the table
            rows.append((label, None, None, None, str(exc).split(": ", 1)[-1][:90]))
            return None
        rows.append((label, b, ec, et, time.perf_counter() - t0))
        print(f"  {label}: {b:.4f} bits, {ec:.5f}", file=sys.stderr)
        return b

    def tag(s):
        return f" {s}" if s else ""

    for label, cfg in cmpq_configs() if bilevel_rows else ():
        b = run(label, bilevel(cfg))
        if b is not None:
            for a in allocators:
                for s in solvers:
                    # floor to 1e-6 bits: the same counted bits or a hair fewer
                    run(f"  cmpq {a}{tag(s)} @ {label}", cmpq(math.floor(b * 1e6) / 1e6, a, s))
    for target in targets:
        for a in allocators:
            for s in solvers:
                run(f"cmpq {a}{tag(s)} {target}", cmpq(target, a, s))
    return rows


def cmpq_table(title: str, rows) -> str:
    lines = [f"### {title}", "",
             "| config | counted bits/weight | rel. output err (calib) "
             "| rel. output err (held-out) |",
             "|---|---|---|---|"]  # fmt: skip
    for label, b, ec, et, extra in rows:
        if b is None:
            lines.append(f"| {label} | unreachable: {extra} | - | - |")
        else:
            lines.append(f"| {label} | {b:.4f} | {ec:.5f} | {et:.5f} |")
    return "\n".join(lines)


def evaluate_targets(layers, targets=TARGETS):
    """``--target-bits`` rows: the allocator (:mod:`spqr_format.codec.allocate`) over the
    workload's layers with their calibration Hessians, each layer encoded with its allocated
    configuration and measured like the preset rows."""
    from spqr_format.codec import allocate

    by_name = {name: (w, hc) for name, w, hc, _ in layers}
    out = []
    t0 = time.perf_counter()
    measured = allocate.measure_all(list(by_name), by_name.__getitem__)
    print(f"  candidates measured in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for tb in targets:
        t0 = time.perf_counter()
        try:
            alloc = allocate.plan(list(by_name), by_name.__getitem__, tb, measured=measured)
        except Exception as e:  # an unreachable target is reported, not fatal
            print(f"  target {tb}: {e}", file=sys.stderr)
            continue
        rows = [(f"target-bits {tb}", None)]
        res = _evaluate_with(layers, rows, alloc.choice)[0]
        res["seconds"] = time.perf_counter() - t0
        res["allocation"] = {k: allocate.config_label(c) for k, c in alloc.choice.items()}
        out.append(res)
        print(f"  target {tb}: done in {res['seconds']:.1f} s", file=sys.stderr)
    return out


def table(title: str, results) -> str:
    lines = [
        f"### {title}",
        "",
        "| config | bits/weight | outliers % | rel. weight err | rel. output err (calib) "
        "| rel. output err (held-out) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['bits_per_weight']:.3f} | {r['outlier_percent']:.3f} "
            f"| {r['relative_weight_error']:.4f} | {r['relative_output_error']:.5f} "
            f"| {r['relative_output_error_heldout']:.5f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["synthetic", "text", "both"], default="both")
    ap.add_argument("--size", type=int, default=1024, help="synthetic matrix size (m = n)")
    ap.add_argument("--tokens", type=int, default=8192, help="synthetic calibration tokens")
    ap.add_argument("--data", default=DATA, help="directory with wiki.{valid,test}.tokens")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--cmpq", action="store_true",
                    help="CMPQ vs bilevel at equal counted bits (issue 19) instead")  # fmt: skip
    ap.add_argument(
        "--cmpq-solvers",
        default="",
        help="--cmpq: solvers of the CMPQ rows, comma-separated (gptq, kmeans; "
        "default: the CmpqConfig default)",
    )
    ap.add_argument(
        "--cmpq-allocators",
        default="norm,rd",
        help="--cmpq: allocators of the CMPQ rows, comma-separated",
    )
    ap.add_argument(
        "--cmpq-targets-only",
        action="store_true",
        help="--cmpq: only the CMPQ rows at 2.2 / 2.5 / 3.0 / 3.5 bits, no bilevel",
    )
    ap.add_argument(
        "--short",
        action="store_true",
        help="only the old spqr/gptq presets, the new presets and the --target-bits rows",
    )
    ap.add_argument("--layers", type=int, help="text workload: transformer blocks (default 2)")
    ap.add_argument("--no-targets", action="store_true", help="skip the --target-bits rows")
    args = ap.parse_args(argv)
    rows = configs()
    if args.short:
        rows = [(k, PRESETS[k]) for k in OLD_SHORT] + new_configs()

    def run(layers):
        res = evaluate(layers, rows)
        return res if args.no_targets else res + evaluate_targets(layers)

    out = {}
    if args.cmpq:
        ckw = dict(
            allocators=tuple(a for a in args.cmpq_allocators.split(",") if a),
            solvers=tuple(s for s in args.cmpq_solvers.split(",") if s) or (None,),
            bilevel_rows=not args.cmpq_targets_only,
        )
        if args.workload in ("synthetic", "both"):
            rows = evaluate_cmpq(synthetic_layers(args.size, args.tokens), **ckw)
            out["cmpq_synthetic"] = rows
            print(cmpq_table(f"CMPQ, synthetic {args.size}x{args.size}", rows), "\n")
        if args.workload in ("text", "both"):
            rows = evaluate_cmpq(text_layers(TEXT_CONFIG, args.data), **ckw)
            out["cmpq_text"] = rows
            print(cmpq_table("CMPQ, WikiText-2 activations, tiny transformer", rows), "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return 0
    if args.workload in ("synthetic", "both"):
        print("synthetic ...", file=sys.stderr)
        res = run(synthetic_layers(args.size, args.tokens))
        out["synthetic"] = res
        print(table(f"(a) synthetic {args.size}x{args.size}, {args.tokens} tokens", res), "\n")
    if args.workload in ("text", "both"):
        print("text ...", file=sys.stderr)
        cfg = dict(TEXT_CONFIG, **({"n_layers": args.layers} if args.layers else {}))
        layers = text_layers(cfg, args.data)
        res = run(layers)
        out["text"] = res
        c = cfg
        title = (
            f"(b) WikiText-2 activations, tiny transformer d={c['d_model']} ff={c['d_ff']} "
            f"layers={c['n_layers']} ({len(layers)} linears), "
            f"{c['calib_seqs'] * c['seq_len']} calib / "
            f"{c['eval_seqs'] * c['seq_len']} held-out tokens"
        )
        print(table(title, res), "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"text_config": TEXT_CONFIG, **out}, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
