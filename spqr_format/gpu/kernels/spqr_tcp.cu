// spqr_tcp.cu -- the pipelined tensor-core matmul for batch slices of 9..128 columns (launch plan
// path "tcp"): the weight stream of the GPU tile layout (spqr_format/gpu/tile_layout.py) through
// a multi-stage cp.async ring in shared memory, mma.sync m16n8k16 consumers that decode the
// codes in registers with exactly the arithmetic of spqr_tc.cu's tc_round.
//
// Not self-contained: it uses spqr_tc.cu's device helpers (namespace spqr_tc), so it is compiled
// after that file's text: NVRTC (spqr_format/gpu/tensor.py) gets spqr_tc.cu + this file with
// -DSPQR_TC_DEVICE_ONLY (spqr_tc.cu's own entry points left out), spqr_tc_host.cu includes both,
// tests/test_kernels_compile.py builds the same concatenation. -DSPQR_TCP_B=b -DSPQR_TCP_SB=sb
// instantiate one (bits, stats_bits) only (the Python layer compiles one module per pair).
//
// Design (sm_80+; compiled for sm_90 as is: wgmma / TMA are the next step, see below):
//  * Block: SPQR_TCP_WARPS = 4 warps. A warp owns MB = 2 row blocks (32 rows) and NTW n-tiles
//    (8 batch columns each) of the slice; the NT = NS * NTW n-tiles of a slice are split over NS
//    warps (NS = 2 for NT = 16, else 1), so a block covers RBB = 4 / NS * 2 row blocks (128 or
//    64 rows) and the whole slice. Two row blocks per warp let each B fragment (x') serve two
//    mma (the shared-memory / L1 bytes per mma halve against spqr_tc_*), and NTW <= 8 keeps the
//    accumulators at <= 64 registers.
//  * Weight stream: per chunk (the tile layout's unit: R rounds of 4 groups), the block's RBB
//    row blocks are contiguous in every array (the layout is chunk-major), so a stage is three
//    contiguous runs (codes RBB * SLABS * 512 bytes, statistics words RBB * SWL * 128, stats2
//    records RBB * MPC * 8), all copied by 16-byte cp.async.cg (L2 only, not L1), coalesced.
//    STAGES = clamp(80 KiB / stage bytes, 2, 8) stages (B3/S3: 4 x 19.25 KiB; B2, B4: 8 x
//    ~5.5 KiB): up to STAGES - 1 chunks in flight per block, two blocks per multiprocessor.
//    Classic ring: wait for stage i (cp.async.wait_group STAGES - 2), one barrier, issue chunk
//    i + STAGES - 1 into the buffer that chunk i - 1 used, then compute chunk i.
//  * x': the mma B fragments that spqr_tc_prepare_x writes ([NT][KT][32] uint2) are read from
//    global memory by each warp (ld.global.nc, L1-cached: the block's warps walk the chunks in
//    step, so the 4 warps and the 2 blocks of a multiprocessor share them in L1), not staged:
//    a chunk's x' is 8 * NT * MPC * 32 bytes (B3, batch 64: 40 KiB), several times a stage's
//    weights, and cp.async groups complete in order, so staging it would cost STAGES copies.
//  * Decode: per round of a chunk, each lane forms (s, -z) of its 2 rows of its group from the
//    statistics codes and the group's (step, base) record (read from shared memory instead of
//    the shuffle of tc_round), then per mma k-step the A registers
//        a = fma(q, s, -z*s) (f16x2; q exact from the 0x6400 magic), exactly as tc_round,
//    so every weight enters the tensor cores with the same f16 value as on the spqr_tc_* path
//    (same error bound: tests/test_gpu_kernels.py _bound_tc).
//  * Epilogue: f32 partial sums [split][8 NT][M16] (k-split over gridDim.y, chunks_per_split
//    chunks each), then spqr_tc_finish_p* adds the splits in order, the outlier corrections
//    (o - w) x' and rounds, as for spqr_tc_* (the outlier corrections are not folded in yet).
//    Deterministic: no atomics, fixed summation order.
//
// Next step on sm_90a (not done: nothing here ran on a GPU yet): the same stage ring filled by
// TMA / cp.async.bulk with an mbarrier per stage and one producer warp, and wgmma.m64nNk16 with
// the decoded weights as the register A operand (64 rows per warpgroup) and x' from shared
// memory as B.

