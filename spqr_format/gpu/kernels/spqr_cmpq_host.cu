// spqr_cmpq_host.cu -- host launchers of the channel_mixed (CMPQ) kernels (spqr_gpu.h, end).
// nvcc only (not NVRTC).
//
// Includes the kernels, so one `nvcc -c spqr_cmpq_host.cu` gives an object with the CMPQ kernels
// and the launchers.  spqr_cmpq_matmul runs the Python layer's default plan (GpuCmpqTensor._plan
// / matmul_into of spqr_format/gpu/cmpq.py with no SPQR_GPU_PLAN override), per slice of <= 16
// rows: batch 1 -> prepare_x, spqr_cmpq_mv1_b{B} (one launch per width present); batch 2..16
// with f16 x and R % 16 == 0 -> prepare_xf, spqr_cmpq_tc_b{B}_nt{ceil(batch/8)} (one launch per
// width); otherwise the first design, prepare_x, spqr_cmpq_mm_nb{NB}; then finish_nb{NB}.  The
// plan (path, tiles, groups, k-splits, shared memory, rows per block) is spqr_cmpq_plan.h,
// shared with spqr_cmpq_layout.c and checked against _kernels.cmpq_slice / cmpq_launches on the
// CPU (tests/test_cmpq_layout_c.py); keep it in step with _kernels.py and codec/cmpq_layout.py.
// SPQR_GPU_PLAN is not read: cmpq_v2=0 / cmpq_blocks_per_sm have no C counterpart.  Also the
// dequantize kernels, with the geometry of GpuCmpqTensor.dequantize_into.

#include <cuda_runtime.h>

#include "spqr_cmpq_plan.h"
#include "spqr_gpu.h"
#include "spqr_cmpq.cu"

// the plan's geometry and the kernels' compile-time geometry agree
static_assert(SPQR_CMPQ_MM_ROWS == SPQR_CMPQ_ROWS, "rows of spqr_cmpq_mm_* / spqr_cmpq_mv1_*");
static_assert(SPQR_CMPQ_TC_BLOCK_ROWS == SPQR_CMPQ_TC_ROWS, "rows of spqr_cmpq_tc_*");
static_assert(SPQR_CMPQ_TC_THREADS == SPQR_CMPQ_TC_WARPS * 32, "threads of spqr_cmpq_tc_*");

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct RunsArg {  // the runs table by value (<= 8 runs), so the tile kernel reads no host data
  int64_t v[SPQR_CMPQ_MAX_RUNS * SPQR_CMPQ_RUN_FIELDS];
};

// Row t of the tile table of cmpq_layout.tiles(layout, nb, cap's min_tiles, tc), one thread a
// tile.
__global__ void spqr_cmpq_build_tiles(RunsArg runs, int64_t nruns, int64_t m, int nb, int tc,
                                      int64_t cap, int64_t ntiles, int64_t* tiles) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t < ntiles)
    spqr_cmpq_tile_at(runs.v, nruns, m, nb, tc, cap, t, tiles + t * SPQR_CMPQ_RUN_FIELDS);
}

