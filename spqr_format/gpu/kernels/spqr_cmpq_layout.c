/* spqr_cmpq_layout.c -- the CMPQ chunk layout (spqr_gpu.h, "channel_mixed") from the file's
 * sections of one channel_mixed tensor, and the tile table of spqr_cmpq_mm_nb* / spqr_cmpq_mv1_b*.
 *
 * C99, no CUDA, no allocation: the twin of spqr_format/codec/cmpq_layout.py (to_cmpq_layout,
 * tiles with tc=False), bit for bit (tests/test_cmpq_layout_c.py).  Compile without
 * floating-point contraction (-ffp-contract=off), as spqr_tile_layout.c.  The kernels trust the
 * layout, so the repack validates what it reads first (spqr_gpu.h says what) and returns a
 * SPQR_CMPQ_E_* code instead of writing a layout the kernels could read out of bounds with.
 */
#include <stdint.h>
#include <string.h>

#include "spqr_cmpq_plan.h"
#include "spqr_gpu.h"
#include "spqr_outlier_walk.h"

#define NO_COLUMN 0xFFFFFFFFu

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

static double f16_to_f64(uint16_t h) {
  const int e = (h >> 10) & 0x1F, f = h & 0x3FF;
  double v;
  if (e == 0)
    v = (double)f / (double)(1 << 24); /* subnormal: f * 2^-24 */
  else
    v = (double)(f | 0x400) * ((e >= 25) ? (double)(1 << (e - 25)) : 1.0 / (double)(1 << (25 - e)));
  return (h & 0x8000) ? -v : v;
}

/* element `idx` of `bits` bits of a packed stream of `words` u32 words (SPEC C-5.2) */
static uint32_t field(const uint32_t *src, int64_t words, int64_t idx, int bits) {
  const int64_t pos = idx * bits, w = pos >> 5;
  const int sh = (int)(pos & 31);
  uint64_t v = src[w];
  if (w + 1 < words) v |= (uint64_t)src[w + 1] << 32;
  return (uint32_t)((v >> sh) & ((1u << bits) - 1u));
}

static uint32_t perm_at(const spqr_cmpq_sections *s, int64_t j) {
  return s->n <= SPQR_PERM_U16_MAX_N ? ((const uint16_t *)s->perm)[j]
                                     : ((const uint32_t *)s->perm)[j];
}

/* The outliers of the file's stream (no outlier_count in channel_mixed params, C-12.1) as
 * per-row lists: orows[i] .. orows[i + 1] - 1 index ocol (stored column) and oval (f16 bits). */
typedef struct emitter {
  uint32_t *orows, *ocol;
  uint16_t *oval;
  int64_t row, out; /* the last row seen, the outliers emitted */
} emitter;

static void emit(void *ctx, int64_t row, int64_t col, uint32_t value) {
  emitter *em = (emitter *)ctx;
  for (int64_t k = em->row + 1; k <= row; ++k) em->orows[k] = (uint32_t)em->out;
  em->ocol[em->out] = (uint32_t)col;
  em->oval[em->out] = (uint16_t)value;
  em->row = row;
  ++em->out;
}

/* The outlier count (em NULL: only counted), or -1 when the stream breaks a rule. */
static int64_t walk_outliers(const spqr_cmpq_sections *s, emitter *em) {
  if (em) em->orows[0] = 0;
  const int64_t k = spqr_walk_outliers(s->m, s->n, s->outlier_entries, s->oindex, s->oents,
                                       em ? emit : NULL, em);
  if (em && k >= 0)
    for (int64_t r = em->row + 1; r <= s->m; ++r) em->orows[r] = (uint32_t)em->out;
  return k;
}

