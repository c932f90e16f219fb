// spqr_tc_host.cu -- host launcher of the tensor-core kernels (spqr_tc.cu) for C programs.
// nvcc only (not NVRTC).  Includes the kernels, so one `nvcc -c spqr_tc_host.cu` gives an
// object with the tensor-core kernels and spqr_tc_matmul / spqr_tc_workspace_bytes.  The tile
// arrays come from spqr_tile_repack (spqr_tile_layout.c) and are uploaded by the caller.
//
// The selection logic (batch <= 8 kernel and its k-slicing, k-split plan) mirrors GpuTensor._tc_matmul and
// spqr_format/gpu/_kernels.py (keep the two in step): with the same device and the same
// SPQR_TC_SPLITS, the result is bit-identical to the Python layer's.

#include <cuda_runtime.h>
#include <stdlib.h>
#include <string.h>

#include "spqr_gpu.h"
#include "spqr_tc.cu"

namespace {

const int TC_WARPS = SPQR_TC_WARPS;
const int TC_MAX_BATCH = 64;
const int64_t QUAD_MIN_ROWS = 16384;  // _kernels.TC_QUAD_MIN_ROWS
const int64_t QUAD_MAX_PER_ROW = 128;  // _kernels.TC_QUAD_MAX_PER_ROW
const int64_t LANES_WARPS_PER_SM = 16;  // _kernels.TC_LANES_WARPS_PER_SM
const int64_t FINISH_SMEM_MAX = 96 * 1024;  // _kernels.TC_FINISH_SMEM_MAX (default)

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int tc_nt(int nb) { return nb <= 8 ? 1 : nb <= 16 ? 2 : nb <= 32 ? 4 : 8; }
int xt_pitch(int nb) {
  if (nb <= 8) {
    int p = 1;
    while (p < nb) p <<= 1;
    return p;
  }
  return (int)(8 * cdiv(nb, 8));
}

typedef void (*tc_fn)(const uint4*, const u32*, const uint2*, const uint2*, float*, int, int, int,
                      i64, int);

#define SPQR_TCK(B, SB, NT) &spqr_tc_b##B##_s##SB##_nt##NT
#define SPQR_TCK_NT(B, SB) {SPQR_TCK(B, SB, 1), SPQR_TCK(B, SB, 2), SPQR_TCK(B, SB, 4), SPQR_TCK(B, SB, 8)}
#define SPQR_TCK_SB(B) {SPQR_TCK_NT(B, 1), SPQR_TCK_NT(B, 2), SPQR_TCK_NT(B, 3), SPQR_TCK_NT(B, 4)}

tc_fn pick_tc(int bits, int sb, int nt) {
  static const tc_fn k[3][4][4] = {SPQR_TCK_SB(2), SPQR_TCK_SB(3), SPQR_TCK_SB(4)};
  if (bits < 2 || bits > 4 || sb < 1 || sb > 4) return NULL;
  const int ni = nt == 1 ? 0 : nt == 2 ? 1 : nt == 4 ? 2 : 3;
  return k[bits - 2][sb - 1][ni];
}

typedef void (*finish_fn)(const float*, int, i64, int, const u32*, const u32*, const u16*, int,
                          int, int, i64, void*, i64, int, i64, int);
typedef void (*tcv_fn)(const uint4*, const u32*, const uint2*, const uint2*, const u32*,
                       const u32*, const u16*, int, int, int, int, int, i64, int, void*, i64, int);
#define SPQR_TCVK_SB(B) \
  {&spqr_tcv_b##B##_s1, &spqr_tcv_b##B##_s2, &spqr_tcv_b##B##_s3, &spqr_tcv_b##B##_s4}

typedef void (*tcg_fn)(const uint4*, const u32*, const uint2*, const uint2*, const float2*,
                       const u32*, const u32*, const u16*, int, int, int, int, i64, int, void*,
                       i64, int);
#define SPQR_TCGK_SB(B) \
  {&spqr_tcg_b##B##_s1, &spqr_tcg_b##B##_s2, &spqr_tcg_b##B##_s3, &spqr_tcg_b##B##_s4}

tcg_fn pick_tcg(int bits, int sb) {
  static const tcg_fn k[3][4] = {SPQR_TCGK_SB(2), SPQR_TCGK_SB(3), SPQR_TCGK_SB(4)};
  if (bits < 2 || bits > 4 || sb < 1 || sb > 4) return NULL;
  return k[bits - 2][sb - 1];
}

tcv_fn pick_tcv(int bits, int sb) {
  static const tcv_fn k[3][4] = {SPQR_TCVK_SB(2), SPQR_TCVK_SB(3), SPQR_TCVK_SB(4)};
  if (bits < 2 || bits > 4 || sb < 1 || sb > 4) return NULL;
  return k[bits - 2][sb - 1];
}

// _kernels.tc_resident_blocks: blocks of TC_WARPS warps per multiprocessor.
int64_t resident_blocks(const void* fn, int64_t smem) {
  cudaFuncAttributes attr;
  int regs = 64;
  if (cudaFuncGetAttributes(&attr, fn) == cudaSuccess && attr.numRegs > 0) regs = attr.numRegs;
  const int64_t warp_regs = cdiv((int64_t)regs * 32, 256) * 256;
  int64_t resident = 65536 / (warp_regs * TC_WARPS);
  const int64_t by_smem = (227 * 1024) / (smem + 1024);
  if (by_smem < resident) resident = by_smem;
  if (64 / TC_WARPS < resident) resident = 64 / TC_WARPS;
  if (resident > 32) resident = 32;
  if (resident < 1) resident = 1;
  return resident;
}


// _kernels.tcv_wanted: the one-kernel path for nb <= 4, up to nb = 8 on small matrices
// (SPQR_TCV=0 / 1 overrides).
bool tcv_wanted(const spqr_tile* t, int nb) {
  const char* mode = getenv("SPQR_TCV");
  if (mode && (strcmp(mode, "0") == 0 || strcmp(mode, "1") == 0)) return mode[0] == '1' && nb <= 8;
  if (nb > 8) return false;
  return nb <= 4 || t->m * t->n <= ((int64_t)1 << 25);  // TCV_SMALL_BATCH, TCV_SMALL_WEIGHTS
}

// _kernels.tcg_wanted: the group-separated one-kernel path for nb <= 2 on matrices of at least
// 2^27 weights (SPQR_TCG=0: never, =1: whenever the one-kernel path is taken).
bool tcg_wanted(const spqr_tile* t, int nb) {
  const char* mode = getenv("SPQR_TCG");
  if ((mode && strcmp(mode, "0") == 0) || nb > 2 || !tcv_wanted(t, nb)) return false;
  if (mode && strcmp(mode, "1") == 0) return true;
  return t->m * t->n >= ((int64_t)1 << 27);  // _kernels.TCG_MIN_WEIGHTS
}

// _kernels.tcv_ks: log2 of the k-slices per row block of spqr_tcv_* (SPQR_TCV_KS overrides).
int tcv_ks(const spqr_tile* t, tcv_fn fn, int sms) {
  const int64_t smem = TC_WARPS * (4 * 32 + 16 * 8) * 4;  // _kernels.TCV_SMEM
  const int64_t slots = resident_blocks((const void*)fn, smem) * sms;
  const int64_t nc = t->d.NC, rb = t->d.RB;
  int best = 0;
  int64_t best_cost = -1;
  for (int k = 0; (1 << k) <= TC_WARPS && (1 << k) <= (nc > 1 ? nc : 1); ++k) {
    const int64_t blocks = cdiv(rb, TC_WARPS >> k);
    const int64_t cost = cdiv(blocks, slots) * (cdiv(nc, 1 << k) + 2);  // + warp overhead
    if (best_cost < 0 || cost <= best_cost) {
      best = k;
      best_cost = cost;
    }
  }
  const char* ov = getenv("SPQR_TCV_KS");
  if (ov && atoi(ov) > 0) {
    int v = atoi(ov) < TC_WARPS ? atoi(ov) : TC_WARPS, k = 0;
    while ((2 << k) <= v) ++k;
    best = k;
  }
  return best;
}

int finish_lanes(int bp, int64_t m, int64_t entries, int sms) {  // _kernels.tc_finish_lanes
  if (bp < 8) return m >= QUAD_MIN_ROWS && entries <= QUAD_MAX_PER_ROW * m ? 8 : 32;
  if (bp > 16) return 32;
  for (int lanes = 4; lanes <= 8; lanes *= 2)
    if (m * lanes >= (int64_t)32 * LANES_WARPS_PER_SM * sms) return lanes;
  return 16;
}

finish_fn pick_finish(int bp) {  // _kernels.tc_finish_name
  return bp <= 1    ? &spqr_tc_finish_p1
         : bp <= 2  ? &spqr_tc_finish_p2
         : bp <= 4  ? &spqr_tc_finish_p4
         : bp <= 8  ? &spqr_tc_finish_p8
         : bp <= 16 ? &spqr_tc_finish_p16
         : bp <= 32 ? &spqr_tc_finish_p32
                    : &spqr_tc_finish_p64;
}

// _kernels.tc_splits: the k-split that fills the machine's block slots in whole waves.
void tc_plan(const spqr_tile* t, int nt, tc_fn fn, int* splits, int* per) {
  int dev = 0, sms = 1;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t resident = resident_blocks((const void*)fn, 2LL * nt * t->d.MPC * 256);
  const int64_t nc = t->d.NC, groups = cdiv(t->d.RB, TC_WARPS), slots = resident * sms;
  int64_t max_splits = t->n / (32 * 8 * nt);
  if (max_splits < 1) max_splits = 1;
  if (max_splits > 16) max_splits = 16;
  int64_t best = 1;
  double best_eff = -1.0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    if (s > 1 && cdiv(nc, s) < 4) break;
    const int64_t p = cdiv(nc, s), real = cdiv(nc, p), total = groups * real;
    const double eff = (double)total / (double)(cdiv(total, slots) * slots);
    if (eff > best_eff + 0.02) {
      best = real;
      best_eff = eff;
    }
  }
  const char* ov = getenv("SPQR_TC_SPLITS");  // tuning override, as in the Python layer
  if (ov && atoi(ov) > 0) best = atoi(ov) < nc ? atoi(ov) : nc;
  const int64_t p = cdiv(nc, best);
  *splits = (int)cdiv(nc, p);
  *per = (int)p;
}

// Byte offsets of x'^T and the partial sums in the workspace, and its size.
void tc_layout(const spqr_tile* t, int nb, int splits, int64_t* xt, int64_t* part,
               int64_t* end) {
  const int nt = tc_nt(nb);
  *xt = (int64_t)nt * t->d.KT * 32 * 8;
  *part = *xt + 16 * cdiv(t->n * xt_pitch(nb) * 2, 16);
  const int64_t psum = (int64_t)splits * nt * 8 * t->d.M16 * 4, gsum = t->d.KT * 2 * 4;
  *end = *part + (psum > gsum ? psum : gsum);  // spqr_tcg_* keeps its group sums there
}

}  // namespace

extern "C" size_t spqr_tc_workspace_bytes(const spqr_tile* t, int batch) {
  const int nb = batch < TC_MAX_BATCH ? (batch < 1 ? 1 : batch) : TC_MAX_BATCH;
  const int nt = tc_nt(nb);
  tc_fn fn = pick_tc(t->bits, t->stats_bits, nt);
  if (!fn) return 0;
  int splits, per;
  tc_plan(t, nt, fn, &splits, &per);
  int64_t xt, part, end;
  tc_layout(t, nb, splits, &xt, &part, &end);
  return (size_t)end;
}

extern "C" int spqr_tc_matmul(const spqr_tile* t, const void* x, int64_t ldx, void* y,
                              int64_t ldy, int out_dtype, int batch, void* workspace,
                              void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  if (out_dtype < 0 || out_dtype > 2 || batch < 1) return cudaErrorInvalidValue;
  const int ysz = out_dtype == SPQR_DTYPE_F32 ? 4 : 2;
  int dev = 0, sms = 1;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  for (int b0 = 0; b0 < batch; b0 += TC_MAX_BATCH) {
    const int nb = batch - b0 < TC_MAX_BATCH ? batch - b0 : TC_MAX_BATCH;
    const int nt = tc_nt(nb);
    tc_fn fmain = pick_tc(t->bits, t->stats_bits, nt);
    if (!fmain) return cudaErrorNotSupported;
    int splits, per;
    tc_plan(t, nt, fmain, &splits, &per);
    int64_t xt_off, part_off, end;
    tc_layout(t, nb, splits, &xt_off, &part_off, &end);
    char* ws = (char*)workspace;
    uint2* xfrag = (uint2*)ws;
    u16* xt = (u16*)(ws + xt_off);
    float* part = (float*)(ws + part_off);
    const int bp = xt_pitch(nb);
    const u16* xb = (const u16*)x + (int64_t)b0 * ldx;
    char* yb = (char*)y + (int64_t)ysz * b0 * ldy;
    const int64_t total = (int64_t)nt * t->d.KT * 32;
    const bool tcg = tcg_wanted(t, nb);
    spqr_tc_prepare_x<<<(unsigned)cdiv(total, 256), 256, 0, stream>>>(
        xb, ldx, t->perm, t->n, nb, nt, t->d.KT, xfrag, xt, bp, tcg ? 1 : 0, tcg ? part : NULL);
    if (tcg) {  // group-separated one kernel; group sums of x' in the partial-sums region
      tcv_fn fv = pick_tcv(t->bits, t->stats_bits);  // its k-slicing plan (same registers)
      tcg_fn fg = pick_tcg(t->bits, t->stats_bits);
      const int ks = tcv_ks(t, fv, sms);
      fg<<<(unsigned)cdiv(t->d.RB, TC_WARPS >> ks), 32 * TC_WARPS, 0, stream>>>(
          (const uint4*)t->codes, t->stats, (const uint2*)t->stats2, xfrag, (const float2*)part,
          t->orows, t->oents, xt, bp, (int)t->d.RB, (int)t->d.NC, ks, t->m, nb, (void*)yb, ldy,
          out_dtype);
      continue;
    }
    if (tcv_wanted(t, nb)) {  // one kernel: outliers and rounding, no partial sums
      tcv_fn fv = pick_tcv(t->bits, t->stats_bits);
      int gp = 0;
      while ((1 << gp) < nb) ++gp;
      const int ks = tcv_ks(t, fv, sms);
      fv<<<(unsigned)cdiv(t->d.RB, TC_WARPS >> ks), 32 * TC_WARPS, 0, stream>>>(
          (const uint4*)t->codes, t->stats, (const uint2*)t->stats2, xfrag, t->orows, t->oents,
          xt, bp, (int)t->d.RB, (int)t->d.NC, ks, gp, t->m, nb, (void*)yb, ldy, out_dtype);
      continue;
    }
    const int msmem = 2 * nt * (int)t->d.MPC * 256;
    if (msmem > 48 * 1024)
      cudaFuncSetAttribute((const void*)fmain, cudaFuncAttributeMaxDynamicSharedMemorySize, msmem);
    fmain<<<dim3((unsigned)cdiv(t->d.RB, TC_WARPS), (unsigned)splits), 32 * TC_WARPS, msmem,
            stream>>>((const uint4*)t->codes, t->stats, (const uint2*)t->stats2, xfrag, part,
                      (int)t->d.RB, (int)t->d.NC, per, t->d.M16, nb);
    const int64_t xbytes = 16 * cdiv(t->n * bp * 2, 16);
    const bool smem_x = t->orows != NULL && nb <= 8 && xbytes <= FINISH_SMEM_MAX;
    const int lanes = finish_lanes(bp, t->m, t->outlier_entries, sms);
    // rows per block: _kernels.tc_finish_rows_per_block
    const int64_t rows_grid = cdiv(t->m, 256 / lanes);
    finish_fn fin = pick_finish(bp);
    int64_t grid = rows_grid;
    int smem = 0;
    if (smem_x) {
      smem = (int)xbytes;
      if (smem > 48 * 1024)
        cudaFuncSetAttribute((const void*)fin, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      int64_t per_sm = (227 * 1024) / (smem + 1024);
      per_sm = per_sm < 1 ? 1 : per_sm > 8 ? 8 : per_sm;
      if (per_sm * sms < grid) grid = per_sm * sms;
    }
    fin<<<(unsigned)grid, 256, smem, stream>>>(part, splits, t->d.M16, 8 * nt, t->orows,
                                                t->oents, xt, bp, smem_x ? 1 : 0, lanes,
                                                t->n, (void*)yb, ldy, out_dtype, t->m, nb);
  }
  return (int)cudaGetLastError();
}
