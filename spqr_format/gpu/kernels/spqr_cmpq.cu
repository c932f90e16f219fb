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
//   * the tensor-core matmul (spqr_cmpq_tc_nt*, f16 x only) multiplies the f16 table entries by
//     the f16 x' exactly (mma.m16n8k16, f32 accumulation; the order within one mma is the
//     hardware's, fixed, and the mmas of a block follow in a fixed order), so it stays
//     deterministic and within the same C-7.6 bound.
//
// Kernels (spqr_gpu.h has the contract):
//   spqr_cmpq_mv1            batch 1: one thread per row, several chunks of codes in flight
//                            (mv1_depth), the next chunks' loads issued before each table
//                            rebuild so that the rebuild does not drain the memory pipe.
//   spqr_cmpq_tc_nt{1,2}     batch 2..16 with f16 x: warps of mma.m16n8k16 on weights decoded
//                            from f16 tables in shared memory (8 or 16 batch columns).
//   spqr_cmpq_mm_nb*         the first design (CUDA cores): every batch and input dtype.

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

// ---- batch 1: spqr_cmpq_mv1 ------------------------------------------------------------------
// Chunks of B words each thread keeps in flight: 16-64 bytes a thread, about 32 KiB an SM at
// four blocks of 256 (Little's law on Hopper wants ~32-40 KiB in flight per SM; one chunk, as
// tile_rows keeps, is 8-12 bytes a thread at the usual widths 2-3).
__host__ __device__ constexpr int mv1_depth(int B) { return B <= 3 ? 4 : 2; }

// One column tile of the B-bit run for row i: the first mv1_depth chunks' loads are issued
// before the table rebuild (tables f16 -> f32 * x' into sm, between two barriers), so that the
// rebuild's latency is hidden behind them; then the sweep keeps mv1_depth chunks in flight
// (a ring: chunk k's words move out of slot k % D as the load of chunk k + D goes in).  The
// sum is the same as tile_rows<B, 1>'s: same products, same order.
template <int B>
__device__ __forceinline__ void mv1_tile(const u32 *codes, const u16 *tab, const float *xt,
                                         int nch, i64 m, i64 i, bool active, float *sm,
                                         float &acc) {
  constexpr int D = mv1_depth(B);
  u32 ring[D][B];
  if (active) {
#pragma unroll
    for (int d = 0; d < D; ++d)
      if (d < nch) load_chunk<B>(ring[d], codes, m, i, d);
  }
  __syncthreads();  // the previous tile / table block is done with sm
  const int ntab = (nch * 32) << B;
  // four independent table loads a thread before the stores: one L2 round trip, not four
  for (int e0 = threadIdx.x; e0 < ntab; e0 += 4 * SPQR_CMPQ_ROWS) {
    float v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int e = e0 + u * SPQR_CMPQ_ROWS;
      v[u] = e < ntab ? f16_to_f32(tab[e]) * xt[e >> B] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int e = e0 + u * SPQR_CMPQ_ROWS;
      if (e < ntab) sm[e] = v[u];
    }
  }
  __syncthreads();
  if (!active) return;
  for (int k0 = 0; k0 < nch; k0 += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int k = k0 + d;
      if (k < nch) {
        u32 cur[B];
#pragma unroll
        for (int q = 0; q < B; ++q) cur[q] = ring[d][q];
        if (k + D < nch) load_chunk<B>(ring[d], codes, m, i, k + D);
        const float *tk = sm + ((k * 32) << B);
#pragma unroll
        for (int c = 0; c < 32; ++c) acc += tk[(c << B) + chunk_code<B>(cur, c)];
      }
    }
  }
}

