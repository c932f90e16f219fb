// spqr_tc.cu -- tensor-core matvec / matmul (batch 1..64) for `bilevel` tensors in the GPU
// tile layout (spqr_format/gpu/tile_layout.py; spqr_gpu.h section "tile layout").
//
// Plain CUDA C++, no includes, no host code; compiles with nvcc and NVRTC (sm_80+: mma.sync
// m16n8k16 with f16 inputs and f32 accumulators).
//
// Per call, on one stream:
//   1. spqr_tc_prepare_x: x'[c][j] = x[c][perm[j]] (f16), written as mma B fragments;
//   2. batch <= 8: spqr_tcv_b{B}_s{SB}, the whole product (tc_vec),
//      or for batch <= 2 on large matrices spqr_tcg_b{B}_s{SB} (unscaled codes into the tensor
//      cores, scales applied in f32: tcg_round); otherwise
//      spqr_tc_b{B}_s{SB}_nt{NT}: each warp owns 16 rows (a block) and a range of chunks
//      (k-split over gridDim.y). Per round of 4 groups (4 mma k-steps; every A element of a
//      lane comes from one group, so each lane decodes the statistics of only its 2 rows of
//      its group) it rebuilds its A fragments in registers,
//        q  = exact small integer (f16 magic number 0x6400 | bits, then one exact f16x2 FMA),
//        s, -z from the statistic codes and the block's (step, base) records (f16x2 FMA),
//        a  = fma(q, s, -z*s)  (f16x2; one rounding of the weight to f16),
//      and issues NT mma.sync per k-step (8 batch columns each), B fragments from shared
//      memory; f32 partial sums go to a workspace;
//   3. (after the k-split kernel) spqr_tc_finish_p*: per row, the k-split partial sums in
//      order, plus the outlier corrections sum (o - w) x'[col] (f16 (o - w) values prepared
//      at load), rounded.
// Deterministic: no atomics; every sum has a fixed order.
//
// Accuracy (what tests/test_gpu_kernels.py checks): every weight enters the tensor cores
// rounded to f16 after f16 arithmetic on its statistics, so |a - w| <= 5 * 2^-11 * |s|(|q| +
// |z|) plus f16-subnormal terms; accumulation is f32. This is the accuracy of dequantizing to
// f16 and calling an f16 GEMM with f32 accumulation, which is what inference does anyway
// (spqr_tcg_*: the same f16 statistics, no rounding of the weight itself, f32 scaling; codes
// as f16 subnormals cost at most 2^-15.8 sum|x'| per group in code units, see tcg_round). The
// bit-exact decode (SPEC section 7) is spqr_kernels.cu's dequantizer.

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;

#ifndef SPQR_TC_WARPS
#define SPQR_TC_WARPS 8
#endif
#ifndef SPQR_TC_MINB
#define SPQR_TC_MINB 2
#endif
// Entries per lane and step of the finish kernel's quad path (all in flight at once).
#ifndef SPQR_TC_QUAD_PER
#define SPQR_TC_QUAD_PER 8
#endif

