"""The ``spqr`` command line: encode, calibrate, info, verify, decode, bench.

Exit codes (every command): 0 success, 1 verification failed (``verify`` found damaged or
mismatching data), 2 bad usage or bad input (unreadable or invalid files, bad options).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable

import click
import numpy as np

from spqr_format import __version__, api, spec
from spqr_format.errors import INTEGRITY_ERRORS, BadInputError, SpqrError
from spqr_format.models import DEFAULT_KEEP_DENSE
from spqr_format.models.cli import cmpq_solver_option

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_CLOSED_PIPE = 141  # what a shell reports for a process ended by SIGPIPE


def safe_text(text: str) -> str:
    """``text`` with every character a terminal could act on or hide escaped: C0 and C1
    controls, DEL, bidi and other format characters (U+202E...), separators other than the
    plain space, unassigned and private code points (whatever ``str.isprintable`` refuses).
    Names are also checked by the reader (SPEC C-2.10); this is defence in depth for every
    message that echoes a name, a path or metadata."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        else:
            cp = ord(ch)
            out.append(
                f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}" if cp < 0x10000 else f"\\U{cp:08x}"
            )
    return "".join(out)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"error: {safe_text(message)}", err=True)
    sys.exit(code)


def _same_file(a: str, b: str) -> bool:
    """True when paths ``a`` and ``b`` name one file: the same inode when both exist (hard
    links, symlinks, ./x/../in), else the same resolved path."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_same_file(dest: str | None, option: str, **inputs: str | None) -> None:
    """E_BAD_INPUT (exit 2) before any work when an output would replace one of the command's
    own inputs (data loss); ``inputs`` maps a description to a path."""
    if dest is None:
        return
    for what, path in inputs.items():
        if path is not None and _same_file(dest, path):
            raise BadInputError(
                f"{option} {dest!r} is the same file as the {what.replace('_', ' ')} "
                f"{path!r}; refusing to replace it (choose another output path)"
            )


def _finite_float(ctx, param, value):
    """click callback: refuse inf and nan (FloatRange lets them through) before any work."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value!r}")
    return value


def _closed_pipe() -> None:
    """The reader of our output went away (``spqr info f.spqr | head``): not an error of the
    command, so no message; stdout is pointed at /dev/null so that the interpreter's final
    flush does not complain either, and the exit status is the one SIGPIPE would give."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. a test runner's buffer)
        pass
    sys.exit(EXIT_CLOSED_PIPE)


def handle_errors(func: Callable) -> Callable:
    """Turn every expected failure into one line on stderr and exit status 2 (never a
    traceback): typed SpqrErrors, and OS errors on the files the user named; a closed output
    pipe ends the command quietly (_closed_pipe)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except BrokenPipeError:
            _closed_pipe()
        except SpqrError as err:
            _fail(str(err))
        except OSError as err:
            _fail(f"E_IO: {err.filename or ''}: {err.strerror or err}")
        except MemoryError:
            _fail("out of memory")

    return wrapper