// One width's kernel (spqr_cmpq_mv1_b{B}): the tiles given are the B-bit run's, the launcher
// sends each width present to its own launch and split range of part.  One kernel per width
// rather than a switch over widths per tile (as spqr_cmpq_mm_* has): each width alone fits 64
// registers, but with the eight inlined into one kernel ptxas spilled 200-550 bytes.
template <int B>
__device__ __forceinline__ void mv1(const u32 *__restrict__ codes, const u16 *__restrict__ tables,
                                    const i64 *__restrict__ tiles, int ntiles,
                                    const float *__restrict__ xs, float *__restrict__ part, i64 m,
                                    i64 R, i64 Lp) {
  extern __shared__ float sm[];
  const i64 r0 = (i64)blockIdx.x * SPQR_CMPQ_ROWS;
  const i64 i = r0 + threadIdx.x;
  const i64 rlast = (r0 + SPQR_CMPQ_ROWS < m ? r0 + SPQR_CMPQ_ROWS : m) - 1;
  const i64 t0 = R ? r0 / R : 0, t1 = R ? rlast / R : 0;
  const i64 trow = i >= m ? -1 : R ? i / R : 0;  // the row's table block (-1: no row)
  float acc = 0.f;
  for (int ti = blockIdx.y; ti < ntiles; ti += gridDim.y) {
    const i64 *td = tiles + 8 * (i64)ti;
    for (i64 t = t0; t <= t1; ++t)
      mv1_tile<B>(codes + td[2], tables + t * Lp + td[3], xs + td[4], (int)td[1], m, i,
                  trow == t, sm, acc);
  }
  if (i < m) part[(i64)blockIdx.y * m + i] = acc;
}

// ---- batch 2..16, f16 x: spqr_cmpq_tc_nt{NT} ---------------------------------------------------
// A block of SPQR_CMPQ_TC_WARPS warps covers SPQR_CMPQ_TC_ROWS rows; each warp owns
// SPQR_CMPQ_TC_MT m-tiles of 16 rows and all NT n-tiles of 8 batch columns.  Per chunk of 32
// columns and m-tile: two mma.m16n8k16 per n-tile.  The k order inside a chunk is permuted (the
// same for A and B, so the sum is unchanged): lane quad tig takes the chunk's 8 contiguous
// columns 8*tig .. 8*tig+7, i.e. mma step s, k index kk holds column
// 8*tig + 4*s + (kk & 1) + 2*(kk >= 8).  So a lane's codes of one row are one contiguous field
// of 8*B bits (1-3 of the chunk's B words, loaded directly, no unpacking of the rest), and its
// x' operand for both steps is 8 contiguous f16, one 16-byte load.
//   Shared memory per tile: the f16 tables of the tile's columns, column c's 2^B entries at
//   (c + c/8) << B (one table of skew per 8 columns: the four quads then read disjoint banks
//   for B <= 4), 16-byte aligned, then x' in fragment order (from xf, a straight copy).
#ifndef SPQR_CMPQ_TC_WARPS
#define SPQR_CMPQ_TC_WARPS 4
#endif
#define SPQR_CMPQ_TC_MT 2
#define SPQR_CMPQ_TC_ROWS (SPQR_CMPQ_TC_WARPS * SPQR_CMPQ_TC_MT * 16)

// Words of a chunk that hold one quad's field (bits 8*tig*B .. 8*tig*B + 8*B - 1), over tig.
__host__ __device__ constexpr int tc_span(int B) {
  int w = 1;
  for (int t = 0; t < 4; ++t) {
    const int s = ((8 * t * B + 8 * B - 1) >> 5) - ((8 * t * B) >> 5) + 1;
    w = s > w ? s : w;
  }
  return w;
}
// Chunks in flight: 16 (B in 1, 2, 4) or 16-24 (other widths) words a thread.
__host__ __device__ constexpr int tc_depth(int B) { return tc_span(B) == 1 ? 4 : 2; }

__device__ __forceinline__ void mma_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The 8*B-bit field of one row from its W loaded words, starting at bit sh of w[0].
template <int B, int W>
__device__ __forceinline__ unsigned long long tc_field(const u32 (&w)[W], int sh) {
  if (W == 1) return w[0] >> sh;
  unsigned long long v = (((unsigned long long)w[1] << 32) | w[0]) >> sh;
  if (W == 3 && sh) v |= (unsigned long long)w[W - 1] << (64 - sh);
  return v;
}

// Chunk k's field words of the warp's rows (m-tiles that are on) into one ring slot.
template <int B, int W>
__device__ __forceinline__ void tc_load(u32 (&slot)[SPQR_CMPQ_TC_MT][2][W], const u32 *codes,
                                        int k, i64 m, const i64 (&wo)[W],
                                        const i64 (&row)[SPQR_CMPQ_TC_MT][2],
                                        const bool (&on)[SPQR_CMPQ_TC_MT]) {
  const u32 *ck = codes + (i64)k * B * m;
#pragma unroll
  for (int mt = 0; mt < SPQR_CMPQ_TC_MT; ++mt) {
    if (!on[mt]) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < W; ++j) slot[mt][h][j] = ldg_u32(ck + wo[j] + row[mt][h]);
  }
}