namespace spqr_tc {

__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
  u32 d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ float f16_to_f32(u32 bits) {
  float f;
  unsigned short h = (unsigned short)bits;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ u32 f32_to_f16(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ u32 f32_to_bf16(float f) {
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld_nc2(const uint2* p) {
  uint2 v;
  asm volatile("ld.global.nc.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ u32 ld_nc1(const u32* p) {
  u32 v;
  asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ void mma16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// f16 bit pattern of 2^e (|e| small) and of -2^e, broadcast to both halves.
__host__ __device__ constexpr u32 h2_pow2(int e) {
  return ((u32)(15 + e) << 10) * 0x10001u;
}
__host__ __device__ constexpr u32 h2_neg_pow2(int e) {
  return (((u32)(15 + e) << 10) | 0x8000u) * 0x10001u;
}

// The f16x2 magic 0x64006400 in a register the compiler cannot fold, so that
// (bits & M) | magic is one LOP3 (immediate mask, register magic) instead of two.
__device__ __forceinline__ u32 magic_reg() {
  u32 r;
  asm volatile("mov.b32 %0, 0x64006400;" : "=r"(r));
  return r;
}
template <u32 MASK>
__device__ __forceinline__ u32 and_or(u32 a, u32 c) {
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(MASK), "r"(c));  // (a & b) | c
  return d;
}

// Bit offset (within each 16-bit half) of slot `slot`'s NB-bit field after the slot's shift,
// if any: the first 10 / NB slots are read in place, the others after shifted().
__host__ __device__ constexpr int slot_offset(int NB, int slot) {
  return (slot < 10 / NB ? slot : slot - 10 / NB) * NB;
}

// Pair slot I of a word holding NB-bit fields (tile_layout.pair_slots): returns the f16x2
// (field_lo, field_hi) as exact small integers. `w` is the word, `ws` the word shifted right
// by (10 / NB) * NB (see shifted(); the compiler computes it once per word).
template <int NB, int I>
__device__ __forceinline__ u32 pair_exact(u32 w, u32 ws, u32 magic) {
  constexpr int D = 10 / NB;
  constexpr int P = slot_offset(NB, I);
  constexpr u32 M = (((1u << NB) - 1u) << P) * 0x10001u;
  const u32 src = I < D ? w : ws;
  const u32 v = and_or<M>(src, magic);  // 1024 + field * 2^P, exactly
  // v * 2^-P - 1024 * 2^-P = field, exactly (power-of-two scaling, integer result)
  return hfma2(v, h2_pow2(-P), h2_neg_pow2(10 - P));
}

// Pair slot I as f16 subnormals: the masked field alone, read as f16x2, is (field_lo,
// field_hi) * 2^(slot_offset - 24), exactly (the field lies inside the 10 mantissa bits).
template <int NB, int I>
__device__ __forceinline__ u32 pair_subnormal(u32 w, u32 ws) {
  constexpr u32 M = (((1u << NB) - 1u) << slot_offset(NB, I)) * 0x10001u;
  return (I < 10 / NB ? w : ws) & M;
}

template <int NB>
__device__ __forceinline__ u32 shifted(u32 w) {
  return w >> ((10 / NB) * NB);
}

template <int NB>
__host__ __device__ constexpr int pair_slots() {
  return 10 / NB + (16 - (10 / NB) * NB) / NB;
}

// (S, Bz) from one row's (s, -z): S = (s, s), Bz = (-z s, -z s) as f16x2.
__device__ __forceinline__ void scale_pair(u32 sz, u32& S, u32& Bz) {
  S = __byte_perm(sz, sz, 0x1010);
  const u32 zz = __byte_perm(sz, sz, 0x3232);
  Bz = hmul2(S, zz);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;"); }

// Layout constants (tile_layout.py): pair slots per code word, rounds per chunk, ...
template <int B>
__host__ __device__ constexpr int rounds_per_chunk() {
  return pair_slots<B>() == 8 ? 2 : pair_slots<B>() == 5 ? 5 : 1;
}

// Accumulator sets per warp: with 2, even and odd k-steps accumulate into separate registers,
// so consecutive mma.sync do not wait for each other (summed at the end); only for small NT,
// where the registers are free (SPQR_TC_ACC2_NT: the largest NT that gets 2 sets; 0: none).
#ifndef SPQR_TC_ACC2_NT
#define SPQR_TC_ACC2_NT 2
#endif
template <int NT>
__host__ __device__ constexpr int tc_acc_sets() {
  return NT <= SPQR_TC_ACC2_NT ? 2 : 1;
}

// Per-chunk stream data of one warp, loaded one chunk ahead of its use.
template <int SLABS, int SWL>
struct Stage {
  uint4 cw[SLABS];  // this lane's code words (4 per slab)
  u32 sw[SWL];      // this lane's statistics words
  uint2 st2;        // lane j < MPC: (step, base) record of the chunk's group j
};

template <int SWL>
__device__ __forceinline__ void load_stats(u32 (&sw)[SWL], const u32* p) {
  if (SWL == 1) {
    sw[0] = ld_nc1(p);
  } else if (SWL == 2) {
    const uint2 v = ld_nc2(reinterpret_cast<const uint2*>(p));
    sw[0] = v.x;
    sw[SWL > 1 ? 1 : 0] = v.y;
  } else {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    sw[0] = v.x;
    sw[SWL > 1 ? 1 : 0] = v.y;
    sw[SWL > 2 ? 2 : 0] = v.z;
    sw[SWL > 3 ? 3 : 0] = v.w;
  }
}

// Per-configuration geometry of the tile layout (tile_layout.geometry, spqr_gpu.h).
template <int B, int SB>
struct TileGeo {
  static constexpr int PPW = pair_slots<B>();        // pair slots per code word
  static constexpr int R = rounds_per_chunk<B>();    // rounds per chunk
  static constexpr int MPC = 4 * R;                  // groups (mma k-steps) per chunk
  static constexpr int SLABS = 4 * R / PPW;          // 16-byte code loads per lane and chunk
  static constexpr int SPW = pair_slots<SB>();
  static constexpr int SWL0 = (2 * R + SPW - 1) / SPW;
  static constexpr int SWL = SWL0 == 1 ? 1 : SWL0 == 2 ? 2 : 4;  // statistics words per lane
  static_assert(SLABS * PPW == 4 * R, "code words fill whole slabs");
};

// One warp's walk over chunks c0, c0 + step, ... of row block rb (of RB; the arrays are
// chunk-major): each load() fills a Stage with the next chunk's code words, statistics words
// and stats2 records (lane j < MPC: group j's).
template <int B, int SB>
struct ChunkStream {
  using G = TileGeo<B, SB>;
  const uint4* cptr;
  const u32* sptr;
  const uint2* s2ptr;
  i64 step;
  __device__ __forceinline__ ChunkStream(const uint4* codes, const u32* stats, const uint2* stats2,
                                         int rb, int RB, int c0, int step_, int lane)
      : cptr(codes + ((i64)c0 * RB + rb) * G::SLABS * 32 + lane),
        sptr(stats + (((i64)c0 * RB + rb) * 32 + lane) * G::SWL),
        s2ptr(stats2 + ((i64)c0 * RB + rb) * G::MPC + (lane < G::MPC ? lane : 0)),
        step((i64)step_ * RB) {}
  __device__ __forceinline__ void load(Stage<G::SLABS, G::SWL>& st) {
#pragma unroll
    for (int k = 0; k < G::SLABS; ++k) st.cw[k] = ld_stream(cptr + k * 32);
    cptr += step * G::SLABS * 32;
    load_stats<G::SWL>(st.sw, sptr);
    sptr += step * 32 * G::SWL;
    st.st2 = ld_nc2(s2ptr);
    s2ptr += step * G::MPC;
  }
};

// Where register RG of k-step MU (= 4 round + mma) of a chunk finds its code pair
// (tile_layout.pair_position): slot MU / SLABS of word 4 (MU % SLABS) + RG. The four registers
// of one mma share a slot, so they share its bit offset (tcg_round relies on this).
template <int B>
__host__ __device__ constexpr int chunk_slabs() {
  return 4 * rounds_per_chunk<B>() / pair_slots<B>();
}
template <int B, int MU, int RG>
__host__ __device__ constexpr int pair_word() {
  return 4 * (MU % chunk_slabs<B>()) + RG;
}
template <int B, int MU>
__host__ __device__ constexpr int pair_slot() {
  return MU / chunk_slabs<B>();
}

// Word W of a stage's code words, as a compile-time index.
template <int W, int SLABS>
__device__ __forceinline__ u32 code_word(const uint4 (&cw)[SLABS]) {
  const uint4& v = cw[W / 4];
  return (W % 4) == 0 ? v.x : (W % 4) == 1 ? v.y : (W % 4) == 2 ? v.z : v.w;
}

// A-fragment register RG of k-step MU of the chunk: exact codes, then fma with the row's
// (S, Bz).
template <int B, int MU, int RG, int SLABS>
__device__ __forceinline__ u32 a_reg(const uint4 (&cw)[SLABS], u32 S, u32 Bz, u32 magic) {
  const u32 w = code_word<pair_word<B, MU, RG>(), SLABS>(cw);
  return hfma2(pair_exact<B, pair_slot<B, MU>()>(w, shifted<B>(w), magic), S, Bz);
}

// (s, -z) as f16x2 of rows g (sz0) and g + 8 (sz1) of the lane's group 4 RHO + t in round RHO
// of a stage: the group's (step, base) record from lane 4 RHO + t, the rows' statistic codes
// from the lane's statistics words.
template <int SB, int RHO, int SLABS, int SWL>
__device__ __forceinline__ void round_stats(const Stage<SLABS, SWL>& st, int lane, u32 magic,
                                            u32& sz0, u32& sz1) {
  constexpr int SPW = pair_slots<SB>();
  uint2 st2;
  const int src = 4 * RHO + (lane & 3);
  st2.x = __shfl_sync(0xffffffffu, st.st2.x, src);
  st2.y = __shfl_sync(0xffffffffu, st.st2.y, src);
  constexpr int Q0 = 2 * RHO, Q1 = 2 * RHO + 1;
  const u32 w0 = st.sw[Q0 / SPW], w1 = st.sw[Q1 / SPW];
  sz0 = hfma2(pair_exact<SB, Q0 % SPW>(w0, shifted<SB>(w0), magic), st2.x, st2.y);
  sz1 = hfma2(pair_exact<SB, Q1 % SPW>(w1, shifted<SB>(w1), magic), st2.x, st2.y);
}

// One round (4 mma) of a chunk: rows g, g + 8 of the lane's group 4*RHO + t. B fragments: WX
// false, from the block's copy of the chunk in shared memory, [NT][MPC][32 lanes]; WX true
// (NT == 1), only lanes `xl` load theirs (the others' are zero: batch columns past the
// batch), from the chunk's xfrag in global memory (L1-cached: every warp of a multiprocessor
// reads the same x').
template <int B, int SB, int NT, bool WX, int RHO, int SLABS, int SWL>
__device__ __forceinline__ void tc_round(const Stage<SLABS, SWL>& st,
                                         float (&acc)[tc_acc_sets<NT>() * NT][4],
                                         const uint2* xs_chunk, int lane, bool xl, u32 magic) {
  constexpr int MPC = 4 * rounds_per_chunk<B>();
  u32 sz0, sz1, S0, B0, S1, B1;
  round_stats<SB, RHO>(st, lane, magic, sz0, sz1);
  scale_pair(sz0, S0, B0);
  scale_pair(sz1, S1, B1);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    u32 a[4];
    // register r = h + 2 hi (h = row half: g or g + 8)
#define SPQR_TC_A(U)                                                  \
  if (u == U) {                                                       \
    a[0] = a_reg<B, 4 * RHO + U, 0, SLABS>(st.cw, S0, B0, magic);     \
    a[1] = a_reg<B, 4 * RHO + U, 1, SLABS>(st.cw, S1, B1, magic);     \
    a[2] = a_reg<B, 4 * RHO + U, 2, SLABS>(st.cw, S0, B0, magic);     \
    a[3] = a_reg<B, 4 * RHO + U, 3, SLABS>(st.cw, S1, B1, magic);     \
  }
    SPQR_TC_A(0)
    SPQR_TC_A(1)
    SPQR_TC_A(2)
    SPQR_TC_A(3)
#undef SPQR_TC_A
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      uint2 bf;
      if (WX)
        bf = xl ? ld_nc2(xs_chunk + (4 * RHO + u) * 32 + lane) : make_uint2(0u, 0u);
      else
        bf = xs_chunk[(j * MPC + 4 * RHO + u) * 32 + lane];
      mma16816(acc[(u % tc_acc_sets<NT>()) * NT + j], a, bf.x, bf.y);
    }
  }
}

template <int B, int SB, int NT, bool WX, int RHO, int R, int SLABS, int SWL>
struct Rounds {
  static __device__ __forceinline__ void run(const Stage<SLABS, SWL>& st,
                                             float (&acc)[tc_acc_sets<NT>() * NT][4],
                                             const uint2* xs_chunk, int lane, bool xl,
                                             u32 magic) {
    tc_round<B, SB, NT, WX, RHO, SLABS, SWL>(st, acc, xs_chunk, lane, xl, magic);
    Rounds<B, SB, NT, WX, RHO + 1, R, SLABS, SWL>::run(st, acc, xs_chunk, lane, xl, magic);
  }
};
template <int B, int SB, int NT, bool WX, int R, int SLABS, int SWL>
struct Rounds<B, SB, NT, WX, R, R, SLABS, SWL> {
  static __device__ __forceinline__ void run(const Stage<SLABS, SWL>&,
                                             float (&)[tc_acc_sets<NT>() * NT][4],
                                             const uint2*, int, bool, u32) {}
};

// Group-separated rounds (batch <= 2, spqr_tcg_*). The field offset of k-step MU's slot, and
// the accumulator class of mma U of round RHO: the first mma of the round whose slot has the
// same offset (its fragments carry the same power of two in tcg_round's subnormal form).
template <int B>
__host__ __device__ constexpr int mu_offset(int mu) {
  return slot_offset(B, mu / chunk_slabs<B>());
}
template <int B>
__host__ __device__ constexpr int tcg_class(int rho, int u) {
  int c = u;
  for (int v = u - 1; v >= 0; --v)
    if (mu_offset<B>(4 * rho + v) == mu_offset<B>(4 * rho + u)) c = v;
  return c;
}
// Subnormal form when every round needs at most 2 accumulator classes: B = 3 (one slot per
// round: 1 class), B = 4 (offsets 0, 4, 0, 4: 2 classes). B = 2 (4 offsets per round) keeps
// the exact-integer form (pair_exact, 1 class).
template <int B>
__host__ __device__ constexpr bool tcg_subnormal() {
  for (int rho = 0; rho < rounds_per_chunk<B>(); ++rho) {
    int n = 0;
    for (int u = 0; u < 4; ++u) n += tcg_class<B>(rho, u) == u;
    if (n > 2) return false;
  }
  return true;
}

// mma U of round RHO: A = the codes of k-step 4 RHO + U, as f16 subnormals (code * 2^(o - 24),
// o = mu_offset: one LOP3 per register) or exact integers (pair_exact), into accumulator set
// tcg_class (0 for the integer form).
template <int B, int RHO, int U, int SLABS>
__device__ __forceinline__ void tcg_mma(const uint4 (&cw)[SLABS], float (&d)[4][4],
                                        const uint2* xs_chunk, int lane, u32 magic) {
  constexpr int MU = 4 * RHO + U, SL = pair_slot<B, MU>();
  constexpr bool SUB = tcg_subnormal<B>();
  u32 a[4];
#define SPQR_TCG_A(RG)                                                              \
  {                                                                                 \
    const u32 w = code_word<pair_word<B, MU, RG>(), SLABS>(cw);                     \
    a[RG] = SUB ? pair_subnormal<B, SL>(w, shifted<B>(w))                           \
                : pair_exact<B, SL>(w, shifted<B>(w), magic);                       \
  }
  SPQR_TCG_A(0) SPQR_TCG_A(1) SPQR_TCG_A(2) SPQR_TCG_A(3)
#undef SPQR_TCG_A
  const uint2 bf = ld_nc2(xs_chunk + MU * 32 + lane);
  mma16816(d[SUB ? tcg_class<B>(RHO, U) : 0], a, bf.x, bf.y);
}

// 2^(24 - o) for accumulator class U of round RHO in the subnormal form (1 otherwise).
template <int B, int RHO, int U>
__host__ __device__ constexpr float tcg_unscale() {
  return tcg_subnormal<B>() ? (float)(1u << (24 - mu_offset<B>(4 * RHO + U))) : 1.f;
}

// One group-separated round: the B fragments (spqr_tc_prepare_x with diag = 1) put batch
// column c of the round's group t into mma column n = 2t + c, so after the round's 4 mma
// (fresh accumulators) lane (g, t) holds, for rows g and g + 8 and batch columns 0 and 1, the
// sums over its own group of q * x' (times 2^(o - 24) per accumulator class in the subnormal
// form: undone exactly in f32). They are scaled in f32 with the group's x' sums X (f32,
// prepare_x):
//   y += s * (D - z * X)
// Per weight pair this saves the f16x2 FMA that applies (s, -z s) (and, in the subnormal
// form, the exact FMA that makes the integer), and the weight is never rounded to f16 (s and
// z are the f16 statistics values of tc_round). Subnormal inputs cost the tensor cores some
// accumulation precision (they align them at the exponent of 2^-14, so a field at offset o
// keeps 10 - B - o bits fewer): measured on H200, at most 2^-15.8 sum|x'| per group in code
// units, against 2^-22 for the integer form (tests/test_gpu_kernels.py's bound counts it).
template <int B, int SB, int RHO, int SLABS, int SWL>
__device__ __forceinline__ void tcg_round(const Stage<SLABS, SWL>& st, float (&y)[4],
                                          const uint2* xs_chunk, const float2* xsum_chunk,
                                          int lane, u32 magic) {
  u32 sz0, sz1;  // (s, -z) of rows g and g + 8 of the lane's group
  round_stats<SB, RHO>(st, lane, magic, sz0, sz1);
  float d[4][4];
#pragma unroll
  for (int k = 0; k < 4; ++k) d[k][0] = d[k][1] = d[k][2] = d[k][3] = 0.f;
  tcg_mma<B, RHO, 0, SLABS>(st.cw, d, xs_chunk, lane, magic);
  tcg_mma<B, RHO, 1, SLABS>(st.cw, d, xs_chunk, lane, magic);
  tcg_mma<B, RHO, 2, SLABS>(st.cw, d, xs_chunk, lane, magic);
  tcg_mma<B, RHO, 3, SLABS>(st.cw, d, xs_chunk, lane, magic);
  float D[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    D[j] = tcg_subnormal<B>() ? d[0][j] * tcg_unscale<B, RHO, 0>() : d[0][j];
    if (tcg_subnormal<B>() && tcg_class<B>(RHO, 1) == 1)
      D[j] = fmaf(d[1][j], tcg_unscale<B, RHO, 1>(), D[j]);
    if (tcg_subnormal<B>() && tcg_class<B>(RHO, 2) == 2)
      D[j] = fmaf(d[2][j], tcg_unscale<B, RHO, 2>(), D[j]);
    if (tcg_subnormal<B>() && tcg_class<B>(RHO, 3) == 3)
      D[j] = fmaf(d[3][j], tcg_unscale<B, RHO, 3>(), D[j]);
  }
  const float2 X = xsum_chunk[4 * RHO + (lane & 3)];
  const float s0 = f16_to_f32(sz0), nz0 = f16_to_f32(sz0 >> 16);
  const float s1 = f16_to_f32(sz1), nz1 = f16_to_f32(sz1 >> 16);
  // D[0], D[1]: row g, batch columns 0, 1; D[2], D[3]: row g + 8
  y[0] = fmaf(s0, fmaf(nz0, X.x, D[0]), y[0]);
  y[1] = fmaf(s0, fmaf(nz0, X.y, D[1]), y[1]);
  y[2] = fmaf(s1, fmaf(nz1, X.x, D[2]), y[2]);
  y[3] = fmaf(s1, fmaf(nz1, X.y, D[3]), y[3]);
}

template <int B, int SB, int RHO, int R, int SLABS, int SWL>
struct GRounds {
  static __device__ __forceinline__ void run(const Stage<SLABS, SWL>& st, float (&y)[4],
                                             const uint2* xs_chunk, const float2* xsum_chunk,
                                             int lane, u32 magic) {
    tcg_round<B, SB, RHO, SLABS, SWL>(st, y, xs_chunk, xsum_chunk, lane, magic);
    GRounds<B, SB, RHO + 1, R, SLABS, SWL>::run(st, y, xs_chunk, xsum_chunk, lane, magic);
  }
};
template <int B, int SB, int R, int SLABS, int SWL>
struct GRounds<B, SB, R, R, SLABS, SWL> {
  static __device__ __forceinline__ void run(const Stage<SLABS, SWL>&, float (&)[4],
                                             const uint2*, const float2*, int, u32) {}
};

template <int B, int SB, int NT>
__device__ __forceinline__ void tc_matmul(const uint4* __restrict__ codes,
                                          const u32* __restrict__ stats,
                                          const uint2* __restrict__ stats2,
                                          const uint2* __restrict__ xfrag,
                                          float* __restrict__ part, int RB, int NC,
                                          int chunks_per_split, i64 M16, int batch) {
  using G = TileGeo<B, SB>;
  constexpr int R = G::R, MPC = G::MPC, SLABS = G::SLABS, SWL = G::SWL;
  // The block's warps share each chunk's x fragments through shared memory (double-buffered
  // cp.async): 2 buffers of NT * MPC mma B fragments of 32 lanes, in the dynamic shared
  // memory the launch provides (2 * NT * MPC * 256 bytes).
  extern __shared__ uint4 xs_dyn[];
  uint2* const xs0 = reinterpret_cast<uint2*>(xs_dyn);
  uint2* const xs1 = xs0 + NT * MPC * 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int rb = blockIdx.x * SPQR_TC_WARPS + warp;
  const bool active = rb < RB;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int split = blockIdx.y;
  const int c0 = split * chunks_per_split;
  const int c1 = min(NC, c0 + chunks_per_split);
  const i64 KT = (i64)NC * MPC;
  const int rbc = active ? rb : 0;  // inactive warps only help with the copies

  constexpr int NA = tc_acc_sets<NT>();
  float acc[NA * NT][4];
#pragma unroll
  for (int j = 0; j < NA * NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  const u32 magic = magic_reg();

  ChunkStream<B, SB> stream(codes, stats, stats2, rbc, RB, c0, 1, lane);
  auto copy_x = [&](int buf, int c) {  // chunk c's B fragments into xs[buf]
    constexpr int UNITS = NT * MPC * 16;  // 16-byte units: NT segments of MPC * 256 bytes
    for (int u = threadIdx.x; u < UNITS; u += 32 * SPQR_TC_WARPS) {
      const int j = u / (MPC * 16);
      const int r = u % (MPC * 16);
      const uint2* src = xfrag + ((i64)j * KT + (i64)c * MPC) * 32 + 2 * r;
      cp_async16((buf ? xs1 : xs0) + j * MPC * 32 + 2 * r, src);
    }
    cp_async_commit();
  };
  Stage<SLABS, SWL> sa, sb;
  if (c0 < c1) {
    stream.load(sa);
    copy_x(0, c0);
  }
  for (int c = c0; c < c1; c += 2) {
    cp_async_wait_all();
    __syncthreads();
    if (c + 1 < c1) {
      copy_x(1, c + 1);
      stream.load(sb);
    }
    if (active) Rounds<B, SB, NT, false, 0, R, SLABS, SWL>::run(sa, acc, xs0, lane, true, magic);
    if (c + 1 >= c1) break;
    cp_async_wait_all();
    __syncthreads();
    if (c + 2 < c1) {
      copy_x(0, c + 2);
      stream.load(sa);
    }
    if (active) Rounds<B, SB, NT, false, 0, R, SLABS, SWL>::run(sb, acc, xs1, lane, true, magic);
  }
  if (!active) return;
  if (NA == 2) {  // the odd k-steps' sums onto the even ones' (fixed order: deterministic)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[j][r] += acc[(NA - 1) * NT + j][r];
  }
  // D fragment: acc[j][0..1] row g, columns 2t, 2t+1; acc[j][2..3] row g + 8.
  float* p = part + (i64)split * (NT * 8) * M16;
  const i64 r0 = (i64)rb * 16 + g;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int col = j * 8 + 2 * t;
    if (col < batch) {
      p[(i64)col * M16 + r0] = acc[j][0];
      p[(i64)col * M16 + r0 + 8] = acc[j][2];
    }
    if (col + 1 < batch) {
      p[(i64)(col + 1) * M16 + r0] = acc[j][1];
      p[(i64)(col + 1) * M16 + r0 + 8] = acc[j][3];
    }
  }
}

}  // namespace spqr_tc

// ---------------------------------------------------------------------------------------------
// extern "C" entry points (arguments and launch contract: spqr_gpu.h, "tile layout").

// Which entry points (the Python layer compiles small modules: _kernels.py kernel_module):
//   -DSPQR_TC_B=b -DSPQR_TC_SB=sb  that pair's spqr_tc_b*_nt*, spqr_tcv_* and spqr_tcg_* only;
//   -DSPQR_TC_SHARED               spqr_tc_prepare_x and spqr_tc_finish_p* only;
//   neither                        all of them (spqr_tc_host.cu, tests/test_kernels_compile.py).
#if defined(SPQR_TC_B) && defined(SPQR_TC_SB)
#define SPQR_TC_PAIR_MODULE 1
#define SPQR_TC_SHARED_MODULE 0
#elif defined(SPQR_TC_SHARED)
#define SPQR_TC_PAIR_MODULE 0
#define SPQR_TC_SHARED_MODULE 1
#else
#define SPQR_TC_PAIR_MODULE 0
#define SPQR_TC_SHARED_MODULE 0
#endif

#if !SPQR_TC_PAIR_MODULE
// One thread per (n-tile j, mma mu, lane): B fragment words of x' (f16; 0 past n / batch), and
// the same values in x'^T [n][bp] (stored column major over batch columns, bp >= batch), which
// the finish kernel gathers outlier columns from. mma mu = 4 * round + u: lane (g, t) holds
// columns 4u .. 4u + 3 of the round's group t (tile_layout.py) for batch column 8j + g; with
// diag = 1 (spqr_tcg_*: nt = 1, batch <= 2) for batch column g - 2t instead (0 where that is
// not a batch column). xsum (NULL: none; needs batch <= 2) [KT][2]: per group (16 columns of
// x', group = mu / 4 * 4 + t) and batch column, the f32 sum of its f16 values in column order
// (0 for batch columns past the batch), from the threads id < 2 * KT.
extern "C" __global__ void spqr_tc_prepare_x(const u16* __restrict__ x, i64 ldx,
                                             const u32* __restrict__ perm, i64 n, int batch,
                                             int nt, i64 KT, uint2* __restrict__ xfrag,
                                             u16* __restrict__ xt, int bp, int diag,
                                             float* __restrict__ xsum) {
  const i64 id = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  const i64 total = (i64)nt * KT * 32;
  if (xsum != nullptr && id < 2 * KT) {
    const int c = (int)(id & 1);
    const i64 k0 = (id >> 1) * 16;
    float v = 0.f;
    if (c < batch) {
      u32 h[16];  // all 16 (perm, then x) loads in flight at once
#pragma unroll
      for (int q = 0; q < 16; ++q) {
        const i64 k = k0 + q;
        h[q] = k < n ? (perm ? perm[k] : (u32)k) : 0xFFFFFFFFu;
      }
#pragma unroll
      for (int q = 0; q < 16; ++q) h[q] = h[q] != 0xFFFFFFFFu ? x[(i64)c * ldx + h[q]] : 0u;
#pragma unroll
      for (int q = 0; q < 16; ++q) v += spqr_tc::f16_to_f32(h[q]);
    }
    xsum[id] = v;
  }
  if (id >= total) return;
  const int lane = (int)(id & 31);
  const i64 mu = (id >> 5) % KT;
  const int j = (int)((id >> 5) / KT);
  const int c = diag ? (lane >> 2) - 2 * (lane & 3) : j * 8 + (lane >> 2);
  const i64 k0 = ((mu >> 2) * 4 + (lane & 3)) * 16 + 4 * (mu & 3);
  u32 h[4] = {0, 0, 0, 0};
  if (c >= 0 && c < batch) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const i64 k = k0 + q;
      if (k < n) {
        const i64 src = perm ? (i64)perm[k] : k;
        h[q] = x[(i64)c * ldx + src];
        xt[k * bp + c] = (u16)h[q];
      }
    }
  }
  const uint2 v = {h[0] | (h[1] << 16), h[2] | (h[3] << 16)};
  xfrag[id] = v;
}
#endif  // !SPQR_TC_PAIR_MODULE

#define SPQR_TC_ENTRY(B, SB, NT)                                                                  \
  extern "C" __global__ void __launch_bounds__(32 * SPQR_TC_WARPS, SPQR_TC_MINB)                 \
      spqr_tc_b##B##_s##SB##_nt##NT(const uint4* __restrict__ codes, const u32* __restrict__ stats, \
                                    const uint2* __restrict__ stats2,                             \
                                    const uint2* __restrict__ xfrag, float* __restrict__ part,    \
                                    int RB, int NC, int chunks_per_split, i64 M16, int batch) {   \
    spqr_tc::tc_matmul<B, SB, NT>(codes, stats, stats2, xfrag, part, RB, NC, chunks_per_split,   \
                                  M16, batch);                                                    \
  }

