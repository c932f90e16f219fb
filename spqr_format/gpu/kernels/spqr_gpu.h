/* spqr_gpu.h -- C interface of the spqr-format GPU kernels (spqr_kernels.cu, spqr_tc.cu,
 * spqr_host.cu, spqr_tc_host.cu, spqr_row_layout.c, spqr_tile_layout.c; spqr_cmpq.cu,
 * spqr_cmpq_layout.c and spqr_cmpq_host.cu for channel_mixed, section "channel_mixed" below).
 *
 * Three pieces, use any:
 *
 *  1. The SPEC-layout kernels (spqr_kernels.cu): `extern "C" __global__` entry points, compiled
 *     by nvcc or NVRTC, launched with <<<>>> or cuLaunchKernel by name.  No host code, no
 *     headers.  Bit-exact dequantize; SIMT matvec / matmul (any batch, f16 or bf16).
 *  2. Host launchers (spqr_host.cu, nvcc only): `spqr_matvec`, `spqr_dequantize`, ... that pick
 *     the specialisation and launch geometry of (1) for you on a given stream.
 *  3. The tensor-core kernels (spqr_tc.cu): f16 matvec / matmul on mma.sync, reading the "tile
 *     layout", a lossless load-time repack of the sections (section "Tile layout" at the end
 *     of this comment block).  The repack is implemented in Python
 *     (spqr_format/gpu/tile_layout.py, run on the GPU through CuPy; the same repack in C99 on
 *     the host: spqr_tile_layout.c, declared at the end of this header).  Its host launcher
 *     is spqr_tc_matmul (spqr_tc_host.cu, nvcc only; its choice of kernels, k-split and
 *     k-slicing is the plain C header spqr_tc_plan.h); or launch the kernels yourself
 *     (contracts below).
 *
 * Data: one `bilevel` tensor in the ROW LAYOUT, in device memory.  A .spqr file packs each
 * section densely (SPEC C-5.2: one bit stream per section, no padding between rows); the
 * kernels want every row on a 16-byte boundary and a row's outliers behind per-row offsets.
 * The row layout is that, built once on the host at load time (spqr_row_repack below, C99, or
 * spqr_format/codec/row_layout.py; both bit for bit the same):
 *   codes  u32 [m][code_row_words]: row i = its n codes LSB first, zero-padded to a multiple of
 *          128 elements;
 *   stats  sb = 0: the file's f16 (scale, zero) pairs [m][G][2]; sb > 0: u32
 *          [m][stats_row_words], row i = its 2G statistics codes, padded as codes are;
 *   stats2 the file's section, u16 [T][G][4];
 *   perm   u32 [n] (the file stores u16 entries when n <= 65536);
 *   orows  u32 [m + 1] per-row offsets into oents, and oents the outlier entries of SPEC C-6.2
 *          with blocks of ONE row (the running column restarts at -1 in every row).
 * Every pointer must be 16-byte aligned (cudaMalloc gives 256).  The kernels do NOT validate
 * the data: validate the file's sections first (SPEC C-5.7, C-5.8, C-6.1, C-6.2: perm is a
 * permutation, outliers in range, ...), as `spqr_format.codec.reference.validate_packed` does
 * (spqr_row_repack also refuses a broken outlier stream); invalid data can make a kernel read
 * out of bounds.
 *
 * Sizes: m, n >= 1, n < 2^31, m * ceil(n/32) < 2^62.  bits b in 1..8, group size g >= 1,
 * stats_bits sb in 0..8 (0 = fp16 statistics), stats_group_size S >= 1 when sb > 0.
 * Derived: G = ceil(n/g), code_row_words = ceil(n/128)*4*b,
 *          stats_row_words = ceil(2G/128)*4*sb (0 when sb = 0), nsub = ceil(n/32).
 *
 * Numerics:
 *  - dequantize is bit-exact with SPEC section 7 (f32 ops without contraction, then RNE to
 *    f16/bf16).  The kernels must be compiled WITHOUT -ftz / --use_fast_math (matvec relies on
 *    f32 subnormals, see spqr_kernels.cu).
 *  - matvec/matmul accumulate in f32; y differs from the f64 product of the decoded f32 W and x
 *    by f32 rounding of the per-group sums (see tests/test_gpu_kernels.py for the bound used)
 *    plus the final rounding of y to f16/bf16.
 *
 * Dtype codes (in_dtype / out_dtype): 0 = f32, 1 = f16, 2 = bf16 (SPQR_OUT_* below).
 * All launches are asynchronous on the stream given; nothing synchronises the device.
 */
#ifndef SPQR_GPU_H
#define SPQR_GPU_H

#include <stddef.h>
#include <stdint.h>

#define SPQR_DTYPE_F32 0
#define SPQR_DTYPE_F16 1
#define SPQR_DTYPE_BF16 2

