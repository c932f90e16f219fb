// spqr_cmpq.cu -- GPU decoder and fused matvec / matmul for the .spqr `channel_mixed` encoding
// (SPEC section 12, CMPQ: per-column widths 1..8 sorted into runs, f16 lookup tables per
// column or per column and block of R rows, the outlier stream of section 6).
//
// Plain CUDA C++ device code, no headers, no host code: it compiles with nvcc (-c / --cubin)
// and with NVRTC (CuPy RawModule).  Every entry point is an `extern "C" __global__` kernel
// whose arguments and launch contract are documented in spqr_gpu.h ("channel_mixed").  The
// kernels read the "CMPQ chunk layout", a lossless load-time repack of the file's sections
// built by spqr_format/codec/cmpq_layout.py (spqr_gpu.h defines it).
//
// Arithmetic:
//   * dequantize is a table lookup: out = the f16 table entry (f16 output: its bits; f32: the
//     exact widening `cvt.f32.f16`; bf16: `cvt.rn.bf16.f32` of that, round to nearest even,
//     SPEC C-7.5), then outliers overwrite their positions.  No other arithmetic, so the result
//     is bit-exact with the reference decoder by construction.
//   * matvec / matmul accumulate in f32: per weight one product f32(T[q]) * x' (for batch 1
//     the tables are scaled by x' once per block, which is the same product rounded once) and
//     f32 additions in a fixed order per block; blocks' partial sums are added in split order
//     by the finish kernel (deterministic, no atomics).  Outliers are applied there as
//     + d * x'[c], d = f32(o) - f32(T[q]) computed on the host, where the load-time repack has
//     replaced the code at each outlier position by the code whose table value is nearest to o
//     (so d and its rounding error stay small; the dense value there is otherwise ignored).

// Rows per block of the matmul kernel (one thread per row); the launcher must use the same.
#ifndef SPQR_CMPQ_ROWS
#define SPQR_CMPQ_ROWS 256
#endif