#ifndef SPQR_TCP_WARPS
#define SPQR_TCP_WARPS 4
#endif
// Shared memory the stage ring aims at (STAGES = clamp(this / stage bytes, 2, 8)); must match
// _kernels.TCP_SMEM_TARGET and spqr_tc_plan.h.
#ifndef SPQR_TCP_SMEM_TARGET
#define SPQR_TCP_SMEM_TARGET (80 * 1024)
#endif

namespace spqr_tc {

constexpr int TCP_MB = 2;  // row blocks per warp

__device__ __forceinline__ void cp_async16_cg(void* smem, const void* gmem) {
  const unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa), "l"(gmem) : "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ u32 dynamic_smem_bytes() {
  u32 v;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(v));
  return v;
}

// Geometry of the pipelined kernel for (B, SB, NT); mirrored by _kernels.tcp_* and
// spqr_tc_plan.h (spqr_plan_tcp_*).
template <int B, int SB, int NT>
struct TcpGeo {
  using G = TileGeo<B, SB>;
  static constexpr int NS = NT > 8 ? NT / 8 : 1;            // warps sharing a row pair
  static constexpr int NTW = NT / NS;                       // n-tiles per warp
  static constexpr int RBB = SPQR_TCP_WARPS / NS * TCP_MB;  // row blocks per block
  static constexpr int CODE_U4 = RBB * G::SLABS * 32;       // 16-byte units per stage
  static constexpr int STAT_U4 = RBB * 8 * G::SWL;
  static constexpr int ST2_U4 = RBB * G::MPC / 2;
  static constexpr int STAGE_U4 = CODE_U4 + STAT_U4 + ST2_U4;
  static constexpr int STAGE_BYTES = 16 * STAGE_U4;
  static constexpr int STAGES0 = SPQR_TCP_SMEM_TARGET / STAGE_BYTES;
  static constexpr int STAGES = STAGES0 < 2 ? 2 : STAGES0 > 8 ? 8 : STAGES0;
  static constexpr int SMEM = STAGES * STAGE_BYTES;
  static_assert(NS * NTW == NT && NTW <= 8, "n-tiles per warp");
  static_assert(SPQR_TCP_WARPS % NS == 0, "warps split into row pairs");
  static_assert(G::MPC % 2 == 0, "stats2 records fill 16-byte units");
};

// One mma k-step MU (= 4 RHO + U) of a chunk for both row blocks of the warp and its NTW
// n-tiles: the B fragments of the k-step from x' (global), the A fragments decoded as a_reg.
template <int B, int MU, int NTW, int SLABS>
__device__ __forceinline__ void tcp_kstep(const uint4 (&cw)[TCP_MB][SLABS],
                                          const u32 (&S)[TCP_MB][2], const u32 (&Bz)[TCP_MB][2],
                                          float (&acc)[TCP_MB][NTW][4],
                                          const uint2* __restrict__ xg, i64 jstride, int lane,
                                          u32 magic) {
  uint2 bf[NTW];
#pragma unroll
  for (int j = 0; j < NTW; ++j) bf[j] = ld_nc2(xg + j * jstride + MU * 32 + lane);
#pragma unroll
  for (int mb = 0; mb < TCP_MB; ++mb) {
    u32 a[4];  // register r = h + 2 hi (h: row g or g + 8)
    a[0] = a_reg<B, MU, 0, SLABS>(cw[mb], S[mb][0], Bz[mb][0], magic);
    a[1] = a_reg<B, MU, 1, SLABS>(cw[mb], S[mb][1], Bz[mb][1], magic);
    a[2] = a_reg<B, MU, 2, SLABS>(cw[mb], S[mb][0], Bz[mb][0], magic);
    a[3] = a_reg<B, MU, 3, SLABS>(cw[mb], S[mb][1], Bz[mb][1], magic);
#pragma unroll
    for (int j = 0; j < NTW; ++j) mma16816(acc[mb][j], a, bf[j].x, bf[j].y);
  }
}