def _progress(items, label: str):
    return click.progressbar(items, label=label, file=sys.stderr, show_pos=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spqr")
def main() -> None:
    """Quantize models and tensors, inspect, verify, decode, evaluate and benchmark .spqr files
    (sparse-quantized LLM weights), and check decoders against the conformance vectors.

    \b
    Quick start:
      spqr quantize-model ./hf-model -o model.spqr --preset spqr-3bit --calib text.txt
      spqr eval model.spqr --model-dir ./hf-model --ppl test.txt
      spqr encode model.safetensors -o model.spqr --outlier-fraction 0.01
      spqr info model.spqr
      spqr verify model.spqr
      spqr decode model.spqr -o dense.safetensors --dtype float16
      spqr bench model.spqr --device gpu --batch 1 --batch 16

    Exit status: 0 ok, 1 verification failed, 2 bad usage or bad input, 141 (quietly)
    when the reader of the output goes away, as with `spqr info f.spqr | head`.
    The file format is specified in SPEC.md.
    """


# --------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------
PRESET_NAMES = (
    "spqr-3bit",
    "spqr-4bit",
    "gptq-4bit-g128",
    "gptq-3bit-g128",
    "rtn-4bit-g128",
    "rtn-3bit-g16-bilevel",
    "q2-g16",
    "q3-g16",
    "q3-g128",
    "q4-g16",
    "q4-g128",
)
# Without --preset: SpQR's 3-bit layout with round-to-nearest (needs no calibration).
DEFAULT_CONFIG = {"preset": "rtn-3bit-g16-bilevel"}


@main.command()
@click.argument("input_path", metavar="IN.safetensors", type=click.Path(dir_okay=False))
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
    help="A named configuration; the options below override its knobs. "
    "Default: rtn-3bit-g16-bilevel.",
)
@click.option(
    "--hessians",
    "hessian_path",
    type=click.Path(dir_okay=False),
    help="Hessians from `spqr calibrate` (needed by gptq/spqr presets; tensors "
    "without one fall back to RTN with a warning).",
)
@click.option(
    "--method",
    type=click.Choice(["rtn", "gptq", "cmpq"]),
    help="rtn: round-to-nearest; gptq: Hessian-aware solver (SpQR with outliers); cmpq: "
    "channel-wise mixed precision (encoding channel_mixed; needs --hessians and --target-bits).",
)
@click.option(
    "--widths",
    help="cmpq: candidate column widths, comma-separated (default 2,3,4).",
)
@click.option(
    "--allocator",
    type=click.Choice(["norm", "rd"]),
    help="cmpq: norm = wider codes for columns of larger activation norm (CMPQ); rd = greedy "
    "rate-distortion on the Hessian diagonal.",
)
@click.option(
    "--table-rows",
    type=click.IntRange(0, spec.MAX_GROUP_SIZE),
    help="cmpq: rows per lookup-table block; 0 (default) = one table per column.",
)
@cmpq_solver_option(" (GPTQ; --percdamp, --perm-order apply)")
@click.option(
    "--act-outliers",
    type=click.FloatRange(0.0, 0.5, max_open=True),
    callback=_finite_float,
    help="cmpq: fraction of activation outliers, largest |w| x activation norm (default 0.0045).",
)
@click.option(
    "--sens-outliers",
    type=click.FloatRange(0.0, 0.5, max_open=True),
    callback=_finite_float,
    help="cmpq: fraction of quantization-sensitive outliers, largest Hessian-weighted error "
    "(default 0.0005).",
)
@click.option("--bits", type=click.IntRange(1, 8), help="Bits per weight code.")
@click.option(
    "--group-size",
    type=click.IntRange(1, spec.MAX_GROUP_SIZE),
    help="Input columns per first-level statistics group.",
)
@click.option(
    "--stats-bits",
    type=click.IntRange(0, 8),
    help="Bits of the quantized scales and zeros; 0 stores them in fp16.",
)
@click.option(
    "--stats-group-size",
    type=click.IntRange(1, spec.MAX_GROUP_SIZE),
    help="Rows per second-level statistics group.",
)
@click.option(
    "--outlier-fraction",
    type=click.FloatRange(0.0, 0.5, max_open=True),
    callback=_finite_float,
    help="Outlier budget: at most this fraction of weights kept in fp16 (rtn: "
    "exactly this fraction, largest magnitudes).",
)
@click.option(
    "--outlier-threshold",
    type=click.FloatRange(0.0, min_open=True),
    callback=_finite_float,
    help="SpQR's tau (gptq): keep weights whose Hessian-normalised error exceeds "
    "tau x the layer mean. Lower = more outliers.",
)
@click.option("--no-outliers", is_flag=True, help="Turn outliers off (threshold and budget).")
@click.option(
    "--target-bits",
    type=float,
    help="Total bits/weight of the quantized tensors (as `spqr info` counts them, every "
    "section included). bilevel: a configuration per tensor (bits 2/3/4/8, group size, "
    "outliers) is chosen by rate-distortion on measured output errors, replacing --preset and "
    "the knobs. --method cmpq: every tensor's channel widths meet it (to within 32 bits). "
    "Needs --hessians for every quantized tensor.",
)
@click.option(
    "--perm-order",
    type=click.Choice(["identity", "act_order"]),
    help="Column order of the gptq solver; act_order stores a permutation (cmpq --solver "
    "gptq: the solve order only, default act_order).",
)
@click.option(
    "--percdamp",
    type=click.FloatRange(0.0),
    callback=_finite_float,
    help="Hessian damping, relative to the mean diagonal (gptq; cmpq --solver gptq: default 0.1).",
)
@click.option(
    "--keep-dense",
    "keep_dense",
    multiple=True,
    metavar="GLOB",
    help="Tensors to store unquantized (repeatable; replaces the default "
    f"{', '.join(DEFAULT_KEEP_DENSE)}). Tensors that are not 2-D always stay dense.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    help="Also write the per-tensor report as JSON.",
)
@click.option("-q", "--quiet", is_flag=True, help="No table on stdout.")
@handle_errors
def encode(
    input_path,
    output,
    preset,
    hessian_path,
    method,
    widths,
    allocator,
    table_rows,
    solver,
    act_outliers,
    sens_outliers,
    bits,
    group_size,
    stats_bits,
    stats_group_size,
    outlier_fraction,
    outlier_threshold,
    no_outliers,
    target_bits,
    perm_order,
    percdamp,
    keep_dense,
    report_path,
    quiet,
):
    """Quantize the 2-D weights of a safetensors file into a .spqr file.

    Tensors matching --keep-dense, and all tensors that are not 2-D, are stored as they are
    (encoding raw); the rest are quantized (encoding bilevel; with --method cmpq, encoding
    channel_mixed at --target-bits counted bits per weight). The report gives, per tensor,
    bits/weight (SPEC sections 8 and 12.4), outlier %, relative weight error and, with
    Hessians, the relative output error tr((W-Q) H (W-Q)^T) / tr(W H W^T).

    \b
    Examples:
      spqr encode model.safetensors -o model.spqr                 # RTN, SpQR 3-bit layout
      spqr calibrate acts.safetensors -o H.safetensors
      spqr encode model.safetensors --hessians H.safetensors --preset spqr-3bit -o model.spqr
      spqr encode model.safetensors --preset gptq-4bit-g128 --hessians H.safetensors \\
           --perm-order identity -o model.spqr
      spqr encode model.safetensors --method cmpq --target-bits 2.2 \\
           --hessians H.safetensors -o model.spqr
    """
    from spqr_format.models.tensors import encode_safetensors

    cmpq_opts = dict(
        target_bits=target_bits, widths=widths, allocator=allocator, table_rows=table_rows,
        solver=solver, act_outliers=act_outliers, sens_outliers=sens_outliers,
    )  # fmt: skip
    if method == "cmpq":
        bilevel_opts = dict(
            bits=bits, group_size=group_size, stats_bits=stats_bits,
            stats_group_size=stats_group_size, outlier_fraction=outlier_fraction,
            outlier_threshold=outlier_threshold,
        )  # fmt: skip
        given = [k for k, v in bilevel_opts.items() if v is not None] + (
            ["no_outliers"] if no_outliers else []
        )
        if given:
            opts = ", ".join("--" + k.replace("_", "-") for k in given)
            raise BadInputError(f"{opts} do not apply to --method cmpq")
        config = _cmpq_config(preset, hessian_path, perm_order=perm_order, percdamp=percdamp,
                              **cmpq_opts)  # fmt: skip
    elif any(v is not None for k, v in cmpq_opts.items() if k != "target_bits"):
        given = ", ".join("--" + k.replace("_", "-") for k, v in cmpq_opts.items()
                          if v is not None and k != "target_bits")  # fmt: skip
        raise BadInputError(f"{given} only apply to --method cmpq")
    else:
        config = _bilevel_config(
            preset, method, bits, group_size, stats_bits, stats_group_size, outlier_fraction,
            outlier_threshold, no_outliers, perm_order, percdamp,
        )  # fmt: skip
    _check_settings_storable(config)
    alloc_bits = None if method == "cmpq" else target_bits  # cmpq: each tensor meets it
    if alloc_bits is not None:
        if not math.isfinite(target_bits) or target_bits <= 0:
            raise BadInputError(
                f"--target-bits must be a finite number > 0, got {target_bits!r}",
                field="target_bits",
            )
        mixed = [o for o, v in (("--preset", preset), ("--method", method), ("--bits", bits),
                 ("--group-size", group_size), ("--stats-bits", stats_bits),
                 ("--stats-group-size", stats_group_size),
                 ("--outlier-fraction", outlier_fraction),
                 ("--outlier-threshold", outlier_threshold), ("--perm-order", perm_order),
                 ("--percdamp", percdamp)) if v is not None]  # fmt: skip
        if mixed or no_outliers:
            raise BadInputError(
                f"--target-bits chooses the configuration of every tensor; it cannot be "
                f"combined with {', '.join(mixed or ['--no-outliers'])}",
                field="target_bits",
            )
        if not hessian_path:
            raise BadInputError(
                "--target-bits needs --hessians (the allocator measures each tensor's output "
                "error)",
                field="hessians",
            )
    refuse_same_file(output, "-o/--output", input=input_path, hessian_file=hessian_path)
    refuse_same_file(
        report_path, "--report", input=input_path, hessian_file=hessian_path, output=output
    )
    with contextlib.ExitStack() as stack:

        def progress(names):
            return stack.enter_context(_progress(names, "encoding"))

        result = encode_safetensors(
            input_path,
            output,
            config,
            hessian_path=hessian_path,
            keep_dense=keep_dense or None,
            progress=progress,
            target_bits=alloc_bits,
        )
    rows, notices = result.rows, result.notices
    for notice in notices:
        click.echo(f"warning: {safe_text(notice)}", err=True)
    if report_path:
        settings = result.metadata.get("encoder.settings", config.to_dict())
        _write_json_atomic(report_path, {"settings": settings, "tensors": rows})
    if not quiet:
        alloc = [safe_text(r.get("config", "-")) for r in rows] if alloc_bits is not None else None
        _print_table(
            ["tensor", "shape", "encoding", "bits/w", "outliers %", "rel. W err", "rel. out err"]
            + (["config"] if alloc else []),
            [
                [
                    safe_text(r["name"]),
                    "x".join(map(str, r["shape"])),
                    r["encoding"],
                    f"{r['bits_per_weight']:.3f}",
                    f"{r['outlier_percent']:.3f}",
                    f"{r['relative_weight_error']:.4g}",
                    "-"
                    if r["relative_output_error"] is None
                    else f"{r['relative_output_error']:.4g}",
                ]
                + ([alloc[k]] if alloc else [])
                for k, r in enumerate(rows)
            ],
        )
        if alloc_bits is not None:
            a = result.metadata["encoder.allocation"]
            click.echo(
                f"target {a['target_bits']:g} bits/weight: allocated "
                f"{a['bits_per_weight']:.4f} over the quantized tensors"
            )