/* ------------------------------------------------------------------------------------------
 * Level 1: kernels (spqr_kernels.cu).  Pointers that a tensor lacks are NULL.
 *
 * spqr_prepare_x(x, ldx, in_dtype, perm, bits, n, xs, ldxs, x16, ldx16, nbatch)
 *   Gathers and scales the input for the matvec kernels.
 *   x      [nbatch][ldx] f16/bf16 (in_dtype 1/2), row b is input vector b, original column order
 *   perm   u32[n] or NULL;  bits = b of the tensor (x' depends on it)
 *   xs     f32 workspace [nbatch][ldxs], ldxs = 32*nsub (16-byte aligned)
 *   x16    f32 workspace [nbatch][ldx16], ldx16 = 2*nsub
 *   grid (ceil(32*nsub / 256), nbatch), block 256 (one thread per element), no dynamic
 *   shared memory.
 *
 * spqr_matvec_b{B}_{h|q}_nb{NB}(codes, stats, stats2, orows, oents, xs, ldxs, x16, ldx16,
 *                               y, ldy, out_dtype, m, n, g, S, sb, G, code_row_words,
 *                               stats_row_words, nbatch)
 *   y[b][i] = sum_j W[i,j] x[b][j] for b < nbatch (needs spqr_prepare_x first, same stream).
 *   B in {2,3,4,8} (bits), h = fp16 statistics (sb = 0), q = packed statistics (sb 1..8),
 *   NB in {2,4}: batch columns per block (grid.y slices cover any nbatch; nbatch = 1 takes
 *   spqr_mv1_*, the old NB = 1 kernel is deleted).  Requires
 *   g % 16 == 0.
 *   codes u32 [m][code_row_words]; stats u32 (sb=0: [m*G] f16 pairs; sb>0: [m][stats_row_words]);
 *   stats2 u16 [T][G][4] or NULL; orows u32[m+1] / oents u32[E] or both NULL (no outliers);
 *   y [nbatch][ldy] f16/bf16 (out_dtype 1/2).  S = stats_group_size (any value when sb = 0).
 *   Launch: R = 4 rows per block; NB = 2 (nbatch <= 2) or 4;
 *           grid (ceil(m/R), ceil(nbatch/NB)); block 32*(W + o) threads where o = 1 when the
 *           tensor has outliers (that warp computes the outlier corrections) and W, the warps
 *           splitting the columns, is any value in 1..8 (the launchers use
 *           W = clamp(ceil(16*SMs / (ceil(m/R)*ceil(nbatch/NB))), 1, min(8, ceil(nsub/32))));
 *           no dynamic shared memory (static <= 1.2 KiB).
 *
 * spqr_mv1_b{B}_{h|q} / spqr_mv1r16_b{B}_{h|q}(codes, stats, stats2, orows, oents, xs, x16,
 *                     part, y, out_dtype, m, n, g, S, sb, G, code_row_words, stats_row_words)
 *   Batch-1 matvec (the fast path for nbatch = 1; needs spqr_prepare_x with nbatch = 1 first).
 *   Each thread owns one 32-column sub-chunk of a column split of 256 sub-chunks (8192
 *   columns) and sweeps RB rows (mv1: 8, mv1r16: 16); the block's split-0 warps add the
 *   outlier corrections.  Launchers use mv1r16 when ceil(m/16)*nsplit*threads >= 100000.
 *   nsplit = ceil(nsub / 256).  nsplit == 1: writes y[row] (f16/bf16) directly.  nsplit > 1:
 *   writes f32 partial sums part[split][m] (workspace after x16) and spqr_mv1_finish(part,
 *   nsplit, y, out_dtype, m) (grid ceil(m/256), block 256) adds them and rounds y.
 *   Launch: grid (ceil(m/RB), nsplit), block 32*ceil(min(nsub,256)/32), no dynamic smem.
 *   Same B / h|q specialisations and g % 16 == 0 requirement as spqr_matvec_*.
 *
 * spqr_dequant_b{B}_{h|q}_{f32|f16|bf16}(codes, stats, stats2, perm, out, ldo, m, n, bits, g,
 *                                        S, sb, G, code_row_words, stats_row_words)
 *   Dense part of the decode: out[i][perm[j]] = s*(q-z) (C-7.1, C-7.2, C-7.4), out row stride
 *   ldo elements.  B in {2,3,4,8} specialised, B = 0 generic (bits given at run time, any 1..8).
 *   Any g.  grid ceil(m*nsub / 256), block 256 (one thread per 32-column sub-chunk of a row).
 *
 * spqr_dequant_row_b{B}_{h|q}_{f32|f16|bf16}(codes, stats, stats2, perm, iperm, orows, oents,
 *                                            out, ldo, n, bits, g, S, sb, G, code_row_words,
 *                                            stats_row_words)
 *   Whole decode of one row per block, one thread per 16 columns (grid-stride), outliers
 *   included.  perm == NULL and every row out + i*ldo 16-byte aligned: rows are written
 *   straight to global memory and no shared memory is needed (any n).  Otherwise the row is
 *   assembled in n * sizeof(element) bytes of dynamic shared memory (raise
 *   cudaFuncAttributeMaxDynamicSharedMemorySize above 48 KiB; use the flat kernels below when
 *   that exceeds the device's opt-in limit): in stored order and gathered on the way out when
 *   iperm (the inverse permutation, iperm[perm[j]] = j, 16-byte aligned) is given (fastest),
 *   else scattered through perm.  grid m, block 32*clamp(ceil(ceil(n/16)/32), 1, 8) or less
 *   (any multiple of 32 up to 256).
 *
 * spqr_dequant_row2_b{B}_{h|q}_{f16|bf16}(codes, stats, stats2, slots, orows, oents, out,
 *                                        ldo, m, n, g, S, sb, G, code_row_words,
 *                                        stats_row_words)
 *   With a permutation, f16/bf16 out, B in {2,3,4,8}, g % 16 == 0, n <= 65536: rows 2i and
 *   2i+1 per block (odd m: the last block has one), staged as (row 0, row 1) u32 pairs so that
 *   one index load and one shared-memory access serve both rows; outliers included.  slots:
 *   u16 [n], 16-byte aligned, slots[c] = s ^ ((s >> 3) & 0x1C) with s = iperm[c] (the
 *   staging position of output column c).  Dynamic smem 128 * ceil(ceil(n/4) / 8) bytes.  grid ceil(m/2), block a
 *   multiple of 32 from 64 to 512 (warps 0 and 1 write rows 0 and 1's outliers); the Python
 *   layer uses spqr_dequant_row_*'s geometry up to 64 KiB of smem and 512 threads above.
 *
 * spqr_dequant_oct_b{B}_{h|q}_{f16|bf16}(codes, stats, stats2, orows, oents, out, ldo, m, n,
 *                                       g, S, sb, G, code_row_words, stats_row_words)
 *   Without a permutation (fastest there), f16/bf16 out, B in {2,3,4,8}, g % 16 == 0,
 *   n < 2^28: rows 2i and 2i+1 per block, written straight to global memory (16-byte stores
 *   when both rows are 16-byte aligned, element stores otherwise), outliers included.  Each
 *   lane decodes 8 consecutive columns of both rows per step.  Dynamic smem: the warps' load
 *   rings, (block / 32) * 4 * NWORD * 128 bytes, NWORD = 2 * (B == 8 ? 3 : 2) + (q ? 4 : 1)
 *   (4 = SPQR_DQO_STAGES).  grid ceil(m/2), block any multiple of 32 from 64 to 256 (128; 256
 *   for n > 8192 is what the Python layer uses).
 *
 * spqr_dequant_outliers_{f32|f16|bf16}(orows, oents, perm, out, ldo, m)
 *   Outlier pass (C-7.3): overwrites the outlier positions.  Launch after the dense pass on
 *   the same stream.  grid ceil(m/8), block 256 (one warp per row).
 * ------------------------------------------------------------------------------------------ */

