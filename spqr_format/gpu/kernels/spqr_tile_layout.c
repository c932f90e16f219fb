/* spqr_tile_layout.c -- host-side repack of a `bilevel` tensor into the GPU tile layout that
 * spqr_tc.cu reads (C99, no CUDA, no allocation).  The same arrays, bit for bit, as
 * spqr_format/gpu/tile_layout.py (whose module docstring defines the layout; spqr_gpu.h
 * declares these functions).  Compile without floating-point contraction
 * (-ffp-contract=off): the outlier corrections use SPEC section 7's f32 arithmetic.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "spqr_gpu.h"

static int pair_slots(int bits) {
  int n1 = 10 / bits;
  return n1 + (16 - n1 * bits) / bits;
}

int spqr_tile_dims_of(int64_t m, int64_t n, int bits, int stats_bits, int group_size,
                      int stats_group_size, spqr_tile_dims *d) {
  if (bits < 2 || bits > 4 || stats_bits < 1 || stats_bits > 4 || group_size != 16) return 0;
  if (m < 1 || n < 1 || m >= ((int64_t)1 << 30) || n >= ((int64_t)1 << 24)) return 0;
  if (stats_group_size < 1 || (stats_group_size % 16 != 0 && stats_group_size < m)) return 0;
  int ppw = pair_slots(bits);
  int r = 1;
  while ((16 * r) % (4 * ppw)) ++r;
  int64_t groups = (n + 15) / 16;
  int swl = (2 * r + pair_slots(stats_bits) - 1) / pair_slots(stats_bits);
  d->R = r;
  d->MPC = 4 * r;
  d->RB = (m + 15) / 16;
  d->NC = (groups + d->MPC - 1) / d->MPC;
  d->KT = d->NC * d->MPC;
  d->SLABS = 4 * r / ppw;
  d->SWL = swl == 1 ? 1 : swl == 2 ? 2 : 4;
  d->M16 = 16 * d->RB;
  return 1;
}

/* Element `idx` of `nbits` bits of an LSB-first packed row of `words` u32 words. */
static uint32_t field(const uint32_t *row, int64_t words, int64_t idx, int nbits) {
  int64_t pos = idx * nbits;
  int64_t w = pos >> 5;
  int sh = (int)(pos & 31);
  uint64_t v = row[w];
  if (w + 1 < words) v |= (uint64_t)row[w + 1] << 32;
  return (uint32_t)((v >> sh) & ((1u << nbits) - 1u));
}

static float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, f = h & 0x3FF, x;
  if (e == 0) {
    if (f == 0) {
      x = sign;
    } else { /* subnormal: normalise */
      e = 127 - 15 + 1;
      while (!(f & 0x400)) {
        f <<= 1;
        --e;
      }
      x = sign | (e << 23) | ((f & 0x3FF) << 13);
    }
  } else if (e == 31) {
    x = sign | 0x7F800000u | (f << 13);
  } else {
    x = sign | ((e + 127 - 15) << 23) | (f << 13);
  }
  float out;
  memcpy(&out, &x, 4);
  return out;
}

