"""``spqr conformance``: run the conformance suite against a decoder, or rebuild it."""

from __future__ import annotations

import json
import sys

import click

from spqr_format.conformance import manifest


def _vectors_option(f):
    return click.option(
        "--vectors",
        "vectors",
        type=click.Path(file_okay=False),
        default=None,
        help="Conformance directory (holding manifest.json and vectors/); default: the "
        "conformance/ directory of this source tree.",
    )(f)


def _cache_option(f):
    return click.option(
        "--cache",
        type=click.Path(file_okay=False),
        default=None,
        help="Where full-suite vectors are built (default ~/.cache/spqr-format/conformance).",
    )(f)


@click.group("conformance")
def conformance_group() -> None:
    """Run the conformance vectors (SPEC.md section 10) against a decoder, or rebuild them.

    \b
    Examples:
      spqr conformance run                                  # the numba reference decoder
      spqr conformance run --backend gpu --suite full
      spqr conformance run --decoder "./mydec {input} {output}" --results out.json
      spqr conformance generate --check

    The decoder protocol, the output format and how results are judged are in
    conformance/README.md.
    """


@conformance_group.command("run")
@click.option(
    "--decoder",
    "decoder_cmd",
    metavar='"CMD {input} {output}"',
    help="External decoder command, run once per vector (see conformance/README.md).",
)
@click.option(
    "--matvec-decoder",
    "matvec_cmd",
    metavar='"CMD {input} {x} {output}"',
    help="External matvec command; without it external runs skip matvec vectors.",
)
@click.option(
    "--backend",
    default=None,
    help="In-process decoder: cpu (numba reference, default), gpu (CUDA kernels), or "
    "module:attribute. Not with --decoder.",
)
@click.option(
    "--suite",
    type=click.Choice(["fast", "full"]),
    default="fast",
    show_default=True,
    help="fast: the committed vectors; full: also the large ones, built on demand.",
)
@click.option(
    "--results",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write per-case results (JSON) here.",
)
@click.option("--only", multiple=True, metavar="GLOB", help="Only vector ids matching GLOB.")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(["decode", "matvec", "reject"]),
    help="Only vectors of this kind (repeatable).",
)
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds per external decoder call.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print only failures and the summary.")
@_vectors_option
@_cache_option
def run_cmd(
    decoder_cmd, matvec_cmd, backend, suite, results, only, kinds, timeout, quiet, vectors, cache
):
    """Judge a decoder on every vector. Exit status: the number of failures (at most 125);
    2 when the suite or the decoder cannot run at all."""
    from spqr_format.conformance import backends, runner

    if (decoder_cmd or matvec_cmd) and backend:
        raise click.UsageError("--backend and --decoder/--matvec-decoder exclude each other")
    try:
        if decoder_cmd or matvec_cmd:
            dec = backends.ExternalDecoder(decoder_cmd, matvec_cmd, timeout=timeout)
            label = decoder_cmd or matvec_cmd
            if not decoder_cmd:
                kinds = kinds or ("matvec",)
        else:
            dec = backends.load_backend(backend or "cpu")
            label = backend or "cpu"
    except backends.BackendUnavailable as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    root = manifest.resolve_root(vectors)

    def show(res):
        if res["status"] == "fail" or not quiet:
            tag = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP"}[res["status"]]
            extra = ""
            if res["status"] == "fail":
                extra = ": " + "; ".join(res.get("problems", []))[:300]
            elif res["kind"] == "matvec" and res["status"] == "pass":
                extra = f" (error/tolerance {res['max_error_over_tolerance']:.3g})"
            click.echo(f"{tag} {res['id']}{extra}")

    try:
        out = runner.run(
            dec,
            root,
            suite=suite,
            cache=cache,
            only=only,
            kinds=kinds,
            progress=show,
            decoder_label=label,
        )
    except manifest.ManifestError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    for p in out["setup_problems"]:
        click.echo(f"FAIL (vector build) {p}")
    s = out["summary"]
    click.echo(
        f"{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped of "
        f"{s['total']} ({suite} suite, {s['seconds']:.1f} s)"
    )
    if results:
        with open(results, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    sys.exit(runner.exit_status(out))


@conformance_group.command("generate")
@click.option(
    "--check",
    is_flag=True,
    help="Rebuild without writing and compare every file's sha256 with the manifest.",
)
@click.option(
    "--suite",
    type=click.Choice(["fast", "full"]),
    default="fast",
    show_default=True,
    help="With --check: which vectors to rebuild.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="With --check: also write the rebuilt vectors here.",
)
@_vectors_option
@_cache_option
def generate_cmd(check, suite, out, vectors, cache):
    """Rebuild the vectors deterministically. Without --check: writes vectors/<id>/ (fast),
    the cache (full) and manifest.json. With --check: exit status = number of files whose
    rebuilt hash differs from the manifest (at most 125)."""
    from spqr_format.conformance import generate

    root = manifest.resolve_root(vectors)
    if check:
        try:
            problems = generate.check(root, suite=suite, out=out)
        except manifest.ManifestError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        for p in problems:
            click.echo(f"MISMATCH {p}")
        click.echo(
            "all vectors rebuild to the committed hashes"
            if not problems
            else f"{len(problems)} mismatches"
        )
        sys.exit(min(len(problems), 125))
    doc = generate.generate(root, cache)
    counts: dict = {}
    for v in doc["vectors"]:
        counts[(v["kind"], v["suite"])] = counts.get((v["kind"], v["suite"]), 0) + 1
    click.echo(
        f"wrote {len(doc['vectors'])} vectors to {root} "
        + ", ".join(f"{k[0]}/{k[1]}: {n}" for k, n in sorted(counts.items()))
    )
