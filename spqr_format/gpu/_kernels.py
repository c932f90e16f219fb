"""Kernel selection and launch geometry for ``kernels/spqr_kernels.cu`` (no CuPy at import).

This module is the single place that knows which specialisations exist; the compile test
(``tests/test_kernels_compile.py``) compiles exactly :func:`all_kernel_names`. For C users,
``spqr_host.cu`` mirrors :func:`matvec_geometry` and ``spqr_tc_plan.h`` the tensor-core plan
(``tc_*``, ``tcv_*``, ``tcg_*`` below; ``tests/test_gpu_plan.py`` checks that the two agree).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from spqr_format.gpu import plan

KERNEL_DIR = Path(__file__).parent / "kernels"
KERNEL_SOURCE = KERNEL_DIR / "spqr_kernels.cu"
HEADER = KERNEL_DIR / "spqr_gpu.h"
HOST_SOURCE = KERNEL_DIR / "spqr_host.cu"
TC_SOURCE = KERNEL_DIR / "spqr_tc.cu"

# Options shared by nvcc (compile test, C example) and NVRTC (CuPy).  No fast math: the matvec
# kernels rely on f32 subnormals, the dequantizer on IEEE rounding.
COMPILE_OPTIONS = ("--std=c++17",)
# Kernel choice: the launch plan (plan.py). Its one override, SPQR_GPU_PLAN, also carries the
# experiments' tuning knobs read below (dq_threads, dq_rows, ...) and extra -D options
# (defines=...), the latter read once at import since they must match the compiled module.
EXTRA_DEFINES = tuple(plan.option("defines", ()))
_DEFS = dict(d[2:].partition("=")[::2] for d in EXTRA_DEFINES if d.startswith("-D"))
# Two rows per block: blocks of up to 256 threads while the staged pair rows take at most
# DQ2_SMEM_MAX bytes; above that, up to DQ2_WIDE_SMEM_MAX (two blocks per multiprocessor on an
# H100/H200), blocks of 512 threads (H200: 8192x28672 262 us against 319 with one row per block
# and 332 with 256 threads). Override keys dq2_smem_max, dq2_wide_smem_max.
DQ2_SMEM_MAX = 64 * 1024
DQ2_WIDE_SMEM_MAX = 113 * 1024


def dq2_smem_max() -> int:
    return plan.option("dq2_smem_max", DQ2_SMEM_MAX)


def dq2_wide_smem_max() -> int:
    return plan.option("dq2_wide_smem_max", DQ2_WIDE_SMEM_MAX)


def dq_rows() -> int:
    """Rows per block of the dequantizer with a permutation (2; override dq_rows=1)."""
    return plan.option("dq_rows", 2)


def dq_oct() -> bool:
    """The octet dequantizer (no permutation) where it applies (override dq_oct=0: off)."""
    return bool(plan.option("dq_oct", 1))


MATVEC_BITS = (2, 3, 4, 8)  # bit widths with a fused matvec kernel
DEQUANT_BITS = (2, 3, 4, 8)  # specialised dequantizers; others use the generic one (B = 0)
# batch columns per block of spqr_matvec_* (larger batches: several slices of 4); batch 1 always
# takes the row sweep spqr_mv1_* (the old NB = 1 kernel was 1.9x slower, H100 session 1: deleted)
NB_CHOICES = (2, 4)
ROWS_PER_BLOCK = {2: 4, 4: 4}
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
OUT_NAMES = {0: "f32", 1: "f16", 2: "bf16"}

log = logging.getLogger("spqr_format.gpu")


def stats_tag(stats_bits: int) -> str:
    return "q" if stats_bits else "h"


def matvec_supported(bits: int, group_size: int) -> bool:
    """Whether a fused matvec kernel exists (else: dequantize + cuBLAS)."""
    return bits in MATVEC_BITS and group_size % 16 == 0


def pick_nb(batch: int) -> int:
    for nb in NB_CHOICES:
        if batch <= nb:
            return nb
    return NB_CHOICES[-1]


def matvec_name(bits: int, stats_bits: int, nb: int) -> str:
    return f"spqr_matvec_b{bits}_{stats_tag(stats_bits)}_nb{nb}"


def dequant_name(bits: int, stats_bits: int, out_code: int) -> str:
    b = bits if bits in DEQUANT_BITS else 0
    return f"spqr_dequant_b{b}_{stats_tag(stats_bits)}_{OUT_NAMES[out_code]}"


def dequant_row_name(bits: int, stats_bits: int, out_code: int) -> str:
    b = bits if bits in DEQUANT_BITS else 0
    return f"spqr_dequant_row_b{b}_{stats_tag(stats_bits)}_{OUT_NAMES[out_code]}"


def dequant_row_geometry(n: int, smem: int = 0) -> int:
    """Threads per block of the whole-row dequantizer (one block per row, thread per 16 columns):
    128, or 256 when a row's shared memory (``smem`` bytes) limits the blocks per multiprocessor
    (measured on an H200: more rows in flight beat more threads per row); override key
    dq_threads."""
    cap = plan.option("dq_threads", 0) // 32 * 32 or (256 if smem > 28 * 1024 else 128)
    units = -(-n // 16)  # 16-column units (one per thread)
    return max(32, min(cap, 32 * -(-units // 32)))


def dequant_row2_name(bits: int, stats_bits: int, out_code: int) -> str:
    """Two-row dequantizer (f16/bf16 output, bits in DEQUANT_BITS, g % 16 == 0, permutation)."""
    return f"spqr_dequant_row2_b{bits}_{stats_tag(stats_bits)}_{OUT_NAMES[out_code]}"


def dequant_row2_smem(n: int) -> int:
    """Shared memory of the two-row dequantizer: (row 0, row 1) u32 pairs in 128-byte blocks."""
    pairs = -(-n // 4)  # 4-column pieces, 8 per 128-byte block
    return 128 * -(-pairs // 8)


def dequant_row2_threads(n: int, smem: int) -> int:
    """Threads per block of the two-row dequantizer for ``smem`` bytes of staged rows."""
    return 512 if smem > dq2_smem_max() else max(64, dequant_row_geometry(n, smem))


def dequant_row2_supported(bits: int, group_size: int, out_code: int) -> bool:
    return dq_rows() == 2 and bits in DEQUANT_BITS and group_size % 16 == 0 and out_code in (1, 2)


def dequant_oct_name(bits: int, stats_bits: int, out_code: int) -> str:
    """Octet dequantizer: two rows per block, no permutation (spqr_gpu.h)."""
    return f"spqr_dequant_oct_b{bits}_{stats_tag(stats_bits)}_{OUT_NAMES[out_code]}"


def dequant_oct_supported(bits: int, group_size: int, out_code: int, n: int) -> bool:
    return (
        dq_oct()
        and bits in DEQUANT_BITS
        and group_size % 16 == 0
        and out_code in (1, 2)
        and n < (1 << 28)  # 32-bit column and bit arithmetic
    )


DQO_STAGES = int(_DEFS.get("SPQR_DQO_STAGES") or 4)  # must match the kernel's define


def dequant_oct_geometry(n: int) -> int:
    """Threads per block of the octet dequantizer: 128, or 256 for rows of more than 8,192
    columns (measured on an H200: 8192x28672 239 us against 303 with 128, 4096x4096 15.7 against
    17.8 with 256); override key dqo_threads."""
    return plan.option("dqo_threads", 0) // 32 * 32 or (256 if n > 8192 else 128)


def dequant_oct_smem(bits: int, stats_bits: int, threads: int) -> int:
    """Shared memory of the octet dequantizer: every warp's ring of DQO_STAGES iterations of
    loads, per lane two octets' code words and the statistics words."""
    nword = 2 * (3 if bits == 8 else 2) + (4 if stats_bits else 1)
    return (threads // 32) * DQO_STAGES * nword * 32 * 4


def dequant_outliers_name(out_code: int) -> str:
    return f"spqr_dequant_outliers_{OUT_NAMES[out_code]}"


def all_kernel_names() -> list[str]:
    """Every entry point the Python layer can launch."""
    names = ["spqr_prepare_x", "spqr_mv1_finish"]
    for b in MATVEC_BITS:
        for sb in (0, 3):
            for nb in NB_CHOICES:
                names.append(matvec_name(b, sb, nb))
            names.append(mv1_name(b, sb))
            names.append(mv1_name(b, sb, tall=True))
    for b in (0, *DEQUANT_BITS):
        for sb in (0, 3):
            for oc in OUT_NAMES:
                names.append(dequant_name(b if b else 1, sb, oc))
                names.append(dequant_row_name(b if b else 1, sb, oc))
                if b and oc:
                    names.append(dequant_row2_name(b, sb, oc))
                    names.append(dequant_oct_name(b, sb, oc))
    for oc in OUT_NAMES:
        names.append(dequant_outliers_name(oc))
    return sorted(set(names))


def nsub_of(n: int) -> int:
    return -(-n // 32)


def mv1_splits(n: int) -> int:
    """Column splits of the batch-1 row-sweep kernel (256 sub-chunks = 8192 columns each)."""
    return -(-nsub_of(n) // 256)


def workspace_floats(n: int, batch: int, m: int = 0) -> tuple[int, int, int]:
    """(ldxs, ldx16, total f32 count) of the matvec workspace for ``batch`` vectors.

    Layout: xs [batch][ldxs], x16 [batch][ldx16], then (batch 1 only) part [splits][m].
    """
    ns = nsub_of(n)
    ldxs, ldx16 = 32 * ns, 2 * ns
    extra = mv1_splits(n) * m if batch == 1 else 0
    return ldxs, ldx16, batch * (ldxs + ldx16) + extra


def mv1_name(bits: int, stats_bits: int, tall: bool = False) -> str:
    return f"spqr_mv1{'r16' if tall else ''}_b{bits}_{stats_tag(stats_bits)}"


MV1_ROWS = int(_DEFS.get("SPQR_MV1_RB") or 8)  # rows per block of spqr_mv1_*
MV1_TALL_ROWS = 16  # rows per block of spqr_mv1r16_*
MV1_TALL_MIN_THREADS = 100_000  # H100 measurement: below this many threads 8 rows is faster


def mv1_plan(m: int, n: int) -> tuple[bool, int, int, int]:
    """(tall, rows per block, column splits, threads per block) of the batch-1 kernel."""
    nsplit = mv1_splits(n)
    threads = 32 * -(-min(nsub_of(n), 256) // 32)
    tall = -(-m // MV1_TALL_ROWS) * nsplit * threads >= MV1_TALL_MIN_THREADS
    return tall, (MV1_TALL_ROWS if tall else MV1_ROWS), nsplit, threads


def matvec_geometry(
    m: int, n: int, batch: int, sm_count: int = 132, outliers: bool = False
) -> tuple[int, tuple[int, int], int]:
    """(nb, grid, block) of the matvec launch.

    R rows per block; W dense warps per block split the columns of those rows, plus one warp
    for the outlier corrections when the tensor has outliers. W is chosen so that about 16
    warps per multiprocessor exist in all (enough loads in flight), at most 8 and at most one
    warp per 32 sub-chunks of a row: tall matrices get W = 1, short ones up to 8.
    """
    nb = pick_nb(batch)
    r = ROWS_PER_BLOCK[nb]
    row_groups = -(-m // r)
    slices = -(-batch // nb)
    want = -(-(WARPS_PER_SM * sm_count) // (row_groups * slices))
    warps = max(1, min(8, want, -(-nsub_of(n) // 32)))
    grid = (row_groups, slices)
    return nb, grid, 32 * (warps + (1 if outliers else 0))


WARPS_PER_SM = int(_DEFS.get("SPQR_WARPS_PER_SM") or 16)


# --- tensor-core kernels (spqr_tc.cu, GPU tile layout) -------------------------------------
TC_BITS = (2, 3, 4)
TC_STATS_BITS = (1, 2, 3, 4)
TC_NT = (1, 2, 4, 8)  # n-tiles of 8 batch columns
TC_MAX_BATCH = 8 * TC_NT[-1]
TC_WARPS = int(_DEFS.get("SPQR_TC_WARPS") or 8)  # warps per block (SPQR_TC_WARPS)


def tc_nt(batch: int) -> int:
    for nt in TC_NT:
        if batch <= 8 * nt:
            return nt
    return TC_NT[-1]


def tc_name(bits: int, stats_bits: int, nt: int) -> str:
    return f"spqr_tc_b{bits}_s{stats_bits}_nt{nt}"


def tcv_name(bits: int, stats_bits: int) -> str:
    """The one-kernel tensor-core path for batch <= 8 (``spqr_tcv_*``)."""
    return f"spqr_tcv_b{bits}_s{stats_bits}"


def tcg_name(bits: int, stats_bits: int) -> str:
    """The group-separated variant of ``spqr_tcv_*`` for batch <= 2 (``spqr_tcg_*``)."""
    return f"spqr_tcg_b{bits}_s{stats_bits}"


TCV_SMEM = TC_WARPS * (4 * 32 + 16 * 8) * 4  # static shared memory of spqr_tcv_* (red, osm)
# spqr_tcg_* (each batch column of each of a round's 4 groups in its own mma column, 8 in all)
# takes slices of at most TCG_MAX_BATCH columns on "large" shapes (plan.shape_class). H200,
# session 7, us, batch 1 / 2, tcg vs tcv: faster on 8192x28672 44.9 vs 49.7, 28672x8192 46.8
# vs 55.0, 11008x4096 17.6 vs 19.6 / 20.8 vs 22.0, 8192x8192 18.5 vs 19.0 / 20.9 vs 20.7,
# 6144x6144 14.9 vs 15.7 / 17.5 vs 17.9, 5120x5120 13.3 vs 14.0 / 15.7 vs 15.9, level on
# 8192x4096; slower on 4096x11008 15.7 vs 15.3 / 18.7 vs 17.9, 4096x8192 14.2 vs 13.4,
# 4096x4096 10.8 vs 10.5 (its x' group sums cost a fixed ~0.5 us).
# spqr_tcv_* takes every other slice of up to 8 columns (session 9: faster than the k-split
# path up to 8 columns on all six benchmark shapes but 11008x4096, 1-3 % slower there).
TCG_MAX_BATCH = 2
# tcv_ks: a warp's fixed cost (first loads, outlier corrections, block sum) in chunks
TCV_WARP_OVERHEAD_CHUNKS = 2


def tcv_gp_log2(batch: int) -> int:
    """log2 of the batch columns (a power of two >= batch, <= 8) spqr_tcv_* stages."""
    return max(0, batch - 1).bit_length()


def tcv_ks(rb: int, nc: int, sm_count: int, resident: int) -> int:
    """log2 of the k-slices per row block of ``spqr_tcv_*`` (KS in 1, 2, 4, 8 with at most
    ``TC_WARPS`` and at most ``nc``): the fewest (waves of blocks) x (chunks per warp plus a
    warp's fixed cost, ``TCV_WARP_OVERHEAD_CHUNKS``), more slices on a tie. H200, session 6:
    the fastest k-slicing at batch 1 on all nine shapes measured (1024x4096 to 57344x8192),
    within 3 % of the fastest at batch 4. Override key tcv_ks (1..8)."""
    slots = max(1, resident * sm_count)
    best, best_cost = 0, None
    k = 0
    while (1 << k) <= min(TC_WARPS, max(1, nc)):
        ks = 1 << k
        blocks = -(-rb // (TC_WARPS // ks))
        cost = -(-blocks // slots) * (-(-nc // ks) + TCV_WARP_OVERHEAD_CHUNKS)
        if best_cost is None or cost <= best_cost:
            best, best_cost = k, cost
        k += 1
    override = plan.option("tcv_ks", 0)
    if override:
        best = min(max(override, 1), TC_WARPS).bit_length() - 1
    return best


def tc_kernel_names() -> list[str]:
    names = ["spqr_tc_prepare_x", *(tc_finish_name(p) for p in (1, 2, 4, 8, 16, 32, 64))]
    for b in TC_BITS:
        for sb in TC_STATS_BITS:
            names.append(tcv_name(b, sb))
            names.append(tcg_name(b, sb))
            for nt in TC_NT:
                names.append(tc_name(b, sb, nt))
    return sorted(names)


def tc_smem_bytes(nt: int, mpc: int) -> int:
    """Dynamic shared memory of the tensor-core kernel: two buffers of a chunk's B fragments."""
    return 2 * nt * mpc * 32 * 8


def tc_resident_blocks(regs: int, smem: int) -> int:
    """Blocks of the tensor-core kernel one multiprocessor holds (sm_80/sm_90 limits: 64K
    registers allocated per warp in 256-register units, 64 warps, 32 blocks, 227 KiB of
    shared memory with 1 KiB reserved per block)."""
    warp_regs = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = 65536 // (warp_regs * TC_WARPS)
    by_smem = (227 * 1024) // (smem + 1024)
    return max(1, min(by_regs, by_smem, 64 // TC_WARPS, 32))


def tc_splits(
    rb: int, nc: int, sm_count: int, resident: int, nt: int, chunk_bytes: int
) -> tuple[int, int]:
    """(splits, chunks per split) of the tensor-core kernel for ``rb`` row blocks, ``nc``
    chunks, ``nt`` n-tiles and ``chunk_bytes`` bytes of tile layout per warp and chunk.

    Among 1..16 splits (each at least 4 chunks) the one of least estimated cost, the fewest on
    a tie (integer arithmetic, mirrored by spqr_tc_plan.h):

        waves * per * slots * TC_WARPS * chunk_bytes * 2  +  splits * 80 * nt * 16 * rb

    The first term is the chunks on the critical path (``waves`` of the grid over the
    machine's ``resident * sm_count`` block slots, ``per`` chunks each), a chunk step costed
    as the bytes every resident warp streams at about half the bandwidth (each warp is bound
    by latency, so a step takes as long however full the machine is); the second, the f32
    partial sums written and read back (8 nt bytes per row and split, at about 80 % of the
    bandwidth). H200, session 9 (.device/6): the previous rule (best slot utilisation, at
    most n / (256 nt) splits) took 7 splits on 28672x8192 at batch 32 (145.7 us against 128.4
    with 1) and 2 on 4096x4096 at batch 64 (41.7 us against 33.9 with 4); this one picks 1 and
    4 there and the same as before on the other benchmark cases. Override key tc_splits.
    """
    blocks = -(-rb // TC_WARPS)
    slots = max(1, resident * sm_count)
    best, best_cost = 1, None
    for s in range(1, 17):
        if s > 1 and -(-nc // s) < 4:
            break
        per = -(-nc // s)
        real = -(-nc // per)
        waves = -(-(blocks * real) // slots)
        cost = waves * per * slots * TC_WARPS * chunk_bytes * 2 + real * 80 * nt * 16 * rb
        if best_cost is None or cost < best_cost:
            best, best_cost = real, cost
    override = plan.option("tc_splits", 0)
    if override:
        best = max(1, min(override, nc))
    per = -(-nc // best)
    return -(-nc // per), per


def tc_finish_name(pitch: int) -> str:
    """The finish kernel for x'^T pitch ``pitch`` (tc_xt_pitch): pitches up to 8 have their own;
    a larger one (a multiple of 8) takes the one for the next power of two."""
    return f"spqr_tc_finish_p{1 << (max(1, pitch) - 1).bit_length()}"


def tc_xt_pitch(batch: int) -> int:
    """Batch columns per row of x'^T: a power of two up to 8, else a multiple of 8."""
    if batch <= 8:
        return 1 << (batch - 1).bit_length()
    return 8 * -(-batch // 8)


# finish kernel: four rows per warp (batch <= 4) from this many rows, with at most this many
# outlier entries per row on average (H100 measurements, session 2: one row per warp is
# faster on short matrices, which it spreads over more blocks, and on long rows)
TC_QUAD_MIN_ROWS = 16384
TC_QUAD_MAX_PER_ROW = 128
# finish kernel, pitch 8 and 16: the fewest lanes per row (4 or 8) that still gives this many
# warps per multiprocessor, else 16 (override key finish_lanes: force 4, 8, 16 or 32). H200,
# session 6 (.device/2): the best or within 3 % of it on the six benchmark shapes at batch 8
# and 16; one row per warp (32, the session-5 scheme) was up to 20 % slower.
TC_LANES_WARPS_PER_SM = 16


def tc_finish_lanes(pitch: int, m: int, entries: int, sms: int) -> int:
    """Lanes per row of the finish kernel (its `lanes` argument): 8 (four rows per warp) or 32
    for pitches up to 4; 4, 8 or 16 for pitch 8 and 16; 32 above."""
    if pitch < 8:
        quad = m >= TC_QUAD_MIN_ROWS and entries <= TC_QUAD_MAX_PER_ROW * m
        return 8 if quad else 32
    if pitch > 16:
        return 32
    forced = plan.option("finish_lanes", 0)
    if forced in (4, 8, 16, 32):
        return forced
    for lanes in (4, 8):
        if m * lanes >= 32 * TC_LANES_WARPS_PER_SM * sms:
            return lanes
    return 16


# x'^T staged in shared memory by the finish kernel up to this size (0: never)
TC_FINISH_SMEM_MAX = 96 * 1024


def tc_workspace_layout(m: int, n: int, kt: int, batch: int, splits: int) -> tuple[int, int, int]:
    """Byte offsets (x'^T, partial sums, end) of the tensor-core workspace, which starts with
    the x' fragments (NT * KT * 32 * 8 bytes); every region 16-byte aligned. spqr_tcg_* (no
    partial sums) keeps its group sums of x' (KT * 2 f32) where the partial sums go."""
    nb = min(batch, TC_MAX_BATCH)
    nt = tc_nt(nb)
    m16 = 16 * -(-m // 16)
    xt = nt * kt * 32 * 8
    part = xt + 16 * -(-(n * tc_xt_pitch(nb) * 2) // 16)
    return xt, part, part + max(splits * nt * 8 * m16 * 4, kt * 2 * 4)


def tc_workspace_bytes(m: int, n: int, kt: int, batch: int, splits: int) -> int:
    return tc_workspace_layout(m, n, kt, batch, splits)[2]


# --- channel_mixed (spqr_cmpq.cu, CMPQ chunk layout: codec/cmpq_layout.py) ------------------
CMPQ_SOURCE = KERNEL_DIR / "spqr_cmpq.cu"
CMPQ_NB = (1, 2, 4, 8, 16)  # batch columns per matmul launch (larger batches: slices of 16)
CMPQ_MAX_BATCH = CMPQ_NB[-1]
CMPQ_ROWS = 256  # rows per block of spqr_cmpq_mm_* / spqr_cmpq_mv1_* (SPQR_CMPQ_ROWS)
CMPQ_BLOCKS_PER_SM = 4  # override key cmpq_blocks_per_sm
CMPQ_DQ_ROWS = 32  # rows per step of spqr_cmpq_dequant_* (one per lane)
CMPQ_DQ_COLS = 256  # output columns per block of spqr_cmpq_dequant_* (SPQR_CMPQ_DQ_COLS)


def cmpq_dq_name(out_name: str) -> str:
    """The channel_mixed dequantizer of one output dtype (spqr_cmpq_dequant_*: lane = row,
    coalesced code words, a shared tile written out row by row)."""
    return f"spqr_cmpq_dequant_{out_name}"


def cmpq_dq_rows_per_block(m: int) -> int:
    """Rows per block (grid.y) of spqr_cmpq_dequant_*: a multiple of CMPQ_DQ_ROWS, with at
    most 65535 blocks down the rows."""
    need = -(-m // 65535)
    return CMPQ_DQ_ROWS * max(1, -(-need // CMPQ_DQ_ROWS))


CMPQ_TC_ROWS = 128  # rows per block of spqr_cmpq_tc_* (SPQR_CMPQ_TC_ROWS), 128 threads
CMPQ_BITS = range(1, 9)  # widths of the per-width kernels spqr_cmpq_mv1_b*, spqr_cmpq_tc_b*


def cmpq_nb(batch: int) -> int:
    for nb in CMPQ_NB:
        if batch <= nb:
            return nb
    return CMPQ_NB[-1]


def cmpq_target_tiles(m: int, sm_count: int, rows: int = CMPQ_ROWS) -> int:
    """Column tiles wanted so that (row blocks of ``rows``) x (k-splits) fills the GPU
    (CMPQ_BLOCKS_PER_SM blocks per multiprocessor; every CMPQ kernel is sized for 4)."""
    row_tiles = -(-m // rows)
    per_sm = plan.option("cmpq_blocks_per_sm", CMPQ_BLOCKS_PER_SM)
    return max(1, -(-(per_sm * sm_count) // row_tiles))


def cmpq_path(batch: int, in_code: int, table_rows: int) -> str:
    """The kernels of one slice of up to 16 rows: ``mv1`` (batch 1, spqr_cmpq_mv1_b*), ``tc``
    (batch 2-16, f16 x, R = 0 or a multiple of 16: spqr_cmpq_tc_b*_nt*, whose 16-row m-tiles
    must each lie in one table block) or ``mm`` (spqr_cmpq_mm_nb*: every other case).
    This second design is the default (on an H100 at 2.5 bits/weight on the 70B shapes it took
    0.88-0.92x the time of the first at batch 1 and 0.58-0.61x at batch 16, every GPU test
    passing); the override cmpq_v2=0 sends every slice to ``mm``, the first design."""
    if not plan.option("cmpq_v2", 1):
        return "mm"
    if batch == 1:
        return "mv1"
    if in_code == 1 and table_rows % 16 == 0:
        return "tc"
    return "mm"


def cmpq_mv1_name(bits: int) -> str:
    return f"spqr_cmpq_mv1_b{bits}"


def cmpq_tc_name(bits: int, nt: int) -> str:
    return f"spqr_cmpq_tc_b{bits}_nt{nt}"


# From this batch on a channel_mixed matmul dequantizes into the workspace and calls cuBLAS
# instead of running the fused kernels on slices of 16 rows (whose time grows with the number
# of slices); override key cmpq_dense_from (0: never). H100, 2.5 bits/weight, 70B shapes
# (gpu-h100-2026-12-07.md, same run): fused 359 / 329 us at batch 16 and 1414 / 1310 at 64
# (~21 us per row more), tiled dequantize 960 / 948 + cuBLAS 165: equal near batch 52.
CMPQ_DENSE_FROM = 52


def cmpq_dense(batch: int, in_code: int) -> bool:
    """Whether a channel_mixed matmul of ``batch`` rows of x in dtype ``in_code`` takes
    dequantize + cuBLAS. f16 x only: W in f16 is exact, while W rounded to bf16 (2^-8 per
    product) would leave SPEC C-7.6's bound and an f32 GEMM is slower than the fused kernels.
    (CMPQ_DENSE_FROM: where the measured times cross.)"""
    d = plan.option("cmpq_dense_from", CMPQ_DENSE_FROM)
    return in_code == 1 and d > 0 and batch >= d


def cmpq_splits(m: int, ntiles: int, sm_count: int) -> int:
    """k-splits (grid.y) of spqr_cmpq_mm_*: each split sums tiles y, y + splits, ..."""
    return max(1, min(ntiles, cmpq_target_tiles(m, sm_count)))


def cmpq_slice(batch: int, in_code: int, table_rows: int) -> tuple[str, int, int]:
    """(path, nb, nbp) of a slice of ``batch`` <= 16 rows: the path (cmpq_path), nb the
    kernels' batch columns (``tc``: 8 * ceil(batch / 8), 8 or 16), nbp those of x' f32, of the
    partial sums and of the finish kernel (cmpq_nb)."""
    nbp = cmpq_nb(batch)
    path = cmpq_path(batch, in_code, table_rows)
    return path, (8 * -(-batch // 8) if path == "tc" else nbp), nbp


def cmpq_launches(m: int, runs, path: str, nb: int, sm_count: int):
    """The host side of GpuCmpqTensor._plan (no CuPy; spqr_cmpq_plan.h mirrors it for the C
    launcher, tests/test_cmpq_layout_c.py compares the two): (tiles int64 [ntiles, 8], groups,
    dynamic shared memory, total splits, rows per block) of ``path`` at ``nb`` batch columns
    for a tensor of ``m`` rows and runs ``runs`` (int64 [nruns, 8]) on ``sm_count``
    multiprocessors. ``groups``: (kernel, first tile, tiles, splits, first split) -- one group
    over all tiles for ``mm``, one per width present for ``mv1`` / ``tc``."""
    import numpy as np

    from spqr_format.codec import cmpq_layout as CL

    info = CL.CmpqLayout.__new__(CL.CmpqLayout)
    info.shape, info.runs = (m, 0), np.asarray(runs, np.int64).reshape(-1, 8)
    rows = CL.TC_ROWS if path == "tc" else CMPQ_ROWS
    target = cmpq_target_tiles(m, sm_count, rows)
    tl, smem = CL.tiles(info, nb, target, tc=path == "tc")
    if path == "mm":
        ranges = [(f"spqr_cmpq_mm_nb{nb}", 0, int(tl.shape[0]))]
    else:
        name = cmpq_mv1_name if path == "mv1" else lambda b: cmpq_tc_name(b, nb // 8)
        ranges = [(name(b), i, c) for b, i, c in CL.width_groups(tl)]
    groups, total = [], 0
    for fn, first, count in ranges:
        splits = cmpq_splits(m, count, sm_count) if path == "mm" else max(1, min(count, target))
        groups.append((fn, first, count, splits, total))
        total += splits
    return tl, groups, smem, total, rows


def cmpq_kernel_names() -> list[str]:
    names = ["spqr_cmpq_prepare_x", "spqr_cmpq_prepare_xf"]
    for nb in CMPQ_NB:
        names += [f"spqr_cmpq_mm_nb{nb}", f"spqr_cmpq_finish_nb{nb}"]
    for b in CMPQ_BITS:
        names += [cmpq_mv1_name(b), cmpq_tc_name(b, 1), cmpq_tc_name(b, 2)]
    for oc in OUT_NAMES.values():
        names += [cmpq_dq_name(oc), f"spqr_cmpq_dequant_outliers_{oc}"]
    return sorted(names)


# --- compiled modules: which NVRTC module holds an entry point -----------------------------
# NVRTC compiles each source as small modules selected by -D options, so that a tensor's first
# call compiles only the kernels it can launch (spqr_tc.cu as one module took ~1 min for sm_90):
#   simt:{B}:{h|q}  spqr_kernels.cu  -DSPQR_SIMT_B=B -DSPQR_SIMT_Q=0|1  (B: dequantizer bits,
#                   0 = generic): spqr_matvec_*, spqr_mv1*_*, spqr_dequant{,_row,_row2,_oct}_*
#   simt:shared     spqr_kernels.cu  -DSPQR_SIMT_SHARED: spqr_prepare_x, spqr_mv1_finish,
#                   spqr_dequant_outliers_*
#   tc:{B}:{SB}     spqr_tc.cu  -DSPQR_TC_B=B -DSPQR_TC_SB=SB: spqr_tc_b*_s*_nt*, spqr_tcv_*,
#                   spqr_tcg_*
#   tc:shared       spqr_tc.cu  -DSPQR_TC_SHARED: spqr_tc_prepare_x, spqr_tc_finish_p*
#   cmpq            spqr_cmpq.cu, whole
# Without these options each source still defines every entry point (spqr_host.cu,
# spqr_tc_host.cu and tests/test_kernels_compile.py build it so); the kernels' code is the same
# either way (each entry point is its own function; the selection only leaves others out).


@dataclass(frozen=True)
class ModuleSpec:
    """One NVRTC module: the concatenated ``sources`` compiled with ``defines``."""

    key: str
    sources: tuple[Path, ...]
    defines: tuple[str, ...] = ()

    def code(self) -> str:
        return "\n".join(s.read_text() for s in self.sources)

    def options(self) -> tuple[str, ...]:
        """NVRTC / nvcc options: COMPILE_OPTIONS, the SPQR_GPU_PLAN defines, the selection."""
        return (*COMPILE_OPTIONS, *EXTRA_DEFINES, *self.defines)


def simt_module(bits: int, stats_bits: int) -> ModuleSpec:
    """The SIMT kernels (matvec, dequantizers) of a tensor of ``bits`` / ``stats_bits``."""
    b = bits if bits in DEQUANT_BITS else 0
    q = 1 if stats_bits else 0
    return ModuleSpec(
        f"simt:{b}:{stats_tag(stats_bits)}",
        (KERNEL_SOURCE,),
        (f"-DSPQR_SIMT_B={b}", f"-DSPQR_SIMT_Q={q}"),
    )


SIMT_SHARED = ModuleSpec("simt:shared", (KERNEL_SOURCE,), ("-DSPQR_SIMT_SHARED",))
TC_SHARED = ModuleSpec("tc:shared", (TC_SOURCE,), ("-DSPQR_TC_SHARED",))
CMPQ_MODULE = ModuleSpec("cmpq", (CMPQ_SOURCE,))


def tc_module(bits: int, stats_bits: int) -> ModuleSpec:
    """spqr_tc_b{bits}_s{stats_bits}_nt*, spqr_tcv_* and spqr_tcg_* of one pair."""
    return ModuleSpec(
        f"tc:{bits}:{stats_bits}",
        (TC_SOURCE,),
        (f"-DSPQR_TC_B={bits}", f"-DSPQR_TC_SB={stats_bits}"),
    )


_TC_PAIR = re.compile(r"spqr_tc[vg]?_b(\d+)_s(\d+)(?:_nt\d+)?")
_SIMT_PAIR = re.compile(
    r"spqr_(?:matvec|mv1|mv1r16|dequant|dequant_row|dequant_row2|dequant_oct)"
    r"_b(\d+)_([hq])(?:_\w+)?"
)


def kernel_module(name: str) -> ModuleSpec:
    """The module that defines the entry point ``name``."""
    if m := _TC_PAIR.fullmatch(name):
        return tc_module(int(m[1]), int(m[2]))
    if name == "spqr_tc_prepare_x" or name.startswith("spqr_tc_finish_p"):
        return TC_SHARED
    if name.startswith("spqr_cmpq_"):
        return CMPQ_MODULE
    if m := _SIMT_PAIR.fullmatch(name):
        b = int(m[1])
        return simt_module(b if b else 1, 0 if m[2] == "h" else 1)
    if name in ("spqr_prepare_x", "spqr_mv1_finish") or name.startswith("spqr_dequant_outliers_"):
        return SIMT_SHARED
    raise ValueError(f"unknown kernel {name!r}")


def every_module() -> list[ModuleSpec]:
    """Every module the Python layer can compile (each entry point of all_kernel_names,
    tc_kernel_names and cmpq_kernel_names in exactly one)."""
    names = all_kernel_names() + tc_kernel_names() + cmpq_kernel_names()
    return sorted({kernel_module(n) for n in names}, key=lambda s: s.key)


def module_kernel_names(spec: ModuleSpec) -> list[str]:
    """The entry points of ``spec``."""
    names = all_kernel_names() + tc_kernel_names() + cmpq_kernel_names()
    return sorted(n for n in names if kernel_module(n) == spec)


def tc_supported_config(bits: int, stats_bits: int) -> bool:
    """Whether (bits, stats_bits) has tensor-core kernels (the tile layout: group size 16 too,
    which a module list for a configuration does not know: these modules then go unused)."""
    return bits in TC_BITS and stats_bits in TC_STATS_BITS


def config_modules(bits: int, stats_bits: int, tensor_cores: bool = True) -> list[ModuleSpec]:
    """The modules a ``bilevel`` tensor of (bits, stats_bits) can launch kernels from."""
    specs = [SIMT_SHARED, simt_module(bits, stats_bits)]
    if tensor_cores and tc_supported_config(bits, stats_bits):
        specs += [TC_SHARED, tc_module(bits, stats_bits)]
    return specs


def precompile_modules(
    configs=None, tensor_cores: bool = True, cmpq: bool = False
) -> list[ModuleSpec]:
    """The modules :func:`spqr_format.gpu.precompile` builds for ``configs`` ((bits,
    stats_bits) pairs; default: those of the encoder presets; ``"all"``: every module, cmpq
    included), each once, in a fixed order (the larger per-pair modules first, so that
    parallel workers finish together)."""
    if configs is None:
        configs = preset_configs()
    seen: dict[str, ModuleSpec] = {}
    if configs == "all":
        configs, cmpq = (), True
        seen = {s.key: s for s in every_module()}
    for bits, stats_bits in configs:
        for spec in config_modules(int(bits), int(stats_bits), tensor_cores):
            seen.setdefault(spec.key, spec)
    if cmpq:
        seen.setdefault(CMPQ_MODULE.key, CMPQ_MODULE)
    order = ("tc", "simt", "cmpq")
    return sorted(
        seen.values(),
        key=lambda s: (":shared" in s.key, order.index(s.key.split(":")[0]), s.key),
    )


def preset_configs() -> list[tuple[int, int]]:
    """(bits, stats_bits) of every encoder preset (spqr_format.codec.presets), sorted."""
    from spqr_format.codec.presets import PRESETS

    return sorted({(c.bits, c.stats_bits) for c in PRESETS.values()})
