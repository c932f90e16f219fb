// spqr_kernels.cu -- GPU decoder and fused matvec for the .spqr `bilevel` encoding.
//
// Plain CUDA C++ device code, no Python and no host code: it compiles with nvcc (-c / --cubin)
// and with NVRTC (CuPy RawModule).  Every entry point is an `extern "C" __global__` kernel whose
// arguments and launch contract are documented in spqr_gpu.h.  The physical layout it reads is
// SPEC.md sections 5 and 6, unchanged (no repack at load time).
//
// Arithmetic:
//   * dequantize reproduces SPEC section 7 bit for bit: every f32 operation is an explicit
//     PTX mul.rn / add.rn / sub.rn.f32 (no contraction, no flush to zero), or an fma.rn whose
//     product is exact (q * 2^p * 2^-p - z = round(q - z), SPEC's sub), then round to nearest
//     even with `cvt.rn.f16.f32` / `cvt.rn.bf16.f32` / `cvt.rn.{f16,bf16}x2.f32` (what
//     __float2half_rn / __float2bfloat16_rn compile to).
//   * matvec uses y_i = sum_k s_ik * (sum_{j in k} q_ij x_j - z_ik * sum_{j in k} x_j) in f32
//     (per 16-column half-block), i.e. a different but mathematically equal order; outliers are
//     applied as + (o - w_dense(i,c)) * x_p[c] with w_dense computed exactly as in SPEC C-7.2.
//
// Codes -> f32 without integer->float conversions: an element of B bits that sits at bit
// position p (p + B <= 23) of a 32-bit window is turned into the f32 *subnormal* q * 2^(p-149)
// by one AND; the prepared input x' = x_p * 2^(87-p) makes the exact product q * x_p * 2^-62,
// which the caller scales back by 2^62.  The FMA that consumes the subnormal is inline PTX
// `fma.rn.f32` (no .ftz), so this holds under -ftz=true / fast math too.

// No headers: f16/bf16 conversions are PTX `cvt` instructions (sm_80+), so NVRTC needs no include
// path and the file has no dependency beyond the compiler.

// Tuning knobs (defaults are what the Python layer and spqr_host.cu assume).
#ifndef SPQR_DENSE_UNROLL
#define SPQR_DENSE_UNROLL 2
#endif
#ifndef SPQR_MV1_RB
#define SPQR_MV1_RB 8
#endif
#ifndef SPQR_MV1_RU
#define SPQR_MV1_RU 4
#endif
#ifndef SPQR_MV1_MINB
#define SPQR_MV1_MINB 2
#endif
#ifndef SPQR_DQ_MINB
#define SPQR_DQ_MINB 4  // whole-row dequantizer: blocks per multiprocessor (register cap)
#endif
#ifndef SPQR_DQ2_MINB
#define SPQR_DQ2_MINB 2  // two-row dequantizer: register cap 64 (2 x 512 threads per multiprocessor)
#endif
#ifndef SPQR_DQO_MINB
#define SPQR_DQO_MINB 4  // octet dequantizer: blocks of 256 per multiprocessor (register cap)
#endif
#ifndef SPQR_DQO_OB
#define SPQR_DQO_OB 2  // octet dequantizer: batches of 32 outlier entries fetched before decoding
#endif
#ifndef SPQR_DQO_STAGES
#define SPQR_DQO_STAGES 4  // octet dequantizer: iterations of loads in flight per warp
#endif
#ifndef SPQR_DQ2_MAXT
#define SPQR_DQ2_MAXT 512  // two-row dequantizer: largest block (512 for wide rows)
#endif
#ifndef SPQR_DQ_OUTLIER_NB
#define SPQR_DQ_OUTLIER_NB 8  // dequantizers: outlier batches of 32 in flight after the prefetch
#endif
#ifndef SPQR_DQ_UNROLL
#define SPQR_DQ_UNROLL 1  // whole-row dequantizer: 16-column units per thread in flight
#endif
#ifndef SPQR_OUTLIER_U
#define SPQR_OUTLIER_U 8
#endif
#define SPQR_PRAGMA_(x) _Pragma(#x)
#define SPQR_PRAGMA(x) SPQR_PRAGMA_(x)

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;
typedef unsigned long long u64;

#define SPQR_OUT_F32 0
#define SPQR_OUT_F16 1
#define SPQR_OUT_BF16 2