#define SPQR_TC_ALL_NT(B, SB) \
  SPQR_TC_ENTRY(B, SB, 1)     \
  SPQR_TC_ENTRY(B, SB, 2)     \
  SPQR_TC_ENTRY(B, SB, 4)     \
  SPQR_TC_ENTRY(B, SB, 8)

#define SPQR_TC_ALL_SB(B) \
  SPQR_TC_ALL_NT(B, 1)    \
  SPQR_TC_ALL_NT(B, 2)    \
  SPQR_TC_ALL_NT(B, 3)    \
  SPQR_TC_ALL_NT(B, 4)

#if SPQR_TC_PAIR_MODULE
#define SPQR_TC_ONE(B, SB) SPQR_TC_ALL_NT(B, SB)
SPQR_TC_ONE(SPQR_TC_B, SPQR_TC_SB)
#elif !SPQR_TC_SHARED_MODULE
#ifndef SPQR_TC_ONLY_B3S3
SPQR_TC_ALL_SB(2)
SPQR_TC_ALL_SB(4)
SPQR_TC_ALL_NT(3, 1)
SPQR_TC_ALL_NT(3, 2)
SPQR_TC_ALL_NT(3, 4)
#endif
SPQR_TC_ALL_NT(3, 3)
#endif

namespace spqr_tc {
// Row `row`, batch column c of the k-split partial sums: part[s][c][row] summed over the
// splits in order (split stride `stride` floats).
__device__ __forceinline__ float split_sum(const float* __restrict__ part, int c, i64 row,
                                           i64 M16, int nsplit, i64 stride) {
  float v = 0.f;
  const float* p = part + (i64)c * M16 + row;
#pragma unroll 4
  for (int sp = 0; sp < nsplit; ++sp, p += stride) v += *p;
  return v;
}

// y[o] = v rounded to out_dtype (0 f32, 1 f16, 2 bf16).
__device__ __forceinline__ void store_y(void* y, i64 o, float v, int out_dtype) {
  if (out_dtype == 0)
    ((float*)y)[o] = v;
  else if (out_dtype == 2)
    ((u16*)y)[o] = (u16)f32_to_bf16(v);
  else
    ((u16*)y)[o] = (u16)f32_to_f16(v);
}

// One step over a row's outlier stream by its LPR lanes (sl = lane % LPR): lane sl loads
// entries e + PER sl .. e + PER sl + PER - 1 (those below e1; past the end: a skip of delta 0)
// into `ent`, and a segmented scan over the row's lanes returns the row's column before the
// lane's first entry; `base` (the column before entry e, -1 at the row's start) advances past
// the step's LPR * PER entries (the same value in the row's lanes).
template <int LPR, int PER>
__device__ __forceinline__ int entries_step(const u32* __restrict__ oent, u32 e, u32 e1, int sl,
                                            int& base, u32 (&ent)[PER]) {
#pragma unroll
  for (int q = 0; q < PER; ++q) {
    const u32 idx = e + PER * sl + q;
    ent[q] = idx < e1 ? oent[idx] : 0xFFFF0000u;
  }
  u32 run = 0;
#pragma unroll
  for (int q = 0; q < PER; ++q) run += ent[q] & 0xFFFFu;
  u32 scan = run;  // inclusive scan of the LPR lanes' totals
#pragma unroll
  for (int o = 1; o < LPR; o <<= 1) {
    const u32 v = __shfl_up_sync(0xffffffffu, scan, o, LPR);
    if (sl >= o) scan += v;
  }
  const int col = base + (int)(scan - run);
  base += (int)__shfl_sync(0xffffffffu, scan, LPR - 1, LPR);
  return col;
}

// Every real entry (no skips) of the entries [e0, e1) of one row whose LPR lanes (row lane
// sl) take PER consecutive entries each per step (all loads in flight): f(column, f32
// correction). Steps continue while any lane of the warp has entries left (the scans shuffle
// over the whole warp).
template <int LPR, int PER, typename F>
__device__ __forceinline__ void for_row_entries(const u32* __restrict__ oent, u32 e0, u32 e1,
                                                int sl, F&& f) {
  int base = -1;  // the row's column before this step's first entry
  for (u32 e = e0; __any_sync(0xffffffffu, e < e1); e += LPR * PER) {
    u32 ent[PER];
    int col = entries_step<LPR, PER>(oent, e, e1, sl, base, ent);
#pragma unroll
    for (int q = 0; q < PER; ++q) {
      col += (int)(ent[q] & 0xFFFFu);
      if ((ent[q] >> 16) == 0xFFFFu) continue;  // a skip
      f(col, f16_to_f32(ent[q] >> 16));
    }
  }
}

// for_row_entries with the x'^T gathers of all PER entries of a lane's step in flight: per
// step, load(column) for each of the lane's real entries, then use(loaded value, f32
// correction) for each in entry order (the same sums, in the same order, as for_row_entries).
// Only where it measured faster: spqr_tcv_*'s epilogue at batch 3-8 (H200, session 9: batch 4
// 4-11 % faster); the finish kernels' lanes pass and batch 1-2 were slower with it.
template <int LPR, int PER, int G, typename L, typename U>
__device__ __forceinline__ void for_row_entries_gathered(const u32* __restrict__ oent, u32 e0,
                                                         u32 e1, int sl, L&& load, U&& use) {
  static_assert(PER % G == 0, "groups of G gathers fill a step");
  int base = -1;  // the row's column before this step's first entry
  for (u32 e = e0; __any_sync(0xffffffffu, e < e1); e += LPR * PER) {
    u32 ent[PER];
    int col = entries_step<LPR, PER>(oent, e, e1, sl, base, ent);
#pragma unroll
    for (int q0 = 0; q0 < PER; q0 += G) {  // G gathers in flight, then their uses
      decltype(load(0)) v[G];
#pragma unroll
      for (int q = 0; q < G; ++q) {
        col += (int)(ent[q0 + q] & 0xFFFFu);
        if ((ent[q0 + q] >> 16) != 0xFFFFu) v[q] = load(col);  // (skips: not loaded, not used)
      }
#pragma unroll
      for (int q = 0; q < G; ++q) {
        if ((ent[q0 + q] >> 16) == 0xFFFFu) continue;
        use(v[q], f16_to_f32(ent[q0 + q] >> 16));
      }
    }
  }
}

// The x'^T row piece of KW = 4 or 8 batch columns (2 KW bytes, aligned to its size).
template <int KW>
struct XRow {
  u32 w[KW / 2];
  __device__ __forceinline__ u32 operator[](int k) const {  // bits of column k (low half)
    return (k & 1) ? w[k >> 1] >> 16 : w[k >> 1];
  }
};
template <int KW>
__device__ __forceinline__ XRow<KW> load_xrow(const u16* p) {
  XRow<KW> r;
  if (KW == 8) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    r.w[0] = v.x, r.w[1] = v.y, r.w[KW == 8 ? 2 : 0] = v.z, r.w[KW == 8 ? 3 : 0] = v.w;
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    r.w[0] = v.x, r.w[1] = v.y;
  }
  return r;
}