template <int B, int NT>
__device__ __forceinline__ void tc_tile(const u32 *codes, const u16 *tab, const uint4 *xf,
                                        int nch, bool copy_x, i64 m, i64 rw, const bool (&on)[SPQR_CMPQ_TC_MT],
                                        unsigned char *smem,
                                        float (&acc)[SPQR_CMPQ_TC_MT][NT][4]) {
  constexpr int D = tc_depth(B), W = tc_span(B), MT = SPQR_CMPQ_TC_MT;
  const int lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const int bit0 = 8 * tig * B, sh = bit0 & 31;
  // word offsets of the lane's field (clamped into the chunk: the clamped word is not used)
  i64 wo[W];
#pragma unroll
  for (int j = 0; j < W; ++j) wo[j] = (i64)((bit0 >> 5) + j < B ? (bit0 >> 5) + j : B - 1) * m;
  i64 row[MT][2];  // rows g and g + 8 of each m-tile, clamped to m - 1 (results not stored)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const i64 r = rw + mt * 16 + h * 8 + g;
      row[mt][h] = r < m ? r : m - 1;
    }
  u32 ring[D][MT][2][W];
#pragma unroll
  for (int d = 0; d < D; ++d)
    if (d < nch) tc_load<B, W>(ring[d], codes, d, m, wo, row, on);
  __syncthreads();  // the previous tile / table block is done with smem
  const int ntab = (nch * 32) << B;
  const int tab_bytes = (((nch * 36) << B) * 2 + 15) & ~15;
  u16 *tsm = (u16 *)smem;
  uint4 *xsm = (uint4 *)(smem + tab_bytes);
  const u32 *tab32 = (const u32 *)tab;
  for (int p = threadIdx.x; p < ntab / 2; p += blockDim.x) {
    const int e = 2 * p, c = e >> B;
    *(u32 *)(tsm + e + ((c >> 3) << B)) = tab32[p];
  }
  if (copy_x)
    for (int p = threadIdx.x; p < nch * NT * 32; p += blockDim.x) xsm[p] = xf[p];
  __syncthreads();
  for (int k0 = 0; k0 < nch; k0 += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int k = k0 + d;
      if (k < nch) {
        u32 cur[MT][2][W];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int j = 0; j < W; ++j) cur[mt][h][j] = ring[d][mt][h][j];
        if (k + D < nch) tc_load<B, W>(ring[d], codes, k + D, m, wo, row, on);
        uint4 xb[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) xb[nt] = xsm[(k * NT + nt) * 32 + lane];
        const u16 *tq = tsm + ((36 * k + 9 * tig) << B);  // the quad's column 8*tig, chunk k
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if (!on[mt]) continue;
          u32 v[2][8];  // f16 weights of rows g, g + 8 at the quad's 8 columns
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const unsigned long long f = tc_field<B, W>(cur[mt][h], sh);
#pragma unroll
            for (int e = 0; e < 8; ++e)
              v[h][e] = tq[(e << B) + (u32)((f >> (e * B)) & ((1u << B) - 1u))];
          }
#pragma unroll
          for (int s = 0; s < 2; ++s) {
            const u32 a[4] = {v[0][4 * s] | (v[0][4 * s + 1] << 16),
                              v[1][4 * s] | (v[1][4 * s + 1] << 16),
                              v[0][4 * s + 2] | (v[0][4 * s + 3] << 16),
                              v[1][4 * s + 2] | (v[1][4 * s + 3] << 16)};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
              mma_16816(acc[mt][nt], a, s ? xb[nt].z : xb[nt].x, s ? xb[nt].w : xb[nt].y);
          }
        }
      }
    }
  }
}