namespace spqr {

__device__ __forceinline__ float f16_bits_to_f32(u32 bits) {
  float f;
  unsigned short h = (unsigned short)(bits & 0xFFFFu);
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

// IEEE f32 operations with round-to-nearest-even that keep subnormals whatever the compile
// flags: CuPy always passes -ftz=true to NVRTC, which would turn __fmul_rn into mul.rn.ftz.
// Inline PTX without `.ftz` is exact SPEC C-7.1/7.2 arithmetic under any flags.
__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float sub_rn(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
// a * b + c with subnormal operands honoured (the matvec's code decode relies on it).
__device__ __forceinline__ float fma_keep_subnormal(float a, float b, float c) {
  float r;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
}

__device__ __forceinline__ float bf16_bits_to_f32(u32 bits) {
  return __uint_as_float((bits & 0xFFFFu) << 16);
}

// Round to nearest even; beyond the largest finite value -> infinity (SPEC C-7.5).
__device__ __forceinline__ u32 f32_to_f16_bits(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ u32 f32_to_bf16_bits(float f) {
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// float with the given biased exponent and zero mantissa: 2^(e - 127), exact.
__device__ __forceinline__ float pow2f(int e) { return __int_as_float((e + 127) << 23); }

// Statistics (s, z) of row `row`, column group `k` (SPEC C-7.1), exact.
// fp16 statistics: `stats` is u32 [m * G] (low half = scale, high half = zero).
// packed statistics: `stats` is u32 [m * stats_row_words], `stats2` is u16 [T, G, 4].
template <bool PACKED>
__device__ __forceinline__ void load_stats(const u32* __restrict__ stats,
                                           const u16* __restrict__ stats2, i64 row, i64 tile,
                                           int k, int G, i64 stats_row_words, int sb, float& s,
                                           float& z) {
  if (!PACKED) {
    u32 pr = __ldg(stats + row * (i64)G + k);
    s = f16_bits_to_f32(pr);
    z = f16_bits_to_f32(pr >> 16);
  } else {
    const u32* srow = stats + row * stats_row_words;
    u32 bit = (u32)k * (u32)(2 * sb);
    u32 wi = bit >> 5, sh = bit & 31u;
    u32 lo = __ldg(srow + wi);
    u32 hi = (sh + 2u * (u32)sb > 32u) ? __ldg(srow + wi + 1) : 0u;
    u32 v = __funnelshift_r(lo, hi, sh);
    u32 smask = (1u << sb) - 1u;
    float qs = (float)(v & smask);
    float qz = (float)((v >> sb) & smask);
    uint2 rec = __ldg(reinterpret_cast<const uint2*>(stats2) + (tile * (i64)G + k));
    float ss = f16_bits_to_f32(rec.x), sbase = f16_bits_to_f32(rec.x >> 16);
    float zs = f16_bits_to_f32(rec.y), zbase = f16_bits_to_f32(rec.y >> 16);
    s = add_rn(sbase, mul_rn(ss, qs));
    z = add_rn(zbase, mul_rn(zs, qz));
  }
}

// Code of row `row`, stored column `col` with runtime bit width (any B in 1..8).
__device__ __forceinline__ u32 load_code(const u32* __restrict__ codes, i64 row,
                                         i64 code_row_words, i64 col, int B) {
  const u32* crow = codes + row * code_row_words;
  i64 bit = col * (i64)B;
  i64 wi = bit >> 5;
  u32 sh = (u32)(bit & 31);
  u32 lo = __ldg(crow + wi);
  u32 hi = (sh + (u32)B > 32u) ? __ldg(crow + wi + 1) : 0u;
  return __funnelshift_r(lo, hi, sh) & ((1u << B) - 1u);
}

// Load the B words (32 elements) of one sub-chunk with the widest aligned vector loads.
template <int B>
__device__ __forceinline__ void load_subchunk(const u32* __restrict__ p, u32 (&w)[B]) {
  if (B % 4 == 0) {
#pragma unroll
    for (int v = 0; v < B / 4; ++v) {
      uint4 t = __ldg(reinterpret_cast<const uint4*>(p) + v);
      w[4 * v] = t.x;
      w[4 * v + 1] = t.y;
      w[4 * v + 2] = t.z;
      w[4 * v + 3] = t.w;
    }
  } else if (B % 2 == 0) {
#pragma unroll
    for (int v = 0; v < B / 2; ++v) {
      uint2 t = __ldg(reinterpret_cast<const uint2*>(p) + v);
      w[2 * v] = t.x;
      w[2 * v + 1] = t.y;
    }
  } else {
#pragma unroll
    for (int v = 0; v < B; ++v) w[v] = __ldg(p + v);
  }
}

// Element e (0..31) of a sub-chunk held in w[0..B): as the raw integer code.
template <int B>
__device__ __forceinline__ u32 code_of(const u32 (&w)[B], int e) {
  const int bit = e * B, wi = bit >> 5, sh = bit & 31;
  u32 lo = w[wi];
  u32 hi = (wi + 1 < B) ? w[wi + 1] : 0u;
  u32 v = sh ? __funnelshift_r(lo, hi, sh) : lo;
  return v & ((1u << B) - 1u);
}

// The 23-bit windows of a sub-chunk: window t holds elements t*EPW .. t*EPW+EPW-1 at bit
// positions 0, B, 2B, ... (one funnel shift per window instead of one per element).
template <int B>
struct Windows {
  static constexpr int EPW = 23 / B;
  static constexpr int N = (32 + EPW - 1) / EPW;
  u32 v[N];
  __device__ __forceinline__ void load(const u32 (&w)[B]) {
#pragma unroll
    for (int t = 0; t < N; ++t) {
      const int st = t * EPW * B, wi = st >> 5, sh = st & 31;
      const u32 lo = w[wi];
      const u32 hi = (wi + 1 < B) ? w[wi + 1] : 0u;
      v[t] = sh ? __funnelshift_r(lo, hi, sh) : lo;
    }
  }
  // element e as the f32 subnormal q * 2^(p(e) - 149)
  __device__ __forceinline__ float subnormal(int e) const {
    const int p = (e % EPW) * B;
    return __uint_as_float(v[e / EPW] & (((1u << B) - 1u) << p));
  }
};

// floor(a / g) for g % 16 == 0; a shift when g is a power of two (the usual group sizes).
__device__ __forceinline__ u32 div_group(u64 a, int g) {
  if ((g & (g - 1)) == 0) return (u32)(a >> (__ffs(g) - 1));
  return (u32)(a / (u64)g);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ void store_out(u16* y, i64 idx, float v, int out_dtype) {
  y[idx] = (u16)(out_dtype == SPQR_OUT_BF16 ? f32_to_bf16_bits(v) : f32_to_f16_bits(v));
}

// ------------------------------------------------------------------------------------------
// Input preparation: x' = gathered, scaled input; X16 = sums of 16-column half-blocks.
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ void prepare_x(const u16* __restrict__ x, i64 ldx, int in_dtype,
                                          const u32* __restrict__ perm, int B, i64 n, i64 nsub,
                                          float* __restrict__ xs, i64 ldxs,
                                          float* __restrict__ x16, i64 ldx16, int nbatch) {
  // One thread per element j < 32 * nsub; the 16 lanes of a half-block sum it by shuffles.
  const int b = blockIdx.y;
  const i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= nbatch || (j & ~(i64)31) >= 32 * nsub) return;  // whole warps leave together
  const int EPW = 23 / B;
  float v = 0.f;
  if (j < n) {
    const i64 src = perm ? (i64)__ldg(perm + j) : j;
    const u32 bits = __ldg(x + (i64)b * ldx + src);
    v = (in_dtype == SPQR_OUT_BF16) ? bf16_bits_to_f32(bits) : f16_bits_to_f32(bits);
  }
  const int p = ((int)(j & 31) % EPW) * B;
  xs[(i64)b * ldxs + j] = v * pow2f(87 - p);  // exact power-of-two scaling
  float sum = v;
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if ((threadIdx.x & 15) == 0) x16[(i64)b * ldx16 + (j >> 4)] = sum;
}

// ------------------------------------------------------------------------------------------
// Outlier stream of rows [row0, row0 + nrows) (nrows <= NR), walked by one warp in passes of
// 32*U entries: the rows' entries are contiguous (C-6.1), so one running prefix sum of the
// deltas serves all rows; base[r] (the sum before row r's first entry) turns it into columns.
// All entry loads of a pass are issued before the scans, and f() is called for U entries per
// lane back to back so that its loads overlap too.  f(r, col, value_bits, active).
// ------------------------------------------------------------------------------------------
template <int NR, int U, typename F>
__device__ __forceinline__ void scan_outliers(const u32* __restrict__ orows,
                                              const u32* __restrict__ oents, i64 row0, int nrows,
                                              F&& f) {
  const int lane = threadIdx.x & 31;
  u32 start[NR + 1];
#pragma unroll
  for (int r = 0; r <= NR; ++r) start[r] = __ldg(orows + row0 + min(r, nrows));
  const u32 e_end = start[NR];
  u64 base[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) base[r] = 0;
  u64 carry = 0;
  for (u32 cb = start[0]; cb < e_end; cb += 32 * U) {
    u32 ent[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const u32 e = cb + 32 * u + lane;
      ent[u] = e < e_end ? __ldg(oents + e) : 0xFFFF0000u;  // past the end: delta 0, skip
    }
    i64 col[U];
    int rsel[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      u32 cs = ent[u] & 0xFFFFu;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const u32 t = __shfl_up_sync(0xffffffffu, cs, o);
        if (lane >= o) cs += t;
      }
      const u64 incl = carry + cs;
      carry += __shfl_sync(0xffffffffu, cs, 31);
      const i64 chunk = (i64)cb + 32 * u;
      const u32 lo = (u32)incl, hi = (u32)(incl >> 32);
#pragma unroll
      for (int r = 1; r < NR; ++r) {  // row r starts inside this chunk: its base is known now
        const i64 idx = (i64)start[r] - 1 - chunk;
        if (idx >= 0 && idx < 32) {
          const u32 blo = __shfl_sync(0xffffffffu, lo, (int)idx);
          const u32 bhi = __shfl_sync(0xffffffffu, hi, (int)idx);
          base[r] = ((u64)bhi << 32) | blo;
        }
      }
      const u32 e = (u32)chunk + lane;
      int r = 0;
      u64 b = base[0];
#pragma unroll
      for (int rr = 1; rr < NR; ++rr)
        if (e >= start[rr]) {
          r = rr;
          b = base[rr];
        }
      rsel[u] = r;
      col[u] = (i64)(incl - b) - 1;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const u32 val = ent[u] >> 16;
      const bool act = val != 0xFFFFu;
      f(rsel[u], act ? col[u] : 0, val, act);
    }
  }
}

// Outlier corrections of the block's rows (run by the block's last warp, concurrently with the
// dense warps): sum over outliers (i, c) of (o - w_dense(i, c)) * x_p[c], w_dense exact (C-7.2).
template <int B, bool PACKED, int R, int NB>
__device__ __forceinline__ void outlier_corrections(
    const u32* __restrict__ codes, const u32* __restrict__ stats, const u16* __restrict__ stats2,
    const u32* __restrict__ orows, const u32* __restrict__ oents, const float* const (&xcol)[NB],
    i64 row0, i64 m, int g, int S, int sb, int G, i64 code_row_words, i64 stats_row_words,
    float (&corr)[R][NB]) {
  constexpr int EPW = 23 / B;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < NB; ++c) corr[r][c] = 0.f;
  const int nrows = (int)min((i64)R, m - row0);
  scan_outliers<R, SPQR_OUTLIER_U>(orows, oents, row0, nrows, [&](int r, i64 col, u32 val, bool act) {
    const i64 row = min(row0 + r, m - 1);  // lanes past the end may name a row >= m
    const u32 q = load_code(codes, row, code_row_words, col, B);
    float s_, z_;
    load_stats<PACKED>(stats, stats2, row, PACKED ? row / S : 0, (int)div_group(col, g), G,
                       stats_row_words, sb, s_, z_);
    const float wd = mul_rn(s_, sub_rn((float)q, z_));
    const float d = act ? f16_bits_to_f32(val) - wd : 0.f;
    const int p = ((int)(col & 31) % EPW) * B;
    const float unscale = pow2f(p - 87);
#pragma unroll
    for (int c = 0; c < NB; ++c) {
      const float t = d * (__ldg(xcol[c] + col) * unscale);
#pragma unroll
      for (int rr = 0; rr < R; ++rr) corr[rr][c] += (rr == r) ? t : 0.f;
    }
  });
}

// ------------------------------------------------------------------------------------------
// Fused matvec / small-batch matmul (SIMT): R rows per block, NB batch columns per block.
// ------------------------------------------------------------------------------------------
template <int B, bool PACKED, int R, int NB>
__device__ __forceinline__ void matvec(const u32* __restrict__ codes, const u32* __restrict__ stats,
                                       const u16* __restrict__ stats2,
                                       const u32* __restrict__ orows,
                                       const u32* __restrict__ oents,
                                       const float* __restrict__ xs, i64 ldxs,
                                       const float* __restrict__ x16, i64 ldx16,
                                       u16* __restrict__ y, i64 ldy, int out_dtype, i64 m, i64 n,
                                       int g, int S, int sb, int G, i64 code_row_words,
                                       i64 stats_row_words, int nbatch) {
    const i64 row0 = (i64)blockIdx.x * R;
  const int b0 = blockIdx.y * NB;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  // With outliers the last warp of the block computes their corrections (concurrently).
  const int ndense = orows != nullptr ? nwarps - 1 : nwarps;
  const i64 nsub = (n + 31) >> 5;

  i64 rows[R], tiles[R];
  const u32* crow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    rows[r] = min(row0 + r, m - 1);
    tiles[r] = PACKED ? rows[r] / S : 0;
    crow[r] = codes + rows[r] * code_row_words;
  }
  const float* xcol[NB];
  const float* x16col[NB];
#pragma unroll
  for (int c = 0; c < NB; ++c) {
    int bc = min(b0 + c, nbatch - 1);
    xcol[c] = xs + (i64)bc * ldxs;
    x16col[c] = x16 + (i64)bc * ldx16;
  }

  float tot[R][NB];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < NB; ++c) tot[r][c] = 0.f;

  const float two62 = pow2f(62);

  if (warp == ndense) {
    outlier_corrections<B, PACKED, R, NB>(codes, stats, stats2, orows, oents, xcol, row0, m, g,
                                          S, sb, G, code_row_words, stats_row_words, tot);
  } else {
  SPQR_PRAGMA(unroll SPQR_DENSE_UNROLL)
  for (i64 s = threadIdx.x; s < nsub; s += 32 * ndense) {
    u32 w[R][B];
#pragma unroll
    for (int r = 0; r < R; ++r) load_subchunk<B>(crow[r] + s * B, w[r]);

    const u32 j0 = (u32)(s * 32);
    const int k0 = (int)div_group(j0, g);
    const int k1 = min((int)div_group(j0 + 16u, g), G - 1);
    float sc[R][2], zc[R][2];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      load_stats<PACKED>(stats, stats2, rows[r], tiles[r], k0, G, stats_row_words, sb, sc[r][0],
                         zc[r][0]);
      if (k1 != k0) {
        load_stats<PACKED>(stats, stats2, rows[r], tiles[r], k1, G, stats_row_words, sb,
                           sc[r][1], zc[r][1]);
      } else {
        sc[r][1] = sc[r][0];
        zc[r][1] = zc[r][0];
      }
    }

    Windows<B> win[R];
#pragma unroll
    for (int r = 0; r < R; ++r) win[r].load(w[r]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float acc[R][NB];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < NB; ++c) acc[r][c] = 0.f;
#pragma unroll
      for (int q8 = 0; q8 < 2; ++q8) {
        const int e0 = h * 16 + q8 * 8;
        float qf[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int e = 0; e < 8; ++e) qf[r][e] = win[r].subnormal(e0 + e);
#pragma unroll
        for (int c = 0; c < NB; ++c) {
          const float4* xp = reinterpret_cast<const float4*>(xcol[c] + s * 32 + e0);
          float4 xa = __ldg(xp), xb = __ldg(xp + 1);
          float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r][c] = fma_keep_subnormal(qf[r][e], xv[e], acc[r][c]);
        }
      }
#pragma unroll
      for (int c = 0; c < NB; ++c) {
        float xsum = __ldg(x16col[c] + 2 * s + h);
#pragma unroll
        for (int r = 0; r < R; ++r)
          tot[r][c] += sc[r][h] * fmaf(acc[r][c], two62, -zc[r][h] * xsum);
      }
    }
  }

  }  // dense warps

  // Block reduction: dense warps 0..W-1 and, when there are outliers, the extra warp W that
  // computed the outlier corrections; red[w][r][c].
  __shared__ float red[9][R][NB];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < NB; ++c) {
      const float v = warp_sum(tot[r][c]);
      if (lane == 0) red[warp][r][c] = v;
    }
  __syncthreads();
  if (threadIdx.x < R * NB) {
    const int r = threadIdx.x / NB, c = threadIdx.x % NB;
    const i64 row = row0 + r;
    if (row < m && b0 + c < nbatch) {
      float v = 0.f;
      for (int w2 = 0; w2 < nwarps; ++w2) v += red[w2][r][c];
      store_out(y, (i64)(b0 + c) * ldy + row, v, out_dtype);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Batch-1 "row sweep" matvec.  Each thread owns one 32-column sub-chunk of a column split of
// up to 256 sub-chunks (8192 columns) and sweeps RB rows: its x' values, group indices and
// (packed statistics) stats2 records stay in registers across rows, and RU rows' loads are in
// flight together.  Per-split row sums go to part[split][row]; spqr_mv1_finish adds the splits
// and the outlier corrections and rounds y.
// ------------------------------------------------------------------------------------------
template <int B, bool PACKED, int RB, int RU>
__device__ __forceinline__ void mv1_sweep(const u32* __restrict__ codes,
                                          const u32* __restrict__ stats,
                                          const u16* __restrict__ stats2,
                                          const u32* __restrict__ orows,
                                          const u32* __restrict__ oents,
                                          const float* __restrict__ xs,
                                          const float* __restrict__ x16,
                                          float* __restrict__ part, u16* __restrict__ y,
                                          int out_dtype, i64 m, i64 n, int g, int S, int sb,
                                          int G, i64 code_row_words, i64 stats_row_words) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const i64 nsub = (n + 31) >> 5;
  const i64 s = (i64)blockIdx.y * 256 + threadIdx.x;  // this thread's sub-chunk
  const bool active = s < nsub;
  const i64 row0 = (i64)blockIdx.x * RB;
  const float two62 = pow2f(62);

  float xv[32];
  float xh0 = 0.f, xh1 = 0.f;
  int k0 = 0, k1 = 0;
  if (active) {
    const float4* xp = reinterpret_cast<const float4*>(xs + s * 32);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const float4 t = __ldg(xp + q);
      xv[4 * q] = t.x;
      xv[4 * q + 1] = t.y;
      xv[4 * q + 2] = t.z;
      xv[4 * q + 3] = t.w;
    }
    xh0 = __ldg(x16 + 2 * s);
    xh1 = __ldg(x16 + 2 * s + 1);
    k0 = (int)div_group((u64)s * 32, g);
    k1 = min((int)div_group((u64)s * 32 + 16, g), G - 1);
  } else {
#pragma unroll
    for (int e = 0; e < 32; ++e) xv[e] = 0.f;
  }
  // packed statistics: the bits of (qs, qz) of groups k0..k1 sit at the same offset in every
  // row: bit0 .. bit0 + (k1 - k0 + 1) * 2sb
  const u32 bit0 = (u32)k0 * (u32)(2 * sb);
  const u32 swi = bit0 >> 5, ssh = bit0 & 31u;
  const bool two_words = ssh + (u32)((k1 - k0 + 1) * 2 * sb) > 32u;
  const u32 smask = (1u << sb) - 1u;
  const int kshift = (k1 - k0) * 2 * sb;

  // stats2 records of (tile, k0) and (tile, k1), reloaded when the tile changes
  i64 tile = -1, tile_end = 0;
  float ss0 = 0.f, sb0 = 0.f, zs0 = 0.f, zb0 = 0.f, ss1 = 0.f, sb1 = 0.f, zs1 = 0.f, zb1 = 0.f;

  float acc[RB];
#pragma unroll
  for (int r = 0; r < RB; ++r) acc[r] = 0.f;

#pragma unroll
  for (int rg = 0; rg < RB; rg += RU) {
    u32 w[RU][B];
    u32 st[RU][2];
#pragma unroll
    for (int u = 0; u < RU; ++u) {
      const i64 row = min(row0 + rg + u, m - 1);
      if (active) {
        load_subchunk<B>(codes + row * code_row_words + s * B, w[u]);
        if (PACKED) {
          const u32* srow = stats + row * stats_row_words + swi;
          st[u][0] = __ldg(srow);
          st[u][1] = two_words ? __ldg(srow + 1) : 0u;
        } else {
          st[u][0] = __ldg(stats + row * (i64)G + k0);
          st[u][1] = __ldg(stats + row * (i64)G + k1);
        }
      } else {
#pragma unroll
        for (int b = 0; b < B; ++b) w[u][b] = 0u;
        st[u][0] = st[u][1] = 0u;
      }
    }
#pragma unroll
    for (int u = 0; u < RU; ++u) {
      const i64 row = min(row0 + rg + u, m - 1);
      float s0, z0, s1, z1;
      if (PACKED) {
        if (row >= tile_end) {  // uniform across the block: all threads sweep the same rows
          tile = row / S;
          tile_end = (tile + 1) * (i64)S;
          if (active) {
            const uint2 r0 = __ldg(reinterpret_cast<const uint2*>(stats2) + (tile * G + k0));
            const uint2 r1 = __ldg(reinterpret_cast<const uint2*>(stats2) + (tile * G + k1));
            ss0 = f16_bits_to_f32(r0.x);
            sb0 = f16_bits_to_f32(r0.x >> 16);
            zs0 = f16_bits_to_f32(r0.y);
            zb0 = f16_bits_to_f32(r0.y >> 16);
            ss1 = f16_bits_to_f32(r1.x);
            sb1 = f16_bits_to_f32(r1.x >> 16);
            zs1 = f16_bits_to_f32(r1.y);
            zb1 = f16_bits_to_f32(r1.y >> 16);
          }
        }
        const u32 v = __funnelshift_r(st[u][0], st[u][1], ssh);
        s0 = add_rn(sb0, mul_rn(ss0, (float)(v & smask)));
        z0 = add_rn(zb0, mul_rn(zs0, (float)((v >> sb) & smask)));
        const u32 v1 = v >> kshift;
        s1 = add_rn(sb1, mul_rn(ss1, (float)(v1 & smask)));
        z1 = add_rn(zb1, mul_rn(zs1, (float)((v1 >> sb) & smask)));
      } else {
        s0 = f16_bits_to_f32(st[u][0]);
        z0 = f16_bits_to_f32(st[u][0] >> 16);
        s1 = f16_bits_to_f32(st[u][1]);
        z1 = f16_bits_to_f32(st[u][1] >> 16);
      }
      Windows<B> win;
      win.load(w[u]);
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;  // two chains per half
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        a0 = fma_keep_subnormal(win.subnormal(e), xv[e], a0);
        a1 = fma_keep_subnormal(win.subnormal(e + 8), xv[e + 8], a1);
        a2 = fma_keep_subnormal(win.subnormal(e + 16), xv[e + 16], a2);
        a3 = fma_keep_subnormal(win.subnormal(e + 24), xv[e + 24], a3);
      }
      acc[rg + u] += s0 * fmaf(a0 + a1, two62, -z0 * xh0) + s1 * fmaf(a2 + a3, two62, -z1 * xh1);
    }
  }

  __shared__ float red[8][RB];
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0) red[warp][r] = v;
  }
  __syncthreads();
  // Row r of the block is finished by warp r % nwarps: outlier corrections (split 0 only; the
  // codes and statistics they need were just streamed by this block, so they are L2 hits),
  // then y directly when there is one split, else part[split][row].
  const int nwarps = blockDim.x >> 5;
  for (int r = warp; r < RB; r += nwarps) {
    const i64 row = row0 + r;
    if (row >= m) break;
    float v = 0.f;
    if (orows != nullptr && blockIdx.y == 0) {
      const i64 tile_r = PACKED ? row / S : 0;
      constexpr int EPW = 23 / B;
      scan_outliers<1, 4>(orows, oents, row, 1, [&](int, i64 col, u32 val, bool act) {
        const u32 q = load_code(codes, row, code_row_words, col, B);
        float s_, z_;
        load_stats<PACKED>(stats, stats2, row, tile_r, (int)div_group(col, g), G,
                           stats_row_words, sb, s_, z_);
        const float wd = mul_rn(s_, sub_rn((float)q, z_));
        const float d = act ? f16_bits_to_f32(val) - wd : 0.f;
        const int p = ((int)(col & 31) % EPW) * B;
        v = fmaf(d, __ldg(xs + col) * pow2f(p - 87), v);
      });
      v = warp_sum(v);
    }
    if (lane == 0) {
      for (int w2 = 0; w2 < nwarps; ++w2) v += red[w2][r];
      if (gridDim.y == 1)
        store_out(y, row, v, out_dtype);
      else
        part[(i64)blockIdx.y * m + row] = v;
    }
  }
}