int sm_count() {
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

int64_t ldxs_of(const spqr_cmpq_tensor* t) { return 4 * ceil_div(t->np > 1 ? t->np : 1, 4); }

// GpuCmpqTensor._slice + _plan of a slice of `rows` batch rows (spqr_cmpq_plan.h).
spqr_cmpq_slice_plan plan_of(const spqr_cmpq_tensor* t, int rows, int in_dtype, int sms) {
  spqr_cmpq_slice_plan p;
  spqr_cmpq_plan_slice(t->runs_host, t->nruns, t->m, sms, rows, in_dtype, t->table_rows, &p);
  return p;
}

// Bytes of xf, x' as f16 in fragment order (tc only): u16 [np * nb].
int64_t xf_bytes(const spqr_cmpq_tensor* t, const spqr_cmpq_slice_plan& p) {
  return p.path == SPQR_CMPQ_PATH_TC ? 2 * t->np * p.nb : 0;
}

// Workspace of one slice: tiles i64 [ntiles][8], x' f32 [nbp][ldxs], (tc) xf u16 [np][nb]
// (np a multiple of 32, nb of 8), partial sums f32 [splits][nbp][m]: GpuCmpqTensor's workspace
// with the tile table in front (every piece starts on a 16-byte boundary: xf is read as uint4).
int64_t slice_bytes(const spqr_cmpq_tensor* t, const spqr_cmpq_slice_plan& p) {
  return 64 * p.ntiles + 4 * p.nbp * (ldxs_of(t) + p.splits * t->m) + xf_bytes(t, p);
}

typedef void (*mm_fn)(const u32*, const u16*, const i64*, int, const float*, i64, float*, i64, i64,
                      i64);
typedef void (*mv1_fn)(const u32*, const u16*, const i64*, int, const float*, float*, i64, i64,
                       i64);
typedef void (*tc_fn)(const u32*, const u16*, const i64*, int, const uint4*, float*, int, i64, i64,
                      i64);
typedef void (*finish_fn)(const float*, int, const u32*, const u32*, const float*, const float*,
                          i64, void*, i64, int, i64, int);
typedef void (*dequant_fn)(const u32*, const u16*, const i64*, int, const u32*, void*, i64, i64,
                           i64, i64, i64, int);
typedef void (*dequant_out_fn)(const u32*, const u32*, const u16*, const u32*, void*, i64, i64);

int nb_index(int nb) { return nb == 1 ? 0 : nb == 2 ? 1 : nb == 4 ? 2 : nb == 8 ? 3 : 4; }

// _raise_smem_limit: opt in to more than 48 KiB of dynamic shared memory.
cudaError_t allow_smem(const void* fn, int64_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
}

}  // namespace

extern "C" size_t spqr_cmpq_workspace_bytes(const spqr_cmpq_tensor* t, int batch) {
  if (batch < 1 || t->nruns < 1 || t->nruns > SPQR_CMPQ_MAX_RUNS) return 0;
  const int sms = sm_count();
  int sizes[2] = {batch < SPQR_CMPQ_MAX_BATCH ? batch : SPQR_CMPQ_MAX_BATCH, 0};
  if (batch > SPQR_CMPQ_MAX_BATCH && batch % SPQR_CMPQ_MAX_BATCH)
    sizes[1] = batch % SPQR_CMPQ_MAX_BATCH;
  // the largest slice over both input classes (f16 x may take tc, f32 / bf16 x take mm), so
  // the size does not depend on the dtype the caller passes to spqr_cmpq_matmul
  static const int dtypes[2] = {SPQR_DTYPE_F16, SPQR_DTYPE_F32};
  int64_t best = 0;
  for (int s = 0; s < 2; ++s) {
    if (sizes[s] < 1) continue;
    for (int d = 0; d < 2; ++d) {
      const int64_t need = slice_bytes(t, plan_of(t, sizes[s], dtypes[d], sms));
      if (need > best) best = need;
    }
  }
  return (size_t)best;
}