// Round RHO of a chunk (4 k-steps): (s, -z) of rows g, g + 8 of the lane's group 4 RHO + t for
// both row blocks (round_stats's arithmetic, the group's record read from shared memory), then
// the 4 k-steps.
template <int B, int SB, int NTW, int RHO, int SLABS, int SWL, int MPC>
__device__ __forceinline__ void tcp_round(const uint4 (&cw)[TCP_MB][SLABS],
                                          const u32 (&sw)[TCP_MB][SWL], const uint2* st2s,
                                          float (&acc)[TCP_MB][NTW][4],
                                          const uint2* __restrict__ xg, i64 jstride, int lane,
                                          u32 magic) {
  constexpr int SPW = pair_slots<SB>();
  constexpr int Q0 = 2 * RHO, Q1 = 2 * RHO + 1;
  u32 S[TCP_MB][2], Bz[TCP_MB][2];
#pragma unroll
  for (int mb = 0; mb < TCP_MB; ++mb) {
    const uint2 st2 = st2s[mb * MPC + 4 * RHO + (lane & 3)];
    const u32 w0 = sw[mb][Q0 / SPW], w1 = sw[mb][Q1 / SPW];
    const u32 sz0 = hfma2(pair_exact<SB, Q0 % SPW>(w0, shifted<SB>(w0), magic), st2.x, st2.y);
    const u32 sz1 = hfma2(pair_exact<SB, Q1 % SPW>(w1, shifted<SB>(w1), magic), st2.x, st2.y);
    scale_pair(sz0, S[mb][0], Bz[mb][0]);
    scale_pair(sz1, S[mb][1], Bz[mb][1]);
  }
  tcp_kstep<B, 4 * RHO + 0, NTW, SLABS>(cw, S, Bz, acc, xg, jstride, lane, magic);
  tcp_kstep<B, 4 * RHO + 1, NTW, SLABS>(cw, S, Bz, acc, xg, jstride, lane, magic);
  tcp_kstep<B, 4 * RHO + 2, NTW, SLABS>(cw, S, Bz, acc, xg, jstride, lane, magic);
  tcp_kstep<B, 4 * RHO + 3, NTW, SLABS>(cw, S, Bz, acc, xg, jstride, lane, magic);
}

template <int B, int SB, int NTW, int RHO, int R, int SLABS, int SWL, int MPC>
struct TcpRounds {
  static __device__ __forceinline__ void run(const uint4 (&cw)[TCP_MB][SLABS],
                                             const u32 (&sw)[TCP_MB][SWL], const uint2* st2s,
                                             float (&acc)[TCP_MB][NTW][4], const uint2* xg,
                                             i64 jstride, int lane, u32 magic) {
    tcp_round<B, SB, NTW, RHO, SLABS, SWL, MPC>(cw, sw, st2s, acc, xg, jstride, lane, magic);
    TcpRounds<B, SB, NTW, RHO + 1, R, SLABS, SWL, MPC>::run(cw, sw, st2s, acc, xg, jstride, lane,
                                                            magic);
  }
};
template <int B, int SB, int NTW, int R, int SLABS, int SWL, int MPC>
struct TcpRounds<B, SB, NTW, R, R, SLABS, SWL, MPC> {
  static __device__ __forceinline__ void run(const uint4 (&)[TCP_MB][SLABS],
                                             const u32 (&)[TCP_MB][SWL], const uint2*,
                                             float (&)[TCP_MB][NTW][4], const uint2*, i64, int,
                                             u32) {}
};