// y[row] = sum of the splits' partial sums (outliers already added by split 0), rounded.
// One thread per row; only launched when there is more than one split.
__device__ __forceinline__ void mv1_finish(const float* __restrict__ part, int nsplit,
                                           u16* __restrict__ y, int out_dtype, i64 m) {
  const i64 row = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= m) return;
  float v = 0.f;
  for (int sp = 0; sp < nsplit; ++sp) v += __ldg(part + (i64)sp * m + row);
  store_out(y, row, v, out_dtype);
}

// ------------------------------------------------------------------------------------------
// Dequantize (bit-exact, SPEC section 7). One thread per (row, 32-column sub-chunk).
// B == 0: runtime bit width (any 1..8). OUT: SPQR_OUT_*.
// ------------------------------------------------------------------------------------------
template <int OUT>
__device__ __forceinline__ void write_elem(void* out, i64 idx, float v) {
  if (OUT == SPQR_OUT_F32)
    reinterpret_cast<float*>(out)[idx] = v;
  else if (OUT == SPQR_OUT_F16)
    reinterpret_cast<u16*>(out)[idx] = (u16)f32_to_f16_bits(v);
  else
    reinterpret_cast<u16*>(out)[idx] = (u16)f32_to_bf16_bits(v);
}

template <int OUT>
__device__ __forceinline__ u32 out_bits(float v) {
  if (OUT == SPQR_OUT_F16) return f32_to_f16_bits(v);
  return f32_to_bf16_bits(v);
}

// The exact values v (C-7.1, C-7.2) of the 32 stored columns j0 .. j0+31 of one row; entries
// past n are 0.  B == 0: bit width `bits` at run time.
template <int B, bool PACKED>
__device__ __forceinline__ void decode_subchunk(const u32* __restrict__ codes,
                                                const u32* __restrict__ stats,
                                                const u16* __restrict__ stats2, i64 row, i64 tile,
                                                i64 j0, int nvalid, int bits, int g, int sb, int G,
                                                i64 code_row_words, i64 stats_row_words,
                                                float (&v)[32]) {
  int k = (int)(j0 / g);
  i64 next = (i64)(k + 1) * g;  // first column of the next group
  float sc, zc;
  load_stats<PACKED>(stats, stats2, row, tile, k, G, stats_row_words, sb, sc, zc);
  if (B > 0) {
    constexpr int BB = B > 0 ? B : 1;
    u32 w[BB];
    load_subchunk<BB>(codes + row * code_row_words + (j0 >> 5) * BB, w);
#pragma unroll
    for (int e = 0; e < 32; ++e) {
      if (j0 + e == next && e < nvalid) {
        ++k;
        next += g;
        load_stats<PACKED>(stats, stats2, row, tile, k, G, stats_row_words, sb, sc, zc);
      }
      v[e] = mul_rn(sc, sub_rn((float)code_of<BB>(w, e), zc));
    }
  } else {
#pragma unroll
    for (int e = 0; e < 32; ++e) {
      if (e < nvalid) {
        if (j0 + e == next) {
          ++k;
          next += g;
          load_stats<PACKED>(stats, stats2, row, tile, k, G, stats_row_words, sb, sc, zc);
        }
        const float q = (float)load_code(codes, row, code_row_words, j0 + e, bits);
        v[e] = mul_rn(sc, sub_rn(q, zc));
      } else {
        v[e] = 0.f;
      }
    }
  }
}