def _cmpq_config(preset, hessian_path, perm_order=None, **opts):
    """The CMPQ encoder configuration of ``spqr encode --method cmpq``: exit-2 errors, before
    any tensor is read, for a missing target or Hessian file, a bilevel preset, bad widths,
    GPTQ knobs (--percdamp, --perm-order) without the gptq solver."""
    from spqr_format.codec.cmpq import CmpqConfig

    if preset is not None:
        raise BadInputError("--preset names a bilevel configuration; not with --method cmpq")
    if opts["target_bits"] is None:
        raise BadInputError("--method cmpq needs --target-bits (e.g. 2.5)")
    if hessian_path is None:
        raise BadInputError(
            "--method cmpq needs --hessians (activation statistics from spqr calibrate)"
        )
    if opts["widths"] is not None:
        try:
            opts["widths"] = tuple(int(v) for v in opts["widths"].split(","))
        except ValueError:
            raise BadInputError(
                f"--widths must be comma-separated integers 1..8, got {opts['widths']!r}"
            ) from None
    if perm_order is not None:
        opts["act_order"] = perm_order == "act_order"
    knobs = [f"--{k}" for k, v in (("percdamp", opts["percdamp"]), ("perm-order", perm_order))
             if v is not None]  # fmt: skip
    config = CmpqConfig(**{k: v for k, v in opts.items() if v is not None})
    if knobs and config.solver != "gptq":
        raise BadInputError(f"{', '.join(knobs)} only apply to --method cmpq --solver gptq")
    return config