/* ------------------------------------------------------------------------------------------
 * Tile layout and tensor-core kernels (spqr_tc.cu).
 *
 * Scope: bits B in {2,3,4}, group size 16, packed statistics SB in {1,2,3,4} whose tiles
 * hold whole 16-row blocks (S % 16 == 0 or S >= m), m < 2^30, n < 2^24, f16 x and y (y may
 * also be bf16/f32).  Other tensors use (1)/(2).
 *
 * Definitions.  PPW = pair_slots(B) (8, 5, 4 for B = 2, 3, 4): a "pair slot" i of a u32 word
 * is bits [i*B, i*B+B) of each 16-bit half (slots whose bits end above bit 10 are read after
 * a right shift by (10/B)*B).  A round is 4 groups of 16 columns computed by 4 mma k-steps in
 * which lane 4g+t's A elements all come from the round's group t (rows g, g+8).  A chunk is
 * R rounds (R = 2, 5, 1 for B = 2, 3, 4; MPC = 4R groups), RB = ceil(m/16) row blocks,
 * NC = ceil(ceil(n/16) / MPC) chunks, KT = NC*MPC groups, M16 = 16*RB, SLABS = 4R/PPW,
 * SWL = 1, 2 or 4 statistics words per lane and chunk.  tile_layout.py's module docstring
 * defines the arrays exactly (chunk-major):
 *   tl_codes  u32 [NC][RB][SLABS][32 lanes][4]   one 16-byte load per lane and slab
 *   tl_stats  u32 [NC][RB][32 lanes][SWL]        (scale code, zero code) pairs, rows g, g+8
 *   tl_stats2 u32 [NC][RB][MPC][2]               f16 pairs (sstep, -zstep), (sbase, -zbase)
 *   tl_oents  u32 [E]                            the row layout's oents, values f16(o - w)
 * plus the row layout's orows and perm.
 *
 * spqr_tc_prepare_x(x, ldx, perm, n, nb, NT, KT, xfrag, xt, bp, diag, xsum)
 *   x [nb][ldx] f16 (nb <= 64); NT = n-tiles of 8 batch columns (1, 2, 4 or 8 >= nb/8);
 *   writes the B fragments xfrag (uint2 [NT][KT][32]; k-step mu = 4*round + u, lane 4g+t:
 *   columns 4u..4u+3 of the round's group t, batch column 8j+g) of x'[c][j] = x[c][perm[j]],
 *   and the same values as x'^T (u16 [n][bp], bp = next power of two >= nb up to 8, else a
 *   multiple of 8).  diag = 1 (for spqr_tcg_*: NT = 1, nb <= 2): lane 4g+t holds batch column
 *   g - 2t instead (zeros where that is not a batch column).  xsum (NULL: not written; nb <=
 *   2) f32 [KT][2]: per group of 16 columns of x' (group = 4*(mu/4) + t) and batch column,
 *   the sum of its values in column order (0 past the batch).  grid ceil(NT*KT*32/256),
 *   block 256.
 *
 * spqr_tcv_b{B}_s{SB}(tl_codes, tl_stats, tl_stats2, xfrag, orows, tl_oents, xt, bp, RB, NC,
 *                     ks_log2, gp_log2, m, nb, y, ldy, out_dtype)             (nb <= 8, NT = 1)
 *   The whole product in one kernel: y[c][i] = (W x')[i][c] + sum over row i's outliers of
 *   f16(o - w) * x'[col][c], rounded to out_dtype.  Block = 8 warps (SPQR_TC_WARPS) = RPB row
 *   blocks times KS = 2^ks_log2 k-slices (KS in 1, 2, 4, 8; RPB = 8 / KS): warp (r, k) of
 *   block b computes chunks k, k + KS, ... of row block b*RPB + r, and the block sums the
 *   slices in order.  gp_log2: smallest with 2^gp_log2 >= nb.  grid ceil(RB / RPB); no
 *   dynamic shared memory.  orows / tl_oents NULL: no outliers.  Any ks_log2 gives a
 *   correct result; spqr_tc_matmul picks the one that fills the GPU best, and uses this
 *   kernel for nb <= 8 (launch plan path tcv); for nb <= 2 on "large" shapes (plan path tcg,
 *   plan.shape_class), the next one.
 *
 * spqr_tcg_b{B}_s{SB}(tl_codes, tl_stats, tl_stats2, xfrag, xsum, orows, tl_oents, xt, bp, RB,
 *                     NC, ks_log2, m, nb, y, ldy, out_dtype)                  (nb <= 2, NT = 1)
 *   As spqr_tcv_*, with xfrag and xsum from spqr_tc_prepare_x with diag = 1: each mma
 *   multiplies the codes (B = 3, 4: as f16 subnormals q * 2^(o-24), o the field's bit
 *   offset; B = 2: exact integers), each group's sums land in their own mma column and are
 *   scaled in f32 (s * (sum q x' - z * sum x')), so the weights are not rounded to f16.
 *   spqr_tc_matmul keeps xsum in the partial-sums region of the workspace.
 *
 * spqr_tc_b{B}_s{SB}_nt{NT}(tl_codes, tl_stats, tl_stats2, xfrag, part, RB, NC, chunks, M16, nb)
 *   f32 partial sums part[split][8*NT][M16] of W x' over the chunks
 *   [split*chunks, min(NC, (split+1)*chunks)).  Block = 8 warps (SPQR_TC_WARPS), warp w owns
 *   row block blockIdx.x*8 + w; grid (ceil(RB/8), splits); dynamic shared memory
 *   2*NT*MPC*256 bytes (raise the limit above 48 KiB).  Weights enter the tensor cores as f16
 *   (see spqr_tc.cu for the error bound); accumulation is f32.
 *
 * spqr_tc_finish_p{1,2,4,8,16,32,64}(part, splits, M16, 8*NT, orows, tl_oents, xt, bp, smem_x,
 *                                    lanes, n, y, ldy, out_dtype, m, nb)
 *   y[c][i] = sum of the splits' partial sums (in order) + sum over row i's outliers of
 *   f16(o - w) * x'[col][c], rounded to out_dtype.  The suffix is bp rounded up to a power of
 *   two (bp <= 8: bp itself; a larger bp is a multiple of 8 and nb <= the suffix).  Block 256,
 *   any grid (grid-stride over rows, 8 * 32 / lanes rows per block and step).  lanes = lanes
 *   per row: 32 (one warp per row) for any bp; 8 for bp <= 4 (four rows per warp, better for
 *   many rows with few outliers each); 4, 8 or 16 for bp 8 and 16 (32 / lanes rows per warp;
 *   a row much longer than the others of its warp is taken by the whole warp).  Any allowed
 *   value gives the same sums up to f32 rounding order; the launcher's choice:
 *   _kernels.tc_finish_lanes.  smem_x = 1 stages x'^T in dynamic shared memory
 *   (n*bp*2 bytes rounded up to 16; then launch at most as many blocks as fit).

 * Workspace (16-byte aligned): xfrag (NT*KT*256 bytes), x'^T (n*bp*2 rounded to 16), part
 * (splits*8*NT*M16*4, at least KT*8: spqr_tcg_* keeps xsum there; not used by spqr_tcv_*).
 * Everything is deterministic (no atomics).
 * ------------------------------------------------------------------------------------------ */

