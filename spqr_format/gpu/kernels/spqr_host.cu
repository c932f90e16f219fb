// spqr_host.cu -- host launchers of spqr_gpu.h (level 2).  nvcc only (not NVRTC).
//
// Includes the kernels, so one `nvcc -c spqr_host.cu` gives an object with the kernels and the
// launchers.  The selection logic mirrors spqr_format/gpu/_kernels.py (keep the two in step).

#include <cuda_runtime.h>

#include "spqr_gpu.h"
#include "spqr_kernels.cu"

namespace {

int nb_of(int batch) { return batch <= 2 ? 2 : 4; }  // batch 1: the row sweep (spqr_mv1_*)
int rows_of(int nb) { (void)nb; return 4; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t packed_words(int64_t count, int bits) { return ceil_div(count, 128) * 4 * bits; }

typedef void (*matvec_fn)(const u32*, const u32*, const u16*, const u32*, const u32*,
                          const float*, i64, const float*, i64, u16*, i64, int, i64, i64, int,
                          int, int, int, i64, i64, int);

#define SPQR_MV(B, S, NB) &spqr_matvec_b##B##_##S##_nb##NB
#define SPQR_MV_NB(B, S) {SPQR_MV(B, S, 2), SPQR_MV(B, S, 4)}

matvec_fn pick_matvec(int bits, int sb, int nb) {
  static const matvec_fn h[4][2] = {SPQR_MV_NB(2, h), SPQR_MV_NB(3, h), SPQR_MV_NB(4, h),
                                    SPQR_MV_NB(8, h)};
  static const matvec_fn q[4][2] = {SPQR_MV_NB(2, q), SPQR_MV_NB(3, q), SPQR_MV_NB(4, q),
                                    SPQR_MV_NB(8, q)};
  int bi = bits == 2 ? 0 : bits == 3 ? 1 : bits == 4 ? 2 : bits == 8 ? 3 : -1;
  int ni = nb == 2 ? 0 : 1;
  if (bi < 0) return nullptr;
  return sb ? q[bi][ni] : h[bi][ni];
}

typedef void (*mv1_fn)(const u32*, const u32*, const u16*, const u32*, const u32*,
                       const float*, const float*, float*, u16*, int, i64, i64, int, int, int,
                       int, i64, i64);

typedef void (*dequant_row_fn)(const u32*, const u32*, const u16*, const u32*, const u32*,
                               const u32*, const u32*, void*, i64, i64, int, int, int, int, int,
                               i64, i64);
typedef void (*dequant_fn)(const u32*, const u32*, const u16*, const u32*, void*, i64, i64, i64,
                           int, int, int, int, int, i64, i64);
typedef void (*dequant_out_fn)(const u32*, const u32*, const u32*, void*, i64, i64);
typedef void (*dequant_oct_fn)(const u32*, const u32*, const u16*, const u32*, const u32*, u16*,
                               i64, i64, i64, int, int, int, int, i64, i64);

#define SPQR_DQ3(PFX, B, S) \
  {&PFX##_b##B##_##S##_f32, &PFX##_b##B##_##S##_f16, &PFX##_b##B##_##S##_bf16}
#define SPQR_DQ_BITS(PFX, S) \
  {SPQR_DQ3(PFX, 0, S), SPQR_DQ3(PFX, 2, S), SPQR_DQ3(PFX, 3, S), SPQR_DQ3(PFX, 4, S), \
   SPQR_DQ3(PFX, 8, S)}

#define SPQR_DQO2(B, S) {&spqr_dequant_oct_b##B##_##S##_f16, &spqr_dequant_oct_b##B##_##S##_bf16}
#define SPQR_DQO_BITS(S) {SPQR_DQO2(2, S), SPQR_DQO2(3, S), SPQR_DQO2(4, S), SPQR_DQO2(8, S)}

int dq_bits_index(int bits) {
  return bits == 2 ? 1 : bits == 3 ? 2 : bits == 4 ? 3 : bits == 8 ? 4 : 0;
}

}  // namespace

extern "C" size_t spqr_matvec_workspace_bytes(const spqr_bilevel* t, int batch) {
  int64_t nsub = ceil_div(t->n, 32);
  int64_t part = batch == 1 ? ceil_div(nsub, 256) * t->m : 0;  // row-sweep partial sums
  return (size_t)4 * ((size_t)batch * (size_t)(34 * nsub) + (size_t)part);
}

extern "C" int spqr_matvec_supported(const spqr_bilevel* t) {
  return (t->bits == 2 || t->bits == 3 || t->bits == 4 || t->bits == 8) &&
         t->group_size % 16 == 0;
}

extern "C" int spqr_matvec(const spqr_bilevel* t, const void* x, int64_t ldx, int in_dtype,
                           void* y, int64_t ldy, int out_dtype, int batch, void* workspace,
                           void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  if (batch < 1) return cudaSuccess;
  if (!spqr_matvec_supported(t)) return cudaErrorNotSupported;
  if (in_dtype == SPQR_DTYPE_F32 || out_dtype == SPQR_DTYPE_F32) return cudaErrorInvalidValue;
  const int64_t m = t->m, n = t->n, nsub = ceil_div(n, 32);
  const int64_t ldxs = 32 * nsub, ldx16 = 2 * nsub;
  float* xs = (float*)workspace;
  float* x16 = xs + (int64_t)batch * ldxs;
  spqr_prepare_x<<<dim3((unsigned)ceil_div(32 * nsub, 256), batch), 256, 0, stream>>>(
      (const u16*)x, ldx, in_dtype, t->perm, t->bits, n, xs, ldxs, x16, ldx16, batch);
  const int64_t G = ceil_div(n, t->group_size);
  const int64_t crw = packed_words(n, t->bits);
  const int64_t srw = t->stats_bits ? packed_words(2 * G, t->stats_bits) : 0;
  const int S = t->stats_group_size > 0 ? t->stats_group_size : 1;
  if (batch == 1) {  // row-sweep kernel (+ split sums), see spqr_format/gpu/tensor.py
    static const mv1_fn sweep[2][4][2] = {
        {{&spqr_mv1_b2_h, &spqr_mv1_b2_q}, {&spqr_mv1_b3_h, &spqr_mv1_b3_q},
         {&spqr_mv1_b4_h, &spqr_mv1_b4_q}, {&spqr_mv1_b8_h, &spqr_mv1_b8_q}},
        {{&spqr_mv1r16_b2_h, &spqr_mv1r16_b2_q}, {&spqr_mv1r16_b3_h, &spqr_mv1r16_b3_q},
         {&spqr_mv1r16_b4_h, &spqr_mv1r16_b4_q}, {&spqr_mv1r16_b8_h, &spqr_mv1r16_b8_q}}};
    const int bi = t->bits == 2 ? 0 : t->bits == 3 ? 1 : t->bits == 4 ? 2 : 3;
    const int64_t nsplit = ceil_div(nsub, 256);
    float* part = x16 + ldx16;
    const int64_t th = 32 * ceil_div(nsub < 256 ? nsub : 256, 32);
    // 16-row sweep when it still gives >= 100k threads (see _kernels.mv1_plan)
    const int tall = ceil_div(m, 16) * nsplit * th >= 100000 ? 1 : 0;
    const int64_t rows = tall ? 16 : SPQR_MV1_RB;
    sweep[tall][bi][t->stats_bits ? 1 : 0]<<<dim3((unsigned)ceil_div(m, rows), (unsigned)nsplit),
                                             (unsigned)th, 0, stream>>>(
        t->codes, t->stats, t->stats2, t->orows, t->oents, xs, x16, part, (u16*)y, out_dtype, m,
        n, t->group_size, S, t->stats_bits, (int)G, crw, srw);
    if (nsplit > 1)
      spqr_mv1_finish<<<(unsigned)ceil_div(m, 256), 256, 0, stream>>>(part, (int)nsplit, (u16*)y,
                                                                       out_dtype, m);
    return (int)cudaGetLastError();
  }
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int nb = nb_of(batch), r = rows_of(nb);
  const int64_t row_groups = ceil_div(m, r), slices = ceil_div(batch, nb);
  int64_t want = ceil_div(16 * (int64_t)sms, row_groups * slices);  // ~16 warps per SM
  int64_t warps = want < 8 ? want : 8;
  if (warps > ceil_div(nsub, 32)) warps = ceil_div(nsub, 32);
  if (warps < 1) warps = 1;
  matvec_fn fn = pick_matvec(t->bits, t->stats_bits, nb);
  const int64_t threads = 32 * (warps + (t->orows ? 1 : 0));  // + the outlier warp
  fn<<<dim3((unsigned)row_groups, (unsigned)slices), (unsigned)threads, 0, stream>>>(
      t->codes, t->stats, t->stats2, t->orows, t->oents, xs, ldxs, x16, ldx16, (u16*)y, ldy,
      out_dtype, m, n, t->group_size, S, t->stats_bits, (int)G, crw, srw, batch);
  return (int)cudaGetLastError();
}

extern "C" int spqr_dequantize(const spqr_bilevel* t, void* out, int64_t ldo, int out_dtype,
                               void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  static const dequant_row_fn row_h[5][3] = SPQR_DQ_BITS(spqr_dequant_row, h);
  static const dequant_row_fn row_q[5][3] = SPQR_DQ_BITS(spqr_dequant_row, q);
  static const dequant_fn flat_h[5][3] = SPQR_DQ_BITS(spqr_dequant, h);
  static const dequant_fn flat_q[5][3] = SPQR_DQ_BITS(spqr_dequant, q);
  static const dequant_out_fn outl[3] = {&spqr_dequant_outliers_f32, &spqr_dequant_outliers_f16,
                                         &spqr_dequant_outliers_bf16};
  if (out_dtype < 0 || out_dtype > 2) return cudaErrorInvalidValue;
  const int64_t m = t->m, n = t->n, nsub = ceil_div(n, 32);
  const int64_t G = ceil_div(n, t->group_size);
  const int64_t crw = packed_words(n, t->bits);
  const int64_t srw = t->stats_bits ? packed_words(2 * G, t->stats_bits) : 0;
  const int S = t->stats_group_size > 0 ? t->stats_group_size : 1;
  const int bi = dq_bits_index(t->bits);
  const int64_t esz = out_dtype == SPQR_DTYPE_F32 ? 4 : 2;
  int dev = 0, optin = 48 * 1024;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  // no permutation, f16/bf16, specialised bits, g % 16 == 0: the octet kernel (two rows per
  // block, as spqr_format/gpu/tensor.py launches it)
  if (t->perm == NULL && bi > 0 && t->group_size % 16 == 0 && out_dtype != SPQR_DTYPE_F32 &&
      n < ((int64_t)1 << 28)) {
    static const dequant_oct_fn oct_h[4][2] = SPQR_DQO_BITS(h);
    static const dequant_oct_fn oct_q[4][2] = SPQR_DQO_BITS(q);
    const dequant_oct_fn fn = t->stats_bits ? oct_q[bi - 1][out_dtype - 1]
                                            : oct_h[bi - 1][out_dtype - 1];
    const int threads = n > 8192 ? 256 : 128;
    const int nword = 2 * (t->bits == 8 ? 3 : 2) + (t->stats_bits ? 4 : 1);
    const int smem = threads / 32 * SPQR_DQO_STAGES * nword * 128;  // at most 40 KiB
    fn<<<(unsigned)ceil_div(m, 2), (unsigned)threads, smem, stream>>>(
        t->codes, t->stats, t->stats2, t->orows, t->oents, (u16*)out, ldo, m, n, t->group_size,
        S, t->stats_bits, (int)G, crw, srw);
    return (int)cudaGetLastError();
  }
  // rows straight to global memory (no shared memory) when there is no permutation and every
  // row is 16-byte aligned; else each row is assembled in n * esz bytes of shared memory
  const bool direct = t->perm == NULL && ((uintptr_t)out & 15) == 0 && ((ldo * esz) & 15) == 0;
  if (direct || n * esz <= (int64_t)optin - 1024) {
    dequant_row_fn fn = t->stats_bits ? row_q[bi][out_dtype] : row_h[bi][out_dtype];
    const int smem = direct ? 0 : (int)(n * esz);
    if (smem > 48 * 1024)
      cudaFuncSetAttribute((const void*)fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    int64_t th = 32 * ceil_div(ceil_div(n, 16), 32);
    th = th < 32 ? 32 : th > 256 ? 256 : th;
    fn<<<(unsigned)m, (unsigned)th, smem, stream>>>(
        t->codes, t->stats, t->stats2, t->perm, NULL /* no inverse permutation: scatter */,
        t->orows, t->oents, out, ldo, n, t->bits,
        t->group_size, S, t->stats_bits, (int)G, crw, srw);
  } else {
    dequant_fn fn = t->stats_bits ? flat_q[bi][out_dtype] : flat_h[bi][out_dtype];
    fn<<<(unsigned)ceil_div(m * nsub, 256), 256, 0, stream>>>(
        t->codes, t->stats, t->stats2, t->perm, out, ldo, m, n, t->bits, t->group_size, S,
        t->stats_bits, (int)G, crw, srw);
    if (t->orows)
      outl[out_dtype]<<<(unsigned)ceil_div(m, 8), 256, 0, stream>>>(t->orows, t->oents, t->perm,
                                                                   out, ldo, m);
  }
  return (int)cudaGetLastError();
}