// Dense pass, one thread per (row, 32-column sub-chunk); writes out[row][perm[j]] directly
// (vector stores without perm; scattered stores with it).
template <int B, bool PACKED, int OUT>
__device__ __forceinline__ void dequant(const u32* __restrict__ codes,
                                        const u32* __restrict__ stats,
                                        const u16* __restrict__ stats2,
                                        const u32* __restrict__ perm, void* __restrict__ out,
                                        i64 ldo, i64 m, i64 n, int bits, int g, int S, int sb,
                                        int G, i64 code_row_words, i64 stats_row_words) {
  const i64 nsub = (n + 31) >> 5;
  const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= m * nsub) return;
  const i64 row = idx / nsub, s = idx - row * nsub;
  const i64 tile = PACKED ? row / S : 0;
  const i64 j0 = s * 32;
  const int nvalid = (int)min((i64)32, n - j0);
  float v[32];
  decode_subchunk<B, PACKED>(codes, stats, stats2, row, tile, j0, nvalid, bits, g, sb, G,
                             code_row_words, stats_row_words, v);

  const i64 obase = row * ldo;
  if (perm == nullptr && nvalid == 32 && OUT != SPQR_OUT_F32 && ((obase + j0) & 7) == 0) {
    uint4* dst = reinterpret_cast<uint4*>(reinterpret_cast<u16*>(out) + obase + j0);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      uint4 t;
      t.x = out_bits<OUT>(v[8 * q + 0]) | (out_bits<OUT>(v[8 * q + 1]) << 16);
      t.y = out_bits<OUT>(v[8 * q + 2]) | (out_bits<OUT>(v[8 * q + 3]) << 16);
      t.z = out_bits<OUT>(v[8 * q + 4]) | (out_bits<OUT>(v[8 * q + 5]) << 16);
      t.w = out_bits<OUT>(v[8 * q + 6]) | (out_bits<OUT>(v[8 * q + 7]) << 16);
      dst[q] = t;
    }
  } else if (perm == nullptr && nvalid == 32 && OUT == SPQR_OUT_F32 && ((obase + j0) & 3) == 0) {
    float4* dst = reinterpret_cast<float4*>(reinterpret_cast<float*>(out) + obase + j0);
#pragma unroll
    for (int q = 0; q < 8; ++q)
      dst[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  } else {
#pragma unroll
    for (int e = 0; e < 32; ++e) {
      if (e < nvalid) {
        const i64 j = j0 + e;
        const i64 col = perm ? (i64)__ldg(perm + j) : j;
        write_elem<OUT>(out, obase + col, v[e]);
      }
    }
  }
}

// One entry per lane of 32 consecutive outlier entries (C-6): its value bits (0xFFFF: a skip,
// or past the end) and its stored column; `colbase` (the column of the entry before this batch,
// -1 at the row's start) moves past the batch.
__device__ __forceinline__ void outlier_scan(u32 ent, i64& colbase, u32& val, i64& col) {
  const int lane = threadIdx.x & 31;
  u32 cs = ent & 0xFFFFu;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u32 t = __shfl_up_sync(0xffffffffu, cs, o);
    if (lane >= o) cs += t;
  }
  col = colbase + (i64)cs;
  colbase += (i64)__shfl_sync(0xffffffffu, cs, 31);
  val = ent >> 16;
}

// The entries [e, e + 32 NB) of a row's outlier stream (those below e1), NB loads per lane in
// flight, one warp: f(value bits, stored column) for every real entry (no skips); `colbase`
// advances past them. The dequantizers walk the entries they did not prefetch with it.
// Entries e + 32 b + lane (b < NB) of an outlier stream, those below e1; past the end: a skip
// of delta 0. All NB loads in flight.
template <int NB>
__device__ __forceinline__ void load_entry_batches(const u32* __restrict__ oents, u32 e, u32 e1,
                                                   u32 (&ent)[NB]) {
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    const u32 idx = e + 32 * b + (threadIdx.x & 31);
    ent[b] = idx < e1 ? __ldg(oents + idx) : 0xFFFF0000u;
  }
}

template <int NB, typename F>
__device__ __forceinline__ void outlier_batches(const u32* __restrict__ oents, u32 e, u32 e1,
                                                i64& colbase, F&& f) {
  u32 ent[NB];
  load_entry_batches<NB>(oents, e, e1, ent);
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    u32 val;
    i64 col;
    outlier_scan(ent[b], colbase, val, col);
    if (val != 0xFFFFu) f(val, col);
  }
}

// One row's outlier entries for one warp of the dequantizers: fetch() loads and decodes the
// first 32 * OB (columns < 2^32) before the dense pass, so that their loads overlap it; write()
// hands them and then the rest (outlier_batches) to f(value bits, destination column) after
// it. The destination of stored column j is perm[j] when `perm` is given (its loads for the
// prefetched entries are issued by fetch() too), else j.
template <int OB>
struct RowOutliers {
  u32 val[OB], col[OB];
  u32 e0 = 0, e1 = 0;
  i64 base = -1;  // the column before the next entry not yet decoded

  // `present`: the row exists (else it has no entries).
  __device__ __forceinline__ void fetch(const u32* __restrict__ orows,
                                        const u32* __restrict__ oents, i64 row, bool present,
                                        const u32* __restrict__ perm = nullptr) {
    e0 = __ldg(orows + row);
    e1 = present ? __ldg(orows + row + 1) : e0;
    u32 ent[OB];
    load_entry_batches<OB>(oents, e0, e1, ent);
#pragma unroll
    for (int b = 0; b < OB; ++b) {
      i64 c;
      outlier_scan(ent[b], base, val[b], c);
      col[b] = (u32)((val[b] != 0xFFFFu && perm != nullptr) ? (i64)__ldg(perm + c) : c);
    }
  }
  template <typename F>
  __device__ __forceinline__ void write(const u32* __restrict__ oents, F&& f,
                                        const u32* __restrict__ perm = nullptr) {
#pragma unroll
    for (int b = 0; b < OB; ++b)
      if (val[b] != 0xFFFFu) f(val[b], (i64)col[b]);
    for (u32 e = e0 + 32 * OB; e < e1; e += 32 * SPQR_DQ_OUTLIER_NB)  // the rest
      outlier_batches<SPQR_DQ_OUTLIER_NB>(oents, e, e1, base, [&](u32 v, i64 c) {
        f(v, perm != nullptr ? (i64)__ldg(perm + c) : c);
      });
  }
};

// f32 values a (low half) and b (high half) rounded to nearest even into one packed word of the
// output type (cvt.rn.f16x2.f32 / cvt.rn.bf16x2.f32 take the high half first).
template <int OUT>
__device__ __forceinline__ u32 pack2(float a, float b) {
  u32 r;
  if (OUT == SPQR_OUT_F16)
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
  else
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
  return r;
}

// 0x4B000000 (2^23 as f32 bits) held in a register: ptxas cannot fold it into an immediate
// because it depends on a kernel argument (g > 0 by contract, so g >> 31 == 0). With both the
// field mask and this constant as immediates, (w & mask) | 0x4B000000 would take two LOP3s.
__device__ __forceinline__ u32 magic_reg(int g) { return 0x4B000000u | ((u32)g >> 31); }

// A 16-column unit (columns 16u .. 16u+15 of one row) of the dequantizer, B in {2, 3, 4, 8},
// whose statistics (s, z) are uniform over the unit (g % 16 == 0): load() issues every load,
// decode() gives the exact values (C-7.1, C-7.2).
template <int B, bool PACKED>
struct Unit16 {
  // the unit's 16 B bits start at bit 16 B u, a multiple of 16: they lie in 1 (B = 2),
  // 2 (B = 3, 4) or 4 (B = 8) words
  static constexpr int NW = B == 8 ? 4 : ((B == 3 || B == 4) ? 2 : 1);
  u32 w[NW + 1];  // code words from the unit's first (w[NW] = 0: the funnel shifts' spill-in)
  u32 sh;         // bit offset of the unit in w[0]
  u32 s0, s1;     // statistics: the f16 (s, z) pair, or the words holding the two codes
  uint2 rec;      // packed statistics: the stats2 record (C-7.1)

  // Issue every load of unit u (group k) of the row whose codes start at `crow` (crw words),
  // statistics at `srow` (packed codes, or f16 pairs) and stats2 records at `recs` (its
  // tile's); nothing is used yet. `full`: the unit's 16 columns all lie in the row (no
  // bounds checks). I: the index type (u32 where n * B < 2^32).
  template <typename I>
  __device__ __forceinline__ void load(const u32* __restrict__ crow, I crw, I u,
                                       const u32* __restrict__ srow,
                                       const uint2* __restrict__ recs, int k, int sb,
                                       bool full) {
    const I bit0 = (I)(16 * B) * u;
    const I w0 = bit0 >> 5;
    sh = (u32)(bit0 & 31);
#pragma unroll
    for (int i = 0; i < NW; ++i) w[i] = (full || w0 + i < crw) ? __ldg(crow + w0 + i) : 0u;
    w[NW] = 0u;
    if (!PACKED) {
      s0 = __ldg(srow + k);
    } else {
      const u32 bit = (u32)k * (u32)(2 * sb);
      const u32 wi = bit >> 5;
      s0 = __ldg(srow + wi);
      s1 = ((bit & 31u) + 2u * (u32)sb > 32u) ? __ldg(srow + wi + 1) : 0u;
      sh |= (bit & 31u) << 8;
      rec = __ldg(recs + k);
    }
  }

  // The exact values (C-7.1, C-7.2) of the unit's 16 columns (g % 16 == 0: one group).
  // Codes -> f32 without conversions: a B-bit field at bit p (p + B <= 23) of a window OR'd
  // into 0x4B000000 is the f32 2^23 + q 2^p; minus 2^23 that is q 2^p exactly, and one fma with
  // 2^-p gives round(q - z) = SPEC's sub(q, z); then mul(s, .). No .ftz (inline PTX).
  // `magic` is 0x4B000000 in a register (see magic_reg), so mask and OR are one LOP3.
  __device__ __forceinline__ void decode(int sb, u32 magic, float (&v)[16]) const {
    float s, z;
    if (!PACKED) {
      s = f16_bits_to_f32(s0);
      z = f16_bits_to_f32(s0 >> 16);
    } else {
      const u32 c = __funnelshift_r(s0, s1, sh >> 8);
      const u32 smask = (1u << sb) - 1u;
      const float qs = (float)(c & smask), qz = (float)((c >> sb) & smask);
      s = add_rn(f16_bits_to_f32(rec.x >> 16), mul_rn(f16_bits_to_f32(rec.x), qs));
      z = add_rn(f16_bits_to_f32(rec.y >> 16), mul_rn(f16_bits_to_f32(rec.y), qz));
    }
    constexpr int EPW = 23 / B;  // fields per window
    constexpr u32 MASK = (1u << B) - 1u;
    u32 x[NW];  // the unit's bits, from bit 0
#pragma unroll
    for (int i = 0; i < NW; ++i) x[i] = __funnelshift_r(w[i], w[i + 1], sh & 31u);
#pragma unroll
    for (int e = 0; e < 16; ++e) {
      const int st = (e / EPW) * EPW * B;  // window start (bit of the unit)
      const int p = e * B - st;            // field position inside the window
      const int wi = st >> 5, ws = st & 31;
      const u32 win = ws ? __funnelshift_r(x[wi], (wi + 1 < NW) ? x[wi + 1] : 0u, ws) : x[wi];
      const float f = __uint_as_float((win & (MASK << p)) | magic);  // 2^23 + q 2^p
      const float q = sub_rn(f, 8388608.0f);                               // q 2^p, exact
      v[e] = mul_rn(s, fma_keep_subnormal(q, pow2f(-p), -z));              // s * (q - z)
    }
  }
};