/* ------------------------------------------------------------------------------------------
 * channel_mixed (CMPQ, SPEC section 12): spqr_cmpq.cu.  Same conventions as above (no headers,
 * NVRTC or nvcc, extern "C" __global__ entry points, asynchronous launches, no -ftz needed or
 * harmful; dtype codes 0 = f32, 1 = f16, 2 = bf16).
 *
 * Data: one channel_mixed tensor in the CMPQ CHUNK LAYOUT, in device memory, built once at
 * load time from the file's sections by spqr_format/codec/cmpq_layout.py (its docstring is the
 * normative description; C twin: spqr_cmpq_repack, spqr_cmpq_layout.c).  Per run r (width b,
 * stored columns s..s+c-1),
 * K = ceil(c/32) chunks of 32 columns (the last padded with zero codes and zero tables):
 *   runs   i64 [nruns][8]: start s, count c, bits b, code_off, tab_off, pad_start, K, 0
 *          (runs by increasing b, only non-empty ones);
 *   codes  u32: word code_off + (k*b + w)*m + i holds codes 32k..32k+31 of row i, run r
 *          (LSB first, as SPEC C-5.2 within the 32 codes); at each outlier the code whose table
 *          value is nearest to the outlier;
 *   tables u16 (f16 bits) [T][Lp]: table of run r's padded column jl for row block t at
 *          t*Lp + tab_off + (jl << b), 2^b entries;  T = 1 (R = 0) or ceil(m/R);
 *   pcol   u32 [np]: original column of padded column jp (run r: pad_start + jl), 0xFFFFFFFF
 *          for padding;  perm u32 [n] (stored -> original), inv_perm u32 [n];
 *   orows  u32 [m+1] per-row offsets (NULL: no outliers), ocol u32 stored column, ocolp u32
 *          padded column, oval u16 f16 value, ocorr f32 f32(o) - f32(T[q]) for the stored code.
 * The kernels do not validate: validate the file's sections first (SPEC C-12.8).
 * Sizes: m, n >= 1, m < 2^31, every index below 2^62.
 *
 * spqr_cmpq_dequant_{f32|f16|bf16}(codes, tables, runs, nruns, inv_perm, out, ldo, m, n, R,
 *                                  Lp, rows_per_block)
 *   Dense part of the decode, bit-exact (SPEC C-12.7): out[i*ldo + c] = tables[t(i)*Lp + ... +
 *   q] for the stored column inv_perm[c] (f16: the bits; f32: exact widening; bf16: RNE of
 *   that).  grid (ceil(n/256), ceil(m/rows_per_block)) with ceil(m/rows_per_block) <= 65535
 *   and rows_per_block a multiple of 32 (the launchers: spqr_cmpq_dq_rows_per_block), block
 *   256: each block 256 output columns, 32 rows at a time (lane = row, so a column's code
 *   words for the 32 rows are one coalesced load; warp w decodes columns 32w..32w+31 into a
 *   shared tile, then the warps store it row by row).
 * spqr_cmpq_dequant_outliers_{f32|f16|bf16}(orows, ocol, oval, perm, out, ldo, m)
 *   Outlier pass (C-7.3): out[i*ldo + perm[ocol[k]]] = oval[k].  After the dense pass on the
 *   same stream; only with outliers.  grid ceil(m/8), block 256 (one warp per row).
 *
 * spqr_cmpq_prepare_x(x, ldx, in_dtype, pcol, np, xs, ldxs, batch)
 *   xs[b][jp] = f32(x[b][pcol[jp]]) (0 for padding and for b >= batch): x [batch][ldx] in
 *   in_dtype (0/1/2), xs f32 [NB][ldxs], ldxs >= np.  grid (ceil(np/256), NB), block 256.
 * spqr_cmpq_mm_nb{NB}(codes, tables, tiles, ntiles, xs, ldxs, part, m, R, Lp)  NB in 1,2,4,8,16
 *   Partial products over column tiles: part[y][b][i] = sum over the tiles y, y + gridDim.y,
 *   ... of sum over the tile's columns of f32(T[q]) * xs[b][jp] (f32, fixed order).  tiles
 *   i64 [ntiles][8]: bits, chunks (nch), first code word (code_off + k0*b*m), first table entry
 *   (tab_off + (32*k0 << b)), first padded column (pad_start + 32*k0), 0, 0, 0: chunks of one
 *   run (cmpq_layout.tiles).  One thread per row, SPQR_CMPQ_ROWS (256) rows per block, one
 *   specialised loop per width (codes via b coalesced u32 loads per 32 columns, tables in
 *   shared memory as f32, scaled by x' when NB = 1).  grid (ceil(m/256), splits <= ntiles),
 *   block 256, dynamic shared memory max over tiles of 4*(32*nch << b) + (NB > 1 ?
 *   4*32*nch*NB : 0) bytes (raise the limit above 48 KiB).  part f32 [splits][NB][m].
 * spqr_cmpq_mv1_b{B}(codes, tables, tiles, ntiles, xs, part, m, R, Lp)      B in 1..8
 *   Batch 1, second design: as spqr_cmpq_mm_nb1 (same sums, f32(T[q]) * xs[jp] rounded once,
 *   fixed order), for tiles of width B only: tiles points at the B-bit run's tiles (tiles are
 *   in run order), part at this launch's first split (part + split0 * m).  Launch one per
 *   width present, each with its own splits; the finish kernel sums all.  Each thread keeps
 *   2-4 chunks of codes in flight and issues the next tile's first loads before its table
 *   rebuild.  grid (ceil(m/256), splits), block 256, 4 blocks/SM (<= 64 registers; ptxas
 *   sm_90: 56-64, no spills), dynamic shared memory as spqr_cmpq_mm_nb1.
 * spqr_cmpq_prepare_xf(x, ldx, pcol, np, xs, ldxs, nbp, xf, nt, batch)
 *   f16 x only: xs as spqr_cmpq_prepare_x for b < nbp, and xf (u16 [np * 8*nt]) x' as f16 in
 *   mma B-fragment order: x'[b][jp] at ((jp/32 * nt + b/8) * 32 + 4*(b%8) + (jp/8)%4) * 8 +
 *   jp%8 (0 for padding and b >= batch).  grid (ceil(np/256), 8*nt), block 256.
 * spqr_cmpq_tc_b{B}_nt{NT}(codes, tables, tiles, ntiles, xf, part, nbp, m, R, Lp)  NT in 1,2
 *   Batch 2..8*NT with f16 x, tensor cores: part[y][b][i] (b < nbp) = sums over the B-bit
 *   run's tiles (tiles / part offset per width as spqr_cmpq_mv1_b{B}; tiles of
 *   cmpq_layout.tiles(..., tc=True): 32 * min(256 >> B, 16) columns) of mma.m16n8k16 (f16 A =
 *   table entries, f16 B = xf, f32 accumulation).  Requires R = 0 or R % 16 == 0 (a 16-row
 *   m-tile in one table block).  grid (ceil(m/128), splits), block 128 (4 warps x 2 m-tiles of
 *   16 rows), 4 blocks/SM (ptxas sm_90: 93-127 registers, no spills), dynamic shared memory max
 *   over tiles of 16*ceil(((36*nch) << B) * 2 / 16) + 512*nch*NT bytes (<= 35 KiB).
 *   Tolerance: the products of f16 weights and f16 x are exact and summed in f32, so the
 *   result meets C-7.6 as the CUDA-core path does.  f32 / bf16 x are not rounded to f16 (that
 *   would add up to 2^-11 |w x| per product and overflow / underflow outside the f16 range):
 *   they take spqr_cmpq_mm_nb*.
 * spqr_cmpq_finish_nb{NB}(part, splits, orows, ocolp, ocorr, xs, ldxs, y, ldy, out_dtype, m,
 *                         batch)
 *   y[b*ldy + i] = sum over y of part[y][b][i] + sum over row i's outliers of ocorr *
 *   xs[b][ocolp], rounded to out_dtype, for b < batch.  grid ceil(m/8), block 256 (one warp per
 *   row); orows/ocolp/ocorr NULL without outliers.  Batches above 16: slices of 16 rows.
 * Paths (_kernels.cmpq_path, per slice of <= 16 rows): the second design by default: batch 1
 * -> prepare_x, mv1_b* (one launch per width present); 2-16 with f16 x and R % 16 == 0 (R = 0
 * included) -> prepare_xf, tc_b*_nt{ceil(batch/8)} (one launch per width); otherwise
 * prepare_x, mm_nb* (the first design: f32 / bf16 x at batch > 1, R not a multiple of 16; the
 * Python override cmpq_v2=0 takes it for every slice).  finish_nb{NB} after each, NB =
 * 1,2,4,8,16 >= batch.  Tiles: cmpq_layout.tiles(..., min_tiles = cmpq_target_tiles(m,
 * multiprocessors, rows), tc = path is tc) with rows 128 for tc, 256 otherwise; k-splits
 * cmpq_splits (mm) or max(1, min(tiles of the width, min_tiles)) per width (mv1, tc).
 * Workspace (Python layer): xs f32 [NB][ldxs], then (tc only) xf f16 [np * 8*NT], then part
 * f32 [splits][NB][m].  Deterministic.  C: spqr_cmpq_layout.c builds the layout on the host
 * and spqr_cmpq_host.cu launches the same default plan (spqr_cmpq_plan.h: every path above,
 * same tiles, splits and geometry, so the same bits; SPQR_GPU_PLAN is not read there) and the
 * dequantize kernels (declarations at the end of this header).
 * ------------------------------------------------------------------------------------------ */

