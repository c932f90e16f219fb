"""The launch plan: which kernel path a matmul of a given batch takes, per GPU and shape class.

One table (:data:`PLAN`) replaces the environment variables that tuning experiments used to
steer kernel choice. The Python layer (:mod:`spqr_format.gpu.tensor`) and the C launcher
(``kernels/spqr_tc_host.cu``, through the generated ``kernels/spqr_launch_plan.h``) read the
same table; ``python -m spqr_format.gpu.plan --header`` regenerates the header and
``tests/test_launch_plan.py`` fails when the checked-in copy is stale.

Lookup: the first entry whose GPU class, layout, shape class and batch range all match wins.

* **GPU class** (:func:`gpu_class`): ``hopper`` = compute capability 9.x (H100 / H200, 132
  multiprocessors: every measurement in ``benchmarks/results``), ``any`` = everything else.
  Entries of class ``any`` repeat the Hopper choices unmeasured, so a new GPU runs the
  measured plan until the benchmark fills an entry of its own.
* **Layout** (:func:`layout_of`): ``tc`` = the tensor has the GPU tile layout and the input
  is f16 (tensor-core kernels); ``simt`` = a fused SIMT kernel exists (bits 2/3/4/8, group
  size a multiple of 16; bf16 inputs, or no tile layout); ``none`` = no fused kernel.
* **Shape class** (:func:`shape_class`): ``small`` = at most 2^24 weights (4096x4096);
  ``large`` = at least 2^27 weights, or at least 5120 rows and 5120^2 weights (the rule under
  which the group-separated kernel ``spqr_tcg_*`` wins at batch 1-2); ``medium`` = the rest.
* **Path**: ``tcg`` / ``tcv`` (one tensor-core kernel, batch <= 2 / <= 8), ``tc_split`` (k-split
  tile kernel + finish kernel, slices of up to 64 columns), ``mv1`` (SIMT row sweep, batch 1),
  ``simt`` (SIMT kernel, slices of 2 or 4 columns), ``dense`` (dequantize into a workspace in
  the input dtype, then a cuBLAS GEMM with f32 accumulation on the same stream).

Deleted paths: ``tcp`` (``spqr_tcp_*``, a multi-stage cp.async pipeline into ``mma.sync``
consumers of 32 rows per warp, sessions 14-15) was correct but slower than ``tc_split`` at
every batch it was built for (H100, ``benchmarks/results/gpu-h100-2026-12-07-paths.json``:
8192x28672 106 against 86 us at batch 16, 204 against 198 at 64, level at 128), so no entry
picked it; it was removed rather than kept as an override.

Where the ``dense`` entries start (H200, session 9, ``gpu-h200-2026-11-23-s9.json``, us; dense =
dequantize + cuBLAS fp16 of the same batch, both measured in that run): 4096x4096 fused 16.7 at
batch 16 and 33.6 at 64 against 17.6 + 12.1 = 29.7 dense, so dense from batch 49 on ``small``
shapes (linear interpolation: equal near 54); at batch 64 fused still wins on the other five
shapes (11008x4096 63.8 vs 67.0, 4096x11008 62.5 vs 74.0, 8192x8192 72.7 vs 98.7, 28672x8192
213.6 vs 313.9, 8192x28672 195.8 vs 341.2), and batch 65-128 adds a second 64-column slice
(at least the batch-1 time more; batch 128 costs twice batch 64 = more than dense everywhere),
so dense from batch 65. SIMT kernels (no tensor cores; H100 session 1: batch 4 28672x8192 374
us, 4096x4096 36.7, against dequantize + cuBLAS 197 + 108 and 17.6 + 13.6 on the H200): dense
from batch 4. These crossovers come from separate measurements; the extended benchmark
(``benchmarks/gpu_matvec.py``) measures fused and dense at every batch to refine them.

Override (experiments only): ``SPQR_GPU_PLAN`` = comma-separated ``key=value`` items, see
:data:`OVERRIDE_KEYS`; read on every plan decision (parsed once per distinct value). A bad key
or value raises :class:`PlanError` naming the variable and the item.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

ENV = "SPQR_GPU_PLAN"

PATHS = ("tcg", "tcv", "tc_split", "mv1", "simt", "dense")  # C enum order: append only
LAYOUTS = ("tc", "simt", "none")
SHAPE_CLASSES = ("small", "medium", "large")
GPU_CLASSES = ("hopper", "any")
ANY = None  # wildcard in an entry
BATCH_MAX = 1 << 30

# paths each layout can run (a forced path outside this set is ignored for that layout)
LAYOUT_PATHS = {
    "tc": ("tcg", "tcv", "tc_split", "dense"),
    "simt": ("mv1", "simt", "dense"),
    "none": ("dense",),
}

SMALL_MAX_WEIGHTS = 1 << 24
LARGE_MIN_WEIGHTS = 1 << 27
LARGE_MIN_ROWS = 5120


@dataclass(frozen=True)
class Entry:
    """One row of the plan: ``path`` for batches ``lo..hi`` (inclusive)."""

    gpu: str | None  # GPU class or ANY
    layout: str
    shapes: tuple[str, ...] | None  # shape classes or ANY
    lo: int
    hi: int
    path: str
    note: str = ""


def _entries(gpu: str | None, measured: str) -> list[Entry]:
    """The plan of one GPU class (the same choices for ``any``, unmeasured there)."""
    big = ("medium", "large")
    return [
        Entry(gpu, "tc", ("large",), 1, 2, "tcg", f"{measured}: tcg beats tcv at batch 1-2"),
        Entry(gpu, "tc", ANY, 1, 8, "tcv", f"{measured}: one kernel up to 8 columns"),
        Entry(gpu, "tc", ("small",), 9, 48, "tc_split", f"{measured}: 4096x4096 b16 16.7 us"),
        Entry(gpu, "tc", big, 9, 64, "tc_split", f"{measured}: b64 fused < dense on 5 shapes"),
        Entry(gpu, "tc", ANY, 1, BATCH_MAX, "dense", f"{measured}: dequantize + cuBLAS"),
        Entry(gpu, "simt", ANY, 1, 1, "mv1", f"{measured}: row sweep"),
        Entry(gpu, "simt", ANY, 2, 3, "simt", f"{measured}: SIMT slices of 2/4"),
        Entry(gpu, "simt", ANY, 1, BATCH_MAX, "dense", f"{measured}: SIMT b4 > dense"),
        Entry(gpu, "none", ANY, 1, BATCH_MAX, "dense", "no fused kernel"),
    ]


PLAN: tuple[Entry, ...] = tuple(
    _entries("hopper", "H100/H200 measured") + _entries(ANY, "unmeasured, Hopper choices")
)


def gpu_class(cc: int, sms: int = 0, name: str = "") -> str:
    """GPU class of compute capability ``cc`` (major * 10 + minor)."""
    return "hopper" if 90 <= cc < 100 else "any"


def shape_class(m: int, n: int) -> str:
    w = m * n
    if w <= SMALL_MAX_WEIGHTS:
        return "small"
    if w >= LARGE_MIN_WEIGHTS or (m >= LARGE_MIN_ROWS and w >= LARGE_MIN_ROWS * LARGE_MIN_ROWS):
        return "large"
    return "medium"


def layout_of(has_tile_layout: bool, fused_simt: bool, in_code: int) -> str:
    if has_tile_layout and in_code == 1:
        return "tc"
    return "simt" if fused_simt else "none"


class PlanError(ValueError):
    """A malformed ``SPQR_GPU_PLAN`` override."""


# key -> (allowed values or None for an integer range (lo, hi), what it does)
OVERRIDE_KEYS: dict[str, tuple] = {
    "path": (PATHS, "force a path wherever the layout and batch allow it"),
    "dense_from": ((0, BATCH_MAX), "dense from this batch on (0: never dense unless forced)"),
    "tc": ((0, 1), "build the tensor-core tile layout at upload (default 1)"),
    "tcv_ks": ((1, 8), "k-slices per row block of spqr_tcv_* / spqr_tcg_*"),
    "tc_splits": ((1, 1 << 20), "k-split of the tile kernel"),
    "finish_lanes": ((4, 32), "lanes per row of the outlier pass (4, 8, 16, 32; pitch 8-16)"),
    "dq_threads": ((32, 256), "threads per block of the one-row dequantizer"),
    "dq_rows": ((1, 2), "rows per block of the dequantizer with a permutation"),
    "dq_oct": ((0, 1), "the no-permutation octet dequantizer (default 1)"),
    "dqo_threads": ((32, 1024), "threads per block of the octet dequantizer"),
    "dq2_smem_max": ((0, 1 << 20), "bytes of staged rows up to which 2-row blocks use <= 256 thr"),
    "dq2_wide_smem_max": ((0, 1 << 20), "bytes of staged rows the two-row dequantizer takes"),
    "cmpq_blocks_per_sm": ((1, 64), "channel_mixed matmul blocks per multiprocessor"),
    "cmpq_dense_from": ((0, BATCH_MAX), "channel_mixed: dequantize + cuBLAS from this batch"),
    "cmpq_v2": ((0, 1), "channel_mixed: 1 mv1 / tensor cores (default), 0 the first design (mm)"),
    "defines": (None, "extra -D options for the kernel build, space-separated"),
}
C_KEYS = ("path", "dense_from", "tcv_ks", "tc_splits", "finish_lanes")  # read by the C launcher

_cache: dict[str, dict] = {}


def parse_override(text: str | None) -> dict:
    """The override items of ``text`` (the value of ``SPQR_GPU_PLAN``) as a dict."""
    text = (text or "").strip()
    hit = _cache.get(text)
    if hit is not None:
        return hit
    out: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in OVERRIDE_KEYS:
            raise PlanError(
                f"{ENV}: bad item {item!r} (want key=value, keys: {', '.join(OVERRIDE_KEYS)})"
            )
        if key in out:
            raise PlanError(f"{ENV}: {key!r} given twice")
        allowed = OVERRIDE_KEYS[key][0]
        if key == "defines":
            defs = tuple(shlex.split(value))
            bad = [d for d in defs if not d.startswith("-D")]
            if bad:
                raise PlanError(f"{ENV}: defines takes -D options only, got {bad[0]!r}")
            out[key] = defs
        elif isinstance(allowed, tuple) and allowed and isinstance(allowed[0], str):
            if value not in allowed:
                raise PlanError(f"{ENV}: {key}={value!r} is not one of {', '.join(allowed)}")
            out[key] = value
        else:
            try:
                v = int(value)
            except ValueError:
                raise PlanError(f"{ENV}: {key}={value!r} is not an integer") from None
            lo, hi = allowed
            if not lo <= v <= hi or (key == "finish_lanes" and v not in (4, 8, 16, 32)):
                raise PlanError(f"{ENV}: {key}={v} out of range {lo}..{hi}")
            out[key] = v
    _cache[text] = out
    return out


def override() -> dict:
    """The current override (``SPQR_GPU_PLAN``; empty when unset)."""
    return parse_override(os.environ.get(ENV))


def override_text() -> str | None:
    """The raw ``SPQR_GPU_PLAN`` text (None when unset): a cache key for decisions."""
    return os.environ.get(ENV)


def option(key: str, default=None):
    return override().get(key, default)


def lookup_entry(gpu: str, layout: str, m: int, n: int, batch: int) -> tuple[int, Entry]:
    """(index, entry) of the first plan entry that matches."""
    sc = shape_class(m, n)
    for i, e in enumerate(PLAN):
        if e.gpu not in (ANY, gpu) or e.layout != layout or not e.lo <= batch <= e.hi:
            continue
        if e.shapes is not ANY and sc not in e.shapes:
            continue
        return i, e
    raise AssertionError(
        f"no plan entry for {gpu} {layout} {m}x{n} batch {batch}"
    )  # pragma: no cover


@dataclass(frozen=True)
class Decision:
    path: str
    entry: int  # index into PLAN, -1 when the override decided
    reason: str


def can_run(path: str, layout: str, batch: int) -> bool:
    """Whether ``path`` can compute a batch of ``batch`` rows for ``layout`` (slices of 64
    columns for the tensor-core paths)."""
    if path not in LAYOUT_PATHS[layout]:
        return False
    if path == "tcg":
        return batch <= 2
    if path == "tcv":
        return batch <= 8
    if path == "mv1":
        return batch == 1
    if path == "simt":
        return batch >= 2
    return True


def decide(gpu: str, layout: str, m: int, n: int, batch: int, ov: dict | None = None) -> Decision:
    """The path of a matmul of ``batch`` rows: the override's ``path`` where it can run, else
    ``dense`` from the override's ``dense_from`` on, else the table."""
    ov = override() if ov is None else ov
    forced = ov.get("path")
    if forced is not None and can_run(forced, layout, batch):
        return Decision(forced, -1, f"{ENV} path={forced}")
    dense_from = ov.get("dense_from")
    if dense_from is not None and layout != "none":
        if dense_from and batch >= dense_from:
            return Decision("dense", -1, f"{ENV} dense_from={dense_from}")
        # below the forced threshold (or never dense): the table's fused choice
        i, e = lookup_entry(gpu, layout, m, n, min(batch, _last_fused(gpu, layout, m, n)))
        return Decision(e.path, i, e.note)
    i, e = lookup_entry(gpu, layout, m, n, batch)
    return Decision(e.path, i, e.note)