// Whole-row pass: one block per row, one thread per 16-column unit (grid-stride), any B and g.
// Without a permutation (and a 16-byte aligned row) dense values go straight to global memory
// with 16-byte stores. With one, the row is assembled in shared memory (n * sizeof(out) bytes of
// dynamic shared memory): in stored order and gathered through the inverse permutation on the
// way out when `iperm` is given, else scattered through perm and copied out with 16-byte
// stores. Outliers overwrite their columns (C-7.3) after a block barrier; warp 0 fetches the
// first of them during the dense pass.
template <int B, bool PACKED, int OUT>
__device__ __forceinline__ void dequant_row(const u32* __restrict__ codes,
                                            const u32* __restrict__ stats,
                                            const u16* __restrict__ stats2,
                                            const u32* __restrict__ perm_in,
                                            const u32* __restrict__ iperm,
                                            const u32* __restrict__ orows,
                                            const u32* __restrict__ oents,
                                            void* __restrict__ out, i64 ldo, i64 n, int bits,
                                            int g, int S, int sb, int G, i64 code_row_words,
                                            i64 stats_row_words) {
  extern __shared__ uint4 smem_raw[];
  constexpr int ESZ = OUT == SPQR_OUT_F32 ? 4 : 2;
  const i64 row = blockIdx.x;
  const i64 tile = PACKED ? row / S : 0;
  const i64 nunits = (n + 15) >> 4;
  char* const grow = reinterpret_cast<char*>(out) + row * ldo * ESZ;
  // direct global stores: no permutation and a 16-byte aligned row
  // With the inverse permutation the row is staged in stored order and gathered on the way out
  // (coalesced index loads, no permutation while decoding); without it, scattered through perm.
  const bool gather = perm_in != nullptr && iperm != nullptr;
  const u32* const perm = gather ? nullptr : perm_in;  // the permutation applied while staging
  const bool direct = perm_in == nullptr && (reinterpret_cast<u64>(grow) & 15) == 0;
  void* const dst = direct ? static_cast<void*>(grow) : static_cast<void*>(smem_raw);
  const u32* const crow = codes + row * code_row_words;
  const bool fast = B > 0 && (g & 15) == 0;
  // Warp 0 fetches the row's first 32 * 4 outlier entries (and their permuted columns) now, so
  // that those loads overlap the dense pass; it writes them after the barrier below (columns
  // as u32: n < 2^31 by contract).
  const bool owarp = orows != nullptr && threadIdx.x < 32;
  RowOutliers<4> ol;
  if (owarp) ol.fetch(orows, oents, row, true, perm);
  // unit u's values v -> dst (column perm[j] for stored column j)
  auto store_unit = [&](i64 u, const float (&v)[16]) {
    const i64 j0 = u << 4;
    const int nvalid = (int)min((i64)16, n - j0);
    if (perm == nullptr && nvalid == 16) {
      uint4* d = reinterpret_cast<uint4*>(reinterpret_cast<char*>(dst) + j0 * ESZ);
      if (OUT == SPQR_OUT_F32) {
#pragma unroll
        for (int q = 0; q < 4; ++q)
          d[q] = make_uint4(__float_as_uint(v[4 * q]), __float_as_uint(v[4 * q + 1]),
                            __float_as_uint(v[4 * q + 2]), __float_as_uint(v[4 * q + 3]));
      } else {
#pragma unroll
        for (int q = 0; q < 2; ++q)
          d[q] = make_uint4(pack2<OUT>(v[8 * q], v[8 * q + 1]),
                            pack2<OUT>(v[8 * q + 2], v[8 * q + 3]),
                            pack2<OUT>(v[8 * q + 4], v[8 * q + 5]),
                            pack2<OUT>(v[8 * q + 6], v[8 * q + 7]));
      }
    } else if (perm != nullptr && nvalid == 16) {
      const uint4* pv = reinterpret_cast<const uint4*>(perm + j0);  // 64-byte aligned
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint4 pq = __ldg(pv + q);
        write_elem<OUT>(dst, pq.x, v[4 * q]);
        write_elem<OUT>(dst, pq.y, v[4 * q + 1]);
        write_elem<OUT>(dst, pq.z, v[4 * q + 2]);
        write_elem<OUT>(dst, pq.w, v[4 * q + 3]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < 16; ++e)
        if (e < nvalid) write_elem<OUT>(dst, perm ? (i64)__ldg(perm + j0 + e) : j0 + e, v[e]);
    }
  };
  if (fast) {
    // SPQR_DQ_UNROLL units per thread at a time: all their loads are issued before any decode
    constexpr int UB = SPQR_DQ_UNROLL;
    const u32 magic = magic_reg(g);
    const u32* const srow = stats + row * (PACKED ? stats_row_words : (i64)G);
    const uint2* const recs = reinterpret_cast<const uint2*>(stats2) + tile * (i64)G;
    constexpr int BB = B > 0 ? B : 1;
    for (i64 u0 = threadIdx.x; u0 < nunits; u0 += UB * (i64)blockDim.x) {
      Unit16<BB, PACKED> raw[UB];
#pragma unroll
      for (int b = 0; b < UB; ++b) {
        const i64 u = u0 + b * (i64)blockDim.x;
        if (u < nunits)
          raw[b].load(crow, code_row_words, u, srow, recs, (int)div_group((u64)(u << 4), g), sb,
                      (u + 1) * 16 <= n);
      }
#pragma unroll
      for (int b = 0; b < UB; ++b) {
        const i64 u = u0 + b * (i64)blockDim.x;
        if (u < nunits) {
          float v[16];
          raw[b].decode(sb, magic, v);
          store_unit(u, v);
        }
      }
    }
  } else {  // any bit width / group size: per element, statistics reloaded at group starts
    for (i64 u = threadIdx.x; u < nunits; u += blockDim.x) {
      const i64 j0 = u << 4;
      const int nvalid = (int)min((i64)16, n - j0);
      float v[16];
      int k = (int)(j0 / g);
      i64 next = (i64)(k + 1) * g;
      float sc, zc;
      load_stats<PACKED>(stats, stats2, row, tile, k, G, stats_row_words, sb, sc, zc);
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        if (e < nvalid) {
          if (j0 + e == next) {
            ++k;
            next += g;
            load_stats<PACKED>(stats, stats2, row, tile, k, G, stats_row_words, sb, sc, zc);
          }
          const float q = (float)load_code(codes, row, code_row_words, j0 + e, bits);
          v[e] = mul_rn(sc, sub_rn(q, zc));
        }
      }
      store_unit(u, v);
    }
  }
  if (orows == nullptr && direct) return;
  __syncthreads();  // dense values visible to the outlier warp (shared or global memory)
  if (owarp)
    ol.write(
        oents, [&](u32 val, i64 col) { write_elem<OUT>(dst, col, f16_bits_to_f32(val)); }, perm);
  if (direct) return;
  __syncthreads();
  const i64 bytes = n * ESZ;
  const char* src = reinterpret_cast<const char*>(smem_raw);
  if (gather) {
    // out[c] = staged[iperm[c]], four columns per thread: one 16-byte index load, one store
    const bool vec = (reinterpret_cast<u64>(grow) & (4 * ESZ - 1)) == 0;
    const i64 n4 = vec ? (n >> 2) : 0;
    for (i64 t = threadIdx.x; t < n4; t += blockDim.x) {
      const uint4 ix = __ldg(reinterpret_cast<const uint4*>(iperm) + t);
      if (ESZ == 4) {
        const float* sv = reinterpret_cast<const float*>(src);
        reinterpret_cast<uint4*>(grow)[t] =
            make_uint4(__float_as_uint(sv[ix.x]), __float_as_uint(sv[ix.y]),
                       __float_as_uint(sv[ix.z]), __float_as_uint(sv[ix.w]));
      } else {
        const u16* sv = reinterpret_cast<const u16*>(src);
        reinterpret_cast<uint2*>(grow)[t] = make_uint2((u32)sv[ix.x] | ((u32)sv[ix.y] << 16),
                                                       (u32)sv[ix.z] | ((u32)sv[ix.w] << 16));
      }
    }
    for (i64 c = 4 * n4 + threadIdx.x; c < n; c += blockDim.x) {
      const u32 j = __ldg(iperm + c);
      if (ESZ == 4)
        reinterpret_cast<u32*>(grow)[c] = reinterpret_cast<const u32*>(src)[j];
      else
        reinterpret_cast<u16*>(grow)[c] = reinterpret_cast<const u16*>(src)[j];
    }
    return;
  }
  if ((reinterpret_cast<u64>(grow) & 15) == 0) {
    const i64 nvec = bytes >> 4;
    for (i64 t = threadIdx.x; t < nvec; t += blockDim.x)
      reinterpret_cast<uint4*>(grow)[t] = reinterpret_cast<const uint4*>(src)[t];
    for (i64 t = (nvec << 4) + threadIdx.x; t < bytes; t += blockDim.x) grow[t] = src[t];
  } else {
    for (i64 t = threadIdx.x; t < bytes / ESZ; t += blockDim.x) {
      if (ESZ == 4)
        reinterpret_cast<u32*>(grow)[t] = reinterpret_cast<const u32*>(src)[t];
      else
        reinterpret_cast<u16*>(grow)[t] = reinterpret_cast<const u16*>(src)[t];
    }
  }
}

// Two rows per block (f16 / bf16 output, a permutation with its inverse, B in {2,3,4,8},
// g % 16 == 0): the rows are staged together in shared memory as u32 (row 0, row 1) pairs in
// stored column order, so the gather through the inverse permutation fetches both rows with one
// 4-byte access and one index load serves two rows (half the shared-memory wavefronts and index
// traffic per element of dequant_row). Pairs of 4 columns form 16-byte chunks; chunk k lives at
// k ^ ((k >> 3) & 7), which makes a warp's 16-byte stores of 32 consecutive units conflict-free.
// Shared memory: 16 * 8 * ceil(ceil(n / 4) / 8) bytes. Warps 0 and 1 write the outliers of
// rows 0 and 1 (so at least 64 threads). The gather reads `slots` (u16 [n], slots[c] =
// pair_slot(iperm[c]): the swizzled staging position of output column c, precomputed once per
// tensor; n <= 65536).
__device__ __forceinline__ u32 pair_slot(u32 j) {
  // chunk k = j >> 2 at k ^ ((k >> 3) & 7): an XOR of bits 2..4 of j with bits 5..7
  return j ^ ((j >> 3) & 0x1Cu);
}

