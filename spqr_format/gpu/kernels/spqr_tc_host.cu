// spqr_tc_host.cu -- host launcher of the tensor-core kernels (spqr_tc.cu) for C programs.
// nvcc only (not NVRTC).  Includes the kernels, so one `nvcc -c spqr_tc_host.cu` gives an
// object with the tensor-core kernels and spqr_tc_matmul / spqr_tc_workspace_bytes.  The tile
// arrays come from spqr_tile_repack (spqr_tile_layout.c) and are uploaded by the caller.
//
// The selection logic (which kernel takes a slice, the k-split, the k-slicing, the outlier
// pass's lanes) is spqr_tc_plan.h, which tests/test_gpu_plan.py checks against
// spqr_format/gpu/_kernels.py; the launches mirror GpuTensor._tc_matmul. With the same device
// and the same environment overrides the result is bit-identical to the Python layer's.

#include <cuda_runtime.h>
#include <stdlib.h>

#include "spqr_gpu.h"
#include "spqr_tc.cu"
#include "spqr_tc_plan.h"

namespace {

const int TC_WARPS = SPQR_TC_WARPS;
static_assert(SPQR_TC_WARPS == SPQR_PLAN_WARPS, "spqr_tc_plan.h assumes the kernels' block size");
const int TC_MAX_BATCH = SPQR_PLAN_MAX_BATCH;
const int64_t FINISH_SMEM_MAX = 96 * 1024;  // _kernels.TC_FINISH_SMEM_MAX (default)

int64_t cdiv(int64_t a, int64_t b) { return spqr_plan_cdiv(a, b); }
int tc_nt(int nb) { return spqr_plan_nt(nb); }
int xt_pitch(int nb) { return spqr_plan_xt_pitch(nb); }
int env_int(const char* name) {
  const char* v = getenv(name);
  return v ? atoi(v) : 0;
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

// _kernels.tc_resident_blocks for a kernel (its register count from the runtime).
int64_t resident_blocks(const void* fn, int64_t smem) {
  cudaFuncAttributes attr;
  int regs = 64;
  if (cudaFuncGetAttributes(&attr, fn) == cudaSuccess && attr.numRegs > 0) regs = attr.numRegs;
  return spqr_plan_resident(regs, smem);
}

bool tcv_wanted(const spqr_tile* t, int nb) {
  return spqr_plan_tcv_wanted(t->m, t->n, nb, getenv("SPQR_TCV"));
}

bool tcg_wanted(const spqr_tile* t, int nb) {
  return spqr_plan_tcg_wanted(t->m, t->n, nb, getenv("SPQR_TCV"), getenv("SPQR_TCG"));
}

// log2 of the k-slices of the one-kernel path (its k-slicing plan uses spqr_tcv_*'s registers)
int tcv_ks(const spqr_tile* t, tcv_fn fn, int sms) {
  const int64_t slots = resident_blocks((const void*)fn, SPQR_PLAN_TCV_SMEM) * sms;
  return spqr_plan_tcv_ks(t->d.RB, t->d.NC, slots, env_int("SPQR_TCV_KS"));
}

int finish_lanes(int bp, int64_t m, int64_t entries, int sms) {
  return spqr_plan_finish_lanes(bp, m, entries, sms, env_int("SPQR_TC_FINISH_LANES"));
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

// _kernels.tc_splits: the k-split of least estimated cost (spqr_tc_plan.h).
void tc_plan(const spqr_tile* t, int nt, tc_fn fn, int* splits, int* per) {
  int dev = 0, sms = 1;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t resident = resident_blocks((const void*)fn, 2LL * nt * t->d.MPC * 256);
  const int64_t chunk_bytes = t->d.SLABS * 512 + t->d.SWL * 128 + t->d.MPC * 8;
  spqr_plan_splits(t->d.RB, t->d.NC, nt, chunk_bytes, resident * sms, env_int("SPQR_TC_SPLITS"),
                   splits, per);
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
    const int64_t rows_grid = cdiv(t->m, 256 / lanes);  // 8 warps of 32 / lanes rows each
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