namespace spqr_cmpq {

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;

__device__ __forceinline__ float f16_to_f32(u32 bits) {
  float f;
  unsigned short h = (unsigned short)(bits & 0xFFFFu);
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ float bf16_to_f32(u32 bits) {
  return __uint_as_float((bits & 0xFFFFu) << 16);
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ u16 f32_to_bf16(float f) {
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ u32 ldg_u32(const u32 *p) {
  u32 v;
  asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// Code c (0..31) of a 32-code chunk of B-bit codes held in words w[0..B-1], LSB first (C-5.2).
template <int B>
__device__ __forceinline__ u32 chunk_code(const u32 (&w)[B], int c) {
  const int bit = c * B;
  const int wi = bit >> 5;
  const int sh = bit & 31;
  u32 v = w[wi] >> sh;
  if (sh + B > 32) v |= w[wi + 1] << (32 - sh);
  return v & ((1u << B) - 1u);
}

template <int B>
__device__ __forceinline__ void load_chunk(u32 (&w)[B], const u32 *codes, i64 m, i64 i, int k) {
#pragma unroll
  for (int q = 0; q < B; ++q) w[q] = ldg_u32(codes + ((i64)k * B + q) * m + i);
}

// One thread = one row i; sweeps the nch chunks (32 columns each) of one column tile of the
// B-bit run.  tab: the tile's tables in shared memory, f32 [ncols][2^B] (NB == 1: already
// multiplied by x'); xsm: NB == 1 unused, else x' [ncols][NB].
template <int B, int NB>
__device__ __forceinline__ void tile_rows(const u32 *codes, i64 m, i64 i, int nch,
                                          const float *tab, const float *xsm, float (&acc)[NB]) {
  u32 cur[B];
  load_chunk<B>(cur, codes, m, i, 0);
  for (int k = 0; k < nch; ++k) {
    u32 nxt[B];
    if (k + 1 < nch) load_chunk<B>(nxt, codes, m, i, k + 1);
    const float *tk = tab + ((k * 32) << B);
    const float *xk = xsm + k * 32 * NB;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const float v = tk[(c << B) + chunk_code<B>(cur, c)];
      if (NB == 1) {
        acc[0] += v;
      } else {
#pragma unroll
        for (int b = 0; b < NB; ++b) acc[b] = fmaf(v, xk[c * NB + b], acc[b]);
      }
    }
    if (k + 1 < nch) {
#pragma unroll
      for (int q = 0; q < B; ++q) cur[q] = nxt[q];
    }
  }
}

// The matmul kernel (contract in spqr_gpu.h).
template <int NB>
__device__ __forceinline__ void matmul(const u32 *__restrict__ codes, const u16 *__restrict__ tables,
                                       const i64 *__restrict__ tiles, int ntiles,
                                       const float *__restrict__ xs, i64 ldxs,
                                       float *__restrict__ part, i64 m, i64 R, i64 Lp) {
  extern __shared__ float sm[];
  const int tid = threadIdx.x;
  const i64 r0 = (i64)blockIdx.x * SPQR_CMPQ_ROWS;
  const i64 i = r0 + tid;
  const bool live = i < m;
  const i64 rlast = (r0 + SPQR_CMPQ_ROWS < m ? r0 + SPQR_CMPQ_ROWS : m) - 1;
  const i64 t0 = R ? r0 / R : 0, t1 = R ? rlast / R : 0;
  float acc[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = 0.f;
  for (int ti = blockIdx.y; ti < ntiles; ti += gridDim.y) {
    const i64 *td = tiles + 8 * (i64)ti;
    const int B = (int)td[0], nch = (int)td[1];
    const i64 code_off = td[2], tab_off = td[3], pc0 = td[4];
    const int ncols = nch * 32;
    const int ntab = ncols << B;
    float *xsm = sm + ntab;
    for (i64 t = t0; t <= t1; ++t) {
      __syncthreads();  // the previous tile / table block is done with the shared memory
      const u16 *tab = tables + t * Lp + tab_off;
      for (int e = tid; e < ntab; e += blockDim.x) {
        float v = f16_to_f32(tab[e]);
        if (NB == 1) v *= xs[pc0 + (e >> B)];
        sm[e] = v;
      }
      if (NB > 1) {
        for (int e = tid; e < ncols * NB; e += blockDim.x) {
          const int c = e / NB, b = e - c * NB;
          xsm[e] = xs[b * ldxs + pc0 + c];
        }
      }
      __syncthreads();
      if (live && (R == 0 || i / R == t)) {
        const u32 *cp = codes + code_off;
        switch (B) {
          case 1: tile_rows<1, NB>(cp, m, i, nch, sm, xsm, acc); break;
          case 2: tile_rows<2, NB>(cp, m, i, nch, sm, xsm, acc); break;
          case 3: tile_rows<3, NB>(cp, m, i, nch, sm, xsm, acc); break;
          case 4: tile_rows<4, NB>(cp, m, i, nch, sm, xsm, acc); break;
          case 5: tile_rows<5, NB>(cp, m, i, nch, sm, xsm, acc); break;
          case 6: tile_rows<6, NB>(cp, m, i, nch, sm, xsm, acc); break;
          case 7: tile_rows<7, NB>(cp, m, i, nch, sm, xsm, acc); break;
          default: tile_rows<8, NB>(cp, m, i, nch, sm, xsm, acc); break;
        }
      }
    }
  }
  if (live) {
#pragma unroll
    for (int b = 0; b < NB; ++b) part[((i64)blockIdx.y * NB + b) * m + i] = acc[b];
  }
}

template <int NB>
__device__ __forceinline__ void finish(const float *__restrict__ part, int splits,
                                       const u32 *__restrict__ orows, const u32 *__restrict__ ocolp,
                                       const float *__restrict__ ocorr, const float *__restrict__ xs,
                                       i64 ldxs, void *y, i64 ldy, int out_dtype, i64 m, int batch) {
  const int lane = threadIdx.x & 31;
  const i64 i = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (i >= m) return;
  float acc[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = 0.f;
  for (int s = lane; s < splits; s += 32) {
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[b] += part[((i64)s * NB + b) * m + i];
  }
  if (orows != 0) {
    for (u32 k = orows[i] + lane; k < orows[i + 1]; k += 32) {
      const float d = ocorr[k];
      const i64 c = ocolp[k];
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[b] = fmaf(d, xs[b * ldxs + c], acc[b]);
    }
  }
#pragma unroll
  for (int b = 0; b < NB; ++b) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      if (b >= batch) break;
      const i64 at = (i64)b * ldy + i;
      if (out_dtype == 0)
        ((float *)y)[at] = acc[b];
      else if (out_dtype == 1)
        ((u16 *)y)[at] = f32_to_f16(acc[b]);
      else
        ((u16 *)y)[at] = f32_to_bf16(acc[b]);
    }
  }
}

template <int OUT>
__device__ __forceinline__ void store_f16_value(void *out, i64 at, u32 h) {
  if (OUT == 0)
    ((float *)out)[at] = f16_to_f32(h);
  else if (OUT == 1)
    ((u16 *)out)[at] = (u16)h;
  else
    ((u16 *)out)[at] = f32_to_bf16(f16_to_f32(h));
}

template <int OUT>
__device__ __forceinline__ void dequant(const u32 *__restrict__ codes, const u16 *__restrict__ tables,
                                        const i64 *__restrict__ runs, int nruns,
                                        const u32 *__restrict__ inv_perm, void *out, i64 ldo, i64 m,
                                        i64 n, i64 R, i64 Lp, int rows_per_block) {
  const i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= n) return;
  const i64 j = inv_perm[c];
  int r = 0;
  while (r + 1 < nruns && j >= runs[8 * (r + 1)]) ++r;
  const i64 *rd = runs + 8 * r;
  const i64 jloc = j - rd[0];
  const int B = (int)rd[2];
  const i64 base = rd[3] + (jloc >> 5) * B * m;
  const int bit = (int)(jloc & 31) * B;
  const u32 *w0 = codes + base + (i64)(bit >> 5) * m;
  const int sh = bit & 31;
  const bool straddle = sh + B > 32;
  const u32 mask = (1u << B) - 1u;
  const i64 toff = rd[4] + (jloc << B);
  const i64 ia = (i64)blockIdx.y * rows_per_block;
  const i64 ib = ia + rows_per_block < m ? ia + rows_per_block : m;
  for (i64 i = ia; i < ib; ++i) {
    u32 q = w0[i] >> sh;
    if (straddle) q |= w0[i + m] << (32 - sh);
    q &= mask;
    const i64 t = R ? i / R : 0;
    store_f16_value<OUT>(out, i * ldo + c, tables[t * Lp + toff + q]);
  }
}

template <int OUT>
__device__ __forceinline__ void dequant_outliers(const u32 *__restrict__ orows,
                                                 const u32 *__restrict__ ocol,
                                                 const u16 *__restrict__ oval,
                                                 const u32 *__restrict__ perm, void *out, i64 ldo,
                                                 i64 m) {
  const int lane = threadIdx.x & 31;
  const i64 i = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (i >= m) return;
  for (u32 k = orows[i] + lane; k < orows[i + 1]; k += 32)
    store_f16_value<OUT>(out, i * ldo + perm[ocol[k]], oval[k]);
}

}  // namespace spqr_cmpq

using namespace spqr_cmpq;

extern "C" __global__ void spqr_cmpq_prepare_x(const void *__restrict__ x, i64 ldx, int in_dtype,
                                               const u32 *__restrict__ pcol, i64 np,
                                               float *__restrict__ xs, i64 ldxs, int batch) {
  const i64 jp = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.y;
  if (jp >= np) return;
  const u32 c = pcol[jp];
  float v = 0.f;
  if (b < batch && c != 0xFFFFFFFFu) {
    const i64 at = (i64)b * ldx + c;
    if (in_dtype == 0)
      v = ((const float *)x)[at];
    else if (in_dtype == 1)
      v = f16_to_f32(((const u16 *)x)[at]);
    else
      v = bf16_to_f32(((const u16 *)x)[at]);
  }
  xs[(i64)b * ldxs + jp] = v;
}

#define SPQR_CMPQ_MM(NB)                                                                       \
  extern "C" __global__ void __launch_bounds__(SPQR_CMPQ_ROWS) spqr_cmpq_mm_nb##NB(            \
      const u32 *__restrict__ codes, const u16 *__restrict__ tables, const i64 *__restrict__ tiles, \
      int ntiles, const float *__restrict__ xs, i64 ldxs, float *__restrict__ part, i64 m, i64 R, \
      i64 Lp) {                                                                                \
    matmul<NB>(codes, tables, tiles, ntiles, xs, ldxs, part, m, R, Lp);                        \
  }                                                                                            \
  extern "C" __global__ void spqr_cmpq_finish_nb##NB(                                          \
      const float *__restrict__ part, int splits, const u32 *__restrict__ orows,               \
      const u32 *__restrict__ ocolp, const float *__restrict__ ocorr, const float *__restrict__ xs, \
      i64 ldxs, void *y, i64 ldy, int out_dtype, i64 m, int batch) {                           \
    finish<NB>(part, splits, orows, ocolp, ocorr, xs, ldxs, y, ldy, out_dtype, m, batch);      \
  }