def _bilevel_config(
    preset, method, bits, group_size, stats_bits, stats_group_size, outlier_fraction,
    outlier_threshold, no_outliers, perm_order, percdamp,
):  # fmt: skip
    from spqr_format.codec.presets import EncoderConfig, get_preset

    overrides = {
        k: v
        for k, v in dict(
            method=method, bits=bits, group_size=group_size, stats_bits=stats_bits,
            stats_group_size=stats_group_size, outlier_budget=outlier_fraction,
            outlier_threshold=outlier_threshold, perm_order=perm_order, percdamp=percdamp,
        ).items()
        if v is not None
    }  # fmt: skip
    if no_outliers:
        overrides.update(outlier_budget=None, outlier_threshold=None)
    if stats_bits == 0:
        overrides["stats_group_size"] = 0
    base = get_preset(preset or DEFAULT_CONFIG["preset"])
    if stats_bits and stats_group_size is None and base.stats_group_size == 0:
        overrides["stats_group_size"] = 16  # turning bilevel statistics on: SpQR's tile height
    if overrides.get("method") == "rtn":
        overrides.setdefault("perm_order", "identity")
        overrides.setdefault("outlier_threshold", None)
    elif overrides.get("method") == "gptq" and base.method == "rtn":
        overrides.setdefault("percdamp", 0.01)  # GPTQ's own default; rtn presets carry 0
    config: EncoderConfig = base.with_overrides(**overrides)
    return config


def _check_settings_storable(config) -> None:
    """Every setting must be storable in the file's metadata (finite JSON numbers, C-2.11):
    checked before any tensor is read, so that a bad setting never costs a whole encode."""
    settings = config.to_dict()
    for key, value in settings.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise BadInputError(f"setting {key} must be finite, got {value!r}", field=key)
    try:
        json.dumps(settings, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"settings cannot be stored in the metadata: {exc}") from None


def _write_json_atomic(path: str, doc: dict) -> None:
    from spqr_format.atomic import atomic_output

    with atomic_output(path, "w") as f:
        json.dump(doc, f, indent=2)