int spqr_cmpq_layout_sizes(const spqr_cmpq_sections *s, spqr_cmpq_sizes *z) {
  const int64_t m = s->m, n = s->n;
  memset(z, 0, sizeof(*z));
  if (m < 1 || n < 1 || m >= ((int64_t)1 << 31) || n >= ((int64_t)1 << 31))
    return SPQR_CMPQ_E_LIMIT;
  if (s->table_rows < 0 || s->table_rows > ((int64_t)1 << 24)) return SPQR_CMPQ_E_BAD_FIELD;
  int64_t total = 0, words = 0, L = 0, nruns = 0, Lp = 0, np_ = 0;
  for (int b = 1; b <= 8; ++b) {
    const int64_t c = s->width_counts[b - 1];
    total += c;
    if (!c) continue;
    const int64_t k = cdiv(c, SPQR_CMPQ_CHUNK);
    ++nruns;
    words += cdiv(m * c * b, 32);
    L += c << b;
    z->codes_words += k * b * m;
    Lp += (k * SPQR_CMPQ_CHUNK) << b;
    np_ += k * SPQR_CMPQ_CHUNK;
  }
  if (total != n) return SPQR_CMPQ_E_BAD_FIELD;
  z->nruns = nruns;
  z->file_code_words = words;
  z->file_table_entries = L;
  z->table_blocks = s->table_rows ? cdiv(m, s->table_rows) : 1;
  z->Lp = Lp;
  z->table_entries = z->table_blocks * Lp;
  z->np = np_;
  if (s->outlier_entries > 0) {
    if (!s->oindex || !s->oents) return SPQR_CMPQ_E_BAD_OUTLIERS;
    const int64_t k = walk_outliers(s, NULL);
    if (k < 0) return SPQR_CMPQ_E_BAD_OUTLIERS;
    z->outliers = k;
    z->orows_words = k > 0 ? m + 1 : 0;
  }
  return SPQR_CMPQ_OK;
}

