"""Run a decoder on every vector of a suite and judge it (conformance/README.md, "Judging").

- ``decode``: the decoder must succeed and its output must hold exactly the expected tensors:
  same names, dtypes, shapes and bytes (bit-exact, NaN payloads included); no other tensor.
- ``matvec``: the decoder must succeed and, for every row ``i`` of every tensor,
  ``|y_i - y_ref_i| <= rel * sum_j |W_ij x_j| + abs`` with the vector's tolerance. A decoder
  without matvec is *skipped* on these cases, not failed.
- ``reject``: the decoder must refuse the file (exit non-zero / raise) reporting exactly the
  expected error code. Accepting the file, another code, no code, or a crash all fail.

The result of every case goes into a JSON document; the exit status of ``spqr conformance
run`` is the number of failures (at most 125).
"""

from __future__ import annotations

import fnmatch
import time
import traceback
from pathlib import Path

import numpy as np

from spqr_format.conformance import manifest, stfile
from spqr_format.conformance.backends import Crashed, Rejected, Unsupported


def _call(fn, *args):
    """(outcome, value): ok / rejected / crashed / unsupported."""
    try:
        return "ok", fn(*args)
    except Unsupported as exc:
        return "unsupported", str(exc)
    except Rejected as exc:
        return "rejected", (exc.code, exc.message)
    except Crashed as exc:
        return "crashed", str(exc)
    except Exception as exc:  # in-process decoders: a typed error carries .code
        code = getattr(exc, "code", None)
        if isinstance(code, str) and code.startswith("E_"):
            return "rejected", (code, str(exc))
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return "crashed", f"untyped exception: {tb}"


def _compare_decode(got: dict, expected: dict) -> list[str]:
    problems = []
    for name, (dt, shape, raw) in expected.items():
        if name not in got:
            problems.append(f"tensor {name!r} missing from the output")
            continue
        g = got[name]
        if g.dtype != dt:
            problems.append(f"tensor {name!r}: dtype {g.dtype}, expected {dt}")
        elif tuple(g.shape) != tuple(shape):
            problems.append(f"tensor {name!r}: shape {list(g.shape)}, expected {list(shape)}")
        elif g.data != raw:
            size = stfile.DTYPES[dt][1]
            a = np.frombuffer(g.data, dtype=f"<u{size}")
            b = np.frombuffer(raw, dtype=f"<u{size}")
            if a.shape != b.shape:
                problems.append(f"tensor {name!r}: {len(g.data)} bytes, expected {len(raw)}")
            else:
                bad = np.flatnonzero(a != b)
                i = int(bad[0])
                idx = list(np.unravel_index(i, shape)) if shape else []
                problems.append(
                    f"tensor {name!r}: {bad.size} of {b.size} elements differ; first at "
                    f"{[int(v) for v in idx]}: got 0x{int(a[i]):0{2 * size}x}, "
                    f"expected 0x{int(b[i]):0{2 * size}x}"
                )
    for name in got:
        if name not in expected:
            problems.append(f"unexpected tensor {name!r} in the output")
    return problems


def judge_decode(decoder, d: Path, v: dict) -> dict:
    outcome, value = _call(decoder.decode, str(d / "input.spqr"))
    if outcome == "ok":
        problems = _compare_decode(value, stfile.read(d / "expected.safetensors"))
        return {
            "status": "fail" if problems else "pass",
            "outcome": "ok",
            **({"problems": problems[:20]} if problems else {}),
        }
    return _not_ok(outcome, value, "a valid file")


def judge_reject(decoder, d: Path, v: dict) -> dict:
    want = v["error"]
    outcome, value = _call(decoder.decode, str(d / "input.spqr"))
    res: dict = {"outcome": outcome, "expected_error": want}
    if outcome == "rejected":
        code, msg = value
        res.update(error=code, message=msg[-300:])
        if code == want:
            res["status"] = "pass"
        else:
            res["status"] = "fail"
            res["problems"] = [f"refused with {code or 'no error code'}, expected {want}"]
    elif outcome == "ok":
        res.update(status="fail", problems=[f"accepted the file, expected {want}"])
    else:
        res.update(status="fail", problems=[f"{outcome}: {value}"])
    return res


