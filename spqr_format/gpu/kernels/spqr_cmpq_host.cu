// spqr_cmpq_host.cu -- host launchers of the channel_mixed (CMPQ) kernels (spqr_gpu.h, end).
// nvcc only (not NVRTC).
//
// Includes the kernels, so one `nvcc -c spqr_cmpq_host.cu` gives an object with the CMPQ kernels
// and the launchers.  Launches the first design only (prepare_x, mm_nb*, finish_nb*: the Python
// layer's default path) and the dequantize kernels, with the geometry of
// spqr_format/gpu/cmpq.py (GpuCmpqTensor._plan / matmul_into / dequantize_into); the tile plan is
// spqr_cmpq_plan.h, shared with spqr_cmpq_layout.c (keep them in step with _kernels.py and
// codec/cmpq_layout.py).

#include <cuda_runtime.h>

#include "spqr_cmpq_plan.h"
#include "spqr_gpu.h"
#include "spqr_cmpq.cu"

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct RunsArg {  // the runs table by value (<= 8 runs), so the tile kernel reads no host data
  int64_t v[8 * SPQR_CMPQ_RUN_FIELDS];
};

// Row t of the tile table of cmpq_layout.tiles(layout, nb, cap's min_tiles), one thread a tile.
__global__ void spqr_cmpq_build_tiles(RunsArg runs, int64_t nruns, int64_t m, int nb, int64_t cap,
                                      int64_t ntiles, int64_t* tiles) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t < ntiles) spqr_cmpq_tile_at(runs.v, nruns, m, nb, cap, t, tiles + t * SPQR_CMPQ_RUN_FIELDS);
}

struct SlicePlan {
  int nb;          // batch columns of the kernels (and of x', the partial sums)
  int64_t cap;     // chunk cap of the tiles
  int64_t ntiles;  // tiles
  int64_t smem;    // dynamic shared memory of spqr_cmpq_mm_nb{nb}
  int64_t splits;  // k-splits (grid.y)
};

// GpuCmpqTensor._plan("mm", nb): tiles with min_tiles = cmpq_target_tiles(m, sms), counted on
// the host (spqr_cmpq_tile_count, as spqr_cmpq_tiles), splits = cmpq_splits.
SlicePlan plan_of(const spqr_cmpq_tensor* t, int rows, int sms) {
  SlicePlan p;
  p.nb = spqr_cmpq_nb(rows);
  p.cap = spqr_cmpq_tile_cap(t->runs_host, t->nruns, spqr_cmpq_target_tiles(t->m, sms));
  p.ntiles = spqr_cmpq_tile_count(t->runs_host, t->nruns, p.nb, p.cap, &p.smem);
  p.splits = spqr_cmpq_splits(t->m, p.ntiles, sms);
  return p;
}

int sm_count() {
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

int64_t ldxs_of(const spqr_cmpq_tensor* t) { return 4 * ceil_div(t->np > 1 ? t->np : 1, 4); }

// Workspace of one slice: tiles i64 [ntiles][8], x' f32 [nb][ldxs], partial sums f32
// [splits][nb][m] (every piece starts on a 16-byte boundary).
int64_t slice_bytes(const spqr_cmpq_tensor* t, const SlicePlan& p) {
  return 64 * p.ntiles + 4 * p.nb * (ldxs_of(t) + p.splits * t->m);
}

typedef void (*mm_fn)(const u32*, const u16*, const i64*, int, const float*, i64, float*, i64, i64,
                      i64);
typedef void (*finish_fn)(const float*, int, const u32*, const u32*, const float*, const float*,
                          i64, void*, i64, int, i64, int);
typedef void (*dequant_fn)(const u32*, const u16*, const i64*, int, const u32*, void*, i64, i64,
                           i64, i64, i64, int);
typedef void (*dequant_out_fn)(const u32*, const u32*, const u16*, const u32*, void*, i64, i64);

int nb_index(int nb) { return nb == 1 ? 0 : nb == 2 ? 1 : nb == 4 ? 2 : nb == 8 ? 3 : 4; }

}  // namespace

