/* spqr_tc_plan.h -- the launch plan of the tensor-core path as plain C (no CUDA): which kernel
 * takes a batch slice, the k-split, the k-slicing of the one-kernel path, the outlier pass's
 * lanes per row.  spqr_tc_host.cu calls these with the device's numbers; each function mirrors
 * the function of spqr_format/gpu/_kernels.py named in its comment, and tests/test_gpu_plan.py
 * compiles this header with the host C compiler and checks that the two agree, so the C
 * launcher and the Python layer pick the same kernels (and give bit-identical results).
 *
 * Which path takes a slice (one kernel, group-separated, k-split) is the launch plan,
 * spqr_launch_plan.h (generated from spqr_format/gpu/plan.py).  Overrides are the parsed
 * items of SPQR_GPU_PLAN (spqr_plan_parse; 0 or -1: automatic). */
#ifndef SPQR_TC_PLAN_H
#define SPQR_TC_PLAN_H

#include <stdint.h>

#define SPQR_PLAN_WARPS 8          /* warps per block of the tile kernels (SPQR_TC_WARPS) */
#define SPQR_PLAN_MAX_BATCH 64     /* _kernels.TC_MAX_BATCH */
#define SPQR_PLAN_QUAD_MIN_ROWS 16384 /* _kernels.TC_QUAD_MIN_ROWS */
#define SPQR_PLAN_QUAD_MAX_PER_ROW 128 /* _kernels.TC_QUAD_MAX_PER_ROW */
#define SPQR_PLAN_LANES_WARPS_PER_SM 16 /* _kernels.TC_LANES_WARPS_PER_SM */
#define SPQR_PLAN_TCV_OVERHEAD 2     /* _kernels.TCV_WARP_OVERHEAD_CHUNKS */
/* static shared memory of spqr_tcv_* / spqr_tcg_* (_kernels.TCV_SMEM) */
#define SPQR_PLAN_TCV_SMEM (SPQR_PLAN_WARPS * (4 * 32 + 16 * 8) * 4)

static inline int64_t spqr_plan_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* _kernels.tc_nt: n-tiles of 8 batch columns for a slice of nb <= 64 columns */
static inline int spqr_plan_nt(int nb) { return nb <= 8 ? 1 : nb <= 16 ? 2 : nb <= 32 ? 4 : 8; }

/* _kernels.tc_xt_pitch: batch columns per row of x'^T */
static inline int spqr_plan_xt_pitch(int nb) {
  if (nb <= 8) {
    int p = 1;
    while (p < nb) p <<= 1;
    return p;
  }
  return (int)(8 * spqr_plan_cdiv(nb, 8));
}

/* _kernels.tc_resident_blocks (warps = SPQR_PLAN_WARPS): blocks per multiprocessor */
static inline int64_t spqr_plan_resident(int regs, int64_t smem) {
  const int64_t warp_regs = spqr_plan_cdiv((int64_t)(regs > 0 ? regs : 1) * 32, 256) * 256;
  int64_t r = 65536 / (warp_regs * SPQR_PLAN_WARPS);
  const int64_t by_smem = (227 * 1024) / (smem + 1024);
  if (by_smem < r) r = by_smem;
  if (64 / SPQR_PLAN_WARPS < r) r = 64 / SPQR_PLAN_WARPS;
  if (r > 32) r = 32;
  return r < 1 ? 1 : r;
}

/* _kernels.tcv_ks: log2 of the k-slices per row block of the one-kernel path (fewest waves x
 * (chunks per warp + a warp's fixed cost), more slices on a tie); slots = resident blocks x
 * multiprocessors; override (SPQR_GPU_PLAN tcv_ks) > 0 forces one */
static inline int spqr_plan_tcv_ks(int64_t rb, int64_t nc, int64_t slots, int override) {
  int best = 0;
  int64_t best_cost = -1;
  if (slots < 1) slots = 1;
  for (int k = 0; (1 << k) <= SPQR_PLAN_WARPS && (1 << k) <= (nc > 1 ? nc : 1); ++k) {
    const int64_t blocks = spqr_plan_cdiv(rb, SPQR_PLAN_WARPS >> k);
    const int64_t cost =
        spqr_plan_cdiv(blocks, slots) * (spqr_plan_cdiv(nc, 1 << k) + SPQR_PLAN_TCV_OVERHEAD);
    if (best_cost < 0 || cost <= best_cost) {
      best = k;
      best_cost = cost;
    }
  }
  if (override > 0) {
    const int v = override < SPQR_PLAN_WARPS ? override : SPQR_PLAN_WARPS;
    best = 0;
    while ((2 << best) <= v) ++best;
  }
  return best;
}

/* _kernels.tc_finish_lanes: lanes per row of the outlier pass for x'^T pitch bp; override
 * (SPQR_GPU_PLAN finish_lanes) 4, 8, 16 or 32 forces one for pitch 8 and 16 */
static inline int spqr_plan_finish_lanes(int bp, int64_t m, int64_t entries, int sms,
                                         int override) {
  if (bp < 8)
    return m >= SPQR_PLAN_QUAD_MIN_ROWS && entries <= SPQR_PLAN_QUAD_MAX_PER_ROW * m ? 8 : 32;
  if (bp > 16) return 32;
  if (override == 4 || override == 8 || override == 16 || override == 32) return override;
  for (int lanes = 4; lanes <= 8; lanes *= 2)
    if (m * lanes >= (int64_t)32 * SPQR_PLAN_LANES_WARPS_PER_SM * sms) return lanes;
  return 16;
}

/* _kernels.tc_splits: the k-split of least estimated cost for blocks of SPQR_PLAN_WARPS row
 * blocks (chunk steps on the critical path costed as the bytes all resident blocks stream, plus
 * the partial sums' traffic); chunk_bytes: tile-layout bytes per warp and chunk (SLABS*512 +
 * SWL*128 + MPC*8); override (SPQR_GPU_PLAN tc_splits) > 0 forces one */
static inline void spqr_plan_splits(int64_t rb, int64_t nc, int nt, int64_t chunk_bytes,
                                    int64_t slots, int override, int* splits, int* per) {
  const int64_t blocks = spqr_plan_cdiv(rb, SPQR_PLAN_WARPS);
  if (slots < 1) slots = 1;
  int64_t best = 1, best_cost = -1;
  for (int64_t s = 1; s <= 16; ++s) {
    if (s > 1 && spqr_plan_cdiv(nc, s) < 4) break;
    const int64_t p = spqr_plan_cdiv(nc, s), real = spqr_plan_cdiv(nc, p);
    const int64_t waves = spqr_plan_cdiv(blocks * real, slots);
    const int64_t cost =
        waves * p * slots * SPQR_PLAN_WARPS * chunk_bytes * 2 + real * 80 * nt * 16 * rb;
    if (best_cost < 0 || cost < best_cost) {
      best = real;
      best_cost = cost;
    }
  }
  if (override > 0) best = override < nc ? override : nc;
  if (best < 1) best = 1;
  const int64_t p = spqr_plan_cdiv(nc, best);
  *splits = (int)spqr_plan_cdiv(nc, p);
  *per = (int)p;
}

#endif /* SPQR_TC_PLAN_H */