template <int B, bool PACKED, int OUT>
__device__ __forceinline__ void dequant_row2(const u32* __restrict__ codes,
                                             const u32* __restrict__ stats,
                                             const u16* __restrict__ stats2,
                                             const u16* __restrict__ slots,
                                             const u32* __restrict__ orows,
                                             const u32* __restrict__ oents,
                                             u16* __restrict__ out, i64 ldo, i64 m, i64 n, int g,
                                             int S, int sb, int G, i64 code_row_words,
                                             i64 stats_row_words) {
  extern __shared__ uint4 smem_raw[];
  u32* const sm = reinterpret_cast<u32*>(smem_raw);
  const i64 r0 = 2 * (i64)blockIdx.x;
  const bool two = r0 + 1 < m;
  const i64 r1 = two ? r0 + 1 : r0;  // odd m: the last block decodes row r0 twice, writes it once
  const i64 nunits = (n + 15) >> 4;
  // warp w < 2 prefetches row w's first 4 batches of outlier entries (stored columns < 2^32 on
  // this path: the rows fit in shared memory)
  const int warp = threadIdx.x >> 5;
  const bool owarp = orows != nullptr && warp < 2;
  RowOutliers<4> ol;
  if (owarp) ol.fetch(orows, oents, warp == 1 ? r1 : r0, warp == 0 || two);
  const u32* const crow0 = codes + r0 * code_row_words;
  const u32* const crow1 = codes + r1 * code_row_words;
  const i64 tile0 = PACKED ? r0 / S : 0, tile1 = PACKED ? r1 / S : 0;
  const u32 magic = magic_reg(g);
  const u32 crw = (u32)code_row_words;  // n * B < 2^32 on this path
  const i64 srw = PACKED ? stats_row_words : (i64)G;
  const u32* const srow0 = stats + r0 * srw;
  const u32* const srow1 = stats + r1 * srw;
  const uint2* const recs0 = reinterpret_cast<const uint2*>(stats2) + tile0 * (i64)G;
  const uint2* const recs1 = reinterpret_cast<const uint2*>(stats2) + tile1 * (i64)G;
  for (int u = threadIdx.x; u < (int)nunits; u += blockDim.x) {  // n < 2^31 on this path
    const int k = (int)div_group((u64)u << 4, g);
    Unit16<B, PACKED> a, b;
    const bool full = (u32)(u + 1) * 16u <= (u32)n;
    a.load(crow0, crw, (u32)u, srow0, recs0, k, sb, full);
    b.load(crow1, crw, (u32)u, srow1, recs1, k, sb, full);
    // each row rounded and packed as soon as it is decoded (columns 2i, 2i+1 per word), then
    // the two rows' halves interleaved into (row 0, row 1) pairs: fewer live registers
    u32 h0[8], h1[8];
    {
      float v[16];
      a.decode(sb, magic, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) h0[i] = pack2<OUT>(v[2 * i], v[2 * i + 1]);
      b.decode(sb, magic, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) h1[i] = pack2<OUT>(v[2 * i], v[2 * i + 1]);
    }
    const int j0 = u << 4;
    if (j0 + 16 <= n) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        reinterpret_cast<uint4*>(sm)[pair_slot((u32)(16 * u + 4 * q)) >> 2] = make_uint4(
            __byte_perm(h0[2 * q], h1[2 * q], 0x5410), __byte_perm(h0[2 * q], h1[2 * q], 0x7632),
            __byte_perm(h0[2 * q + 1], h1[2 * q + 1], 0x5410),
            __byte_perm(h0[2 * q + 1], h1[2 * q + 1], 0x7632));
      }
    } else {
#pragma unroll
      for (int e = 0; e < 16; ++e)
        if (j0 + e < n)
          sm[pair_slot((u32)(j0 + e))] =
              __byte_perm(h0[e >> 1], h1[e >> 1], (e & 1) ? 0x7632 : 0x5410);
    }
  }
  if (orows != nullptr) {
    __syncthreads();  // dense values in place before the outliers overwrite theirs (C-7.3)
    if (owarp) {
      u16* const sm16 = reinterpret_cast<u16*>(sm);
      ol.write(oents, [&](u32 val, i64 col) {
        sm16[2 * pair_slot((u32)col) + warp] = (u16)out_bits<OUT>(f16_bits_to_f32(val));
      });
    }
  }
  __syncthreads();
  // out[r][c] = staged[slots[c]] for both rows (slots[c] = pair_slot(iperm[c]), u16): eight
  // columns per thread, one 16-byte index load and one 16-byte store per row
  u16* const g0 = out + r0 * ldo;
  u16* const g1 = out + r1 * ldo;
  const bool vec = ((reinterpret_cast<u64>(g0) | reinterpret_cast<u64>(g1)) & 15) == 0;
  const int n8 = vec ? (int)(n >> 3) : 0;
  for (int t = threadIdx.x; t < n8; t += blockDim.x) {
    const uint4 ix = __ldg(reinterpret_cast<const uint4*>(slots) + t);
    const u32 iw[4] = {ix.x, ix.y, ix.z, ix.w};
    u32 p[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = sm[(i & 1) ? iw[i >> 1] >> 16 : iw[i >> 1] & 0xFFFFu];
    reinterpret_cast<uint4*>(g0)[t] =
        make_uint4(__byte_perm(p[0], p[1], 0x5410), __byte_perm(p[2], p[3], 0x5410),
                   __byte_perm(p[4], p[5], 0x5410), __byte_perm(p[6], p[7], 0x5410));
    if (two)
      reinterpret_cast<uint4*>(g1)[t] =
          make_uint4(__byte_perm(p[0], p[1], 0x7632), __byte_perm(p[2], p[3], 0x7632),
                     __byte_perm(p[4], p[5], 0x7632), __byte_perm(p[6], p[7], 0x7632));
  }
  for (i64 c = 8 * n8 + threadIdx.x; c < n; c += blockDim.x) {
    const u32 pv = sm[__ldg(slots + c)];
    g0[c] = (u16)pv;
    if (two) g1[c] = (u16)(pv >> 16);
  }
}

// ------------------------------------------------------------------------------------------
// Octet dequantizer (no permutation; f16 / bf16 output, B in {2, 3, 4, 8}, g % 16 == 0): two
// rows per block, written straight to global memory. Each lane decodes octets (8 consecutive
// stored columns of one row), so each 16-byte store instruction of a warp covers 256 contiguous
// columns (512 bytes). The (s, z) pair of a group is computed once per iteration by one lane
// and shuffled to the lanes that need it (lanes 0-15: row 0's groups, 16-31: row 1's). Each
// warp keeps SPQR_DQO_STAGES iterations of loads in flight through a ring in shared memory
// (cp.async), so the latency is hidden without holding registers.
// With a permutation the row kernels above stay faster: their staged rows already take the
// shared memory that the rings would need (measured on an H200, benchmarks/results).
// ------------------------------------------------------------------------------------------