extern "C" size_t spqr_cmpq_workspace_bytes(const spqr_cmpq_tensor* t, int batch) {
  if (batch < 1 || t->nruns < 1 || t->nruns > 8) return 0;
  const int sms = sm_count();
  const int first = batch < SPQR_CMPQ_MAX_BATCH ? batch : SPQR_CMPQ_MAX_BATCH;
  int64_t best = slice_bytes(t, plan_of(t, first, sms));
  if (batch > SPQR_CMPQ_MAX_BATCH && batch % SPQR_CMPQ_MAX_BATCH) {
    const int64_t rest = slice_bytes(t, plan_of(t, batch % SPQR_CMPQ_MAX_BATCH, sms));
    if (rest > best) best = rest;
  }
  return (size_t)best;
}

extern "C" int spqr_cmpq_matmul(const spqr_cmpq_tensor* t, const void* x, int64_t ldx, int in_dtype,
                                void* y, int64_t ldy, int out_dtype, int batch, void* workspace,
                                void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  if (batch < 1) return cudaSuccess;
  if (in_dtype < 0 || in_dtype > 2 || out_dtype < 0 || out_dtype > 2) return cudaErrorInvalidValue;
  if (t->nruns < 1 || t->nruns > 8) return cudaErrorInvalidValue;
  static const mm_fn mm[5] = {&spqr_cmpq_mm_nb1, &spqr_cmpq_mm_nb2, &spqr_cmpq_mm_nb4,
                              &spqr_cmpq_mm_nb8, &spqr_cmpq_mm_nb16};
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
  int built = 0;  // nb of the tile table in the workspace (0: none yet)
  for (int b0 = 0; b0 < batch; b0 += SPQR_CMPQ_MAX_BATCH) {
    const int nbt = batch - b0 < SPQR_CMPQ_MAX_BATCH ? batch - b0 : SPQR_CMPQ_MAX_BATCH;
    const SlicePlan p = plan_of(t, nbt, sms);
    float* xs = (float*)(ws + 64 * p.ntiles);
    float* part = xs + p.nb * ldxs;
    if (built != p.nb) {
      spqr_cmpq_build_tiles<<<(unsigned)ceil_div(p.ntiles, 128), 128, 0, stream>>>(
          runs, t->nruns, m, p.nb, p.cap, p.ntiles, tiles);
      built = p.nb;
    }
    spqr_cmpq_prepare_x<<<dim3((unsigned)ceil_div(t->np, 256), (unsigned)p.nb), 256, 0, stream>>>(
        (const char*)x + xsz * b0 * ldx, ldx, in_dtype, t->pcol, t->np, xs, ldxs, nbt);
    const mm_fn fn = mm[nb_index(p.nb)];
    if (p.smem > 48 * 1024)
      cudaFuncSetAttribute((const void*)fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           (int)p.smem);
    fn<<<dim3((unsigned)ceil_div(m, SPQR_CMPQ_MM_ROWS), (unsigned)p.splits), SPQR_CMPQ_MM_ROWS,
         (size_t)p.smem, stream>>>(t->codes, t->tables, (const i64*)tiles, (int)p.ntiles, xs,
                                   ldxs, part, m, t->table_rows, t->Lp);
    fin[nb_index(p.nb)]<<<(unsigned)ceil_div(m, 8), 256, 0, stream>>>(
        part, (int)p.splits, t->orows, t->ocolp, t->ocorr, xs, ldxs,
        (char*)y + ysz * b0 * ldy, ldy, out_dtype, m, nbt);
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
  const int64_t need = ceil_div(m, 65535);
  const int rpb = (int)(need > SPQR_CMPQ_DQ_ROWS ? need : SPQR_CMPQ_DQ_ROWS);
  dense[out_dtype]<<<dim3((unsigned)ceil_div(n, 256), (unsigned)ceil_div(m, rpb)), 256, 0,
                     stream>>>(t->codes, t->tables, (const i64*)t->runs, (int)t->nruns,
                               t->inv_perm, out, ldo, m, n, t->table_rows, t->Lp, rpb);
  if (t->orows)
    outl[out_dtype]<<<(unsigned)ceil_div(m, 8), 256, 0, stream>>>(t->orows, t->ocol, t->oval,
                                                                 t->perm, out, ldo, m);
  return (int)cudaGetLastError();
}