int spqr_cmpq_repack(const spqr_cmpq_sections *s, const spqr_cmpq_sizes *z, int64_t *runs,
                     uint32_t *codes, uint16_t *tables, uint32_t *pcol, uint32_t *perm,
                     uint32_t *inv_perm, uint32_t *orows, uint32_t *ocol, uint32_t *ocolp,
                     uint16_t *oval, float *ocorr) {
  const int64_t m = s->m, n = s->n, T = z->table_blocks, L = z->file_table_entries;
  const int64_t R = s->table_rows, Lp = z->Lp;
  /* the permutation (SPEC C-12.8, E_BAD_PERMUTATION): inv_perm doubles as the seen-set */
  for (int64_t j = 0; j < n; ++j) inv_perm[j] = NO_COLUMN;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t p = perm_at(s, j);
    if ((int64_t)p >= n || inv_perm[p] != NO_COLUMN) return SPQR_CMPQ_E_BAD_PERMUTATION;
    inv_perm[p] = (uint32_t)j;
    perm[j] = p;
  }
  /* finite tables (E_NONFINITE) */
  for (int64_t e = 0; e < T * L; ++e)
    if ((s->tables[e] & 0x7C00u) == 0x7C00u) return SPQR_CMPQ_E_NONFINITE;
  /* runs, codes, tables, pcol */
  int64_t r = 0, start = 0, word = 0, ftab = 0, code_off = 0, tab_off = 0, pad0 = 0;
  for (int b = 1; b <= 8; ++b) {
    const int64_t c = s->width_counts[b - 1];
    if (!c) continue;
    const int64_t k = cdiv(c, SPQR_CMPQ_CHUNK), fwords = cdiv(m * c * b, 32);
    int64_t *rd = runs + r * SPQR_CMPQ_RUN_FIELDS;
    rd[0] = start, rd[1] = c, rd[2] = b, rd[3] = code_off, rd[4] = tab_off, rd[5] = pad0;
    rd[6] = k, rd[7] = 0;
    const uint32_t *src = s->codes + word;
    uint32_t *dst = codes + code_off;
    memset(dst, 0, (size_t)(k * b * m) * sizeof(uint32_t));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < c; ++j) {
        const uint32_t q = field(src, fwords, i * c + j, b);
        const int64_t bit = (j % SPQR_CMPQ_CHUNK) * b, w = bit >> 5, sh = bit & 31;
        uint32_t *cw = dst + ((j / SPQR_CMPQ_CHUNK) * b + w) * m + i;
        cw[0] |= q << sh;
        if (sh + b > 32) cw[m] |= q >> (32 - sh);
      }
    const int64_t ents = (k * SPQR_CMPQ_CHUNK) << b;
    for (int64_t t = 0; t < T; ++t) {
      uint16_t *td = tables + t * Lp + tab_off;
      memcpy(td, s->tables + t * L + ftab, (size_t)(c << b) * sizeof(uint16_t));
      memset(td + (c << b), 0, (size_t)(ents - (c << b)) * sizeof(uint16_t));
    }
    for (int64_t j = 0; j < k * SPQR_CMPQ_CHUNK; ++j)
      pcol[pad0 + j] = j < c ? perm[start + j] : NO_COLUMN;
    ++r;
    start += c;
    word += fwords;
    ftab += c << b;
    code_off += k * b * m;
    tab_off += ents;
    pad0 += k * SPQR_CMPQ_CHUNK;
  }
  if (!z->outliers) return SPQR_CMPQ_OK;
  /* outliers: per-row lists, then at each the code nearest to the value and the correction */
  emitter em = {orows, ocol, oval, -1, 0};
  if (walk_outliers(s, &em) != z->outliers) return SPQR_CMPQ_E_BAD_OUTLIERS;
  for (int64_t i = 0; i < m; ++i)
    for (uint32_t e = orows[i]; e < orows[i + 1]; ++e) {
      const int64_t col = ocol[e];
      int64_t ri = z->nruns - 1;
      while (ri > 0 && col < runs[ri * SPQR_CMPQ_RUN_FIELDS]) --ri;
      const int64_t *rd = runs + ri * SPQR_CMPQ_RUN_FIELDS;
      const int b = (int)rd[2];
      const int64_t jl = col - rd[0], tb = R ? i / R : 0;
      const uint16_t *ent = tables + tb * Lp + rd[4] + (jl << b);
      const double ov = f16_to_f64(oval[e]);
      int q = 0;
      double best = 0;
      for (int v = 0; v < (1 << b); ++v) {
        const double d = f16_to_f64(ent[v]) - ov, a = d < 0 ? -d : d;
        if (v == 0 || a < best) best = a, q = v;
      }
      const int64_t bit = (jl % SPQR_CMPQ_CHUNK) * b, w = bit >> 5, sh = bit & 31;
      uint32_t *cw = codes + rd[3] + ((jl / SPQR_CMPQ_CHUNK) * b + w) * m + i;
      const uint64_t mask = (1ull << b) - 1;
      cw[0] = (uint32_t)((cw[0] & ~(mask << sh)) | ((uint64_t)q << sh));
      if (sh + b > 32)
        cw[m] = (uint32_t)((cw[m] & ~(mask >> (32 - sh))) | ((uint32_t)q >> (32 - sh)));
      ocolp[e] = (uint32_t)(rd[5] + jl);
      /* f16 - f16 is exact in f64; one rounding to f32, as cmpq_layout.py */
      ocorr[e] = (float)(ov - f16_to_f64(ent[q]));
    }
  return SPQR_CMPQ_OK;
}

int64_t spqr_cmpq_tiles(const int64_t *runs, int64_t nruns, int64_t m, int nb, int64_t min_tiles,
                        int64_t *tiles, int64_t *smem) {
  const int64_t cap = spqr_cmpq_tile_cap(runs, nruns, min_tiles);
  int64_t sm = 4;
  const int64_t count = spqr_cmpq_tile_count(runs, nruns, nb, 0, cap, &sm);
  if (tiles)
    for (int64_t t = 0; t < count; ++t)
      if (!spqr_cmpq_tile_at(runs, nruns, m, nb, 0, cap, t, tiles + t * SPQR_CMPQ_RUN_FIELDS))
        return -1; /* cannot happen: the count and the rows come from the same plan */
  if (smem) *smem = sm;
  return count;
}