def _last_fused(gpu: str, layout: str, m: int, n: int) -> int:
    """The largest batch the table gives a fused path (1 when none)."""
    sc = shape_class(m, n)
    last = 1
    for e in PLAN:
        if e.gpu in (ANY, gpu) and e.layout == layout and e.path != "dense":
            if e.shapes is ANY or sc in e.shapes:
                last = max(last, e.hi)
    return last


def dense_from(gpu: str, layout: str, m: int, n: int) -> int:
    """The smallest batch the plan (with the override) sends to ``dense``."""
    for b in range(1, 4097):
        if decide(gpu, layout, m, n, b).path == "dense":
            return b
    return 0


# --- C header ---------------------------------------------------------------------------------
_C_PATH = {p: i for i, p in enumerate(PATHS)}


def c_header() -> str:
    """``kernels/spqr_launch_plan.h``: the table and its lookup as plain C."""
    lines = [
        "/* spqr_launch_plan.h -- GENERATED by `python -m spqr_format.gpu.plan --header`",
        " * from spqr_format/gpu/plan.py (the launch plan; see its docstring).  Do not edit:",
        " * tests/test_launch_plan.py checks that this file is what plan.py generates and that",
        " * its lookup agrees with plan.decide.  Plain C99, no CUDA. */",
        "#ifndef SPQR_LAUNCH_PLAN_H",
        "#define SPQR_LAUNCH_PLAN_H",
        "",
        "#include <stdint.h>",
        "#include <stdlib.h>",
        "#include <string.h>",
        "",
    ]
    for p, i in _C_PATH.items():
        lines.append(f"#define SPQR_PATH_{p.upper()} {i}")
    for i, lay in enumerate(LAYOUTS):
        lines.append(f"#define SPQR_LAYOUT_{lay.upper()} {i}")
    for i, sc in enumerate(SHAPE_CLASSES):
        lines.append(f"#define SPQR_SHAPE_{sc.upper()} {i}")
    for i, g in enumerate(GPU_CLASSES):
        lines.append(f"#define SPQR_GPU_{g.upper()} {i}")
    lines += [
        f"#define SPQR_PLAN_SMALL_MAX_WEIGHTS ((int64_t){SMALL_MAX_WEIGHTS})",
        f"#define SPQR_PLAN_LARGE_MIN_WEIGHTS ((int64_t){LARGE_MIN_WEIGHTS})",
        f"#define SPQR_PLAN_LARGE_MIN_ROWS ((int64_t){LARGE_MIN_ROWS})",
        f"#define SPQR_PLAN_BATCH_MAX {BATCH_MAX}",
        f'#define SPQR_PLAN_ENV "{ENV}"',
        "",
        "/* gpu: GPU class or -1 (any); shapes: bit mask of shape classes (7: any) */",
        "typedef struct {",
        "  int gpu, layout, shapes, lo, hi, path;",
        "} spqr_plan_entry;",
        "",
        "static const spqr_plan_entry spqr_plan_table[] = {",
    ]
    for e in PLAN:
        gpu = -1 if e.gpu is ANY else GPU_CLASSES.index(e.gpu)
        mask = 7 if e.shapes is ANY else sum(1 << SHAPE_CLASSES.index(s) for s in e.shapes)
        lines.append(
            f"    {{{gpu}, {LAYOUTS.index(e.layout)}, {mask}, {e.lo}, {e.hi}, "
            f"{_C_PATH[e.path]}}}, /* {e.note} */"
        )
    lines += [
        "};",
        "#define SPQR_PLAN_ENTRIES ((int)(sizeof(spqr_plan_table) / sizeof(spqr_plan_table[0])))",
        "",
        "/* plan.gpu_class: cc = major * 10 + minor */",
        "static inline int spqr_plan_gpu_class(int cc) {",
        "  return cc >= 90 && cc < 100 ? SPQR_GPU_HOPPER : SPQR_GPU_ANY;",
        "}",
        "",
        "/* plan.shape_class */",
        "static inline int spqr_plan_shape_class(int64_t m, int64_t n) {",
        "  const int64_t w = m * n;",
        "  if (w <= SPQR_PLAN_SMALL_MAX_WEIGHTS) return SPQR_SHAPE_SMALL;",
        "  if (w >= SPQR_PLAN_LARGE_MIN_WEIGHTS ||",
        "      (m >= SPQR_PLAN_LARGE_MIN_ROWS &&",
        "       w >= SPQR_PLAN_LARGE_MIN_ROWS * SPQR_PLAN_LARGE_MIN_ROWS))",
        "    return SPQR_SHAPE_LARGE;",
        "  return SPQR_SHAPE_MEDIUM;",
        "}",
        "",
        "/* The override (SPQR_GPU_PLAN) items the C launcher uses; other keys plan.py knows are",
        " * skipped, unknown keys or bad values make spqr_plan_parse return -1.  -1: not set. */",
        "typedef struct {",
        "  int path, dense_from, tcv_ks, tc_splits, finish_lanes;",
        "} spqr_plan_override;",
        "",
        "static inline int spqr_plan_parse(const char* text, spqr_plan_override* o) {",
        "  static const char* const paths[] = {" + ", ".join(f'"{p}"' for p in PATHS) + "};",
        "  static const char* const other[] = {"
        + ", ".join(f'"{k}"' for k in OVERRIDE_KEYS if k not in C_KEYS)
        + "};",
        "  o->path = o->dense_from = o->tcv_ks = o->tc_splits = o->finish_lanes = -1;",
        "  if (text == NULL) return 0;",
        "  const char* p = text;",
        "  while (*p) {",
        "    const char* end = strchr(p, ',');",
        "    const size_t len = end ? (size_t)(end - p) : strlen(p);",
        "    char item[256];",
        "    if (len >= sizeof item) return -1;",
        "    memcpy(item, p, len);",
        "    item[len] = 0;",
        "    p += len + (end ? 1 : 0);",
        "    char* s = item;",
        "    while (*s == ' ') ++s;",
        "    if (!*s) continue;",
        "    char* eq = strchr(s, '=');",
        "    if (!eq) return -1;",
        "    char* k_end = eq;",
        "    while (k_end > s && k_end[-1] == ' ') --k_end;",
        "    *k_end = 0;",
        "    char* v = eq + 1;",
        "    while (*v == ' ') ++v;",
        "    size_t vl = strlen(v);",
        "    while (vl > 0 && v[vl - 1] == ' ') v[--vl] = 0;",
        '    if (strcmp(s, "path") == 0) {',
        "      int found = -1;",
        "      for (int i = 0; i < (int)(sizeof paths / sizeof paths[0]); ++i)",
        "        if (strcmp(v, paths[i]) == 0) found = i;",
        "      if (found < 0) return -1;",
        "      o->path = found;",
        "      continue;",
        "    }",
        "    int known = 0;",
        "    for (int i = 0; i < (int)(sizeof other / sizeof other[0]); ++i)",
        "      if (strcmp(s, other[i]) == 0) known = 1;",
        "    if (known) continue;",
        "    char* tail = NULL;",
        "    const long x = strtol(v, &tail, 10);",
        "    if (!*v || (tail && *tail)) return -1;",
        f'    if (strcmp(s, "dense_from") == 0 && x >= 0 && x <= {BATCH_MAX})',
        "      o->dense_from = (int)x;",
        '    else if (strcmp(s, "tcv_ks") == 0 && x >= 1 && x <= 8) o->tcv_ks = (int)x;',
        '    else if (strcmp(s, "tc_splits") == 0 && x >= 1 && x <= (1L << 20))',
        "      o->tc_splits = (int)x;",
        '    else if (strcmp(s, "finish_lanes") == 0 && (x == 4 || x == 8 || x == 16 || x == 32))',
        "      o->finish_lanes = (int)x;",
        "    else",
        "      return -1;",
        "  }",
        "  return 0;",
        "}",
        "",
        "/* plan.can_run */",
        "static inline int spqr_plan_can_run(int path, int layout, int batch) {",
        "  if (layout == SPQR_LAYOUT_NONE) return path == SPQR_PATH_DENSE;",
        "  if (layout == SPQR_LAYOUT_TC) {",
        "    if (path == SPQR_PATH_TCG) return batch <= 2;",
        "    if (path == SPQR_PATH_TCV) return batch <= 8;",
        "    return path == SPQR_PATH_TC_SPLIT || path == SPQR_PATH_DENSE;",
        "  }",
        "  if (path == SPQR_PATH_MV1) return batch == 1;",
        "  if (path == SPQR_PATH_SIMT) return batch >= 2;",
        "  return path == SPQR_PATH_DENSE;",
        "}",
        "",
        "static inline int spqr_plan_table_path(int gpu, int layout, int sc, int batch) {",
        "  for (int i = 0; i < SPQR_PLAN_ENTRIES; ++i) {",
        "    const spqr_plan_entry* e = &spqr_plan_table[i];",
        "    if ((e->gpu < 0 || e->gpu == gpu) && e->layout == layout && e->lo <= batch &&",
        "        batch <= e->hi && (e->shapes >> sc & 1))",
        "      return e->path;",
        "  }",
        "  return SPQR_PATH_DENSE;",
        "}",
        "",
        "/* plan.decide: the path of a matmul of `batch` rows (o: the parsed override or NULL) */",
        "static inline int spqr_plan_decide(int gpu, int layout, int64_t m, int64_t n, int batch,",
        "                                   const spqr_plan_override* o) {",
        "  const int sc = spqr_plan_shape_class(m, n);",
        "  if (o && o->path >= 0 && spqr_plan_can_run(o->path, layout, batch)) return o->path;",
        "  if (o && o->dense_from >= 0 && layout != SPQR_LAYOUT_NONE) {",
        "    if (o->dense_from > 0 && batch >= o->dense_from) return SPQR_PATH_DENSE;",
        "    int last = 1;",
        "    for (int i = 0; i < SPQR_PLAN_ENTRIES; ++i) {",
        "      const spqr_plan_entry* e = &spqr_plan_table[i];",
        "      if ((e->gpu < 0 || e->gpu == gpu) && e->layout == layout &&",
        "          e->path != SPQR_PATH_DENSE && (e->shapes >> sc & 1) && e->hi > last)",
        "        last = e->hi;",
        "    }",
        "    return spqr_plan_table_path(gpu, layout, sc, batch < last ? batch : last);",
        "  }",
        "  return spqr_plan_table_path(gpu, layout, sc, batch);",
        "}",
        "",
        "#endif /* SPQR_LAUNCH_PLAN_H */",
        "",
    ]
    return "\n".join(lines)


def header_path():
    from pathlib import Path

    return Path(__file__).parent / "kernels" / "spqr_launch_plan.h"


def describe() -> str:
    """The table as text (README / benchmark reports)."""
    rows = []
    for i, e in enumerate(PLAN):
        shapes = "any" if e.shapes is ANY else "/".join(e.shapes)
        hi = "inf" if e.hi == BATCH_MAX else str(e.hi)
        rows.append(
            f"{i:2d}  {e.gpu or 'any':6s} {e.layout:4s} {shapes:12s} {e.lo:>3d}-{hi:<4s} "
            f"{e.path:8s} {e.note}"
        )
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--header" in sys.argv:
        header_path().write_text(c_header())
        print(f"wrote {header_path()}")
    else:
        print(describe())
