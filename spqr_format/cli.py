"""The ``spqr`` command line: encode, decode, info, verify.

Exit codes (every command): 0 success, 1 verification failed (``verify`` found damaged or
mismatching data), 2 bad usage or bad input (unreadable or invalid files, bad options).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import sys
import time
from collections.abc import Callable

import click
import numpy as np

from spqr_format import __version__, api, spec
from spqr_format.errors import INTEGRITY_ERRORS, BadInputError, SpqrError

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT = 0, 1, 2

DEFAULT_KEEP_DENSE = ("*embed*", "*norm*", "*lm_head*")


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(func: Callable) -> Callable:
    """Turn every expected failure into one line on stderr and exit status 2 (never a
    traceback): typed SpqrErrors, and OS errors on the files the user named."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
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
    """Encode, inspect, verify and decode .spqr files (sparse-quantized LLM weights).

    \b
    Quick start:
      spqr encode model.safetensors -o model.spqr --method rtn --bits 3 \\
           --group-size 16 --stats-bits 3 --stats-group-size 16
      spqr info model.spqr
      spqr verify model.spqr
      spqr decode model.spqr -o dense.safetensors --dtype float16

    Exit status: 0 ok, 1 verification failed, 2 bad usage or bad input.
    The file format is specified in SPEC.md.
    """


# --------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------
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
    "--method",
    type=click.Choice(["rtn"]),
    default="rtn",
    show_default=True,
    help="Encoder. rtn: round-to-nearest min-max.",
)
@click.option(
    "--bits", type=click.IntRange(1, 8), default=3, show_default=True, help="Bits per weight code."
)
@click.option(
    "--group-size",
    type=click.IntRange(1, spec.MAX_GROUP_SIZE),
    default=16,
    show_default=True,
    help="Input columns per first-level statistics group.",
)
@click.option(
    "--stats-bits",
    type=click.IntRange(0, 8),
    default=3,
    show_default=True,
    help="Bits of the quantized scales and zeros; 0 stores them in fp16.",
)
@click.option(
    "--stats-group-size",
    type=click.IntRange(1, spec.MAX_GROUP_SIZE),
    default=16,
    show_default=True,
    help="Rows per second-level statistics group.",
)
@click.option(
    "--outlier-fraction",
    type=click.FloatRange(0.0, 0.5),
    default=0.0,
    show_default=True,
    help="Fraction of weights kept exactly in fp16 (e.g. 0.01).",
)
@click.option(
    "--keep-dense",
    "keep_dense",
    multiple=True,
    metavar="GLOB",
    help="Tensors to store unquantized (repeatable; replaces the default "
    f"{', '.join(DEFAULT_KEEP_DENSE)}). 1-D tensors are always kept dense.",
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
    method,
    bits,
    group_size,
    stats_bits,
    stats_group_size,
    outlier_fraction,
    keep_dense,
    report_path,
    quiet,
):
    """Quantize the 2-D weights of a safetensors file into a .spqr file.

    Tensors matching --keep-dense and all tensors that are not 2-D are stored as they are
    (encoding raw); the rest are quantized (encoding bilevel).

    \b
    Example (SpQR-like 3-bit, 16x16 bilevel statistics, 1% outliers):
      spqr encode model.safetensors -o model.spqr --bits 3 --group-size 16 \\
           --stats-bits 3 --stats-group-size 16 --outlier-fraction 0.01
    """
    from spqr_format.codec.rtn import encode_rtn
    from spqr_format.safetensors_io import SafetensorsFile

    patterns = keep_dense or DEFAULT_KEEP_DENSE
    settings = {
        "bits": bits,
        "group_size": group_size,
        "stats_bits": stats_bits,
        "stats_group_size": stats_group_size if stats_bits else 0,
        "outlier_fraction": outlier_fraction,
        "keep_dense": list(patterns),
    }
    rows = []
    with SafetensorsFile(input_path) as src:
        metadata = {
            "provenance.tool": "spqr-format",
            "provenance.tool_version": __version__,
            "encoder.method": method,
            "encoder.settings": settings,
        }
        if src.metadata:
            metadata["model.safetensors_metadata"] = dict(src.metadata)
        with (
            api.SpqrWriter(output, metadata=metadata) as writer,
            _progress(src.names(), "encoding") as names,
        ):
            for name in names:
                st = src.get(name)
                if st.dtype not in ("float32", "float16", "bfloat16"):
                    raise BadInputError(
                        f"dtype {st.dtype} cannot be stored: .spqr holds float32, float16 and "
                        "bfloat16 tensors (SPEC C-3.3)",
                        path=input_path,
                        tensor=name,
                    )
                dtype = spec.DTYPE_BY_NAME[st.dtype]
                quantize = len(st.shape) == 2 and not any(
                    fnmatch.fnmatchcase(name, p) for p in patterns
                )
                if not quantize:
                    writer.add(name, api.RawTensor(dtype, st.data))
                    rows.append(_row(name, st.shape, "raw", 8 * spec.DTYPE_SIZES[dtype], 0, 0.0))
                    continue
                weight = st.to_float32()
                tensor = encode_rtn(
                    weight,
                    bits=bits,
                    group_size=group_size,
                    stats_bits=stats_bits,
                    stats_group_size=stats_group_size if stats_bits else 0,
                    outlier_fraction=outlier_fraction,
                    dtype=dtype,
                    name=name,
                )
                writer.add(name, tensor)
                rows.append(_quant_row(name, weight, tensor))
            metadata["encoder.report"] = rows
            writer.set_metadata(metadata)
    if report_path:
        with open(report_path, "w") as f:
            json.dump({"settings": settings, "tensors": rows}, f, indent=2)
    if not quiet:
        _print_table(
            ["tensor", "shape", "encoding", "bits/w", "outliers %", "rel. error"],
            [
                [
                    r["name"],
                    "x".join(map(str, r["shape"])),
                    r["encoding"],
                    f"{r['bits_per_weight']:.3f}",
                    f"{100 * r['outlier_fraction']:.3f}",
                    f"{r['relative_weight_error']:.4g}",
                ]
                for r in rows
            ],
        )