// Entries e .. e + 127 of a row's outlier stream (those below e1), 4 consecutive per lane: for
// each, the element offset of its column's row of x'^T (column * bp; -1 for a skip) and its
// correction as f32. `base` is the row's column before entry e (-1 at the row's start); it is
// advanced past the 128 entries (the same value in every lane).
__device__ __forceinline__ void decode128(const u32* __restrict__ oent, u32 e, u32 e1, int lane,
                                          int bp, int& base, int (&xi)[4], float (&d)[4]) {
  u32 ent[4];
  int col = entries_step<32, 4>(oent, e, e1, lane, base, ent);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    col += (int)(ent[q] & 0xFFFFu);
    const bool real = (ent[q] >> 16) != 0xFFFFu;
    xi[q] = real ? col * bp : -1;
    d[q] = real ? f16_to_f32(ent[q] >> 16) : 0.f;
  }
}

// rows_outliers4's entry walk with x'^T gathers in flight (16 registers' worth: 8 pieces of 4
// columns, or 4 of 8): KW = 4 or 8 columns per piece (bp >= KW), batch <= KW.
template <int LPR, int PER, int KW, int KMAX>
__device__ __forceinline__ void rows_gathered(const u32* __restrict__ oent, u32 e0, u32 e1,
                                              int sl, const u16* xt, int bp, int batch,
                                              float (&acc)[KMAX]) {
  for_row_entries_gathered<LPR, PER, (KW == 8 ? 4 : 8)>(
      oent, e0, e1, sl, [&](int col) { return load_xrow<KW>(xt + (i64)col * bp); },
      [&](const XRow<KW>& xr, float d) {
#pragma unroll
        for (int k = 0; k < KW; ++k) {  // a branch out, not KW predicated FMAs
          if (k >= batch) break;
          acc[k < KMAX ? k : 0] += d * f16_to_f32(xr[k]);
        }
      });
}

