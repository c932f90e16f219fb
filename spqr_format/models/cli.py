"""``spqr quantize-model`` and ``spqr eval``: thin Click commands over spqr_format.models."""

from __future__ import annotations

import functools
import json
import os

import click

from spqr_format.errors import BadInputError

# The names of spqr_format.codec.presets.PRESETS (not imported here: it loads numba, and
# `spqr --help` should stay fast); tests/test_models.py checks that they agree.
PRESET_NAMES = ("spqr-3bit", "spqr-4bit", "gptq-4bit-g128", "gptq-3bit-g128", "rtn-4bit-g128",
                "rtn-3bit-g16-bilevel", "q2-g16", "q3-g16", "q3-g128", "q4-g16",
                "q4-g128")  # fmt: skip


def handle_errors(func):
    """spqr_format.cli.handle_errors, looked up at call time (cli.py imports this module)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from spqr_format.cli import handle_errors as handle

        return handle(func)(*args, **kwargs)

    return wrapper


def safe_text(text: str) -> str:
    from spqr_format.cli import safe_text as safe

    return safe(text)


def cmpq_solver_option(note: str = ""):
    """``--solver`` of the CMPQ encoder (``spqr encode`` and ``spqr quantize-model``)."""
    return click.option(
        "--solver",
        type=click.Choice(["gptq", "kmeans"]),
        help="cmpq: gptq = each column's table fitted on its error-updated values, the error "
        f"fed back to the later columns through the Hessian{note}; kmeans = tables fitted on "
        "the original values, no error feedback. Default: gptq.",
    )


@click.command("quantize-model")
@click.argument("model_dir", metavar="MODEL_DIR", type=click.Path())
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output .spqr file (written atomically).",
)
@click.option(
    "--preset",
    type=click.Choice(PRESET_NAMES),
    default="spqr-3bit",
    show_default=True,
    help="Encoder configuration of every block's linear layers.",
)
@click.option(
    "--calib",
    required=True,
    metavar="FILE|wikitext2",
    help="Calibration text: a UTF-8 text file, or wikitext2 (train split, else valid; "
    "found in --data-dir or $SPQR_DATA_DIR).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Directory holding wikitext-2/wiki.*.tokens (default $SPQR_DATA_DIR).",
)
@click.option(
    "--samples",
    type=int,
    default=128,
    show_default=True,
    help="Calibration windows (distinct, non-overlapping, drawn with --seed).",
)
@click.option(
    "--seq-len", type=int, default=2048, show_default=True, help="Tokens per calibration window."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the window draw.")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where the encoder runs: cpu (the numba reference encoder) or cuda / cuda:N (the "
    "torch GPU encoder: each block, its activations and Hessians on the GPU while it is "
    "quantized; same file semantics). --resume needs the same device as the interrupted run. "
    "Under torchrun each rank uses its own GPU, cuda:LOCAL_RANK.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run from the block checkpoints in OUT.partial/ "
    "(same settings: the file is byte-identical to an uninterrupted run).",
)
@click.option(
    "--quantize-lm-head",
    is_flag=True,
    help="Also quantize the output layer (calibrated on the quantized model).",
)
@click.option(
    "--method",
    type=click.Choice(["bilevel", "cmpq"]),
    default="bilevel",
    show_default=True,
    help="bilevel: SpQR/GPTQ/RTN per --preset or --target-bits; cmpq: channel-wise mixed "
    "precision (encoding channel_mixed; every layer at --target-bits, CPU encoder).",
)
@click.option(
    "--target-bits",
    type=float,
    help="Total bits/weight of the quantized layers (as `spqr info` counts them). bilevel: a "
    "configuration per layer is chosen by rate-distortion on measured output errors "
    "(replaces --preset; one extra calibration pass). cmpq: each layer's channel widths "
    "meet it.",
)
@cmpq_solver_option()
@click.option(
    "--eval-ppl",
    metavar="FILE|wikitext2",
    help="Afterwards, measure the perplexity of the original and the quantized model on this "
    "text (wikitext2: the test split) and print both (as spqr eval does).",
)
@click.option(
    "--eval-seq-len", type=int, default=512, show_default=True, help="Context of --eval-ppl."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@handle_errors
@click.pass_context
def quantize_model_cmd(ctx, model_dir, output, preset, calib, data_dir, samples, seq_len, seed,
                       device, resume, quantize_lm_head, method, target_bits, solver, eval_ppl,
                       eval_seq_len, quiet):  # fmt: skip
    """Quantize a local Hugging Face model into one .spqr file, block by block.

    The calibration windows run through the embeddings; then, for each transformer block,
    the inputs of its linear layers give float64 Hessians, the layers are encoded (GPTQ /
    SpQR / RTN per --preset) and the block's quantized outputs feed the next block.
    Embeddings, norms, biases and lm_head stay raw. Progress and ETA go to stderr.

    \b
    Example:
      spqr quantize-model ./my-llama -o my-llama.spqr --preset spqr-3bit \\
           --calib train.txt --samples 128 --seq-len 2048
      spqr quantize-model ./my-llama -o my-llama-3.5.spqr --target-bits 3.5 --calib train.txt
      spqr quantize-model ./my-llama -o my-llama-cmpq.spqr --method cmpq --target-bits 2.5 \\
           --calib train.txt
      spqr eval ./my-llama my-llama.spqr --ppl test.txt
      torchrun --nproc-per-node 4 -m spqr_format quantize-model ./my-llama -o my-llama.spqr \\
           --calib train.txt     # 4 CPU processes (gloo), the same file as one process
      torchrun --nproc-per-node 8 -m spqr_format quantize-model ./my-llama -o my-llama.spqr \\
           --calib train.txt --device cuda   # 8 GPUs (NCCL), rank r on cuda:LOCAL_RANK
    """
    from spqr_format.models.pipeline import format_event, quantize_model

    for opt, v in (("--samples", samples), ("--seq-len", seq_len)):
        if v < 1 or (opt == "--seq-len" and v < 2):
            raise BadInputError(f"{opt} must be at least {2 if opt == '--seq-len' else 1}, "
                                f"got {v}", field=opt)  # fmt: skip

    if eval_ppl:  # a bad --eval-ppl fails before the work, not after it
        from spqr_format.models.data import resolve_text

        resolve_text(eval_ppl, purpose="eval", data_dir=data_dir)
        if eval_seq_len < 2:
            raise BadInputError(f"--eval-seq-len must be at least 2, got {eval_seq_len}",
                                field="--eval-seq-len")  # fmt: skip

    config = None
    if method == "cmpq":
        from click.core import ParameterSource

        from spqr_format.codec.cmpq import CmpqConfig

        if target_bits is None:
            raise BadInputError("--method cmpq needs --target-bits (e.g. 2.5)",
                                field="target_bits")  # fmt: skip
        if ctx.get_parameter_source("preset") is not ParameterSource.DEFAULT:
            raise BadInputError("--preset does not apply to --method cmpq", field="preset")
        config = CmpqConfig(target_bits=target_bits, **({"solver": solver} if solver else {}))
        target_bits = None  # not the bilevel allocator's target

    elif solver is not None:
        raise BadInputError("--solver only applies to --method cmpq", field="solver")

    def progress(ev):
        line = None if quiet else format_event(ev)
        if line:
            click.echo(safe_text(line), err=True)

    from spqr_format.models.distributed import (
        quantize_model_distributed,
        torchrun_world,
        under_torchrun,
    )

    # launched by torchrun: this process is one rank (with cuda even when it is the only one:
    # a one-rank NCCL group runs the multi-GPU code)
    if torchrun_world() > 1 or (under_torchrun() and str(device).startswith("cuda")):
        quantize_model = quantize_model_distributed  # noqa: F811
    result = quantize_model(
        model_dir, output, preset=preset, config=config, calib=calib, data_dir=data_dir,
        samples=samples, seq_len=seq_len, seed=seed, device=device, resume=resume,
        quantize_lm_head=quantize_lm_head, progress=progress, target_bits=target_bits,
    )  # fmt: skip
    if torchrun_world() > 1 and os.environ.get("RANK", "0") != "0":
        return  # rank 0 reports (and runs --eval-ppl)
    q = [r for r in result.reports if r["encoding"] in ("bilevel", "channel_mixed")]
    weights = sum(r["shape"][0] * r["shape"][1] for r in q)
    bits = sum(r["bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in q)
    click.echo(
        f"{safe_text(output)}: {len(q)} quantized layers, {bits / max(weights, 1):.3f} bits/weight "
        f"over them, {len(result.reports) - len(q)} raw tensors"
        + (f" ({result.resumed_blocks} blocks resumed)" if result.resumed_blocks else "")
    )
    if eval_ppl:
        from spqr_format.models.evaluate import evaluate_models

        rows = evaluate_models(
            [model_dir, output], eval_ppl, data_dir=data_dir, seq_len=eval_seq_len,
            on_result=lambda res: click.echo(_ppl_line(res)),
        )  # fmt: skip
        click.echo(ppl_table(rows))


@click.command("eval")
@click.argument("models", metavar="MODEL_DIR|MODEL.spqr...", nargs=-1, required=True,
                type=click.Path())  # fmt: skip
@click.option(
    "--ppl",
    "ppl_text",
    required=True,
    metavar="FILE|wikitext2",
    help="Text to measure perplexity on (wikitext2: the test split, found in "
    "--data-dir or $SPQR_DATA_DIR).",
)
@click.option(
    "--model-dir",
    type=click.Path(file_okay=False),
    help="The original model directory (tokenizer) for .spqr files "
    "(default: the first MODEL_DIR given).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Directory holding wikitext-2/wiki.*.tokens (default $SPQR_DATA_DIR).",
)
@click.option(
    "--seq-len", type=int, default=512, show_default=True, help="Context length of each window."
)
@click.option("--stride", type=int, default=None, help="Window step (default: --seq-len).")
@click.option("--max-tokens", type=int, default=None, help="Only the first N tokens of the text.")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="cpu (float32, dequantized weights) or cuda[:N] (float16, SpQRLinear kernels).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list for several models).")
@handle_errors
def eval_cmd(models, ppl_text, model_dir, data_dir, seq_len, stride, max_tokens, device,
             as_json):  # fmt: skip
    """Perplexity of Hugging Face model directories and/or .spqr models, in one table.

    Every model is scored on the same tokens with the same windows: windows of --seq-len
    tokens every --stride tokens; each token is scored at most once, with up to seq_len - 1
    tokens of context (stride = seq_len: disjoint windows, whose first tokens are not
    scored). With several models, a table follows with each one's change against the first.

    \b
    Example:
      spqr eval ./my-llama my-llama.spqr --ppl test.txt --seq-len 512
      spqr eval my-llama.spqr --model-dir ./my-llama --ppl wikitext2 --data-dir data --json
    """
    from spqr_format.models.evaluate import evaluate_models

    def line(res):
        if not as_json:
            click.echo(_ppl_line(res))

    rows = evaluate_models(
        models, ppl_text, model_dir=model_dir, data_dir=data_dir, seq_len=seq_len,
        stride=stride, max_tokens=max_tokens, device=device, on_result=line,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
    elif len(rows) > 1:
        click.echo(ppl_table(rows))


def _ppl_line(res: dict) -> str:
    return (
        f"{safe_text(res['model'])}: perplexity {res['perplexity']:.4f} on "
        f"{safe_text(res['text'])} ({res['tokens']} tokens scored of {res['text_tokens']}, "
        f"context {res['seq_len']}, stride {res['stride']}, {res['windows']} windows, "
        f"{res['seconds']:.1f}s)"
    )


def ppl_table(rows: list[dict]) -> str:
    """Markdown table of :func:`evaluate_models` rows, deltas against the first row."""
    base = rows[0]["perplexity"]
    out = ["", "| model | perplexity | change | file MB |", "|---|---|---|---|"]
    for r in rows:
        path = r["model"]
        if os.path.isdir(path):
            size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                       if f.endswith((".safetensors", ".bin")))  # fmt: skip
        else:
            size = os.path.getsize(path)
        change = r["perplexity"] - base
        pct = 100 * change / base
        out.append(f"| {safe_text(path)} | {r['perplexity']:.3f} | "
                   f"{change:+.3f} ({pct:+.2f} %) | {size / 1e6:.2f} |")  # fmt: skip
    return "\n".join(out)