/* f32 -> f16, round to nearest even, overflow to infinity (IEEE 754). */
static uint16_t f32_to_f16(float v) {
  uint32_t x;
  memcpy(&x, &v, 4);
  uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return (uint16_t)(sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* >= 65520 */
  if (a <= 0x33000000u) return (uint16_t)sign;              /* <= 2^-25 */
  int e = (int)(a >> 23) - 127;
  uint32_t mant = (a & 0x7FFFFFu) | 0x800000u, q, rem, half;
  if (e < -14) { /* subnormal result, unit 2^-24 */
    int shift = -e - 1;
    q = mant >> shift;
    rem = mant & ((1u << shift) - 1u);
    half = 1u << (shift - 1);
  } else {
    q = ((uint32_t)(e + 15) << 10) | ((mant >> 13) & 0x3FFu);
    rem = mant & 0x1FFFu;
    half = 0x1000u;
  }
  if (rem > half || (rem == half && (q & 1u))) ++q; /* a carry may reach the exponent: right */
  return (uint16_t)(sign | q);
}

int spqr_tile_repack(const spqr_bilevel *t, uint32_t *tl_codes, uint32_t *tl_stats,
                     uint32_t *tl_stats2, uint32_t *tl_oents) {
  spqr_tile_dims d;
  if (!spqr_tile_dims_of(t->m, t->n, t->bits, t->stats_bits, t->group_size,
                         t->stats_group_size, &d))
    return 0;
  const int B = t->bits, SB = t->stats_bits, ppw = pair_slots(B), spw = pair_slots(SB);
  const int64_t m = t->m, n = t->n, G = (n + 15) / 16;
  const int64_t crw = ((n + 127) / 128) * 4 * B;        /* code_row_words */
  const int64_t srw = ((2 * G + 127) / 128) * 4 * SB;   /* stats_row_words */
  const int64_t S = t->stats_group_size, T = (m + S - 1) / S;

  /* the fragments are f16: refuse statistics that could overflow it (as tile_layout.py) */
  for (int64_t i = 0; i < T * G; ++i) {
    const uint16_t *rec = t->stats2 + i * 4;
    const double top = (double)((1 << SB) - 1), qmax = (double)((1 << B) - 1);
    const double smax = fabs(f16_to_f32(rec[1])) + fabs(f16_to_f32(rec[0])) * top;
    const double zmax = fabs(f16_to_f32(rec[3])) + fabs(f16_to_f32(rec[2])) * top;
    if (!(smax * (qmax + zmax) < SPQR_TILE_F16_SAFE && zmax < SPQR_TILE_F16_SAFE)) return 0;
  }

  /* codes [NC][RB][SLABS][32][4] (chunk-major) */
  for (int64_t c = 0; c < d.NC; ++c)
    for (int64_t rb = 0; rb < d.RB; ++rb)
      for (int64_t s = 0; s < d.SLABS; ++s)
        for (int lane = 0; lane < 32; ++lane)
          for (int k = 0; k < 4; ++k) {
            const int g = lane >> 2, tt = lane & 3;
            uint32_t word = 0;
            for (int i = 0; i < ppw; ++i) {
              /* word 4s + k, slot i: k-step mu = i * SLABS + s, register k (pair_position) */
              const int mu = i * (int)d.SLABS + (int)s;
              const int rho = mu / 4, u = mu % 4, r = k, h = r & 1, hi = r >> 1;
              const int64_t row = rb * 16 + 8 * h + g;
              const int64_t grp = c * d.MPC + 4 * rho + tt;
              for (int e = 0; e < 2; ++e) {
                const int64_t col = grp * 16 + 4 * u + 2 * hi + e;
                if (row < m && col < n)
                  word |= field(t->codes + row * crw, crw, col, B) << (i * B + 16 * e);
              }
            }
            tl_codes[(((c * d.RB + rb) * d.SLABS + s) * 32 + lane) * 4 + k] = word;
          }

  /* stats [NC][RB][32][SWL] */
  for (int64_t c = 0; c < d.NC; ++c)
    for (int64_t rb = 0; rb < d.RB; ++rb)
      for (int lane = 0; lane < 32; ++lane)
        for (int w = 0; w < d.SWL; ++w) {
          const int g = lane >> 2, tt = lane & 3;
          uint32_t word = 0;
          for (int i = 0; i < spw; ++i) {
            const int Q = w * spw + i;
            if (Q >= 2 * d.R) break;
            const int64_t row = rb * 16 + 8 * (Q % 2) + g;
            const int64_t grp = c * d.MPC + 4 * (Q / 2) + tt;
            if (row >= m || grp >= G) continue;
            const uint32_t *sr = t->stats + row * srw;
            word |= field(sr, srw, 2 * grp, SB) << (i * SB);
            word |= field(sr, srw, 2 * grp + 1, SB) << (i * SB + 16);
          }
          tl_stats[((c * d.RB + rb) * 32 + lane) * d.SWL + w] = word;
        }

  /* stats2 [NC][RB][MPC][2]: (sstep, -zstep), (sbase, -zbase) of group k = c * MPC + j */
  for (int64_t rb = 0; rb < d.RB; ++rb) {
    int64_t tile = (rb * 16) / S;
    if (tile > T - 1) tile = T - 1;
    for (int64_t k = 0; k < d.KT; ++k) {
      uint32_t w0 = 0, w1 = 0;
      if (k < G) {
        const uint16_t *rec = t->stats2 + (tile * G + k) * 4;
        w0 = rec[0] | ((uint32_t)(rec[2] ^ 0x8000u) << 16);
        w1 = rec[1] | ((uint32_t)(rec[3] ^ 0x8000u) << 16);
      }
      const int64_t at = ((k / d.MPC) * d.RB + rb) * d.MPC + k % d.MPC;
      tl_stats2[at * 2] = w0;
      tl_stats2[at * 2 + 1] = w1;
    }
  }

  /* outlier entries: values f16(o - w), w the exact dense value (SPEC C-7.1, C-7.2) */
  if (t->orows && t->oents && tl_oents) {
    for (int64_t row = 0; row < m; ++row) {
      int64_t col = -1;
      const int64_t tile = row / S;
      for (uint32_t e = t->orows[row]; e < t->orows[row + 1]; ++e) {
        const uint32_t ent = t->oents[e];
        col += ent & 0xFFFFu;
        tl_oents[e] = ent;
        if ((ent >> 16) == 0xFFFFu) continue;
        const int64_t grp = col / 16;
        const uint32_t *sr = t->stats + row * srw;
        const uint16_t *rec = t->stats2 + (tile * G + grp) * 4;
        const float qs = (float)field(sr, srw, 2 * grp, SB);
        const float qz = (float)field(sr, srw, 2 * grp + 1, SB);
        const float ps = f16_to_f32(rec[0]) * qs, pz = f16_to_f32(rec[2]) * qz;
        const float s = f16_to_f32(rec[1]) + ps, z = f16_to_f32(rec[3]) + pz;
        const float q = (float)field(t->codes + row * crw, crw, col, B);
        const float diff = q - z;
        const float w = s * diff;
        const float dv = f16_to_f32((uint16_t)(ent >> 16)) - w;
        if (!(fabsf(dv) < 60000.0f)) return 0; /* o - w must fit f16 */
        tl_oents[e] = (ent & 0xFFFFu) | ((uint32_t)f32_to_f16(dv) << 16);
      }
    }
  }
  return 1;
}