// Outlier corrections of up to 32 / LPR rows at once for batch columns 0 .. batch - 1 (batch
// <= KMAX <= LPR), one warp: lanes LPR s .. LPR s + LPR - 1 take row `row` (-1: none; the value
// may differ per group of LPR lanes). Each step, each lane takes PER consecutive entries of its
// row (all PER loads in flight), a segmented scan over the LPR lanes gives their columns, and
// the lane multiplies them with x'^T [n][bp] (`xt`, spqr_tc_prepare_x; global or shared
// memory); a fixed xor tree over the LPR lanes sums them (deterministic). Returns, in lane
// LPR s + c (c < batch), the row's sum for batch column c (0 in the others).
template <int PER, int KMAX, int LPR = 8, bool GATHER = false>
__device__ __forceinline__ float rows_outliers4(const u32* __restrict__ orows,
                                                const u32* __restrict__ oent, const u16* xt,
                                                int bp, i64 row, int batch, int lane) {
  static_assert(KMAX <= LPR, "each batch column's sum ends in its own lane of the row");
  const int sl = lane & (LPR - 1);
  u32 e0 = 0, e1 = 0;
  if (row >= 0) {
    e0 = orows[row];
    e1 = orows[row + 1];
  }
  float acc[KMAX];
#pragma unroll
  for (int k = 0; k < KMAX; ++k) acc[k] = 0.f;
  if (GATHER && KMAX >= 8 && batch >= 5 && bp >= 8) {
    rows_gathered<LPR, PER, (KMAX >= 8 ? 8 : 4), KMAX>(oent, e0, e1, sl, xt, bp, batch, acc);
  } else if (GATHER && KMAX >= 4 && batch >= 3 && bp >= 4) {
    rows_gathered<LPR, PER, 4, KMAX>(oent, e0, e1, sl, xt, bp, batch, acc);
  } else {
    for_row_entries<LPR, PER>(oent, e0, e1, sl, [&](int col, float d) {
        const u16* xr = xt + (i64)col * bp;
        if (KMAX == 1 || batch == 1) {
          acc[0] += d * f16_to_f32(xr[0]);
          return;
        }
        // the entry's x'^T row piece (bp >= batch columns, 2 bp bytes, aligned to its size) in
        // one load
        u32 xw[KMAX >= 8 ? 4 : KMAX >= 4 ? 2 : 1];
        if (KMAX >= 8 && bp >= 8) {
          const uint4 v = *reinterpret_cast<const uint4*>(xr);
          xw[0] = v.x, xw[KMAX >= 8 ? 1 : 0] = v.y, xw[KMAX >= 8 ? 2 : 0] = v.z;
          xw[KMAX >= 8 ? 3 : 0] = v.w;
        } else if (KMAX >= 4 && bp >= 4) {
          const uint2 v = *reinterpret_cast<const uint2*>(xr);
          xw[0] = v.x, xw[KMAX >= 4 ? 1 : 0] = v.y;
        } else {
          xw[0] = *reinterpret_cast<const u32*>(xr);  // bp = 2
        }
#pragma unroll
        for (int k = 0; k < KMAX; ++k) {  // a branch out, not KMAX predicated FMAs
          if (k >= batch) break;
          acc[k] += d * f16_to_f32((k & 1) ? xw[k >> 1] >> 16 : xw[k >> 1]);
        }
      });
  }
  float mine = 0.f;
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    if (k >= batch) break;
#pragma unroll
    for (int o = LPR / 2; o > 0; o >>= 1)
      acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], o, LPR);
    if (sl == k) mine = acc[k];
  }
  return mine;
}

