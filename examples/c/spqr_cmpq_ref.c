/* spqr_cmpq_ref.c -- see spqr_cmpq_ref.h.  C99, no dependencies; build it without
 * floating-point contraction (-ffp-contract=off) like the other host C files. */
#include "spqr_cmpq_ref.h"

#include <string.h>

uint32_t spqr_f16_to_f32_bits(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu, f = h & 0x3FFu;
  if (e == 0x1F) return sign | 0x7F800000u | (f << 13); /* not reached: the reader refuses */
  if (e == 0) {
    if (f == 0) return sign;
    /* subnormal f * 2^-24: normalise to 1.f' * 2^(-14 - shift) */
    int shift = 0;
    while (!(f & 0x400u)) f <<= 1, ++shift;
    return sign | ((uint32_t)(113 - shift) << 23) | ((f & 0x3FFu) << 13);
  }
  return sign | ((e + 112) << 23) | (f << 13); /* rebias 15 -> 127 */
}

uint16_t spqr_f32_to_bf16_bits(uint32_t f) {
  return (uint16_t)((f + 0x7FFFu + ((f >> 16) & 1u)) >> 16); /* nearest-even, finite f */
}

double spqr_value_f64(const void *base, int64_t index, int dtype) {
  uint32_t bits;
  float v;
  if (dtype == 0)
    bits = ((const uint32_t *)base)[index];
  else if (dtype == 1)
    bits = spqr_f16_to_f32_bits(((const uint16_t *)base)[index]);
  else
    bits = (uint32_t)((const uint16_t *)base)[index] << 16;
  memcpy(&v, &bits, sizeof v);
  return (double)v;
}

void spqr_checksum(const void *v, int64_t count, int dtype, uint64_t *fnv1a, double *sum) {
  const unsigned char *bytes = (const unsigned char *)v;
  const int64_t nbytes = count * (dtype == 0 ? 4 : 2);
  uint64_t h = 1469598103934665603ull;
  double s = 0;
  for (int64_t k = 0; k < nbytes; ++k) h = (h ^ bytes[k]) * 1099511628211ull;
  for (int64_t k = 0; k < count; ++k) s += spqr_value_f64(v, k, dtype);
  *fnv1a = h;
  *sum = s;
}

/* W element `idx` := the f16 value h, in out_dtype */
static void put(void *w, int64_t idx, uint16_t h, int out_dtype) {
  if (out_dtype == 1)
    ((uint16_t *)w)[idx] = h;
  else if (out_dtype == 0)
    ((uint32_t *)w)[idx] = spqr_f16_to_f32_bits(h);
  else
    ((uint16_t *)w)[idx] = spqr_f32_to_bf16_bits(spqr_f16_to_f32_bits(h));
}

static uint32_t perm_at(const spqr_host_cmpq *t, int64_t j) {
  return t->n <= 65536 ? ((const uint16_t *)t->perm)[j] : ((const uint32_t *)t->perm)[j];
}

int spqr_cmpq_decode(const spqr_host_cmpq *t, int out_dtype, void *w) {
  if (out_dtype < 0 || out_dtype > 2) return -1;
  const int64_t m = t->m, n = t->n, R = t->table_rows, L = t->table_entries;
  /* C-12.3 / C-12.5 / C-12.7: run by run (width b, stored columns start .. start + c - 1) */
  int64_t start = 0, word = 0, tab = 0;
  for (int b = 1; b <= 8; ++b) {
    const int64_t c = t->width_counts[b - 1];
    if (!c) continue;
    const uint32_t *src = t->codes + word, mask = (1u << b) - 1u;
    for (int64_t i = 0; i < m; ++i) {
      const uint16_t *tb = t->tables + (R ? i / R : 0) * L + tab; /* row i's table block */
      for (int64_t jl = 0; jl < c; ++jl) {
        const int64_t bit = (i * c + jl) * b, wi = bit >> 5;
        const int sh = (int)(bit & 31);
        uint32_t v = src[wi] >> sh;
        if (sh + b > 32) v |= src[wi + 1] << (32 - sh); /* an element across two words */
        put(w, i * n + perm_at(t, start + jl), tb[(jl << b) + (v & mask)], out_dtype);
      }
    }
    start += c;
    word += (m * c * b + 31) / 32;
    tab += c << b;
  }
  /* outliers replace their weights (C-6.2, C-7.3): cell p of block k is row 16k + p / n,
   * stored column p % n */
  if (t->outlier_entries > 0) {
    const int64_t nb = (m + 15) / 16;
    for (int64_t k = 0; k < nb; ++k) {
      int64_t p = -1;
      for (uint32_t e = t->oindex[k]; e < t->oindex[k + 1]; ++e) {
        const uint32_t ent = t->oents[e];
        p += ent & 0xFFFFu;
        if ((ent >> 16) == 0xFFFFu) continue; /* skip */
        const int64_t row = 16 * k + p / n, col = p % n;
        if (row < m) put(w, row * n + perm_at(t, col), (uint16_t)(ent >> 16), out_dtype);
      }
    }
  }
  return 0;
}

void spqr_reference_matmul(const float *w32, int64_t m, int64_t n, const double *x, int batch,
                           double *ref, double *tol) {
  for (int b = 0; b < batch; ++b)
    for (int64_t i = 0; i < m; ++i) {
      const float *wr = w32 + i * n;
      const double *xb = x + (int64_t)b * n;
      double s = 0, a = 0;
      for (int64_t j = 0; j < n; ++j) {
        const double p = (double)wr[j] * xb[j];
        s += p;
        a += p < 0 ? -p : p;
      }
      ref[(int64_t)b * m + i] = s;
      tol[(int64_t)b * m + i] = a * (1.0 / 512) + 1.0 / 16777216;
    }
}