SPQR_CMPQ_MM(1)
SPQR_CMPQ_MM(2)
SPQR_CMPQ_MM(4)
SPQR_CMPQ_MM(8)
SPQR_CMPQ_MM(16)
#undef SPQR_CMPQ_MM

#define SPQR_CMPQ_DQ(OUT, NAME)                                                                 \
  extern "C" __global__ void spqr_cmpq_dequant_##NAME(                                          \
      const u32 *__restrict__ codes, const u16 *__restrict__ tables, const i64 *__restrict__ runs, \
      int nruns, const u32 *__restrict__ inv_perm, void *out, i64 ldo, i64 m, i64 n, i64 R,     \
      i64 Lp, int rows_per_block) {                                                             \
    dequant<OUT>(codes, tables, runs, nruns, inv_perm, out, ldo, m, n, R, Lp, rows_per_block);  \
  }                                                                                             \
  extern "C" __global__ void spqr_cmpq_dequant_outliers_##NAME(                                 \
      const u32 *__restrict__ orows, const u32 *__restrict__ ocol, const u16 *__restrict__ oval, \
      const u32 *__restrict__ perm, void *out, i64 ldo, i64 m) {                                \
    dequant_outliers<OUT>(orows, ocol, oval, perm, out, ldo, m);                                \
  }
SPQR_CMPQ_DQ(0, f32)
SPQR_CMPQ_DQ(1, f16)
SPQR_CMPQ_DQ(2, bf16)
#undef SPQR_CMPQ_DQ