// Batch <= 8 in one kernel (no k-split partial sums, no finish kernel). A block's warps are
// RPB = SPQR_TC_WARPS / KS row blocks times KS k-slices (KS = 2^ks_log2): warp (rbl, kq) takes
// chunks kq, kq + KS, ... of row block blockIdx.x * RPB + rbl, its code stream loaded into
// registers one chunk ahead and its x' fragments read from global memory (L1-cached: every
// warp of a multiprocessor reads the same x') by the lanes of the 2^gp_log2 >= batch batch
// columns, so the chunk loop has no block barrier. After its loop a warp computes the outlier
// corrections of its rows kq, kq + KS, ... (rows_outliers4, 4 rows at a time) into shared
// memory; then the block adds, per row and batch column, the KS k-slices' sums in order and
// then the correction, and rounds to the output dtype. Deterministic. GS (spqr_tcg_*, batch
// <= 2): the group-separated rounds (tcg_round) instead of tc_round, every lane loading its
// B fragments (the diagonal layout of prepare_x, zeros elsewhere).
template <int B, int SB, bool GS>
__device__ __forceinline__ void tc_vec(const uint4* __restrict__ codes,
                                       const u32* __restrict__ stats,
                                       const uint2* __restrict__ stats2,
                                       const uint2* __restrict__ xfrag,
                                       const float2* __restrict__ xsum,
                                       const u32* __restrict__ orows,
                                       const u32* __restrict__ oent, const u16* __restrict__ xt,
                                       int bp, int RB, int NC, int ks_log2, int gp_log2, i64 m,
                                       int batch, void* __restrict__ y, i64 ldy, int out_dtype) {
  using G = TileGeo<B, SB>;
  constexpr int R = G::R, MPC = G::MPC, SLABS = G::SLABS, SWL = G::SWL;
  constexpr int NA = tc_acc_sets<1>();
  __shared__ float red[SPQR_TC_WARPS][4][32];  // each warp's D fragments
  __shared__ float osm[SPQR_TC_WARPS][16][8];  // [row block][row][batch column] corrections
  const int KS = 1 << ks_log2;
  const int RPB = SPQR_TC_WARPS >> ks_log2;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int rbl = warp >> ks_log2;
  const int kq = warp & (KS - 1);
  const int rb = blockIdx.x * RPB + rbl;
  const bool active = rb < RB;
  const int rbc = active ? rb : 0;
  const bool xl = lane < (4 << gp_log2);  // B fragments of batch columns < 2^gp_log2

  float acc[NA][4];
#pragma unroll
  for (int j = 0; j < NA; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  const u32 magic = magic_reg();

  ChunkStream<B, SB> stream(codes, stats, stats2, rbc, RB, kq, KS, lane);
  const uint2* xg = xfrag + (i64)kq * MPC * 32;  // the x' fragments of the chunk computed next
  const float2* xsg = xsum + (i64)kq * MPC;        // GS: its groups' x' sums
  float yg[4] = {0.f, 0.f, 0.f, 0.f};              // GS: rows g, g + 8 x batch columns 0, 1
  Stage<SLABS, SWL> sa, sb;
  if (active && kq < NC) stream.load(sa);
  if (active) {
    // Each half: the first round of the current stage, then the next stage's loads, then the
    // other rounds (the current stage's first uses come before the new loads are issued:
    // measured on H200, 2 % faster at batch 1 together with the outliers after the loop).
    // The two halves are written out: one lambda for both made batch 4 1-4 % slower (H200,
    // session 7; ptxas schedules the lambda differently).
    for (int c = kq; c < NC; c += 2 * KS) {
      if (GS) {
        tcg_round<B, SB, 0, SLABS, SWL>(sa, yg, xg, xsg, lane, magic);
        if (c + KS < NC) stream.load(sb);
        GRounds<B, SB, 1, R, SLABS, SWL>::run(sa, yg, xg, xsg, lane, magic);
      } else {
        tc_round<B, SB, 1, true, 0, SLABS, SWL>(sa, acc, xg, lane, xl, magic);
        if (c + KS < NC) stream.load(sb);
        Rounds<B, SB, 1, true, 1, R, SLABS, SWL>::run(sa, acc, xg, lane, xl, magic);
      }
      xg += (i64)KS * MPC * 32;
      xsg += KS * MPC;
      if (c + KS >= NC) break;
      if (GS) {
        tcg_round<B, SB, 0, SLABS, SWL>(sb, yg, xg, xsg, lane, magic);
        if (c + 2 * KS < NC) stream.load(sa);
        GRounds<B, SB, 1, R, SLABS, SWL>::run(sb, yg, xg, xsg, lane, magic);
      } else {
        tc_round<B, SB, 1, true, 0, SLABS, SWL>(sb, acc, xg, lane, xl, magic);
        if (c + 2 * KS < NC) stream.load(sa);
        Rounds<B, SB, 1, true, 1, R, SLABS, SWL>::run(sb, acc, xg, lane, xl, magic);
      }
      xg += (i64)KS * MPC * 32;
      xsg += KS * MPC;
    }
  }
  // Outlier corrections of this warp's rows kq, kq + KS, ... (rows_outliers4) into shared
  // memory: after the chunk loop, so that the loop starts at once (H200: a warp that does them
  // first waits for their dependent loads while the GPU is otherwise idle).
  // All of the warp's rows in one pass where the batch allows (lanes per row = 2 KS): each
  // pass ends in a chain of dependent loads (entries, then x'^T), so fewer passes are shorter
  // (H200, session 7: batch 1 28672x8192 46.7 -> 45.3 us, 11008x4096 17.6 -> 16.2; batch 4
  // 11008x4096 24.6 -> 20.2).
  if (ks_log2 == 0 && batch <= 2 && active && orows != nullptr) {
    // 16 rows, 2 lanes each
    const bool live = (i64)rb * 16 + (lane >> 1) < m;
    const float v = rows_outliers4<16, 2, 2>(orows, oent, xt, bp,
                                             live ? (i64)rb * 16 + (lane >> 1) : -1, batch, lane);
    if (live && (lane & 1) < batch) osm[rbl][lane >> 1][lane & 1] = v;
  } else if (ks_log2 == 1 && batch <= 4 && active && orows != nullptr) {
    // 8 rows kq, kq + 2, ..., 4 lanes each
    const int r = kq + ((lane >> 2) << 1);
    const bool live = (i64)rb * 16 + r < m;
    const float v = rows_outliers4<16, 4, 4, !GS>(orows, oent, xt, bp,
                                                   live ? (i64)rb * 16 + r : -1, batch, lane);
    if (live && (lane & 3) < batch) osm[rbl][r][lane & 3] = v;
  } else if (active && orows != nullptr) {  // 4 rows at a time, 8 lanes each
    const int nr = 16 >> ks_log2;
    for (int i0 = 0; i0 < nr; i0 += 4) {
      const int i = i0 + (lane >> 3);
      const int r = kq + (i << ks_log2);
      const bool live = i < nr && (i64)rb * 16 + r < m;
      const float v = rows_outliers4<16, 8, 8, !GS>(orows, oent, xt, bp,
                                                     live ? (i64)rb * 16 + r : -1, batch, lane);
      if (live && (lane & 7) < batch) osm[rbl][r][lane & 7] = v;
    }
  }
  if (GS) {
    // sum the 4 groups of each quad (fixed xor order): lane 4g then holds rows g, g + 8 and
    // batch columns 0, 1 in the D-fragment order read below
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      float v = yg[r];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      red[warp][r][lane] = v;
    }
  } else {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      float v = acc[0][r];
      if (NA == 2) v += acc[NA - 1][r];  // odd k-steps onto even ones (fixed order)
      red[warp][r][lane] = v;
    }
  }
  __syncthreads();
  // D fragment of lane 4 g + t: [0..1] row g, columns 2t, 2t + 1; [2..3] row g + 8.
  const int outs = RPB * 16 * batch;
  for (int i = threadIdx.x; i < outs; i += blockDim.x) {
    const int c = i / (RPB * 16);
    const int rr = i - c * (RPB * 16);
    const int rl = rr >> 4, r = rr & 15;
    const i64 row = ((i64)blockIdx.x * RPB + rl) * 16 + r;
    if (row >= m) continue;
    const int src = 4 * (r & 7) + (c >> 1), reg = 2 * (r >> 3) + (c & 1);
    float v = 0.f;
    for (int k = 0; k < KS; ++k) v += red[rl * KS + k][reg][src];
    if (orows != nullptr) v += osm[rl][r][c];
    store_y(y, (i64)c * ldy + row, v, out_dtype);
  }
}