/* ------------------------------------------------------------------------------------------
 * Level 2: host launchers (spqr_host.cu; link it, or compile it with your program by nvcc).
 * ------------------------------------------------------------------------------------------ */
#ifdef __cplusplus
extern "C" {
#endif

/* One bilevel tensor on the device, in the row layout, and the parameters of its record. */
typedef struct spqr_bilevel {
  const uint32_t *codes;      /* row-layout codes [m][code_row_words]                   */
  const uint32_t *stats;      /* row-layout stats (sb = 0: f16 pairs viewed as u32)     */
  const uint16_t *stats2;     /* section `stats2` or NULL                               */
  const uint32_t *perm;       /* u32 [n] or NULL                                        */
  const uint32_t *orows;      /* per-row outlier offsets [m + 1] or NULL                */
  const uint32_t *oents;      /* per-row outlier entries or NULL                        */
  int64_t m, n;               /* dims[0], dims[1]                                       */
  int32_t bits, stats_bits;   /* params: b, sb                                          */
  int32_t group_size;         /* g                                                      */
  int32_t stats_group_size;   /* S (0 when sb = 0)                                      */
} spqr_bilevel;

/* Bytes of f32 workspace spqr_matvec needs for `batch` input vectors (16-byte aligned):
 * 4 * (batch * 34 * nsub + (batch == 1 ? ceil(nsub/256) * m : 0)). */
size_t spqr_matvec_workspace_bytes(const spqr_bilevel *t, int batch);

/* 1 when spqr_matvec has a fused kernel for this tensor (bits in {2,3,4,8}, g % 16 == 0);
 * otherwise spqr_matvec returns cudaErrorNotSupported and the caller dequantizes + GEMMs. */
int spqr_matvec_supported(const spqr_bilevel *t);

/* Y[b][:] = W X[b][:] for b < batch (batch >= 1; X rows of ldx elements, Y rows of ldy).
 * x and y are f16 or bf16 (dtype codes).  workspace: spqr_matvec_workspace_bytes(t, batch).
 * Returns the launch error (cudaGetLastError after the launches) as an int (cudaError_t). */
int spqr_matvec(const spqr_bilevel *t, const void *x, int64_t ldx, int in_dtype, void *y,
                int64_t ldy, int out_dtype, int batch, void *workspace, void *stream);

/* out[m][ldo] = decoded W (f32/f16/bf16 by out_dtype), bit-exact with SPEC section 7.
 * Without a permutation, for f16/bf16, bits in {2,3,4,8} and g % 16 == 0 it launches the octet
 * kernel (spqr_dequant_oct_*, as the Python layer does); otherwise the one-row kernel, which
 * scatters through perm (the Python layer's two-row kernel needs an inverse permutation,
 * which spqr_bilevel does not carry). */
int spqr_dequantize(const spqr_bilevel *t, void *out, int64_t ldo, int out_dtype, void *stream);

/* ------------------------------------------------------------------------------------------
 * Host-side row-layout repack (spqr_row_layout.c: C99, no CUDA, no allocation): the file's
 * sections of one bilevel tensor (host memory, as read from the file) -> the row layout that
 * spqr_bilevel points to.  Call spqr_row_layout_sizes, allocate, call spqr_row_repack, upload.
 * ------------------------------------------------------------------------------------------ */
#define SPQR_OUTLIER_BLOCK_ROWS 16 /* SPEC C-6.1 */
#define SPQR_PERM_U16_MAX_N 65536  /* SPEC C-5.7: u16 perm entries when n <= this */

typedef struct spqr_bilevel_sections {
  const uint32_t *codes;     /* section `codes`: packed stream of m*n codes                */
  const void *stats;         /* section `stats`: f16 pairs (sb = 0) or packed stream       */
  const uint16_t *stats2;    /* section `stats2` or NULL                                   */
  const void *perm;          /* section `perm` (u16 when n <= 65536, else u32) or NULL     */
  const uint32_t *oindex;    /* section `outlier_index` [ceil(m/16) + 1] or NULL           */
  const uint32_t *oents;     /* section `outlier_entries` [E] or NULL                      */
  int64_t m, n;              /* dims[0], dims[1]                                           */
  int32_t bits, stats_bits, group_size, stats_group_size;
  int64_t outlier_count;     /* params: K                                                  */
  int64_t outlier_entries;   /* params: E                                                  */
} spqr_bilevel_sections;

typedef struct spqr_row_sizes { /* u32 words of each row-layout array */
  int64_t code_row_words, stats_row_words;
  int64_t codes_words, stats_words, perm_words, orows_words, oents_words;
} spqr_row_sizes;

/* Sizes of the row-layout arrays.  Walks the outlier stream once: returns 0 when it breaks
 * SPEC C-6.1 / C-6.2 (E_BAD_OUTLIERS) or a non-skip value is not finite (E_NONFINITE). */
int spqr_row_layout_sizes(const spqr_bilevel_sections *s, spqr_row_sizes *z);

/* Fills the row-layout arrays (sizes from spqr_row_layout_sizes; perm, orows, oents may be
 * NULL when the tensor has none).  Returns 1, or 0 on a broken outlier stream. */
int spqr_row_repack(const spqr_bilevel_sections *s, const spqr_row_sizes *z, uint32_t *codes,
                    uint32_t *stats, uint32_t *perm, uint32_t *orows, uint32_t *oents);

/* ------------------------------------------------------------------------------------------
 * Host-side tile-layout repack (spqr_tile_layout.c: C99, no CUDA; compile it without
 * floating-point contraction, e.g. -ffp-contract=off).  Produces the arrays of section
 * "Tile layout" above, bit for bit as spqr_format/gpu/tile_layout.py, from HOST copies of the
 * row layout (pass an spqr_bilevel whose pointers are host pointers); upload them yourself, then
 * launch with spqr_tc_matmul (spqr_tc_host.cu, below).
 * ------------------------------------------------------------------------------------------ */
#define SPQR_TILE_F16_SAFE 30000.0 /* |s| (2^b - 1 + |z|) and |z| must stay below this */

typedef struct spqr_tile_dims {
  int64_t RB, NC, R, MPC, KT, SLABS, SWL, M16;
} spqr_tile_dims;

/* 1 and the dimensions when (bits, stats_bits, group_size, stats_group_size, m, n) have a
 * tensor-core path; 0 otherwise.  Array sizes in u32 words: codes RB*NC*SLABS*32*4,
 * stats RB*NC*32*SWL, stats2 RB*KT*2, outlier entries E. */
int spqr_tile_dims_of(int64_t m, int64_t n, int bits, int stats_bits, int group_size,
                      int stats_group_size, spqr_tile_dims *d);

/* Fills the tile-layout arrays (tl_oents may be NULL when the tensor has no outliers).
 * Returns 1, or 0 when the tensor has no tensor-core path (see spqr_tile_dims_of), its
 * statistics could overflow f16, or an outlier correction o - w does not fit f16. */
int spqr_tile_repack(const spqr_bilevel *t, uint32_t *tl_codes, uint32_t *tl_stats,
                     uint32_t *tl_stats2, uint32_t *tl_oents);

/* ------------------------------------------------------------------------------------------
 * Tensor-core launcher (spqr_tc_host.cu; link it, or compile it with your program by nvcc).
 * ------------------------------------------------------------------------------------------ */
typedef struct spqr_tile {
  const uint32_t *codes, *stats, *stats2; /* spqr_tile_repack's arrays, on the device        */
  const uint32_t *oents;                  /* its tl_oents on the device, or NULL             */
  const uint32_t *orows;                  /* row-layout orows on the device, or NULL         */
  const uint32_t *perm;                   /* row-layout perm (u32) on the device, or NULL    */
  int64_t m, n;                           /* dims[0], dims[1]                                */
  int64_t outlier_entries;                /* E (0 without outliers)                          */
  int32_t bits, stats_bits;               /* params: b, sb                                   */
  spqr_tile_dims d;                       /* spqr_tile_dims_of                               */
} spqr_tile;

/* Bytes of workspace spqr_tc_matmul needs for `batch` input rows (16-byte aligned), or 0 when
 * (bits, stats_bits) has no tensor-core kernel. */
size_t spqr_tc_workspace_bytes(const spqr_tile *t, int batch);

/* Y[b][:] = W X[b][:] for b < batch on tensor cores: X f16 rows of ldx elements, Y rows of ldy
 * elements in out_dtype (f32/f16/bf16).  Per 64 batch rows, on `stream` with no
 * synchronisation: prepare + spqr_tcg_* (<= 2 rows on large matrices) or spqr_tcv_* (<= 8
 * rows), else prepare, tile kernel, finish.  Same arithmetic and tolerance as the Python layer's
 * tensor-core path, and bit-identical to it for the same k-split (which is
 * chosen from the device's multiprocessor count and the kernel's registers; the override
 * SPQR_GPU_PLAN=tc_splits=N forces it in both).  Which kernel takes a slice is the launch plan
 * (spqr_launch_plan.h); where it says "dense" this launcher still runs the fused kernels (it
 * does not link cuBLAS): ask spqr_launch_plan_path first.  Returns the launch error as an int
 * (cudaError_t): cudaErrorNotSupported for a configuration without a kernel,
 * cudaErrorInvalidValue for a malformed SPQR_GPU_PLAN. */
int spqr_tc_matmul(const spqr_tile *t, const void *x, int64_t ldx, void *y, int64_t ldy,
                   int out_dtype, int batch, void *workspace, void *stream);

/* The launch plan's path (SPQR_PATH_* of spqr_launch_plan.h: 0 tcg, 1 tcv, 2 tc_split, 3 mv1,
 * 4 simt, 5 dense) for a matmul of `batch` rows of an m x n tensor on the current device;
 * layout 0: tile layout with f16 input, 1: fused SIMT kernels, 2: none.  With path 5 the
 * Python layer dequantizes (spqr_dequantize) into a workspace and runs one GEMM (cublasGemmEx,
 * f32 accumulation).  -1 for a malformed SPQR_GPU_PLAN or bad arguments. */
int spqr_launch_plan_path(int64_t m, int64_t n, int layout, int batch);

/* ------------------------------------------------------------------------------------------
 * channel_mixed (CMPQ): host-side chunk-layout repack (spqr_cmpq_layout.c: C99, no CUDA, no
 * allocation; compile it without floating-point contraction, e.g. -ffp-contract=off) and the
 * launcher (spqr_cmpq_host.cu, nvcc only: the Python layer's default plan).  The arrays are
 * those of section "channel_mixed" above, bit for bit as spqr_format/codec/cmpq_layout.py
 * (to_cmpq_layout; spqr_cmpq_tiles: tiles(..., tc=False)).  Call spqr_cmpq_layout_sizes,
 * allocate, call spqr_cmpq_repack (host memory), upload, fill an spqr_cmpq_tensor, launch.
 *
 * Return codes (0 = success, as cudaError_t; NOT the 1/0 of spqr_row_repack): the checks of
 * SPEC C-12.2 / C-12.8 that are cheap on the host, which to_cmpq_layout(validate=True) also
 * makes:
 *   SPQR_CMPQ_E_LIMIT            m or n < 1 or >= 2^31;
 *   SPQR_CMPQ_E_BAD_FIELD        width counts do not sum to n; table_rows outside 0..2^24;
 *   SPQR_CMPQ_E_BAD_OUTLIERS     the outlier stream breaks SPEC C-6.1 / C-6.2 (index[0] != 0,
 *                                decreasing, index[B] != E, delta 0, a skip with delta !=
 *                                65535 or ending a block, a position past its block), a
 *                                non-skip value is not finite, or E > 0 with a NULL section;
 *   SPQR_CMPQ_E_BAD_PERMUTATION  perm is not a permutation of 0..n-1 (spqr_cmpq_repack);
 *   SPQR_CMPQ_E_NONFINITE        a table entry is NaN or infinite (spqr_cmpq_repack).
 * NOT checked: the lengths of the section arrays (the caller gives codes of file_code_words
 * u32, tables of table_blocks * file_table_entries u16, oindex of ceil(m/16) + 1 u32 and oents
 * of E u32, as the file's section lengths must be, SPEC C-12.3).  Codes need no check (every
 * b-bit code indexes its 2^b-entry table).
 * ------------------------------------------------------------------------------------------ */
#define SPQR_CMPQ_OK 0
#define SPQR_CMPQ_E_LIMIT 1
#define SPQR_CMPQ_E_BAD_FIELD 2
#define SPQR_CMPQ_E_BAD_OUTLIERS 3
#define SPQR_CMPQ_E_BAD_PERMUTATION 4
#define SPQR_CMPQ_E_NONFINITE 5

typedef struct spqr_cmpq_sections {
  const uint32_t *codes;      /* section `codes`: the runs' packed streams                   */
  const void *perm;           /* section `perm` (u16 when n <= 65536, else u32)               */
  const uint32_t *oindex;     /* section `outlier_index` [ceil(m/16) + 1] or NULL             */
  const uint32_t *oents;      /* section `outlier_entries` [E] or NULL                        */
  const uint16_t *tables;     /* section `tables`: f16 bits [T][L]                            */
  int64_t m, n;               /* dims[0], dims[1]                                             */
  uint32_t width_counts[8];   /* params: c_1 .. c_8                                           */
  int64_t table_rows;         /* params: R                                                    */
  int64_t outlier_entries;    /* params: E (0: no outlier sections)                           */
} spqr_cmpq_sections;

typedef struct spqr_cmpq_sizes { /* elements of each array (spqr_cmpq_layout_sizes)          */
  int64_t nruns;              /* runs: i64 [nruns][8]                                         */
  int64_t codes_words;        /* codes: u32                                                   */
  int64_t table_blocks, Lp;   /* T, padded entries per block                                  */
  int64_t table_entries;      /* tables: u16 [T * Lp]                                         */
  int64_t np;                 /* pcol: u32 [np] (padded columns); perm, inv_perm: u32 [n]     */
  int64_t orows_words;        /* orows: u32 [m + 1], or 0 without outliers                   */
  int64_t outliers;           /* ocol, ocolp u32, oval u16, ocorr f32: [outliers] each        */
  int64_t file_code_words, file_table_entries; /* the file's: codes words, L (per block)     */
} spqr_cmpq_sizes;

/* Sizes of the chunk-layout arrays; walks the outlier stream once.  SPQR_CMPQ_OK or E_LIMIT,
 * E_BAD_FIELD, E_BAD_OUTLIERS. */
int spqr_cmpq_layout_sizes(const spqr_cmpq_sections *s, spqr_cmpq_sizes *z);

/* Fills the chunk-layout arrays (sizes from spqr_cmpq_layout_sizes; the outlier arrays may be
 * NULL when z->outliers is 0).  SPQR_CMPQ_OK, or E_BAD_PERMUTATION, E_NONFINITE,
 * E_BAD_OUTLIERS (the arrays are then partly written: do not use them). */
int spqr_cmpq_repack(const spqr_cmpq_sections *s, const spqr_cmpq_sizes *z, int64_t *runs,
                     uint32_t *codes, uint16_t *tables, uint32_t *pcol, uint32_t *perm,
                     uint32_t *inv_perm, uint32_t *orows, uint32_t *ocol, uint32_t *ocolp,
                     uint16_t *oval, float *ocorr);

/* The tile table of spqr_cmpq_mm_nb{nb} (nb = 1: also of spqr_cmpq_mv1_b*;
 * cmpq_layout.tiles(layout, nb, min_tiles)): writes i64 [ntiles][8] to `tiles` (NULL: count
 * only) and the dynamic shared memory in bytes to *smem (may be NULL); returns ntiles.  runs:
 * the layout's (host memory).  spqr_cmpq_matmul builds its tables itself (spqr_cmpq_plan.h,
 * whose spqr_cmpq_plan_slice / spqr_cmpq_tile_at also give the tensor-core tiles): this is for
 * launching the kernels yourself. */
int64_t spqr_cmpq_tiles(const int64_t *runs, int64_t nruns, int64_t m, int nb, int64_t min_tiles,
                        int64_t *tiles, int64_t *smem);

typedef struct spqr_cmpq_tensor { /* the chunk layout on the device (outliers NULL without) */
  const int64_t *runs;        /* i64 [nruns][8], device                                       */
  const int64_t *runs_host;   /* the same, host memory (read by the launchers on each call)   */
  const uint32_t *codes;
  const uint16_t *tables;
  const uint32_t *pcol, *perm, *inv_perm;
  const uint32_t *orows, *ocol, *ocolp;
  const uint16_t *oval;
  const float *ocorr;
  int64_t m, n, table_rows, Lp, np, nruns;
} spqr_cmpq_tensor;

/* Bytes of workspace spqr_cmpq_matmul needs for `batch` input rows on the current device, for
 * any in_dtype (the larger of the f16 plan and the f32 / bf16 plan): the tile table, x' (and
 * for the tensor-core path x' as f16 in fragment order) and the partial sums of the largest
 * slice of 16 rows; 16-byte aligned pieces (pass a 16-byte aligned workspace). */
size_t spqr_cmpq_workspace_bytes(const spqr_cmpq_tensor *t, int batch);

/* Y[b][:] = W X[b][:] for b < batch, the Python layer's default plan (GpuCmpqTensor.matmul_into
 * with no SPQR_GPU_PLAN override; the override is not read here), per slice of up to 16 rows on
 * `stream` with no synchronisation: batch 1 -> spqr_cmpq_prepare_x, spqr_cmpq_mv1_b{B} (one
 * launch per width present); 2-16 with f16 x and table_rows % 16 == 0 -> spqr_cmpq_prepare_xf,
 * spqr_cmpq_tc_b{B}_nt{ceil(rows/8)} (one launch per width); otherwise (f32 / bf16 x, other
 * table_rows) the first design, spqr_cmpq_prepare_x, spqr_cmpq_mm_nb{NB} (NB = 1,2,4,8,16 >=
 * slice rows); then spqr_cmpq_finish_nb{NB}.  Tiles, k-splits, shared memory and grids of
 * spqr_cmpq_plan.h (spqr_cmpq_plan_slice, the twin of _kernels.cmpq_slice / cmpq_launches; the
 * tile table is built in the workspace by a small kernel).  X rows of ldx elements in
 * in_dtype, Y rows of ldy elements in out_dtype (0 f32, 1 f16, 2 bf16).  Same kernels, tiles
 * and splits as GpuCmpqTensor.matmul_into on the same device without SPQR_GPU_PLAN overrides,
 * so the same bits, except from batch 52 (_kernels.CMPQ_DENSE_FROM) with f16 x, where the
 * Python layer dequantizes and calls cuBLAS (_kernels.cmpq_dense; this launcher links no
 * cuBLAS and keeps slicing: for
 * prefill-sized batches, spqr_cmpq_dequantize + your GEMM is faster).  Returns the launch
 * error as an int (cudaError_t); cudaErrorInvalidValue for a bad dtype or runs table.
 * Status: ran on an H100 (2026-12-07), bit for bit with the Python layer on every case of
 * tests/test_gpu_cmpq_c.py (mv1, tc and mm slices, batch 1-40, three dtypes). */
int spqr_cmpq_matmul(const spqr_cmpq_tensor *t, const void *x, int64_t ldx, int in_dtype,
                     void *y, int64_t ldy, int out_dtype, int batch, void *workspace,
                     void *stream);

/* W (m x n, original column order) into out (rows of ldo elements, out_dtype), bit-exact with
 * SPEC section 7: spqr_cmpq_dequant_* then, with outliers, spqr_cmpq_dequant_outliers_*. */
int spqr_cmpq_dequantize(const spqr_cmpq_tensor *t, void *out, int64_t ldo, int out_dtype,
                         void *stream);

#ifdef __cplusplus
}
#endif

#endif /* SPQR_GPU_H */
