// spqr_tc_host.cu -- host launcher of the tensor-core kernels (spqr_tc.cu) for C
// programs.  nvcc only (not NVRTC).  Includes the kernels, so one `nvcc -c spqr_tc_host.cu`
// gives an object with the tensor-core kernels and spqr_tc_matmul / spqr_tc_workspace_bytes.  The tile
// arrays come from spqr_tile_repack (spqr_tile_layout.c) and are uploaded by the caller.
//
// Which kernel takes a slice is the launch plan (spqr_launch_plan.h, generated from
// spqr_format/gpu/plan.py); the k-split, the k-slicing and the outlier pass's lanes are
// spqr_tc_plan.h, which tests/test_gpu_plan.py checks against spqr_format/gpu/_kernels.py. The
// launches mirror GpuTensor._tc_matmul. With the same device and the same SPQR_GPU_PLAN the
// result is bit-identical to the Python layer's, except where the plan says "dense"
// (dequantize + cuBLAS, which this launcher does not link): there it runs the fused kernels
// the plan picks below its crossover; C callers can ask spqr_launch_plan_path first and call
// spqr_dequantize + their own GEMM.

#include <cuda_runtime.h>
#include <stdlib.h>

#include "spqr_gpu.h"
#include "spqr_tc.cu"
#include "spqr_tc_plan.h"
#include "spqr_launch_plan.h"