// Rows row0, row0 + row_step, ... (below `rows`) of the outlier pass, one warp per row, batch
// <= BPT <= 16 (bp <= 8, or 16): a row's entries are decoded 128 at a time (decode128: 4 per
// lane, one warp scan; a typical row is one window, so the row costs one chain of dependent
// loads); each lane multiplies its entries with the batch columns (the entry's x'^T row piece:
// 16-byte loads when bp is a multiple of 8) into KA per-column sums kept over the whole row,
// and one reduce-scatter over the lanes at the end (fixed xor tree) leaves each column's sum
// in the lanes that own it; the first of them adds the split sums and stores. Best for long
// rows (a window fills the warp).
template <int BPT>
__device__ __forceinline__ void row_per_warp(const float* __restrict__ part, int nsplit, i64 M16,
                                             i64 split_stride, const u32* __restrict__ orows,
                                             const u32* __restrict__ oent, const u16* xsrc,
                                             int bp, int row0, int row_step, int rows,
                                             void* __restrict__ y, i64 ldy, int out_dtype,
                                             int batch, int lane) {
  constexpr int KA = BPT < 16 ? BPT : 16;
  // After the reduce-scatter lane l holds the sum of column cown(l), from the same fixed
  // sequence of halvings as below; 32 / KA lanes (differing only in their low bits) hold
  // copies of it, and the first of them stores it.
  int cown = 0;
  {
    int cnt = KA;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      if (cnt > 1) {
        cnt /= 2;
        if (lane & o) cown += cnt;
      }
  }
  const bool first = (lane & (32 / KA - 1)) == 0;  // the copy that stores
  for (int row = row0; row < rows; row += row_step) {
    float acc[KA];
  #pragma unroll
    for (int k = 0; k < KA; ++k) acc[k] = 0.f;
    if (orows != nullptr) {
      const u32 e0 = orows[row], e1 = orows[row + 1];
      int base = -1;
      for (u32 e = e0; e < e1; e += 128) {
        int xi[4];  // element offset of the entry's row of x'^T, -1 for skips
        float d[4];
        decode128(oent, e, e1, lane, bp, base, xi, d);
  #pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (xi[q] < 0) continue;
          if (KA >= 8) {
            const uint4* xr = reinterpret_cast<const uint4*>(xsrc + xi[q]);
  #pragma unroll
            for (int cb = 0; cb < KA; cb += 8) {
              if (cb >= batch) break;
              const uint4 v = xr[cb / 8];
              const u32 w[4] = {v.x, v.y, v.z, v.w};
  #pragma unroll
              for (int k = 0; k < 8; ++k)
                acc[cb + k] += d[q] * f16_to_f32((k & 1) ? (w[k >> 1] >> 16) : w[k >> 1]);
            }
          } else {
            acc[0] += d[q] * f16_to_f32(xsrc[xi[q]]);  // batch >= 1
  #pragma unroll
            for (int k = 1; k < KA; ++k) {
              if (k >= batch) break;
              acc[k] += d[q] * f16_to_f32(xsrc[xi[q] + k]);
            }
          }
        }
      }
    }
    // reduce-scatter: at xor distance o a lane keeps the half of its columns selected by
    // (lane & o) and adds its partner's copy of that half; once one column is left, plain
    // xor sums.
    int cnt = KA;
  #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      if (cnt > 1) {
        const bool up = (lane & o) != 0;
        const int half = cnt / 2;
  #pragma unroll
        for (int i = 0; i < (KA > 1 ? KA / 2 : 1); ++i) {
          if (i >= half) break;
          const float send = up ? acc[i] : acc[i + half];
          const float keep = up ? acc[i + half] : acc[i];
          acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
        }
        cnt = half;
      } else {
        acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], o);
      }
    }
    if (first && cown < batch) {
      const float v = split_sum(part, cown, row, M16, nsplit, split_stride);
      store_y(y, (i64)cown * ldy + row, v + acc[0], out_dtype);
    }
  }
}

// Rows of the outlier pass by LPR lanes each (32 / LPR rows per warp), KA = 8 or 16 batch
// columns (bp = KA, batch <= KA): the lanes of row `row` (-1: none; entries [e0, e1)) take
// 4 consecutive entries each per step (all loads in flight), a segmented scan over the LPR
// lanes gives their columns, and each lane multiplies them with the KA columns of the
// entry's x'^T row (16-byte loads) into per-column sums kept over the row. At the end a
// reduce-scatter over the LPR lanes (fixed xor tree) leaves KA / LPR consecutive columns in
// each lane (one column in LPR / KA lanes when LPR > KA), which adds the split sums and stores
// them. No per-row reduction over the whole warp, and 32 / LPR rows per warp instruction:
// cheapest for many rows of about the same length.
template <int LPR, int KA>
__device__ __forceinline__ void lanes_rows(const float* __restrict__ part, int nsplit, i64 M16,
                                           i64 split_stride, const u32* __restrict__ oent,
                                           const u16* xsrc, int bp, int row, u32 e0, u32 e1,
                                           void* __restrict__ y, i64 ldy, int out_dtype,
                                           int batch, int lane) {
  constexpr int PER = 4;
  const int sl = lane % LPR;
  if (row < 0) e1 = e0;
  float acc[KA];
#pragma unroll
  for (int k = 0; k < KA; ++k) acc[k] = 0.f;
  for_row_entries<LPR, PER>(oent, e0, e1, sl, [&](int col, float d) {
    const uint4* xr = reinterpret_cast<const uint4*>(xsrc + (i64)col * bp);
#pragma unroll
    for (int cb = 0; cb < KA; cb += 8) {
      const uint4 v = xr[cb / 8];
      const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int k = 0; k < 8; ++k)
        acc[cb + k] += d * f16_to_f32((k & 1) ? (w[k >> 1] >> 16) : w[k >> 1]);
    }
  });
  // reduce-scatter over the LPR lanes: at xor distance o a lane keeps the half of its columns
  // selected by (lane & o) and adds its partner's copy of that half; once one column is left
  // (LPR > KA), plain xor sums, and the first of the LPR / KA copies stores.
  int cnt = KA, cb = 0;
#pragma unroll
  for (int o = LPR / 2; o > 0; o >>= 1) {
    if (cnt > 1) {
      const bool up = (lane & o) != 0;
      const int half = cnt / 2;
#pragma unroll
      for (int i = 0; i < KA / 2; ++i) {
        if (i >= half) break;
        const float send = up ? acc[i] : acc[i + half];
        const float keep = up ? acc[i + half] : acc[i];
        acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
      }
      if (up) cb += half;
      cnt = half;
    } else {
      acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], o);
    }
  }
  constexpr int DUP = LPR > KA ? LPR / KA : 1;
  if (row < 0 || (sl & (DUP - 1)) != 0) return;
#pragma unroll
  for (int i = 0; i < (KA / LPR > 1 ? KA / LPR : 1); ++i) {
    const int c = cb + i;
    if (c >= batch) break;
    const float v = split_sum(part, c, row, M16, nsplit, split_stride);
    store_y(y, (i64)c * ldy + row, v + acc[i], out_dtype);
  }
}

// The outlier pass with LPR lanes per row (32 / LPR rows per warp, lanes_rows), KA = BPT = 8
// or 16 batch columns. A row with many more entries than the lightest of its warp's rows (more
// than twice as many, plus 64) would keep the warp's other lanes idle for its extra steps:
// such rows are left out of the lane pass and taken afterwards by the whole warp
// (row_per_warp, 128 entries per window), one after the other.
template <int LPR, int BPT>
__device__ __forceinline__ void lanes_pass(const float* __restrict__ part, int nsplit, i64 M16,
                                           i64 split_stride, const u32* __restrict__ orows,
                                           const u32* __restrict__ oent, const u16* xsrc, int bp,
                                           void* __restrict__ y, i64 ldy, int out_dtype,
                                           int rows, int batch, int lane) {
  constexpr int RPW = 32 / LPR;
  const int sub = lane / LPR;
  for (int r0 = (blockIdx.x * 8 + (threadIdx.x >> 5)) * RPW; r0 < rows;
       r0 += gridDim.x * 8 * RPW) {
    const int row = r0 + sub;
    const bool live = row < rows;
    u32 e0 = 0, e1 = 0;
    if (live && orows != nullptr) {
      e0 = orows[row];
      e1 = orows[row + 1];
    }
    u32 lightest = live ? e1 - e0 : 0xFFFFFFFFu;
#pragma unroll
    for (int o = LPR; o < 32; o <<= 1)
      lightest = min(lightest, __shfl_xor_sync(0xffffffffu, lightest, o));
    const bool heavy = live && (e1 - e0) > 2 * lightest + 64;
    lanes_rows<LPR, BPT>(part, nsplit, M16, split_stride, oent, xsrc, bp,
                         live && !heavy ? row : -1, e0, e1, y, ldy, out_dtype, batch, lane);
    u32 hb = __ballot_sync(0xffffffffu, heavy && lane % LPR == 0);
    while (hb) {
      const int hrow = r0 + (__ffs(hb) - 1) / LPR;
      hb &= hb - 1;
      row_per_warp<BPT>(part, nsplit, M16, split_stride, orows, oent, xsrc, bp, hrow, 1,
                        hrow + 1, y, ldy, out_dtype, batch, lane);
    }
  }
}