# --------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------
@main.command()
@click.argument(
    "inputs",
    metavar="ACTIVATIONS.safetensors...",
    nargs=-1,
    required=True,
    type=click.Path(dir_okay=False),
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output Hessian file (safetensors, written atomically).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float64", "float32"]),
    default="float64",
    show_default=True,
    help="Storage dtype of the Hessians.",
)
@handle_errors
def calibrate(inputs, output, dtype):
    """Accumulate layer Hessians H = (2/N) sum x x^T from recorded input activations.

    Each activation tensor is named after the weight it feeds (for example
    model.layers.0.mlp.down_proj.weight) and has shape [..., in_features]; every row is one
    token. Batches accumulate: the same name in several files, or NAME::k for several batches
    in one file. Accumulation is float64 and streams, one tensor at a time.

    \b
    Example:
      spqr calibrate acts-0.safetensors acts-1.safetensors -o H.safetensors
      spqr encode model.safetensors --hessians H.safetensors --preset spqr-3bit -o m.spqr
    """
    from spqr_format.codec.hessian import HessianAccumulator, save_hessians
    from spqr_format.safetensors_io import SafetensorsFile

    for i, path in enumerate(inputs):
        refuse_same_file(output, "-o/--output", **{f"input_{i + 1}": path})
    accumulators: dict[str, HessianAccumulator] = {}
    for path in inputs:
        with SafetensorsFile(path) as src, _progress(src.names(), f"reading {path}") as names:
            for key in names:
                name = key.split("::", 1)[0]
                acc = accumulators.setdefault(name, HessianAccumulator(name=name))
                try:
                    acc.add(src.get(key).to_float32())
                except SpqrError as err:
                    raise err.with_context(path=path) from None
    save_hessians(output, accumulators, dtype=dtype)
    for name, acc in accumulators.items():
        click.echo(
            f"{safe_text(name)}: {acc.in_features}x{acc.in_features} from {acc.tokens} tokens"
        )


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False))
    click.echo(line)
    click.echo("  ".join("-" * w for w in widths))
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)))