namespace {

const int TC_WARPS = SPQR_TC_WARPS;
static_assert(SPQR_TC_WARPS == SPQR_PLAN_WARPS, "spqr_tc_plan.h assumes the kernels' block size");
const int TC_MAX_BATCH = SPQR_PLAN_MAX_BATCH;
const int64_t FINISH_SMEM_MAX = 96 * 1024;  // _kernels.TC_FINISH_SMEM_MAX (default)

int64_t cdiv(int64_t a, int64_t b) { return spqr_plan_cdiv(a, b); }
int tc_nt(int nb) { return spqr_plan_nt(nb); }
int xt_pitch(int nb) { return spqr_plan_xt_pitch(nb); }
// The override SPQR_GPU_PLAN, parsed on every call (as the Python layer reads it on every plan
// decision); -1 when malformed.
int plan_override(spqr_plan_override* o) { return spqr_plan_parse(getenv(SPQR_PLAN_ENV), o); }
int pos(int v) { return v > 0 ? v : 0; }

int gpu_class_of_current_device() {
  int dev = 0, major = 0, minor = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  return spqr_plan_gpu_class(10 * major + minor);
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

// log2 of the k-slices of the one-kernel path (its k-slicing plan uses spqr_tcv_*'s registers)
int tcv_ks(const spqr_tile* t, tcv_fn fn, int sms, const spqr_plan_override* o) {
  const int64_t slots = resident_blocks((const void*)fn, SPQR_PLAN_TCV_SMEM) * sms;
  return spqr_plan_tcv_ks(t->d.RB, t->d.NC, slots, pos(o->tcv_ks));
}

int finish_lanes(int bp, int64_t m, int64_t entries, int sms, const spqr_plan_override* o) {
  return spqr_plan_finish_lanes(bp, m, entries, sms, pos(o->finish_lanes));
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
void tc_plan(const spqr_tile* t, int nt, tc_fn fn, const spqr_plan_override* o, int* splits,
             int* per) {
  int dev = 0, sms = 1;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t resident = resident_blocks((const void*)fn, 2LL * nt * t->d.MPC * 256);
  const int64_t chunk_bytes = t->d.SLABS * 512 + t->d.SWL * 128 + t->d.MPC * 8;
  spqr_plan_splits(t->d.RB, t->d.NC, nt, chunk_bytes, resident * sms, pos(o->tc_splits), splits,
                   per);
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
  spqr_plan_override o;
  if (plan_override(&o) != 0) return 0;
  int splits, per;
  tc_plan(t, nt, fn, &o, &splits, &per);
  int64_t xt, part, end;
  tc_layout(t, nb, splits, &xt, &part, &end);
  return (size_t)end;
}

namespace {
// The finish kernel of a k-split slice (GpuTensor._tc_finish): split sums, outlier corrections,
// rounding.
void run_finish(const spqr_tile* t, const float* part, int splits, int ncols, const u16* xt,
                int bp, int nb, char* yb, int64_t ldy, int out_dtype, int sms,
                const spqr_plan_override* o, cudaStream_t stream) {
  const int64_t xbytes = 16 * cdiv(t->n * bp * 2, 16);
  const bool smem_x = t->orows != NULL && nb <= 8 && xbytes <= FINISH_SMEM_MAX;
  const int lanes = finish_lanes(bp, t->m, t->outlier_entries, sms, o);
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
  fin<<<(unsigned)grid, 256, smem, stream>>>(part, splits, t->d.M16, ncols, t->orows, t->oents,
                                              xt, bp, smem_x ? 1 : 0, lanes, t->n, (void*)yb,
                                              ldy, out_dtype, t->m, nb);
}

int tc_matmul(const spqr_tile* t, const void* x, int64_t ldx, void* y, int64_t ldy,
              int out_dtype, int batch, void* workspace, cudaStream_t stream,
              const spqr_plan_override& o, int sms) {
  const int ysz = out_dtype == SPQR_DTYPE_F32 ? 4 : 2;
  const int gpu = gpu_class_of_current_device();
  // the plan's path for the whole batch (GpuTensor.plan_for); "dense" (not linked here): the
  // plan's fused choice per slice, as with dense_from=0
  const int whole = spqr_plan_decide(gpu, SPQR_LAYOUT_TC, t->m, t->n, batch, &o);
  const int forced = o.path >= 0 && spqr_plan_can_run(o.path, SPQR_LAYOUT_TC, batch);
  spqr_plan_override fused = o;
  if (whole == SPQR_PATH_DENSE) fused.dense_from = 0;
  for (int b0 = 0; b0 < batch; b0 += TC_MAX_BATCH) {
    const int nb = batch - b0 < TC_MAX_BATCH ? batch - b0 : TC_MAX_BATCH;
    const int nt = tc_nt(nb);
    tc_fn fmain = pick_tc(t->bits, t->stats_bits, nt);
    if (!fmain) return cudaErrorNotSupported;
    int path = whole;  // _tc_matmul: a narrower slice takes the plan's choice for its width
    if (whole == SPQR_PATH_DENSE || (nb != batch && !forced))
      path = spqr_plan_decide(gpu, SPQR_LAYOUT_TC, t->m, t->n, nb, &fused);
    if ((path != SPQR_PATH_TCG && path != SPQR_PATH_TCV && path != SPQR_PATH_TC_SPLIT) ||
        !spqr_plan_can_run(path, SPQR_LAYOUT_TC, nb))
      path = SPQR_PATH_TC_SPLIT;
    int splits, per;
    tc_plan(t, nt, fmain, &o, &splits, &per);
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
    const bool tcg = path == SPQR_PATH_TCG;
    spqr_tc_prepare_x<<<(unsigned)cdiv(total, 256), 256, 0, stream>>>(
        xb, ldx, t->perm, t->n, nb, nt, t->d.KT, xfrag, xt, bp, tcg ? 1 : 0, tcg ? part : NULL);
    if (tcg) {  // group-separated one kernel; group sums of x' in the partial-sums region
      tcv_fn fv = pick_tcv(t->bits, t->stats_bits);  // its k-slicing plan (same registers)
      tcg_fn fg = pick_tcg(t->bits, t->stats_bits);
      const int ks = tcv_ks(t, fv, sms, &o);
      fg<<<(unsigned)cdiv(t->d.RB, TC_WARPS >> ks), 32 * TC_WARPS, 0, stream>>>(
          (const uint4*)t->codes, t->stats, (const uint2*)t->stats2, xfrag, (const float2*)part,
          t->orows, t->oents, xt, bp, (int)t->d.RB, (int)t->d.NC, ks, t->m, nb, (void*)yb, ldy,
          out_dtype);
      continue;
    }
    if (path == SPQR_PATH_TCV) {  // one kernel: outliers and rounding, no partial sums
      tcv_fn fv = pick_tcv(t->bits, t->stats_bits);
      int gp = 0;
      while ((1 << gp) < nb) ++gp;
      const int ks = tcv_ks(t, fv, sms, &o);
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
    run_finish(t, part, splits, 8 * nt, xt, bp, nb, yb, ldy, out_dtype, sms, &o, stream);
  }
  return (int)cudaGetLastError();
}
}  // namespace

extern "C" int spqr_tc_matmul(const spqr_tile* t, const void* x, int64_t ldx, void* y,
                              int64_t ldy, int out_dtype, int batch, void* workspace,
                              void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  if (out_dtype < 0 || out_dtype > 2 || batch < 1) return cudaErrorInvalidValue;
  int dev = 0, sms = 1;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  spqr_plan_override o;
  if (plan_override(&o) != 0) return cudaErrorInvalidValue;  // malformed SPQR_GPU_PLAN
  return tc_matmul(t, x, ldx, y, ldy, out_dtype, batch, workspace, stream, o, sms);
}

extern "C" int spqr_launch_plan_path(int64_t m, int64_t n, int layout, int batch) {
  spqr_plan_override o;
  if (plan_override(&o) != 0 || layout < 0 || layout > SPQR_LAYOUT_NONE || batch < 1) return -1;
  return spqr_plan_decide(gpu_class_of_current_device(), layout, m, n, batch, &o);
}