// Outlier pass (grid-stride over rows): y[c][row] = sum over splits of part[s][c][row] (in
// order) + the row's outlier corrections sum (o - w) x'[col][c], rounded to the output dtype
// (out_dtype: 1 f16, 2 bf16, 0 f32), with `lanes` lanes per row (a launch parameter,
// _kernels.tc_finish_lanes): 8 with bp <= 4: four rows per warp (quad); 4, 8 or 16 with bp 8
// or 16: 32 / lanes rows per warp (lanes_pass, a warp's unusually long rows taken by the whole
// warp); 32: one row per warp, the lanes over entry slots and column quads for bp > 16, over
// entries otherwise (row_per_warp). Every sum has a fixed order (deterministic).
// x'^T [n][bp] comes from spqr_tc_prepare_x; with `smem_x` it is first copied to shared
// memory (n * bp * 2 bytes of dynamic shared memory). 32-bit indices: the Python layer uses
// this kernel only for n * bp < 2^31, E < 2^32 (SPEC cap) and m < 2^31.
template <int BPT>  // x'^T pitch 1, 2, 4; or 8, 16, 32, 64: a multiple of 8, batch <= BPT
__device__ __forceinline__ void finish(
    const float* __restrict__ part, int nsplit, i64 M16, int ncols, const u32* __restrict__ orows,
    const u32* __restrict__ oent, const u16* __restrict__ xt, int bp, int smem_x, int lanes,
    i64 n, void* __restrict__ y, i64 ldy, int out_dtype, i64 m, int batch) {
  extern __shared__ uint4 xs_raw[];
  const u16* xsrc = xt;
  if (smem_x && orows != nullptr) {
    const int units = (int)((n * bp * 2 + 15) / 16);
    const uint4* g = reinterpret_cast<const uint4*>(xt);
#pragma unroll 4
    for (int u = threadIdx.x; u < units; u += blockDim.x) xs_raw[u] = g[u];
    __syncthreads();
    xsrc = reinterpret_cast<const u16*>(xs_raw);
  }
  const int lane = threadIdx.x & 31;
  const i64 split_stride = (i64)ncols * M16;
  const int rows = (int)m;
  if (BPT < 8 && lanes == 8) {
    // quad (batch <= 4): four rows per warp, eight lanes per row (rows_outliers4,
    // SPQR_TC_QUAD_PER entries per lane and step, so a typical row takes one step: one chain
    // of dependent loads), so a warp instruction serves four rows and the per-row overhead is
    // a quarter of the one-row-per-warp scheme.
    const int sub = lane >> 3, sl = lane & 7;
    for (int r0 = (blockIdx.x * 8 + (threadIdx.x >> 5)) * 4; r0 < rows; r0 += gridDim.x * 32) {
      const int row = r0 + sub;
      const bool live = row < rows;
      float own = 0.f;  // column sl
      if (live && sl < batch) own = split_sum(part, sl, row, M16, nsplit, split_stride);
      if (orows != nullptr)
        own += rows_outliers4<SPQR_TC_QUAD_PER, (BPT < 8 ? BPT : 1)>(
            orows, oent, xsrc, bp, live ? row : -1, batch, lane);
      if (live && sl < batch) {
        store_y(y, (i64)sl * ldy + row, own, out_dtype);
      }
    }
  } else if (BPT >= 32) {
    // bp a multiple of 8, 16 < batch <= BPT: one row per warp, in passes of KA = 32 batch
    // columns. The lanes are ES = 4 entry slots times CQ = 8 column quads: lane (es, cq)
    // multiplies entries es, es + ES, ... of each window with columns 4 cq .. 4 cq + 3 of the
    // pass (one 8-byte piece of the entry's x'^T row). Entries are decoded 32 at a time (one
    // per lane, one warp scan for the columns) and handed to the slots by shuffles; at the end
    // of the row a fixed xor tree sums the slots and slot 0 adds the split sums and stores.
    // Few registers (many rows in flight per multiprocessor: the work is a chain of dependent
    // loads) and no per-column reduce-scatter (measured on H200: faster than the scheme below
    // from 32 columns on, slower up to 16).
    constexpr int KA = 32;
    constexpr int CQ = KA / 4, ES = 32 / CQ;
    const int es = lane / CQ, cq = lane % CQ;
    for (int row = blockIdx.x * 8 + (threadIdx.x >> 5); row < rows; row += gridDim.x * 8) {
      u32 e0 = 0, e1 = 0;
      if (orows != nullptr) {
        e0 = orows[row];
        e1 = orows[row + 1];
      }
      for (int cp = 0; cp < batch; cp += KA) {
        const int c = cp + 4 * cq;  // this lane's first column
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        int base = -1;
        for (u32 e = e0; e < e1; e += 32) {
          u32 ent[1];
          int col = entries_step<32, 1>(oent, e, e1, lane, base, ent);
          col += (int)(ent[0] & 0xFFFFu);
          const bool real = (ent[0] >> 16) != 0xFFFFu;
          const int xi_l = real ? col * bp : -1;
          const float d_l = real ? f16_to_f32(ent[0] >> 16) : 0.f;
          const int steps = ((int)min(32u, e1 - e) + ES - 1) / ES;
#pragma unroll 2
          for (int k = 0; k < steps; ++k) {
            const int src = k * ES + es;
            const int xi = __shfl_sync(0xffffffffu, xi_l, src);
            const float d = __shfl_sync(0xffffffffu, d_l, src);
            if (xi >= 0 && c < batch) {
              const uint2 v = *reinterpret_cast<const uint2*>(xsrc + xi + c);
              acc[0] += d * f16_to_f32(v.x);
              acc[1] += d * f16_to_f32(v.x >> 16);
              acc[2] += d * f16_to_f32(v.y);
              acc[3] += d * f16_to_f32(v.y >> 16);
            }
          }
        }
#pragma unroll
        for (int o = CQ; o < 32; o <<= 1)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
        if (es == 0) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (c + j >= batch) break;
            const float v = split_sum(part, c + j, row, M16, nsplit, split_stride);
            store_y(y, (i64)(c + j) * ldy + row, v + acc[j], out_dtype);
          }
        }
      }
    }
  } else if ((BPT == 8 || BPT == 16) && lanes < 32) {
    // 4 < batch <= 16 (bp 8 or 16): `lanes` (4, 8 or 16) lanes per row (lanes_pass)
    if (lanes == 4)
      lanes_pass<4, BPT>(part, nsplit, M16, split_stride, orows, oent, xsrc, bp, y, ldy,
                         out_dtype, rows, batch, lane);
    else if (lanes == 8)
      lanes_pass<8, BPT>(part, nsplit, M16, split_stride, orows, oent, xsrc, bp, y, ldy,
                         out_dtype, rows, batch, lane);
    else
      lanes_pass<16, BPT>(part, nsplit, M16, split_stride, orows, oent, xsrc, bp, y, ldy,
                          out_dtype, rows, batch, lane);
  } else {
    // one row per warp, batch <= 16 (row_per_warp)
    row_per_warp<BPT>(part, nsplit, M16, split_stride, orows, oent, xsrc, bp,
                      blockIdx.x * 8 + (threadIdx.x >> 5), gridDim.x * 8, rows, y, ldy,
                      out_dtype, batch, lane);
  }
}
}  // namespace spqr_tc

#if !SPQR_TC_PAIR_MODULE
#define SPQR_TC_FINISH_ENTRY(BPT)                                                                \
  extern "C" __global__ void __launch_bounds__(256) spqr_tc_finish_p##BPT(                      \
      const float* __restrict__ part, int nsplit, i64 M16, int ncols,                            \
      const u32* __restrict__ orows, const u32* __restrict__ oent, const u16* __restrict__ xt,    \
      int bp, int smem_x, int lanes, i64 n, void* __restrict__ y, i64 ldy, int out_dtype, i64 m, \
      int batch) {                                                                               \
    spqr_tc::finish<BPT>(part, nsplit, M16, ncols, orows, oent, xt, bp, smem_x, lanes, n, y, ldy,\
                         out_dtype, m, batch);                                                   \
  }
SPQR_TC_FINISH_ENTRY(1)
SPQR_TC_FINISH_ENTRY(2)
SPQR_TC_FINISH_ENTRY(4)
SPQR_TC_FINISH_ENTRY(8)
SPQR_TC_FINISH_ENTRY(16)
SPQR_TC_FINISH_ENTRY(32)
SPQR_TC_FINISH_ENTRY(64)
#endif  // !SPQR_TC_PAIR_MODULE

#define SPQR_TCV_ENTRY(B, SB)                                                                     \
  extern "C" __global__ void __launch_bounds__(32 * SPQR_TC_WARPS, SPQR_TC_MINB)                 \
      spqr_tcv_b##B##_s##SB(const uint4* __restrict__ codes, const u32* __restrict__ stats,       \
                            const uint2* __restrict__ stats2, const uint2* __restrict__ xfrag,    \
                            const u32* __restrict__ orows, const u32* __restrict__ oent,          \
                            const u16* __restrict__ xt, int bp, int RB, int NC, int ks_log2,      \
                            int gp_log2, i64 m, int batch, void* __restrict__ y, i64 ldy,         \
                            int out_dtype) {                                                      \
    spqr_tc::tc_vec<B, SB, false>(codes, stats, stats2, xfrag, nullptr, orows, oent, xt, bp, RB, \
                                  NC, ks_log2, gp_log2, m, batch, y, ldy, out_dtype);           \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(32 * SPQR_TC_WARPS, SPQR_TC_MINB)                 \
      spqr_tcg_b##B##_s##SB(const uint4* __restrict__ codes, const u32* __restrict__ stats,       \
                            const uint2* __restrict__ stats2, const uint2* __restrict__ xfrag,    \
                            const float2* __restrict__ xsum, const u32* __restrict__ orows,       \
                            const u32* __restrict__ oent, const u16* __restrict__ xt, int bp,     \
                            int RB, int NC, int ks_log2, i64 m, int batch,                        \
                            void* __restrict__ y, i64 ldy, int out_dtype) {                       \
    spqr_tc::tc_vec<B, SB, true>(codes, stats, stats2, xfrag, xsum, orows, oent, xt, bp, RB, NC, \
                                 ks_log2, 0, m, batch, y, ldy, out_dtype);                       \
  }
#define SPQR_TCV_ALL_SB(B) \
  SPQR_TCV_ENTRY(B, 1)     \
  SPQR_TCV_ENTRY(B, 2)     \
  SPQR_TCV_ENTRY(B, 3)     \
  SPQR_TCV_ENTRY(B, 4)
#if SPQR_TC_PAIR_MODULE
#define SPQR_TCV_ONE(B, SB) SPQR_TCV_ENTRY(B, SB)
SPQR_TCV_ONE(SPQR_TC_B, SPQR_TC_SB)
#elif !SPQR_TC_SHARED_MODULE
#ifndef SPQR_TC_ONLY_B3S3
SPQR_TCV_ALL_SB(2)
SPQR_TCV_ALL_SB(4)
SPQR_TCV_ENTRY(3, 1)
SPQR_TCV_ENTRY(3, 2)
SPQR_TCV_ENTRY(3, 4)
#endif
SPQR_TCV_ENTRY(3, 3)
#endif