# --------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------
@main.command()
@click.argument("path", metavar="FILE.spqr", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--metadata", "show_metadata", is_flag=True, help="Also print the metadata.")
@handle_errors
def info(path, as_json, show_metadata):
    """List the tensors of a .spqr file (reads the header only, so it is instant).

    \b
    Example:
      spqr info model.spqr
      spqr info model.spqr --json | jq '.tensors[] | select(.encoding=="bilevel")'
    """
    with api.open_file(path) as f:
        infos = f.infos()
        total_bytes = sum(i.nbytes for i in infos)
        total_elems = sum(i.elements for i in infos)
        quant = [i for i in infos if i.encoding in ("bilevel", "channel_mixed")]
        q_bytes = sum(i.nbytes for i in quant)
        q_elems = sum(i.elements for i in quant)
        summary = {
            "file": path,
            "version": "{}.{}".format(*f.version),
            "file_size": f.file_size,
            "tensor_count": len(infos),
            "elements": total_elems,
            "bits_per_weight_all": 8 * total_bytes / total_elems if total_elems else 0.0,
            "bits_per_weight_quantized": 8 * q_bytes / q_elems if q_elems else 0.0,
        }
        if as_json:
            out = dict(summary, tensors=[i.to_dict() for i in infos])
            if show_metadata:
                out["metadata"] = f.metadata
            click.echo(json.dumps(out, indent=2))
            return
        _print_table(
            ["tensor", "shape", "encoding", "dtype", "bits/w", "outliers %", "bytes"],
            [
                [
                    safe_text(i.name),
                    "x".join(map(str, i.shape)) or "scalar",
                    _enc_label(i),
                    i.dtype,
                    f"{i.bits_per_weight:.3f}",
                    f"{100 * i.outlier_fraction:.3f}",
                    str(i.nbytes),
                ]
                for i in infos
            ],
        )
        click.echo(
            f"\n{summary['tensor_count']} tensors, {summary['elements']:,} weights, "
            f"{summary['file_size']:,} bytes; bits/weight {summary['bits_per_weight_all']:.3f} "
            f"overall, {summary['bits_per_weight_quantized']:.3f} over quantized tensors "
            f"(format {summary['version']})"
        )
        if show_metadata:  # ensure_ascii (the default): no raw control or bidi characters
            click.echo(json.dumps(f.metadata, indent=2, sort_keys=True))


def _enc_label(i: api.TensorInfo) -> str:
    if not i.supported:  # listed, but this reader cannot decode it (SPEC C-3.4)
        return f"{i.encoding} v{i.encoding_version} (unsupported: {i.unsupported})"
    if i.encoding == "channel_mixed":
        p = i.params
        widths = " ".join(f"w{b}x{c}" for b, c in p["width_counts"].items())
        tables = f" tables/{p['table_rows']}rows" if p["table_rows"] else ""
        return f"channel_mixed {widths}{tables}"
    if i.encoding != "bilevel":
        return i.encoding
    p = i.params
    stats = f"s{p['stats_bits']}x{p['stats_group_size']}" if p["stats_bits"] else "fp16"
    perm = "+perm" if p["permutation"] else ""
    return f"bilevel w{p['bits']} g{p['group_size']} {stats}{perm}"


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
@main.command()
@click.argument("path", metavar="FILE.spqr", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="Also draw bits/weight, outlier % and error per quantized tensor to this PNG "
    "(needs matplotlib).",
)
@handle_errors
def report(path, as_json, plot_path):
    """What quantization cost, per tensor: bits/weight and outlier % (from the file's
    sections) and the relative weight and output errors the encoder recorded.

    \b
    Example:
      spqr report model.spqr
      spqr report model.spqr --plot layers.png
    """
    from spqr_format.report import build_report, plot_report

    refuse_same_file(plot_path, "--plot", input=path)
    with api.open_file(path) as f:
        rows, summary = build_report(f)
    if plot_path:
        plot_report(rows, plot_path, title=os.path.basename(path))
    if as_json:
        click.echo(json.dumps({"file": path, **summary, "tensors": [r.to_dict() for r in rows]}))
        return

    def err(v):
        return "-" if v is None else f"{v:.4g}"

    allocated = summary.get("allocation") is not None
    _print_table(
        ["tensor", "shape", "encoding", "bits/w", "outliers %", "rel. W err", "rel. out err"]
        + (["config"] if allocated else []),
        [
            [
                safe_text(r.name),
                "x".join(map(str, r.shape)) or "scalar",
                r.encoding,
                f"{r.bits_per_weight:.3f}",
                f"{r.outlier_percent:.3f}",
                err(r.relative_weight_error),
                err(r.relative_output_error),
            ]
            + ([safe_text(r.config or "-")] if allocated else [])
            for r in rows
        ],
    )
    if allocated:
        a = summary["allocation"]
        click.echo(
            f"allocation: target {a['target_bits']:g} bits/weight, planned "
            f"{a['bits_per_weight']:.4f}; configurations: "
            + ", ".join(f"{safe_text(k)} x{v}" for k, v in a["configs"].items())
        )
    click.echo(
        f"{summary['quantized_tensors']} of {summary['tensors']} tensors quantized"
        f" (preset {summary['preset'] or 'not recorded'}): "
        f"{summary['bits_per_weight_quantized']:.3f} bits/weight quantized, "
        f"{summary['bits_per_weight_all']:.3f} overall; mean rel. W err "
        f"{err(summary['mean_relative_weight_error'])}, rel. out err "
        f"{err(summary['mean_relative_output_error'])} (weighted by size)"
    )


# --------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------
@main.command()
@click.argument("path", metavar="FILE.spqr", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@handle_errors
def verify(path, as_json):
    """Check every section CRC and every tensor's decoded-weight digest.

    \b
    Exit status:
      0  every tensor verifies;
      1  the file is damaged: a header or section CRC, or a decoded-weight digest, does not
         match, or the file is cut short (E_HEADER_CRC, E_SECTION_CRC, E_DIGEST_MISMATCH,
         E_TRUNCATED), and nothing in it is invalid;
      2  the file is invalid or unsupported (any other error code: bad outliers, non-finite
         statistics, a bad permutation, an unknown encoding...), even where other tensors are
         also damaged, or it cannot be read, or bad usage.

    \b
    Example:
      spqr verify model.spqr && echo intact
    """
    results = []
    t0 = time.perf_counter()
    try:
        f = api.open_file(path)
    except INTEGRITY_ERRORS as err:  # damage in the header: no tensor can be checked
        _report_verify(path, as_json, [], t0, file_error=err)
        sys.exit(EXIT_VERIFY_FAILED)
    with f:
        with _progress(f.names(), "verifying") as names:
            for name in names:
                try:
                    f.verify(name)
                    results.append({"name": name, "ok": True, "status": "ok"})
                except SpqrError as err:
                    status = "damaged" if isinstance(err, INTEGRITY_ERRORS) else "invalid"
                    results.append(
                        {"name": name, "ok": False, "status": status, "code": err.code,
                         "error": str(err)}
                    )  # fmt: skip
    _report_verify(path, as_json, results, t0)
    statuses = {r["status"] for r in results}
    if "invalid" in statuses:
        sys.exit(EXIT_BAD_INPUT)
    if "damaged" in statuses:
        sys.exit(EXIT_VERIFY_FAILED)


def _report_verify(path, as_json, results, t0, file_error=None) -> None:
    bad = [r for r in results if not r["ok"]]
    if file_error is not None:
        status = "damaged"
    elif any(r["status"] == "invalid" for r in bad):
        status = "invalid"
    else:
        status = "damaged" if bad else "ok"
    if as_json:
        doc = {"file": path, "ok": status == "ok", "status": status, "tensors": results}
        if file_error is not None:
            doc.update(code=file_error.code, error=str(file_error))
        click.echo(json.dumps(doc, indent=2))
        return
    if file_error is not None:
        click.echo(f"FAIL {safe_text(str(file_error))}")
        click.echo("file is damaged; verification FAILED")
        return
    for r in bad:
        click.echo(f"FAIL [{r['status']}] {safe_text(r['name'])}: {safe_text(r['error'])}")
    click.echo(
        f"{len(results) - len(bad)} of {len(results)} tensors verified "
        f"({time.perf_counter() - t0:.2f} s)"
        + ("" if not bad else f"; verification FAILED (file {status})")
    )


# --------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------
@main.command()
@click.argument("path", metavar="FILE.spqr", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output .safetensors file (written atomically).",
)
@click.option(
    "--dtype",
    type=click.Choice(["original", "float16", "bfloat16", "float32"]),
    default="original",
    show_default=True,
    help="dtype of the dense weights; 'original' keeps each tensor's own.",
)
@click.option(
    "--tensor",
    "only",
    multiple=True,
    metavar="NAME",
    help="Decode only these tensors (repeatable).",
)
@click.option(
    "--no-verify-digest",
    "no_digest",
    is_flag=True,
    help="Skip the check of each tensor's stored SHA-256 digest (by default a mismatch is "
    "an error, E_DIGEST_MISMATCH, and nothing is written). The check costs one SHA-256 "
    "per tensor.",
)
@handle_errors
def decode(path, output, dtype, only, no_digest):
    """Decode a .spqr file to dense weights in a safetensors file.

    Every section CRC and (unless --no-verify-digest) every decoded tensor's digest is
    checked; on any failure no output file is left.

    \b
    Example:
      spqr decode model.spqr -o model-dense.safetensors --dtype float16
    """
    from spqr_format.safetensors_io import SafetensorsWriter

    refuse_same_file(output, "-o/--output", input=path)
    with api.open_file(path) as f:
        names = list(only) if only else f.names()
        for n in names:
            f.entry(n)  # E_NOT_FOUND before anything is written
        layout = []
        for n in names:
            e = f.entry(n)
            out = spec.DTYPE_NAMES[spec.DType(e.dtype)] if dtype == "original" else dtype
            layout.append((n, out, tuple(e.shape)))
        with SafetensorsWriter(output, layout) as writer, _progress(layout, "decoding") as items:
            for n, out, _ in items:
                writer.write(n, f.decode(n, out, verify_digest=not no_digest))
    click.echo(f"wrote {len(layout)} tensors to {safe_text(output)}", err=True)


# --------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------
def _median_time(fn, repeat: int) -> float:
    """Median wall time of ``fn()`` over ``repeat`` calls after one warm-up call, seconds."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _gpu_time(cp, fn, repeat: int) -> float:
    """Median time of ``fn()`` on CuPy's current stream (CUDA events), after one warm-up."""
    fn()
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeat):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) * 1e-3)
    times.sort()
    return times[len(times) // 2]


def _bench_cpu(p, nbytes: int, repeat: int) -> list[dict]:
    """``nbytes``: the tensor's section bytes (what a decoder reads)."""
    from spqr_format.codec import reference

    m, n = p.shape
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    t_dec = _median_time(lambda: reference.decode_bilevel(p, "float16", validate=False), repeat)
    t_mv = _median_time(lambda: reference.matvec_bilevel(p, x, validate=False), repeat)
    return [
        dict(
            device="cpu",
            op="dequantize-f16",
            batch=None,
            seconds=t_dec,
            bytes=nbytes + 2 * m * n,
        ),
        dict(device="cpu", op="matvec", batch=1, seconds=t_mv, bytes=nbytes),
    ]


def _bench_gpu(cp, p, nbytes: int, batches, repeat: int) -> list[dict]:
    from spqr_format.gpu import GpuTensor

    m, n = p.shape
    g = GpuTensor.from_packed(p, validate=False)
    w = cp.empty((m, n), dtype=cp.float16)
    rows = [
        dict(
            device="gpu",
            op="dequantize-f16",
            batch=None,
            seconds=_gpu_time(cp, lambda: g.dequantize("float16", out=w), repeat),
            bytes=nbytes + 2 * m * n,
        )
    ]
    rng = np.random.default_rng(0)
    for b in batches:
        x = cp.asarray(rng.standard_normal((b, n)), dtype=cp.float16)
        y = cp.empty((b, m), dtype=cp.float16)
        ws = cp.empty(g.workspace_bytes(b) // 4 + 1, dtype=cp.float32)

        def fused(x=x, y=y, ws=ws, b=b):
            g.matmul_into(x.data.ptr, n, 1, y.data.ptr, m, 1, b, ws.data.ptr)

        t = _gpu_time(cp, fused, repeat)
        t_ref = _gpu_time(cp, lambda x=x: cp.matmul(x, w.T), repeat)  # cuBLAS, f16 weights
        rows.append(
            dict(device="gpu", op="matmul", batch=b, seconds=t, bytes=nbytes, cublas_seconds=t_ref)
        )
    return rows


def _gpu_module():
    """CuPy with a CUDA device, or a BadInputError saying why not."""
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
    except Exception as err:  # ImportError, CUDA driver errors
        raise BadInputError(
            f"--device gpu needs CuPy and a CUDA device ({type(err).__name__}: {err})"
        ) from None
    return cp


@main.command()
@click.argument("path", metavar="FILE.spqr", type=click.Path(dir_okay=False))
@click.option(
    "--tensor",
    "only",
    multiple=True,
    metavar="NAME",
    help="Benchmark only these tensors (repeatable); default: every bilevel tensor.",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="cpu: the reference (numba) decoder and matvec; gpu: the CUDA kernels (needs CuPy).",
)
@click.option(
    "--batch",
    "batches",
    type=click.IntRange(1, 4096),
    multiple=True,
    metavar="B",
    help="GPU matmul batch sizes (repeatable; default 1 and 16).",
)
@click.option(
    "--repeat", type=click.IntRange(1, 1000), default=5, show_default=True, help="Timed calls."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@handle_errors
def bench(path, only, device, batches, repeat, as_json):
    """Time dequantization and matrix-vector products of a file's bilevel tensors.

    Each figure is the median of --repeat calls after a warm-up call, on this machine; GB/s
    counts the compressed bytes read (plus the f16 weights written, for dequantize). With
    --device gpu each call is timed with CUDA events on warm caches, next to cuBLAS fp16 on the
    dequantized weights (`speedup`); benchmarks/gpu_matvec.py is the cold-cache benchmark
    behind the README's table.

    \b
    Example:
      spqr bench model.spqr --tensor layers.0.mlp.up_proj.weight
      spqr bench model.spqr --device gpu --batch 1 --batch 16 --json
    """
    cp = _gpu_module() if device == "gpu" else None
    batches = list(batches) or [1, 16]
    results = []
    with api.open_file(path) as f:
        if only:
            infos = [f.info(n) for n in only]  # E_NOT_FOUND before any timing
        else:
            infos = [i for i in f.infos() if i.encoding == "bilevel"]
        for i in infos:
            if i.encoding != "bilevel":
                raise BadInputError(
                    f"{path}: tensor {i.name!r} is stored raw; bench times bilevel tensors only"
                )
        for i in infos:
            name, p = i.name, f.read(i.name)
            rows = (
                _bench_cpu(p, i.nbytes, repeat)
                if cp is None
                else _bench_gpu(cp, p, i.nbytes, batches, repeat)
            )
            for r in rows:
                r.update(tensor=name, shape=list(p.shape), gbs=r["bytes"] / r["seconds"] / 1e9)
                if "cublas_seconds" in r:
                    r["speedup"] = r["cublas_seconds"] / r["seconds"]
            results += rows
    if as_json:
        click.echo(json.dumps({"file": path, "repeat": repeat, "results": results}, indent=2))
        return
    _print_table(
        ["tensor", "shape", "device", "op", "batch", "us", "GB/s", "speedup"],
        [
            [
                r["tensor"],
                "x".join(map(str, r["shape"])),
                r["device"],
                r["op"],
                "" if r["batch"] is None else str(r["batch"]),
                f"{1e6 * r['seconds']:.1f}",
                f"{r['gbs']:.1f}",
                f"{r['speedup']:.2f}x" if "speedup" in r else "",
            ]
            for r in results
        ],
    )
    if not results:
        click.echo("no bilevel tensors in the file", err=True)


# --------------------------------------------------------------------------------------
# conformance (spqr_format/conformance/cli.py)
# --------------------------------------------------------------------------------------
from spqr_format.conformance.cli import conformance_group  # noqa: E402

main.add_command(conformance_group)

# --------------------------------------------------------------------------------------
# whole models (spqr_format/models/cli.py)
# --------------------------------------------------------------------------------------
from spqr_format.models.cli import eval_cmd, quantize_model_cmd  # noqa: E402

main.add_command(quantize_model_cmd)
main.add_command(eval_cmd)


if __name__ == "__main__":  # pragma: no cover
    main()