// One width's kernel (spqr_cmpq_tc_b{B}_nt{NT}), split by width for the reason mv1 is.
template <int B, int NT>
__device__ __forceinline__ void tc_matmul(const u32 *__restrict__ codes,
                                          const u16 *__restrict__ tables,
                                          const i64 *__restrict__ tiles, int ntiles,
                                          const uint4 *__restrict__ xf, float *__restrict__ part,
                                          int nbp, i64 m, i64 R, i64 Lp) {
  extern __shared__ uint4 tc_sm[];
  unsigned char *smem = (unsigned char *)tc_sm;
  const int lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const i64 r0 = (i64)blockIdx.x * SPQR_CMPQ_TC_ROWS;
  const i64 rw = r0 + (threadIdx.x >> 5) * (SPQR_CMPQ_TC_MT * 16);  // the warp's first row
  const i64 rlast = (r0 + SPQR_CMPQ_TC_ROWS < m ? r0 + SPQR_CMPQ_TC_ROWS : m) - 1;
  const i64 t0 = R ? r0 / R : 0, t1 = R ? rlast / R : 0;
  i64 tblk[SPQR_CMPQ_TC_MT];  // each m-tile's table block (-1: past the last row)
#pragma unroll
  for (int mt = 0; mt < SPQR_CMPQ_TC_MT; ++mt) {
    const i64 r = rw + mt * 16;
    tblk[mt] = r >= m ? -1 : R ? r / R : 0;
  }
  float acc[SPQR_CMPQ_TC_MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < SPQR_CMPQ_TC_MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.f;
  for (int ti = blockIdx.y; ti < ntiles; ti += gridDim.y) {
    const i64 *td = tiles + 8 * (i64)ti;
    const int nch = (int)td[1];
    const u32 *cp = codes + td[2];
    const uint4 *xt = xf + (td[4] >> 5) * NT * 32;
    for (i64 t = t0; t <= t1; ++t) {
      // R % 16 == 0 (launcher): an m-tile lies in one table block; warp-uniform
      bool on[SPQR_CMPQ_TC_MT];
#pragma unroll
      for (int mt = 0; mt < SPQR_CMPQ_TC_MT; ++mt) on[mt] = tblk[mt] == t;
      const u16 *tab = tables + t * Lp + td[3];
      tc_tile<B, NT>(cp, tab, xt, nch, t == t0, m, rw, on, smem, acc);
    }
  }
  // c0, c1: row g, batch columns 2*tig, 2*tig + 1 of the n-tile; c2, c3: row g + 8
#pragma unroll
  for (int mt = 0; mt < SPQR_CMPQ_TC_MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const i64 i = rw + mt * 16 + g + (r >> 1) * 8;
        const int b = nt * 8 + 2 * tig + (r & 1);
        if (i < m && b < nbp) part[((i64)blockIdx.y * nbp + b) * m + i] = acc[mt][nt][r];
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

// Where the code of stored column j lives (all rows): word w0[i] (and w0[i + m] when the code
// straddles two words) of row i, shifted right by sh, masked; its table starts at toff.
struct ColCode {
  const u32 *w0;
  int sh, bits;
  bool straddle;
  i64 toff;
};

__device__ __forceinline__ ColCode col_code(const u32 *__restrict__ codes,
                                            const i64 *__restrict__ runs, int nruns, i64 j,
                                            i64 m) {
  int r = 0;
  while (r + 1 < nruns && j >= runs[8 * (r + 1)]) ++r;
  const i64 *rd = runs + 8 * r;
  const i64 jloc = j - rd[0];
  ColCode cc;
  cc.bits = (int)rd[2];
  const int bit = (int)(jloc & 31) * cc.bits;
  cc.w0 = codes + rd[3] + (jloc >> 5) * cc.bits * m + (i64)(bit >> 5) * m;
  cc.sh = bit & 31;
  cc.straddle = cc.sh + cc.bits > 32;
  cc.toff = rd[4] + (jloc << cc.bits);
  return cc;
}

__device__ __forceinline__ u32 col_value(const ColCode &cc, const u16 *__restrict__ tables,
                                         i64 trow, i64 i, i64 m) {
  u32 q = ldg_u32(cc.w0 + i) >> cc.sh;
  if (cc.straddle) q |= ldg_u32(cc.w0 + i + m) << (32 - cc.sh);
  q &= (1u << cc.bits) - 1u;
  return tables[trow + cc.toff + q];
}

template <int OUT>
__device__ __forceinline__ u32 out_bits(u32 h) {  // the f16 bits h as OUT's bits
  if (OUT == 0) return __float_as_uint(f16_to_f32(h));
  if (OUT == 1) return h;
  return f32_to_bf16(f16_to_f32(h));
}

// Dense part of the decode (spqr_cmpq_dequant_*). Each block: SPQR_CMPQ_DQ_COLS (256) output
// columns, rows in steps of 32 (lane = row, so the 32 rows' code words of a column are one
// 128-byte load and its table one or two lines); warp w decodes columns 32w..32w+31 of the
// block into a shared tile, which the warps then write out row by row, 128 bytes per store.
// 16-bit outputs pack two columns into one 32-bit tile word (row pitch 129 words: both phases
// conflict-free).  H100, 2.5 bits/weight on the 70B shapes: 960 / 948 us, 1.5-2.9x faster
// than the design it replaced (one thread per output column, every lane's code word a
// separate sector).
#define SPQR_CMPQ_DQ_COLS 256
template <int OUT>
__device__ __forceinline__ void dequant_tile(const u32 *__restrict__ codes,
                                             const u16 *__restrict__ tables,
                                             const i64 *__restrict__ runs, int nruns,
                                             const u32 *__restrict__ inv_perm, void *out, i64 ldo,
                                             i64 m, i64 n, i64 R, i64 Lp, int rows_per_block) {
  constexpr int WORDS = OUT == 0 ? SPQR_CMPQ_DQ_COLS : SPQR_CMPQ_DQ_COLS / 2;  // per tile row
  __shared__ u32 tile[32][WORDS + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const i64 c0 = (i64)blockIdx.x * SPQR_CMPQ_DQ_COLS;
  const int ncols = (int)(n - c0 < SPQR_CMPQ_DQ_COLS ? n - c0 : SPQR_CMPQ_DQ_COLS);
  const i64 ra = (i64)blockIdx.y * rows_per_block;
  const i64 rb = ra + rows_per_block < m ? ra + rows_per_block : m;
  for (i64 r0 = ra; r0 < rb; r0 += 32) {
    const i64 i = r0 + lane;
    const bool live = i < rb;
    const i64 trow = live && R ? (i / R) * Lp : 0;
    if (OUT == 0) {
#pragma unroll 4
      for (int k = 0; k < 32; ++k) {
        const int cc = warp * 32 + k;
        if (cc >= ncols) break;
        const ColCode code = col_code(codes, runs, nruns, inv_perm[c0 + cc], m);
        tile[lane][cc] = live ? out_bits<0>(col_value(code, tables, trow, i, m)) : 0u;
      }
    } else {
#pragma unroll 4
      for (int k = 0; k < 32; k += 2) {
        const int cc = warp * 32 + k;
        if (cc >= ncols) break;
        const ColCode a = col_code(codes, runs, nruns, inv_perm[c0 + cc], m);
        u32 lo = 0, hi = 0;
        if (cc + 1 < ncols) {
          const ColCode b = col_code(codes, runs, nruns, inv_perm[c0 + cc + 1], m);
          if (live) hi = out_bits<OUT>(col_value(b, tables, trow, i, m));
        }
        if (live) lo = out_bits<OUT>(col_value(a, tables, trow, i, m));
        tile[lane][cc >> 1] = lo | hi << 16;
      }
    }
    __syncthreads();
    for (int rr = warp; rr < 32; rr += SPQR_CMPQ_DQ_COLS / 32) {
      const i64 ii = r0 + rr;
      if (ii >= rb) break;
      if (OUT == 0) {
        float *o = (float *)out + ii * ldo + c0;
        for (int cc = lane; cc < ncols; cc += 32) o[cc] = __uint_as_float(tile[rr][cc]);
      } else {
        u16 *o = (u16 *)out + ii * ldo + c0;
        for (int w = lane; 2 * w < ncols; w += 32) {
          const u32 v = tile[rr][w];
          if (2 * w + 1 < ncols && (((size_t)(o + 2 * w)) & 3) == 0) {
            *(u32 *)(o + 2 * w) = v;
          } else {
            o[2 * w] = (u16)v;
            if (2 * w + 1 < ncols) o[2 * w + 1] = (u16)(v >> 16);
          }
        }
      }
    }
    __syncthreads();
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

// Four blocks of 256 an SM (<= 64 registers): with mv1_depth chunks a thread, ~32 KiB in flight.
#define SPQR_CMPQ_MV1(B)                                                                        \
  extern "C" __global__ void __launch_bounds__(SPQR_CMPQ_ROWS, 4) spqr_cmpq_mv1_b##B(           \
      const u32 *__restrict__ codes, const u16 *__restrict__ tables, const i64 *__restrict__ tiles, \
      int ntiles, const float *__restrict__ xs, float *__restrict__ part, i64 m, i64 R, i64 Lp) { \
    mv1<B>(codes, tables, tiles, ntiles, xs, part, m, R, Lp);                                   \
  }
SPQR_CMPQ_MV1(1)
SPQR_CMPQ_MV1(2)
SPQR_CMPQ_MV1(3)
SPQR_CMPQ_MV1(4)
SPQR_CMPQ_MV1(5)
SPQR_CMPQ_MV1(6)
SPQR_CMPQ_MV1(7)
SPQR_CMPQ_MV1(8)
#undef SPQR_CMPQ_MV1

// x' for the tensor-core kernels (f16 x): xs as spqr_cmpq_prepare_x (the finish kernel's
// outlier corrections read it) for b < nbp, and xf, the f16 bits in mma B-fragment order: chunk
// kg = jp / 32, n-tile b / 8, lane 4*(b % 8) + (jp / 8) % 4, half jp % 8.
extern "C" __global__ void spqr_cmpq_prepare_xf(const u16 *__restrict__ x, i64 ldx,
                                                const u32 *__restrict__ pcol, i64 np,
                                                float *__restrict__ xs, i64 ldxs, int nbp,
                                                u16 *__restrict__ xf, int nt, int batch) {
  const i64 jp = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.y;
  if (jp >= np) return;
  const u32 c = pcol[jp];
  const u16 h = b < batch && c != 0xFFFFFFFFu ? x[(i64)b * ldx + c] : (u16)0;
  if (b < nbp) xs[(i64)b * ldxs + jp] = f16_to_f32(h);
  const i64 lane = (b & 7) * 4 + ((jp >> 3) & 3);
  xf[(((jp >> 5) * nt + (b >> 3)) * 32 + lane) * 8 + (jp & 7)] = h;
}

#define SPQR_CMPQ_TC(B, NT)                                                                     \
  extern "C" __global__ void __launch_bounds__(SPQR_CMPQ_TC_WARPS * 32, 4)                      \
      spqr_cmpq_tc_b##B##_nt##NT(const u32 *__restrict__ codes, const u16 *__restrict__ tables, \
                                 const i64 *__restrict__ tiles, int ntiles,                     \
                                 const uint4 *__restrict__ xf, float *__restrict__ part, int nbp, \
                                 i64 m, i64 R, i64 Lp) {                                        \
    tc_matmul<B, NT>(codes, tables, tiles, ntiles, xf, part, nbp, m, R, Lp);                    \
  }
#define SPQR_CMPQ_TC_NT(B) SPQR_CMPQ_TC(B, 1) SPQR_CMPQ_TC(B, 2)
SPQR_CMPQ_TC_NT(1)
SPQR_CMPQ_TC_NT(2)
SPQR_CMPQ_TC_NT(3)
SPQR_CMPQ_TC_NT(4)
SPQR_CMPQ_TC_NT(5)
SPQR_CMPQ_TC_NT(6)
SPQR_CMPQ_TC_NT(7)
SPQR_CMPQ_TC_NT(8)
#undef SPQR_CMPQ_TC_NT
#undef SPQR_CMPQ_TC

#define SPQR_CMPQ_DQ(OUT, NAME)                                                                 \
  extern "C" __global__ void __launch_bounds__(SPQR_CMPQ_DQ_COLS) spqr_cmpq_dequant_##NAME(      \
      const u32 *__restrict__ codes, const u16 *__restrict__ tables, const i64 *__restrict__ runs, \
      int nruns, const u32 *__restrict__ inv_perm, void *out, i64 ldo, i64 m, i64 n, i64 R,     \
      i64 Lp, int rows_per_block) {                                                             \
    dequant_tile<OUT>(codes, tables, runs, nruns, inv_perm, out, ldo, m, n, R, Lp,             \
                      rows_per_block);                                                          \
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
