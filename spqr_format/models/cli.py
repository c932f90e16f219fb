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
    help="Where the encoder runs (cpu; the GPU encoder is not built yet).",
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
    "--target-bits",
    type=float,
    help="Total bits/weight of the quantized layers (as `spqr info` counts them): a "
    "configuration per layer is chosen by rate-distortion on measured output errors "
    "(replaces --preset; one extra calibration pass).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@handle_errors
def quantize_model_cmd(model_dir, output, preset, calib, data_dir, samples, seq_len, seed,
                       device, resume, quantize_lm_head, target_bits, quiet):  # fmt: skip
    """Quantize a local Hugging Face model into one .spqr file, block by block.

    The calibration windows run through the embeddings; then, for each transformer block,
    the inputs of its linear layers give float64 Hessians, the layers are encoded (GPTQ /
    SpQR / RTN per --preset) and the block's quantized outputs feed the next block.
    Embeddings, norms, biases and lm_head stay raw. Progress and ETA go to stderr.

    \b
    Example:
      spqr quantize-model ./my-llama -o my-llama.spqr --preset spqr-3bit \\
           --calib train.txt --samples 128 --seq-len 2048
      spqr eval my-llama.spqr --model-dir ./my-llama --ppl test.txt
    """
    from spqr_format.models.pipeline import format_event, quantize_model

    for opt, v in (("--samples", samples), ("--seq-len", seq_len)):
        if v < 1 or (opt == "--seq-len" and v < 2):
            raise BadInputError(f"{opt} must be at least {2 if opt == '--seq-len' else 1}, "
                                f"got {v}", field=opt)  # fmt: skip

    def progress(ev):
        line = None if quiet else format_event(ev)
        if line:
            click.echo(safe_text(line), err=True)

    result = quantize_model(
        model_dir, output, preset=preset, calib=calib, data_dir=data_dir, samples=samples,
        seq_len=seq_len, seed=seed, device=device, resume=resume,
        quantize_lm_head=quantize_lm_head, progress=progress, target_bits=target_bits,
    )  # fmt: skip
    q = [r for r in result.reports if r["encoding"] == "bilevel"]
    weights = sum(r["shape"][0] * r["shape"][1] for r in q)
    bits = sum(r["bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in q)
    click.echo(
        f"{safe_text(output)}: {len(q)} quantized layers, {bits / max(weights, 1):.3f} bits/weight "
        f"over them, {len(result.reports) - len(q)} raw tensors"
        + (f" ({result.resumed_blocks} blocks resumed)" if result.resumed_blocks else "")
    )


@click.command("eval")
@click.argument("model", metavar="MODEL.spqr|MODEL_DIR", type=click.Path())
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
    help="The original model directory (tokenizer) for a .spqr file.",
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def eval_cmd(model, ppl_text, model_dir, data_dir, seq_len, stride, max_tokens, as_json):
    """Perplexity of a .spqr model (with --model-dir) or of a Hugging Face model directory.

    Sliding windows of --seq-len tokens every --stride tokens; each token is scored at most
    once, with up to seq_len - 1 tokens of context (stride = seq_len: disjoint windows, whose
    first tokens are not scored). The model
    runs on CPU in float32 (a .spqr model with its dequantized weights).

    \b
    Example:
      spqr eval ./my-llama --ppl test.txt --seq-len 512
      spqr eval my-llama.spqr --model-dir ./my-llama --ppl test.txt --seq-len 512 --json
    """
    from spqr_format.models import data, hf
    from spqr_format.models._deps import require_torch
    from spqr_format.models.evaluate import perplexity
    from spqr_format.models.loader import load_model

    stride = seq_len if stride is None else stride
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise BadInputError(f"need --seq-len >= 2 and 1 <= --stride <= --seq-len, got "
                            f"{seq_len} and {stride}", field="--stride")  # fmt: skip
    if max_tokens is not None and max_tokens < 2:
        raise BadInputError(f"--max-tokens must be at least 2, got {max_tokens}")
    if os.path.isdir(model):
        tok_dir = model
        source = "model directory"
    elif os.path.isfile(model):
        if model_dir is None:
            raise BadInputError("a .spqr model needs --model-dir (its tokenizer)", path=model)
        tok_dir = model_dir
        source = ".spqr file"
    else:
        raise BadInputError("no such file or directory", path=model)
    src = data.resolve_text(ppl_text, purpose="eval", data_dir=data_dir)
    tokenizer = hf.load_tokenizer(tok_dir)
    ids = data.tokenize(tokenizer, data.read_text(src))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    torch = require_torch()
    if source == "model directory":
        m = hf.load_hf_model(model, dtype=torch.float32)
    else:
        m = load_model(model, model_dir).float()
    res = perplexity(m, ids, seq_len=seq_len, stride=stride)
    res.update(model=model, source=source, text=src.name, text_path=src.path, split=src.split)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(
        f"{safe_text(model)}: perplexity {res['perplexity']:.4f} on {safe_text(src.name)} "
        f"({res['tokens']} tokens scored of {res['text_tokens']}, context {seq_len}, "
        f"stride {stride}, {res['windows']} windows, {res['seconds']:.1f}s)"
    )