// 4-byte asynchronous copy global -> shared (sm_80+); `ok` false: zero-fill, nothing read.
__device__ __forceinline__ void cp_async4(u32* smem, const u32* gmem, bool ok) {
  const u32 sa = (u32)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(sa), "l"(gmem),
               "r"(ok ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit_group() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// What one lane of the octet dequantizer reads for one iteration: two octets' code bits (rows
// 0 and 1) and one group's statistics.
template <int B, bool PACKED>
struct OctLoads {
  static constexpr int NWC = B == 8 ? 2 : 1;  // code words per octet after the funnel shift
  u32 w[2][NWC + 1];                           // raw code words of octets 0 and 1
  u32 sh[2];                                   // bit offset of each octet in its first word
  u32 s0, s1;                                  // statistics word(s)
  u32 ssh;                                     // packed statistics: bit offset in s0
  uint2 rec;                                   // packed statistics: the stats2 record

  // The exact (s, z) (C-7.1) of the loaded group.
  __device__ __forceinline__ void stats_of(int sb, float& s, float& z) const {
    if (!PACKED) {
      s = f16_bits_to_f32(s0);
      z = f16_bits_to_f32(s0 >> 16);
    } else {
      const u32 c = __funnelshift_r(s0, s1, ssh);
      const u32 smask = (1u << sb) - 1u;
      const float qs = (float)(c & smask), qz = (float)((c >> sb) & smask);
      s = add_rn(f16_bits_to_f32(rec.x >> 16), mul_rn(f16_bits_to_f32(rec.x), qs));
      z = add_rn(f16_bits_to_f32(rec.y >> 16), mul_rn(f16_bits_to_f32(rec.y), qz));
    }
  }
  // The 8 values of octet o (C-7.1, C-7.2) rounded to OUT, packed two per word, decoded as in
  // Unit16::decode (`magic` = magic_reg(g)).
  template <int OUT>
  __device__ __forceinline__ void decode(int o, float s, float z, u32 magic,
                                         u32 (&h)[4]) const {
    u32 x[NWC];
#pragma unroll
    for (int i = 0; i < NWC; ++i) x[i] = __funnelshift_r(w[o][i], w[o][i + 1], sh[o]);
    constexpr int EPW = 23 / B;  // fields per window
    constexpr u32 MASK = (1u << B) - 1u;
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int st = (e / EPW) * EPW * B;  // window start (bit of the octet)
      const int p = e * B - st;            // field position inside the window
      const int wi = st >> 5, ws = st & 31;
      const u32 win = ws ? (x[wi] >> ws) | (wi + 1 < NWC ? x[wi + 1] << (32 - ws) : 0u) : x[wi];
      const float f = __uint_as_float((win & (MASK << p)) | magic);  // 2^23 + q 2^p
      const float q = sub_rn(f, 8388608.0f);                         // q 2^p, exact
      v[e] = mul_rn(s, fma_keep_subnormal(q, pow2f(-p), -z));        // s * (q - z)
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = pack2<OUT>(v[2 * i], v[2 * i + 1]);
  }
};

// Rows r0 = 2 blockIdx.x and r0 + 1 (odd m: the last block has one). Dynamic shared memory:
// the rings, (blockDim.x / 32) * SPQR_DQO_STAGES * NWORD * 128 bytes (NWORD: see below).
template <int B, bool PACKED, int OUT>
__device__ __forceinline__ void dequant_oct(const u32* __restrict__ codes,
                                            const u32* __restrict__ stats,
                                            const u16* __restrict__ stats2,
                                            const u32* __restrict__ orows,
                                            const u32* __restrict__ oents,
                                            u16* __restrict__ out, i64 ldo, i64 m, u32 n, int g,
                                            int S, int sb, int G, i64 code_row_words,
                                            i64 stats_row_words) {
  extern __shared__ uint4 smem_raw[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const i64 r0 = 2 * (i64)blockIdx.x;
  const bool two = r0 + 1 < m;
  const i64 r1 = two ? r0 + 1 : r0;  // odd m: the last block decodes its row twice
  const u32 magic = magic_reg(g);
  // warp w < 2 fetches row w's first SPQR_DQO_OB batches of outlier entries now; it writes
  // them at the end
  const bool owarp = orows != nullptr && warp < 2;
  RowOutliers<SPQR_DQO_OB> ol;
  if (owarp) ol.fetch(orows, oents, warp == 1 ? r1 : r0, warp == 0 || two);
  const u32 crw = (u32)code_row_words;
  const u32* const crow0 = codes + r0 * code_row_words;
  const u32* const crow1 = codes + r1 * code_row_words;
  u16* const g0 = out + r0 * ldo;
  u16* const g1 = out + r1 * ldo;
  const bool vec_out = ((reinterpret_cast<u64>(g0) | reinterpret_cast<u64>(g1)) & 15) == 0;
  const u32 niter = (n + 255) / 256;  // a warp iteration: 256 columns of both rows
  // this lane's statistics: row lane / 16, group k0 + lane % 16 of the iteration
  const i64 srow = lane >= 16 ? r1 : r0;
  const u32* const st_row =
      PACKED ? stats + srow * stats_row_words : stats + srow * (i64)G;
  const uint2* const st_recs =
      reinterpret_cast<const uint2*>(stats2) + (PACKED ? srow / S : 0) * (i64)G;
  // column -> group: a shift for power-of-two group sizes
  const int gsh = (g & (g - 1)) == 0 ? __ffs(g) - 1 : -1;
  auto group_of = [&](u32 c) -> int { return gsh >= 0 ? (int)(c >> gsh) : (int)(c / (u32)g); };

  // ring[warp][stage][word][lane]: per lane and stage the two octets' code words (row 0, row 1),
  // then the statistics words. Every lane reads back only what it copied itself.
  constexpr int NCW = OctLoads<B, PACKED>::NWC + 1;  // code words per octet
  constexpr int NWORD = 2 * NCW + (PACKED ? 4 : 1);
  constexpr int D = SPQR_DQO_STAGES;
  u32* const ring = reinterpret_cast<u32*>(smem_raw) + warp * (D * NWORD * 32) + lane;
  auto issue = [&](int stage, u32 it) {
    u32* const dst = ring + stage * (NWORD * 32);
    const u32 c0 = it * 256;
    const int k = group_of(c0) + (lane & 15);
    const bool sok = k < G;
    if (PACKED) {
      const u32 bit = (u32)k * (u32)(2 * sb);
      const u32* const sp = st_row + (sok ? bit >> 5 : 0u);
      const u32* const rp = reinterpret_cast<const u32*>(st_recs + (sok ? k : 0));
      cp_async4(dst + (2 * NCW) * 32, sp, sok);
      cp_async4(dst + (2 * NCW + 1) * 32, sp + 1, sok && (bit & 31u) + 2u * (u32)sb > 32u);
      cp_async4(dst + (2 * NCW + 2) * 32, rp, sok);
      cp_async4(dst + (2 * NCW + 3) * 32, rp + 1, sok);
    } else {
      cp_async4(dst + (2 * NCW) * 32, st_row + (sok ? k : 0), sok);
    }
    const u32 c = c0 + 8u * lane;
    const bool valid = c < n, full = c + 8 <= n;
    const u32 bit0 = c * (u32)B, w0 = valid ? bit0 >> 5 : 0u;
#pragma unroll
    for (int o = 0; o < 2; ++o) {
      const u32* const p = (o ? crow1 : crow0) + w0;
#pragma unroll
      for (int i = 0; i < NCW; ++i) {
        // the word after the octet's last one is needed only when the octet crosses into it
        const bool need = i < NCW - 1 || (8 * B < 32 && (bit0 & 31u) + 8u * B > 32u);
        cp_async4(dst + (o * NCW + i) * 32, p + i, valid && need && (full || w0 + i < crw));
      }
    }
  };
  auto finish = [&](int stage, u32 it) {
    const u32* const src = ring + stage * (NWORD * 32);
    const u32 c0 = it * 256, c = c0 + 8u * lane;
    const int k0 = group_of(c0);
    OctLoads<B, PACKED> L;
#pragma unroll
    for (int o = 0; o < 2; ++o) {
#pragma unroll
      for (int i = 0; i < NCW; ++i) L.w[o][i] = src[(o * NCW + i) * 32];
      L.sh[o] = (c * (u32)B) & 31u;
    }
    L.s0 = src[(2 * NCW) * 32];
    if (PACKED) {
      L.s1 = src[(2 * NCW + 1) * 32];
      L.rec = make_uint2(src[(2 * NCW + 2) * 32], src[(2 * NCW + 3) * 32]);
      L.ssh = ((u32)(k0 + (lane & 15)) * (u32)(2 * sb)) & 31u;
    }
    float s, z;
    L.stats_of(sb, s, z);  // zero-filled words past G: finite values, never used
    u32 h[2][4];
    const int src_lane = group_of(min(c, n - 1)) - k0;
#pragma unroll
    for (int o = 0; o < 2; ++o) {
      const float so = __shfl_sync(0xffffffffu, s, 16 * o + src_lane);
      const float zo = __shfl_sync(0xffffffffu, z, 16 * o + src_lane);
      L.template decode<OUT>(o, so, zo, magic, h[o]);
    }
    if (c + 8 <= n && vec_out) {
      *reinterpret_cast<uint4*>(g0 + c) = make_uint4(h[0][0], h[0][1], h[0][2], h[0][3]);
      if (two) *reinterpret_cast<uint4*>(g1 + c) = make_uint4(h[1][0], h[1][1], h[1][2], h[1][3]);
    } else if (c < n) {
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (c + e < n) {
          g0[c + e] = (u16)(h[0][e >> 1] >> (16 * (e & 1)));
          if (two) g1[c + e] = (u16)(h[1][e >> 1] >> (16 * (e & 1)));
        }
    }
  };
  // D - 1 iterations' loads are issued ahead of the one being decoded
#pragma unroll
  for (int j = 0; j < D - 1; ++j) {
    const u32 it = warp + j * nwarps;
    if (it < niter) issue(j, it);
    cp_async_commit_group();
  }
  int stage = 0;
  for (u32 it = warp; it < niter; it += nwarps) {
    const u32 ahead = it + (D - 1) * nwarps;
    if (ahead < niter) issue(stage == 0 ? D - 1 : stage - 1, ahead);
    cp_async_commit_group();
    cp_async_wait_group<D - 1>();
    finish(stage, it);
    stage = stage == D - 1 ? 0 : stage + 1;
  }
  if (orows == nullptr) return;
  __syncthreads();  // dense values in place before the outliers overwrite theirs (C-7.3)
  if (owarp) {
    u16* const gw = warp == 0 ? g0 : g1;
    ol.write(oents, [&](u32 val, i64 col) { gw[col] = (u16)out_bits<OUT>(f16_bits_to_f32(val)); });
  }
}

// Outlier pass of dequantize: one warp per row overwrites W[i, perm[c]] = f32(o) (C-7.3).
template <int OUT>
__device__ __forceinline__ void dequant_outliers(const u32* __restrict__ orows,
                                                 const u32* __restrict__ oents,
                                                 const u32* __restrict__ perm,
                                                 void* __restrict__ out, i64 ldo, i64 m) {
  const int lane = threadIdx.x & 31;
  const i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (row >= m) return;
  const u32 e_begin = __ldg(orows + row), e_end = __ldg(orows + row + 1);
  i64 colbase = -1;
  for (u32 base = e_begin; base < e_end; base += 32) {
    const u32 e = base + lane;
    const bool valid = e < e_end;
    const u32 ent = valid ? __ldg(oents + e) : 0u;
    u32 cs = ent & 0xFFFFu;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      u32 t = __shfl_up_sync(0xffffffffu, cs, o);
      if (lane >= o) cs += t;
    }
    const i64 col = colbase + (i64)cs;
    colbase += (i64)__shfl_sync(0xffffffffu, cs, 31);
    const u32 val = ent >> 16;
    if (valid && val != 0xFFFFu) {
      const i64 oc = perm ? (i64)__ldg(perm + col) : col;
      write_elem<OUT>(out, row * ldo + oc, f16_bits_to_f32(val));
    }
  }
}

}  // namespace spqr

// ==========================================================================================
// extern "C" entry points (see spqr_gpu.h for the argument meaning and launch contract).
// ==========================================================================================
// Which entry points (the Python layer compiles small modules: _kernels.py kernel_module):
//   -DSPQR_SIMT_B=b -DSPQR_SIMT_Q=q  the kernels of one bit width b (0: the generic dequantizer)
//                                    and statistics kind (q = 1: packed, "_q"; 0: f16, "_h");
//   -DSPQR_SIMT_SHARED               spqr_prepare_x, spqr_mv1_finish, spqr_dequant_outliers_*;
//   neither                          all of them (spqr_host.cu, tests/test_kernels_compile.py).
#if defined(SPQR_SIMT_B) && defined(SPQR_SIMT_Q)
#define SPQR_SIMT_PAIR_MODULE 1
#define SPQR_SIMT_SHARED_MODULE 0
#elif defined(SPQR_SIMT_SHARED)
#define SPQR_SIMT_PAIR_MODULE 0
#define SPQR_SIMT_SHARED_MODULE 1
#else
#define SPQR_SIMT_PAIR_MODULE 0
#define SPQR_SIMT_SHARED_MODULE 0
#endif

#if !SPQR_SIMT_PAIR_MODULE
extern "C" __global__ void spqr_prepare_x(const u16* __restrict__ x, i64 ldx, int in_dtype,
                                          const u32* __restrict__ perm, int bits, i64 n,
                                          float* __restrict__ xs, i64 ldxs,
                                          float* __restrict__ x16, i64 ldx16, int nbatch) {
  spqr::prepare_x(x, ldx, in_dtype, perm, bits, n, (n + 31) >> 5, xs, ldxs, x16, ldx16, nbatch);
}
#endif

#define SPQR_MATVEC_ENTRY(B, SNAME, PACKED, R, NB, MINB)                                             \
  extern "C" __global__ void __launch_bounds__(288, MINB)                                     \
      spqr_matvec_b##B##_##SNAME##_nb##NB(                                                    \
          const u32* __restrict__ codes, const u32* __restrict__ stats,                        \
          const u16* __restrict__ stats2, const u32* __restrict__ orows,                       \
          const u32* __restrict__ oents, const float* __restrict__ xs, i64 ldxs,               \
          const float* __restrict__ x16, i64 ldx16, u16* __restrict__ y, i64 ldy,              \
          int out_dtype, i64 m, i64 n, int g, int S, int sb, int G, i64 code_row_words,        \
          i64 stats_row_words, int nbatch) {                                                   \
    spqr::matvec<B, PACKED, R, NB>(codes, stats, stats2, orows, oents, xs, ldxs, x16, ldx16,  \
                                   y, ldy, out_dtype, m, n, g, S, sb, G, code_row_words,       \
                                   stats_row_words, nbatch);                                   \
  }

#define SPQR_MV1_ENTRY_RB(B, SNAME, PACKED, PFX, RB, RU)                                        \
  extern "C" __global__ void __launch_bounds__(256, SPQR_MV1_MINB) PFX##_b##B##_##SNAME(        \
      const u32* __restrict__ codes, const u32* __restrict__ stats,                            \
      const u16* __restrict__ stats2, const u32* __restrict__ orows,                           \
      const u32* __restrict__ oents, const float* __restrict__ xs,                             \
      const float* __restrict__ x16, float* __restrict__ part, u16* __restrict__ y,            \
      int out_dtype, i64 m, i64 n, int g, int S, int sb, int G, i64 code_row_words,            \
      i64 stats_row_words) {                                                                   \
    spqr::mv1_sweep<B, PACKED, RB, RU>(codes, stats, stats2, orows, oents, xs, x16, part, y,   \
                                       out_dtype, m, n, g, S, sb, G, code_row_words,           \
                                       stats_row_words);                                       \
  }