def judge_matvec(decoder, d: Path, v: dict) -> dict:
    tol = v["tolerance"]
    rel, abs_ = float(tol["rel"]), float(tol["abs"])
    xs = {
        n: stfile.as_array(e).astype(np.float32)
        for n, e in stfile.read(d / "x.safetensors").items()
    }
    yref = {n: stfile.as_array(e) for n, e in stfile.read(d / "y_ref.safetensors").items()}
    scale = {n: stfile.as_array(e) for n, e in stfile.read(d / "y_absdot.safetensors").items()}
    fn = getattr(decoder, "matvec", None)
    if fn is None:
        return {"status": "skip", "outcome": "unsupported", "reason": "decoder has no matvec"}
    outcome, value = _call(fn, str(d / "input.spqr"), xs)
    if outcome == "unsupported":
        return {"status": "skip", "outcome": outcome, "reason": value}
    if outcome != "ok":
        return _not_ok(outcome, value, "a valid file")
    problems, worst_ratio, worst_abs, worst_rel = [], 0.0, 0.0, 0.0
    for n, ref in yref.items():
        y = value.get(n)
        if y is None:
            problems.append(f"no y for tensor {n!r}")
            continue
        y = np.asarray(y, np.float64).reshape(-1)
        if y.shape != ref.shape:
            problems.append(
                f"tensor {n!r}: y has shape {list(y.shape)}, expected {list(ref.shape)}"
            )
            continue
        err = np.abs(y - ref)
        bound = rel * scale[n] + abs_
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(np.isfinite(err), err / bound, np.inf)
            relerr = np.where(scale[n] > 0, err / scale[n], np.where(err > 0, np.inf, 0.0))
        worst_ratio = max(worst_ratio, float(ratio.max(initial=0)))
        worst_abs = max(worst_abs, float(np.nan_to_num(err, nan=np.inf).max(initial=0)))
        worst_rel = max(worst_rel, float(np.nan_to_num(relerr, nan=np.inf).max(initial=0)))
        bad = np.flatnonzero(~(err <= bound))
        if bad.size:
            i = int(bad[0])
            problems.append(
                f"tensor {n!r}: {bad.size} of {ref.size} rows outside the tolerance; row {i}: "
                f"y {y[i]!r}, y_ref {ref[i]!r}, allowed error {bound[i]:.3g}"
            )
    return {
        "status": "fail" if problems else "pass",
        "outcome": "ok",
        "max_abs_error": worst_abs,
        "max_error_over_scale": worst_rel,  # max_i |y_i - y_ref_i| / sum_j |W_ij x_j|
        "max_error_over_tolerance": worst_ratio,  # <= 1 passes
        "tolerance": tol,
        **({"problems": problems[:20]} if problems else {}),
    }


def _not_ok(outcome, value, what) -> dict:
    if outcome == "rejected":
        code, msg = value
        return {
            "status": "fail",
            "outcome": outcome,
            "error": code,
            "message": msg[-300:],
            "problems": [f"refused {what} with {code or 'no error code'}"],
        }
    return {"status": "fail", "outcome": outcome, "problems": [f"{outcome}: {value}"]}


JUDGES = {"decode": judge_decode, "matvec": judge_matvec, "reject": judge_reject}


def select(doc: dict, suite: str, only=(), kinds=()) -> list[dict]:
    out = []
    for v in doc["vectors"]:
        if suite == "fast" and v["suite"] != "fast":
            continue
        if kinds and v["kind"] not in kinds:
            continue
        if only and not any(fnmatch.fnmatchcase(v["id"], pat) for pat in only):
            continue
        out.append(v)
    return out


def run(
    decoder,
    root: Path,
    *,
    suite="fast",
    cache=None,
    only=(),
    kinds=(),
    progress=None,
    decoder_label=None,
) -> dict:
    """Judge ``decoder`` on the vectors of ``suite``; returns the results document."""
    from spqr_format.conformance import generate

    root = Path(root)
    cache = Path(cache) if cache is not None else manifest.default_cache()
    doc = manifest.load(root)
    vectors = select(doc, suite, only, kinds)
    setup_problems = []
    if any(v["suite"] == "full" for v in vectors):
        wanted = {"vectors": [v for v in vectors if v["suite"] == "full"]}
        setup_problems = generate.ensure_full(root, cache, wanted, progress=None)
    cases = []
    t_all = time.perf_counter()
    for v in vectors:
        d = manifest.vector_dir(root, cache, v)
        t0 = time.perf_counter()
        bad_files = manifest.check_files(d, v)
        if bad_files:
            res = {"status": "fail", "outcome": "vector-missing", "problems": bad_files}
        else:
            res = JUDGES[v["kind"]](decoder, d, v)
        res = {
            "id": v["id"],
            "kind": v["kind"],
            "suite": v["suite"],
            **res,
            "seconds": round(time.perf_counter() - t0, 4),
        }
        cases.append(res)
        if progress:
            progress(res)
    counts = {s: sum(c["status"] == s for c in cases) for s in ("pass", "fail", "skip")}
    return {
        "schema": "spqr-conformance-results/1",
        "spec_version": doc["spec_version"],
        "decoder": decoder_label or getattr(decoder, "name", "?"),
        "suite": suite,
        "summary": {
            "total": len(cases),
            "passed": counts["pass"],
            "failed": counts["fail"],
            "skipped": counts["skip"],
            "seconds": round(time.perf_counter() - t_all, 3),
        },
        "setup_problems": setup_problems,
        "cases": cases,
    }


def exit_status(results: dict) -> int:
    return min(results["summary"]["failed"] + len(results.get("setup_problems", [])), 125)