def _row(name, shape, encoding, bpw, outliers, rel_error) -> dict:
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return {
        "name": name,
        "shape": list(shape),
        "encoding": encoding,
        "bits_per_weight": float(bpw),
        "outlier_fraction": outliers / count if count else 0.0,
        "relative_weight_error": float(rel_error),
    }


def _quant_row(name: str, weight: np.ndarray, tensor) -> dict:
    from spqr_format.codec.packing import pack
    from spqr_format.codec.reference import decode_bilevel

    packed = pack(tensor)
    decoded = decode_bilevel(packed, spec.DType.FLOAT32)
    denom = float(np.linalg.norm(weight))
    err = float(np.linalg.norm(decoded - weight)) / denom if denom else 0.0
    nbytes = sum(a.nbytes for _, a in packed.sections())
    return _row(
        name, weight.shape, "bilevel", 8 * nbytes / weight.size, packed.header.outlier_count, err
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
        quant = [i for i in infos if i.encoding == "bilevel"]
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
                    i.name,
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
        if show_metadata:
            click.echo(json.dumps(f.metadata, indent=2, sort_keys=True))


def _enc_label(i: api.TensorInfo) -> str:
    if i.encoding != "bilevel":
        return i.encoding
    p = i.params
    stats = f"s{p['stats_bits']}x{p['stats_group_size']}" if p["stats_bits"] else "fp16"
    perm = "+perm" if p["permutation"] else ""
    return f"bilevel w{p['bits']} g{p['group_size']} {stats}{perm}"


# --------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------
@main.command()
@click.argument("path", metavar="FILE.spqr", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@handle_errors
def verify(path, as_json):
    """Check every section CRC and every tensor's decoded-weight digest.

    Exit 0 if all tensors verify, 1 if any is damaged, 2 if the file is not a valid .spqr
    file at all.

    \b
    Example:
      spqr verify model.spqr && echo intact
    """
    results = []
    t0 = time.perf_counter()
    with api.open_file(path) as f:
        with _progress(f.names(), "verifying") as names:
            for name in names:
                try:
                    f.verify(name)
                    results.append({"name": name, "ok": True})
                except INTEGRITY_ERRORS as err:
                    results.append({"name": name, "ok": False, "code": err.code, "error": str(err)})
                except SpqrError as err:
                    results.append({"name": name, "ok": False, "code": err.code, "error": str(err)})
    bad = [r for r in results if not r["ok"]]
    if as_json:
        click.echo(json.dumps({"file": path, "ok": not bad, "tensors": results}, indent=2))
    else:
        for r in bad:
            click.echo(f"FAIL {r['name']}: {r['error']}")
        click.echo(
            f"{len(results) - len(bad)} of {len(results)} tensors verified "
            f"({time.perf_counter() - t0:.2f} s)" + ("" if not bad else "; verification FAILED")
        )
    if bad:
        sys.exit(EXIT_VERIFY_FAILED)


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
@handle_errors
def decode(path, output, dtype, only):
    """Decode a .spqr file to dense weights in a safetensors file.

    \b
    Example:
      spqr decode model.spqr -o model-dense.safetensors --dtype float16
    """
    from spqr_format.safetensors_io import SafetensorsWriter

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
                writer.write(n, f.decode(n, out))
    click.echo(f"wrote {len(layout)} tensors to {output}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