// Block (blockIdx.x, blockIdx.y): row blocks RBB * blockIdx.x .. + RBB - 1, chunks
// [split * chunks_per_split, + chunks_per_split) of the slice's 8 NT batch columns.
template <int B, int SB, int NT>
__device__ __forceinline__ void tcp_matmul(const uint4* __restrict__ codes,
                                           const u32* __restrict__ stats,
                                           const uint2* __restrict__ stats2,
                                           const uint2* __restrict__ xfrag,
                                           float* __restrict__ part, int RB, int NC,
                                           int chunks_per_split, i64 M16, int batch) {
  using G = TileGeo<B, SB>;
  using T = TcpGeo<B, SB, NT>;
  constexpr int R = G::R, MPC = G::MPC, SLABS = G::SLABS, SWL = G::SWL;
  constexpr int S = T::STAGES, NTW = T::NTW, RBB = T::RBB;
  extern __shared__ uint4 ring[];  // [S][STAGE_U4]: codes, statistics words, stats2 records
  // The launch must give the ring (a plan that disagrees with this file is a launch error).
  if (dynamic_smem_bytes() < (u32)T::SMEM) __trap();

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int pair = warp / T::NS;  // the warp's row pair in the block
  const int ns = warp % T::NS;    // the warp's n-tiles: ns * NTW ..
  const int rb0 = blockIdx.x * RBB;
  const int nrb = min(RBB, RB - rb0);  // row blocks of the block that exist
  const bool active = TCP_MB * pair < nrb;
  const int c0 = blockIdx.y * chunks_per_split;
  const int nch = min(NC, c0 + chunks_per_split) - c0;
  const i64 KT = (i64)NC * MPC;

  // Chunk c's stage: three contiguous runs of 16-byte units (row blocks past RB not copied).
  auto load_stage = [&](int buf, int c) {
    uint4* dst = ring + buf * T::STAGE_U4;
    const i64 base = (i64)c * RB + rb0;  // (chunk, first row block) in the chunk-major arrays
    const uint4* gc = codes + base * SLABS * 32;
    const uint4* gs = reinterpret_cast<const uint4*>(stats) + base * 8 * SWL;
    const uint4* g2 = reinterpret_cast<const uint4*>(stats2) + base * (MPC / 2);
    const int ncode = nrb * SLABS * 32, nstat = nrb * 8 * SWL, nst2 = nrb * (MPC / 2);
    for (int u = tid; u < ncode; u += 32 * SPQR_TCP_WARPS) cp_async16_cg(dst + u, gc + u);
    dst += T::CODE_U4;
    for (int u = tid; u < nstat; u += 32 * SPQR_TCP_WARPS) cp_async16_cg(dst + u, gs + u);
    dst += T::STAT_U4;
    for (int u = tid; u < nst2; u += 32 * SPQR_TCP_WARPS) cp_async16_cg(dst + u, g2 + u);
  };

  float acc[TCP_MB][NTW][4];
#pragma unroll
  for (int mb = 0; mb < TCP_MB; ++mb)
#pragma unroll
    for (int j = 0; j < NTW; ++j) acc[mb][j][0] = acc[mb][j][1] = acc[mb][j][2] = acc[mb][j][3] = 0.f;
  const u32 magic = magic_reg();

  // prologue: chunks 0 .. S - 2 in flight (one commit group each, empty past the end, so the
  // group count stays uniform)
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < nch) load_stage(s, c0 + s);
    cp_async_commit();
  }
  const i64 jstride = KT * 32;
  const uint2* xw = xfrag + (i64)ns * NTW * jstride;  // this warp's first n-tile
  for (int i = 0; i < nch; ++i) {
    cp_async_wait<S - 2>();  // chunk i's group has landed (this thread's copies)
    __syncthreads();         // everyone's copies visible; chunk i - 1's buffer is free
    if (i + S - 1 < nch) load_stage((i + S - 1) % S, c0 + i + S - 1);
    cp_async_commit();
    if (active) {
      const uint4* st = ring + (i % S) * T::STAGE_U4;
      const u32* sws = reinterpret_cast<const u32*>(st + T::CODE_U4);
      const uint2* st2s = reinterpret_cast<const uint2*>(st + T::CODE_U4 + T::STAT_U4);
      uint4 cw[TCP_MB][SLABS];
      u32 sw[TCP_MB][SWL];
#pragma unroll
      for (int mb = 0; mb < TCP_MB; ++mb) {
        const int rbl = TCP_MB * pair + mb;  // past nrb: stale data, computed, never stored
#pragma unroll
        for (int k = 0; k < SLABS; ++k) cw[mb][k] = st[(rbl * SLABS + k) * 32 + lane];
#pragma unroll
        for (int k = 0; k < SWL; ++k) sw[mb][k] = sws[(rbl * 32 + lane) * SWL + k];
      }
      TcpRounds<B, SB, NTW, 0, R, SLABS, SWL, MPC>::run(
          cw, sw, st2s + TCP_MB * pair * MPC, acc, xw + (i64)(c0 + i) * MPC * 32, jstride, lane,
          magic);
    }
  }
  cp_async_wait<0>();  // no copy outstanding at exit
  if (!active) return;
  // D fragment: acc[..][0..1] row g, columns 2t, 2t + 1; acc[..][2..3] row g + 8.
  float* p = part + (i64)blockIdx.y * (NT * 8) * M16;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mb = 0; mb < TCP_MB; ++mb) {
    const int rbl = TCP_MB * pair + mb;
    if (rbl >= nrb) break;
    const i64 r0 = (i64)(rb0 + rbl) * 16 + g;
#pragma unroll
    for (int j = 0; j < NTW; ++j) {
      const int col = (ns * NTW + j) * 8 + 2 * t;
      if (col < batch) {
        p[(i64)col * M16 + r0] = acc[mb][j][0];
        p[(i64)col * M16 + r0 + 8] = acc[mb][j][2];
      }
      if (col + 1 < batch) {
        p[(i64)(col + 1) * M16 + r0] = acc[mb][j][1];
        p[(i64)(col + 1) * M16 + r0 + 8] = acc[mb][j][3];
      }
    }
  }
}

}  // namespace spqr_tc