extern "C" int spqr_cmpq_matmul(const spqr_cmpq_tensor* t, const void* x, int64_t ldx, int in_dtype,
                                void* y, int64_t ldy, int out_dtype, int batch, void* workspace,
                                void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  if (batch < 1) return cudaSuccess;
  if (in_dtype < 0 || in_dtype > 2 || out_dtype < 0 || out_dtype > 2) return cudaErrorInvalidValue;
  if (t->nruns < 1 || t->nruns > SPQR_CMPQ_MAX_RUNS) return cudaErrorInvalidValue;
  for (int64_t r = 0; r < t->nruns; ++r) {  // the per-width kernels exist for widths 1..8
    const int64_t b = t->runs_host[r * SPQR_CMPQ_RUN_FIELDS + 2];
    if (b < 1 || b > 8) return cudaErrorInvalidValue;
  }
  static const mm_fn mm[5] = {&spqr_cmpq_mm_nb1, &spqr_cmpq_mm_nb2, &spqr_cmpq_mm_nb4,
                              &spqr_cmpq_mm_nb8, &spqr_cmpq_mm_nb16};
  static const mv1_fn mv1k[8] = {&spqr_cmpq_mv1_b1, &spqr_cmpq_mv1_b2, &spqr_cmpq_mv1_b3,
                                 &spqr_cmpq_mv1_b4, &spqr_cmpq_mv1_b5, &spqr_cmpq_mv1_b6,
                                 &spqr_cmpq_mv1_b7, &spqr_cmpq_mv1_b8};
  static const tc_fn tck[8][2] = {
      {&spqr_cmpq_tc_b1_nt1, &spqr_cmpq_tc_b1_nt2}, {&spqr_cmpq_tc_b2_nt1, &spqr_cmpq_tc_b2_nt2},
      {&spqr_cmpq_tc_b3_nt1, &spqr_cmpq_tc_b3_nt2}, {&spqr_cmpq_tc_b4_nt1, &spqr_cmpq_tc_b4_nt2},
      {&spqr_cmpq_tc_b5_nt1, &spqr_cmpq_tc_b5_nt2}, {&spqr_cmpq_tc_b6_nt1, &spqr_cmpq_tc_b6_nt2},
      {&spqr_cmpq_tc_b7_nt1, &spqr_cmpq_tc_b7_nt2}, {&spqr_cmpq_tc_b8_nt1, &spqr_cmpq_tc_b8_nt2}};
  static const finish_fn fin[5] = {&spqr_cmpq_finish_nb1, &spqr_cmpq_finish_nb2,
                                   &spqr_cmpq_finish_nb4, &spqr_cmpq_finish_nb8,
                                   &spqr_cmpq_finish_nb16};
  RunsArg runs;
  for (int64_t k = 0; k < t->nruns * SPQR_CMPQ_RUN_FIELDS; ++k) runs.v[k] = t->runs_host[k];
  const int sms = sm_count();
  const int64_t m = t->m, ldxs = ldxs_of(t);
  const int64_t xsz = in_dtype == SPQR_DTYPE_F32 ? 4 : 2;
  const int64_t ysz = out_dtype == SPQR_DTYPE_F32 ? 4 : 2;
  char* ws = (char*)workspace;
  int64_t* tiles = (int64_t*)ws;
  int built_path = -1, built_nb = 0;  // the tile table in the workspace (path -1: none yet)
  for (int b0 = 0; b0 < batch; b0 += SPQR_CMPQ_MAX_BATCH) {
    const int nbt = batch - b0 < SPQR_CMPQ_MAX_BATCH ? batch - b0 : SPQR_CMPQ_MAX_BATCH;
    const spqr_cmpq_slice_plan p = plan_of(t, nbt, in_dtype, sms);
    const bool tc = p.path == SPQR_CMPQ_PATH_TC;
    // the workspace of matmul_into behind the tile table: xs, (tc) xf, part
    float* xs = (float*)(ws + 64 * p.ntiles);
    u16* xf = (u16*)(xs + p.nbp * ldxs);
    float* part = (float*)((char*)xf + xf_bytes(t, p));
    if (built_path != p.path || built_nb != p.nb) {  // GpuCmpqTensor.plans' key (path, nb)
      spqr_cmpq_build_tiles<<<(unsigned)ceil_div(p.ntiles, 128), 128, 0, stream>>>(
          runs, t->nruns, m, p.nb, tc ? 1 : 0, p.cap, p.ntiles, tiles);
      built_path = p.path;
      built_nb = p.nb;
    }
    const char* x0 = (const char*)x + xsz * b0 * ldx;
    if (tc)
      spqr_cmpq_prepare_xf<<<dim3((unsigned)ceil_div(t->np, 256), (unsigned)p.nb), 256, 0,
                             stream>>>((const u16*)x0, ldx, t->pcol, t->np, xs, ldxs, p.nbp, xf,
                                       p.nb / 8, nbt);
    else
      spqr_cmpq_prepare_x<<<dim3((unsigned)ceil_div(t->np, 256), (unsigned)p.nbp), 256, 0,
                            stream>>>(x0, ldx, in_dtype, t->pcol, t->np, xs, ldxs, nbt);
    const dim3 block((unsigned)p.threads);
    const size_t smem = (size_t)p.smem;
    for (int k = 0; k < p.ngroups; ++k) {
      const spqr_cmpq_group& g = p.groups[k];
      const dim3 grid((unsigned)ceil_div(m, p.rows), (unsigned)g.splits);
      const i64* tg = (const i64*)tiles + 8 * g.first;
      float* pg = part + g.split0 * p.nbp * m;
      cudaError_t err;
      if (p.path == SPQR_CMPQ_PATH_MM) {
        const mm_fn fn = mm[nb_index(p.nb)];
        if ((err = allow_smem((const void*)fn, p.smem)) != cudaSuccess) return (int)err;
        fn<<<grid, block, smem, stream>>>(t->codes, t->tables, tg, (int)g.count, xs, ldxs, pg, m,
                                          t->table_rows, t->Lp);
      } else if (p.path == SPQR_CMPQ_PATH_MV1) {
        const mv1_fn fn = mv1k[g.bits - 1];
        if ((err = allow_smem((const void*)fn, p.smem)) != cudaSuccess) return (int)err;
        fn<<<grid, block, smem, stream>>>(t->codes, t->tables, tg, (int)g.count, xs, pg, m,
                                          t->table_rows, t->Lp);
      } else {
        const tc_fn fn = tck[g.bits - 1][p.nb / 8 - 1];
        if ((err = allow_smem((const void*)fn, p.smem)) != cudaSuccess) return (int)err;
        fn<<<grid, block, smem, stream>>>(t->codes, t->tables, tg, (int)g.count,
                                          (const uint4*)xf, pg, p.nbp, m, t->table_rows, t->Lp);
      }
    }
    fin[nb_index(p.nbp)]<<<(unsigned)ceil_div(m, 8), 256, 0, stream>>>(
        part, (int)p.splits, t->orows, t->ocolp, t->ocorr, xs, ldxs, (char*)y + ysz * b0 * ldy,
        ldy, out_dtype, m, nbt);
  }
  return (int)cudaGetLastError();
}