// Two row-sweep heights: 8 rows (small matrices: more blocks) and 16 rows with 8 rows' loads in
// flight (large matrices: x' and reductions amortised over more rows).
#define SPQR_MV1_ENTRY(B, SNAME, PACKED)                                    \
  SPQR_MV1_ENTRY_RB(B, SNAME, PACKED, spqr_mv1, SPQR_MV1_RB, SPQR_MV1_RU)  \
  SPQR_MV1_ENTRY_RB(B, SNAME, PACKED, spqr_mv1r16, 16, 8)

#if !SPQR_SIMT_PAIR_MODULE
extern "C" __global__ void spqr_mv1_finish(const float* __restrict__ part, int nsplit,
                                           u16* __restrict__ y, int out_dtype, i64 m) {
  spqr::mv1_finish(part, nsplit, y, out_dtype, m);
}
#endif

// Rows per block for each batch width: keeps accumulators + decoded codes in registers.
// No NB = 1 entry: batch 1 always takes the row sweep spqr_mv1_* (the launch plan never
// picked the old NB = 1 kernel, 1.9x slower on an H100; deleted).
#define SPQR_MATVEC_ALL_NB(B, SNAME, PACKED)  \
  SPQR_MATVEC_ENTRY(B, SNAME, PACKED, 4, 2, 1)   \
  SPQR_MATVEC_ENTRY(B, SNAME, PACKED, 4, 4, 1)
// NB = 8 (R = 2) measured 3x slower per column than NB = 4 on an H100 (x' traffic, 154
// registers): batches > 4 run as several slices of 4 columns instead.

#define SPQR_MATVEC_S(B, SNAME, PACKED)  \
  SPQR_MATVEC_ALL_NB(B, SNAME, PACKED) \
  SPQR_MV1_ENTRY(B, SNAME, PACKED)

#define SPQR_MATVEC_ALL(B)         \
  SPQR_MATVEC_ALL_NB(B, h, false) \
  SPQR_MATVEC_ALL_NB(B, q, true)  \
  SPQR_MV1_ENTRY(B, h, false)     \
  SPQR_MV1_ENTRY(B, q, true)

// One (bit width, statistics kind) of a SPQR_SIMT_B / SPQR_SIMT_Q module: M(b, h|q, packed).
#if SPQR_SIMT_PAIR_MODULE && SPQR_SIMT_Q
#define SPQR_SIMT_ONE(M) M(SPQR_SIMT_B, q, true)
#elif SPQR_SIMT_PAIR_MODULE
#define SPQR_SIMT_ONE(M) M(SPQR_SIMT_B, h, false)
#endif

#if SPQR_SIMT_PAIR_MODULE
#if SPQR_SIMT_B != 0  // B = 0 (the generic dequantizer) has no matvec
SPQR_SIMT_ONE(SPQR_MATVEC_S)
#endif
#elif !SPQR_SIMT_SHARED_MODULE
// whole module; SPQR_FAST_BUILD (experiments only): just the 3-bit kernels, for quick builds
#ifndef SPQR_FAST_BUILD
SPQR_MATVEC_ALL(2)
SPQR_MATVEC_ALL(4)
SPQR_MATVEC_ALL(8)
#endif
SPQR_MATVEC_ALL(3)
#endif

#define SPQR_DEQUANT_ENTRY(B, SNAME, PACKED, ONAME, OUT)                                      \
  extern "C" __global__ void __launch_bounds__(256) spqr_dequant_b##B##_##SNAME##_##ONAME(   \
      const u32* __restrict__ codes, const u32* __restrict__ stats,                           \
      const u16* __restrict__ stats2, const u32* __restrict__ perm, void* __restrict__ out,   \
      i64 ldo, i64 m, i64 n, int bits, int g, int S, int sb, int G, i64 code_row_words,       \
      i64 stats_row_words) {                                                                  \
    spqr::dequant<B, PACKED, OUT>(codes, stats, stats2, perm, out, ldo, m, n, bits, g, S, sb, \
                                  G, code_row_words, stats_row_words);                        \
  }

#define SPQR_DEQUANT_ROW_ENTRY(B, SNAME, PACKED, ONAME, OUT)                                  \
  extern "C" __global__ void __launch_bounds__(256, SPQR_DQ_MINB) spqr_dequant_row_b##B##_##SNAME##_##ONAME( \
      const u32* __restrict__ codes, const u32* __restrict__ stats,                           \
      const u16* __restrict__ stats2, const u32* __restrict__ perm,                           \
      const u32* __restrict__ iperm, const u32* __restrict__ orows,                           \
      const u32* __restrict__ oents, void* __restrict__ out, i64 ldo, i64 n, int bits, int g, \
      int S, int sb, int G, i64 code_row_words, i64 stats_row_words) {                        \
    spqr::dequant_row<B, PACKED, OUT>(codes, stats, stats2, perm, iperm, orows, oents, out, ldo, n, \
                                      bits, g, S, sb, G, code_row_words, stats_row_words);    \
  }

#define SPQR_DEQUANT_ROW2_ENTRY(B, SNAME, PACKED, ONAME, OUT)                                 \
  extern "C" __global__ void __launch_bounds__(SPQR_DQ2_MAXT, SPQR_DQ2_MINB)                  \
      spqr_dequant_row2_b##B##_##SNAME##_##ONAME(                                             \
          const u32* __restrict__ codes, const u32* __restrict__ stats,                       \
          const u16* __restrict__ stats2, const u16* __restrict__ slots,                      \
          const u32* __restrict__ orows, const u32* __restrict__ oents, u16* __restrict__ out, \
          i64 ldo, i64 m, i64 n, int g, int S, int sb, int G, i64 code_row_words,             \
          i64 stats_row_words) {                                                              \
    spqr::dequant_row2<B, PACKED, OUT>(codes, stats, stats2, slots, orows, oents, out, ldo, m, \
                                       n, g, S, sb, G, code_row_words, stats_row_words);      \
  }

#define SPQR_DEQUANT_OCT_ENTRY(B, SNAME, PACKED, ONAME, OUT)                                 \
  extern "C" __global__ void __launch_bounds__(256, SPQR_DQO_MINB)                            \
      spqr_dequant_oct_b##B##_##SNAME##_##ONAME(                                              \
          const u32* __restrict__ codes, const u32* __restrict__ stats,                       \
          const u16* __restrict__ stats2, const u32* __restrict__ orows,                      \
          const u32* __restrict__ oents, u16* __restrict__ out, i64 ldo, i64 m, i64 n, int g, \
          int S, int sb, int G, i64 code_row_words, i64 stats_row_words) {                    \
    spqr::dequant_oct<B, PACKED, OUT>(codes, stats, stats2, orows, oents, out, ldo, m,        \
                                      (u32)n, g, S, sb, G, code_row_words, stats_row_words);  \
  }

#define SPQR_DEQUANT_OCT_S(B, SNAME, PACKED)                  \
  SPQR_DEQUANT_OCT_ENTRY(B, SNAME, PACKED, f16, SPQR_OUT_F16) \
  SPQR_DEQUANT_OCT_ENTRY(B, SNAME, PACKED, bf16, SPQR_OUT_BF16)

#define SPQR_DEQUANT_OCT_ALL(B)       \
  SPQR_DEQUANT_OCT_S(B, h, false) \
  SPQR_DEQUANT_OCT_S(B, q, true)

#define SPQR_DEQUANT_ALL_OUT(B, SNAME, PACKED)                 \
  SPQR_DEQUANT_ENTRY(B, SNAME, PACKED, f32, SPQR_OUT_F32)     \
  SPQR_DEQUANT_ENTRY(B, SNAME, PACKED, f16, SPQR_OUT_F16)     \
  SPQR_DEQUANT_ENTRY(B, SNAME, PACKED, bf16, SPQR_OUT_BF16)     \
  SPQR_DEQUANT_ROW_ENTRY(B, SNAME, PACKED, f32, SPQR_OUT_F32)  \
  SPQR_DEQUANT_ROW_ENTRY(B, SNAME, PACKED, f16, SPQR_OUT_F16)  \
  SPQR_DEQUANT_ROW_ENTRY(B, SNAME, PACKED, bf16, SPQR_OUT_BF16)

#define SPQR_DEQUANT_ALL(B)             \
  SPQR_DEQUANT_ALL_OUT(B, h, false)     \
  SPQR_DEQUANT_ALL_OUT(B, q, true)

// two-row kernels: specialised bit widths only (B = 0 has no Unit16 decoder)
#define SPQR_DEQUANT_ROW2_S(B, SNAME, PACKED)                  \
  SPQR_DEQUANT_ROW2_ENTRY(B, SNAME, PACKED, f16, SPQR_OUT_F16) \
  SPQR_DEQUANT_ROW2_ENTRY(B, SNAME, PACKED, bf16, SPQR_OUT_BF16)

#define SPQR_DEQUANT_ROW2_ALL(B)       \
  SPQR_DEQUANT_ROW2_S(B, h, false) \
  SPQR_DEQUANT_ROW2_S(B, q, true)

#if SPQR_SIMT_PAIR_MODULE
SPQR_SIMT_ONE(SPQR_DEQUANT_ALL_OUT)
#if SPQR_SIMT_B != 0
SPQR_SIMT_ONE(SPQR_DEQUANT_ROW2_S)
SPQR_SIMT_ONE(SPQR_DEQUANT_OCT_S)
#endif
#elif !SPQR_SIMT_SHARED_MODULE
#ifndef SPQR_FAST_BUILD
SPQR_DEQUANT_ALL(0)
SPQR_DEQUANT_ALL(2)
SPQR_DEQUANT_ALL(4)
SPQR_DEQUANT_ALL(8)
SPQR_DEQUANT_ROW2_ALL(2)
SPQR_DEQUANT_ROW2_ALL(4)
SPQR_DEQUANT_ROW2_ALL(8)
SPQR_DEQUANT_OCT_ALL(2)
SPQR_DEQUANT_OCT_ALL(4)
SPQR_DEQUANT_OCT_ALL(8)
#endif
SPQR_DEQUANT_ALL(3)
SPQR_DEQUANT_ROW2_ALL(3)
SPQR_DEQUANT_OCT_ALL(3)
#endif

#define SPQR_DEQUANT_OUTLIERS_ENTRY(ONAME, OUT)                                               \
  extern "C" __global__ void spqr_dequant_outliers_##ONAME(                                   \
      const u32* __restrict__ orows, const u32* __restrict__ oents,                           \
      const u32* __restrict__ perm, void* __restrict__ out, i64 ldo, i64 m) {                 \
    spqr::dequant_outliers<OUT>(orows, oents, perm, out, ldo, m);                             \
  }

#if !SPQR_SIMT_PAIR_MODULE
SPQR_DEQUANT_OUTLIERS_ENTRY(f32, SPQR_OUT_F32)
SPQR_DEQUANT_OUTLIERS_ENTRY(f16, SPQR_OUT_F16)
SPQR_DEQUANT_OUTLIERS_ENTRY(bf16, SPQR_OUT_BF16)
#endif