// extern "C" entry points: spqr_tcp_b{B}_s{SB}_nt{NT}, NT in 2, 4, 8, 16 (slices of up to 8 NT
// batch columns). Arguments as spqr_tc_b*_nt* (spqr_gpu.h); grid (ceil(RB / RBB), splits), block
// 32 * SPQR_TCP_WARPS, dynamic shared memory STAGES * STAGE_BYTES (TcpGeo; spqr_tc_plan.h).
// Two blocks per multiprocessor (the ring is sized for that): with only the block size given,
// ptxas (CUDA 13, sm_90) capped some specialisations at 128 registers and spilled; with the
// minimum of 2 blocks it uses up to 255 and spills nothing (ptxas -v, every specialisation).
#define SPQR_TCP_ENTRY(B, SB, NT)                                                                 \
  extern "C" __global__ void __launch_bounds__(32 * SPQR_TCP_WARPS, 2)                           \
      spqr_tcp_b##B##_s##SB##_nt##NT(const uint4* __restrict__ codes,                             \
                                     const u32* __restrict__ stats,                               \
                                     const uint2* __restrict__ stats2,                            \
                                     const uint2* __restrict__ xfrag, float* __restrict__ part,   \
                                     int RB, int NC, int chunks_per_split, i64 M16, int batch) {  \
    spqr_tc::tcp_matmul<B, SB, NT>(codes, stats, stats2, xfrag, part, RB, NC, chunks_per_split,  \
                                   M16, batch);                                                   \
  }
#define SPQR_TCP_ALL_NT(B, SB) \
  SPQR_TCP_ENTRY(B, SB, 2)     \
  SPQR_TCP_ENTRY(B, SB, 4)     \
  SPQR_TCP_ENTRY(B, SB, 8)     \
  SPQR_TCP_ENTRY(B, SB, 16)

#if defined(SPQR_TCP_B) && defined(SPQR_TCP_SB)
#define SPQR_TCP_ONE(B, SB) SPQR_TCP_ALL_NT(B, SB)
SPQR_TCP_ONE(SPQR_TCP_B, SPQR_TCP_SB)
#else
#define SPQR_TCP_ALL_SB(B) \
  SPQR_TCP_ALL_NT(B, 1)    \
  SPQR_TCP_ALL_NT(B, 2)    \
  SPQR_TCP_ALL_NT(B, 3)    \
  SPQR_TCP_ALL_NT(B, 4)
SPQR_TCP_ALL_SB(2)
SPQR_TCP_ALL_SB(3)
SPQR_TCP_ALL_SB(4)
#endif