extern "C" int spqr_cmpq_dequantize(const spqr_cmpq_tensor* t, void* out, int64_t ldo,
                                    int out_dtype, void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  static const dequant_fn dense[3] = {&spqr_cmpq_dequant_f32, &spqr_cmpq_dequant_f16,
                                      &spqr_cmpq_dequant_bf16};
  static const dequant_out_fn outl[3] = {&spqr_cmpq_dequant_outliers_f32,
                                         &spqr_cmpq_dequant_outliers_f16,
                                         &spqr_cmpq_dequant_outliers_bf16};
  if (out_dtype < 0 || out_dtype > 2) return cudaErrorInvalidValue;
  const int64_t m = t->m, n = t->n;
  const int rpb = (int)spqr_cmpq_dq_rows_per_block(m);
  dense[out_dtype]<<<dim3((unsigned)ceil_div(n, 256), (unsigned)ceil_div(m, rpb)), 256, 0,
                     stream>>>(t->codes, t->tables, (const i64*)t->runs, (int)t->nruns,
                               t->inv_perm, out, ldo, m, n, t->table_rows, t->Lp, rpb);
  if (t->orows)
    outl[out_dtype]<<<(unsigned)ceil_div(m, 8), 256, 0, stream>>>(t->orows, t->ocol, t->oval,
                                                                 t->perm, out, ldo, m);
  return (int)cudaGetLastError();
}
