/* spqr_row_layout.c -- the row layout (spqr_gpu.h, "Row layout") from the file's sections.
 *
 * C99, no CUDA, no allocation: the twin of spqr_format/codec/row_layout.py, bit for bit.  A
 * .spqr file packs a bilevel tensor densely (SPEC C-5.2: one bit stream per section, u16
 * permutation entries when n <= 65536, outliers indexed per block of 16 rows); the kernels of
 * spqr_kernels.cu / spqr_tc.cu read every row from a 16-byte boundary and find a row's
 * outliers through per-row offsets.  This file converts the first into the second on the host.
 */
#include <stdint.h>
#include <string.h>

#include "spqr_gpu.h"
#include "spqr_outlier_walk.h"

static int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* `count` elements of `bits` bits starting at element `first` of a packed stream of `words`
 * words, appended LSB first to a zero-initialised padded row. */
static void copy_elements(const uint32_t *src, int64_t words, int64_t first, int64_t count,
                          int bits, uint32_t *dst) {
  const uint64_t mask = (1ull << bits) - 1;
  int64_t pos = first * bits;
  for (int64_t e = 0; e < count; ++e, pos += bits) {
    const int64_t w = pos >> 5;
    const int sh = (int)(pos & 31);
    uint64_t x = src[w];
    if (w + 1 < words) x |= (uint64_t)src[w + 1] << 32;
    const uint32_t v = (uint32_t)((x >> sh) & mask);
    const int64_t dpos = e * bits;
    dst[dpos >> 5] |= v << (dpos & 31);
    if ((dpos & 31) + bits > 32) dst[(dpos >> 5) + 1] |= v >> (32 - (dpos & 31));
  }
}

static void stream_to_rows(const uint32_t *src, int64_t rows, int64_t count, int bits,
                           int64_t row_words, uint32_t *dst) {
  const int64_t words = ceil_div64(rows * count * bits, 32);
  memset(dst, 0, (size_t)(rows * row_words) * sizeof(uint32_t));
  if ((count * bits) % 32 == 0) { /* every real layer width: rows are whole words */
    const int64_t per_row = count * bits / 32;
    for (int64_t i = 0; i < rows; ++i)
      memcpy(dst + i * row_words, src + i * per_row, (size_t)per_row * sizeof(uint32_t));
    return;
  }
  for (int64_t i = 0; i < rows; ++i)
    copy_elements(src, words, i * count, count, bits, dst + i * row_words);
}

/* The per-row outlier stream being written (orows/oents NULL: only counted). */
typedef struct row_stream {
  uint32_t *orows, *oents;
  int64_t out, row, prev; /* entries so far, the current row, its last column */
} row_stream;

/* One outlier into the per-row stream: a running column restarting at -1 in each row, skip
 * entries for gaps > 65535. */
static void emit_row_entry(void *ctx, int64_t row, int64_t col, uint32_t value) {
  row_stream *rs = (row_stream *)ctx;
  if (row != rs->row) { /* close rows row+1 .. i */
    for (int64_t k = rs->row + 1; k <= row; ++k)
      if (rs->orows) rs->orows[k] = (uint32_t)rs->out;
    rs->row = row;
    rs->prev = -1;
  }
  int64_t gap = col - rs->prev;
  for (; gap > 0xFFFF; gap -= 0xFFFF, ++rs->out)
    if (rs->oents) rs->oents[rs->out] = 0xFFFFFFFFu;
  if (rs->oents) rs->oents[rs->out] = (value << 16) | (uint32_t)gap;
  ++rs->out;
  rs->prev = col;
}

/* The file's outlier stream (SPEC C-6.1, C-6.2, spqr_walk_outliers) as the per-row stream.
 * Returns the per-row entry count, or -1 when the stream breaks C-6.1/C-6.2 or does not hold
 * outlier_count outliers. */
static int64_t outliers_to_rows(const spqr_bilevel_sections *s, uint32_t *orows,
                                uint32_t *oents) {
  row_stream rs = {orows, oents, 0, -1, -1};
  if (orows) orows[0] = 0;
  const int64_t nreal = spqr_walk_outliers(s->m, s->n, s->outlier_entries, s->oindex, s->oents,
                                           emit_row_entry, &rs);
  if (nreal < 0 || nreal != (int64_t)s->outlier_count) return -1;
  if (orows)
    for (int64_t k = rs.row + 1; k <= s->m; ++k) orows[k] = (uint32_t)rs.out;
  return rs.out;
}

int spqr_row_layout_sizes(const spqr_bilevel_sections *s, spqr_row_sizes *z) {
  const int64_t m = s->m, n = s->n;
  const int64_t G = ceil_div64(n, s->group_size);
  memset(z, 0, sizeof(*z));
  z->code_row_words = ceil_div64(n, 128) * 4 * s->bits;
  z->stats_row_words = s->stats_bits ? ceil_div64(2 * G, 128) * 4 * s->stats_bits : 0;
  z->codes_words = m * z->code_row_words;
  z->stats_words = s->stats_bits ? m * z->stats_row_words : m * G;
  z->perm_words = s->perm ? n : 0;
  if (s->oindex && s->outlier_entries > 0) {
    const int64_t e = outliers_to_rows(s, NULL, NULL);
    if (e < 0 || e > 0xFFFFFFFFll) return 0;
    z->orows_words = m + 1;
    z->oents_words = e;
  }
  return 1;
}

int spqr_row_repack(const spqr_bilevel_sections *s, const spqr_row_sizes *z, uint32_t *codes,
                    uint32_t *stats, uint32_t *perm, uint32_t *orows, uint32_t *oents) {
  const int64_t m = s->m, n = s->n;
  const int64_t G = ceil_div64(n, s->group_size);
  stream_to_rows(s->codes, m, n, s->bits, z->code_row_words, codes);
  if (s->stats_bits)
    stream_to_rows((const uint32_t *)s->stats, m, 2 * G, s->stats_bits, z->stats_row_words,
                   stats);
  else
    memcpy(stats, s->stats, (size_t)(m * G) * sizeof(uint32_t));
  if (s->perm) {
    if (n <= SPQR_PERM_U16_MAX_N) {
      const uint16_t *p = (const uint16_t *)s->perm;
      for (int64_t j = 0; j < n; ++j) perm[j] = p[j];
    } else {
      memcpy(perm, s->perm, (size_t)n * sizeof(uint32_t));
    }
  }
  if (z->orows_words && outliers_to_rows(s, orows, oents) != z->oents_words) return 0;
  return 1;
}
