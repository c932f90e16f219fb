/* spqr_outlier_walk.h -- the one walk of a file's outlier stream (SPEC C-6.1, C-6.2) shared by
 * the host repacks (spqr_row_layout.c for bilevel, spqr_cmpq_layout.c for channel_mixed).
 * C99, no CUDA, no allocation; include after spqr_gpu.h (SPQR_OUTLIER_BLOCK_ROWS).
 */
#ifndef SPQR_OUTLIER_WALK_H
#define SPQR_OUTLIER_WALK_H

#include <stdint.h>

/* Called once per outlier, in (row, column) order: its row, its stored column, its f16 bits. */
typedef void (*spqr_outlier_fn)(void *ctx, int64_t row, int64_t col, uint32_t value);

/* Walks the stream of an m x n tensor: `index` (ceil(m / 16) + 1 block offsets) and the `E`
 * entries of `entries`.  Checks every rule the repacks rely on: index[0] == 0, index[blocks] ==
 * E, the offsets non-decreasing and within E (so no entry past E is ever read), no zero delta,
 * skip entries (value 0xFFFF) only with delta 65535 and never last in a block, every cell inside
 * its block, every value finite.  Calls fn (when not NULL) per outlier.  Returns the number of
 * outliers, or -1 when a rule is broken (fn may have been called for earlier outliers). */
static int64_t spqr_walk_outliers(int64_t m, int64_t n, int64_t E, const uint32_t *index,
                                  const uint32_t *entries, spqr_outlier_fn fn, void *ctx) {
  const int64_t blocks = (m + SPQR_OUTLIER_BLOCK_ROWS - 1) / SPQR_OUTLIER_BLOCK_ROWS;
  if (index[0] != 0 || (int64_t)index[blocks] != E) return -1;
  int64_t count = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    if (index[b + 1] < index[b] || (int64_t)index[b + 1] > E) return -1;
    const int64_t r0 = b * SPQR_OUTLIER_BLOCK_ROWS;
    const int64_t nrows = m - r0 < SPQR_OUTLIER_BLOCK_ROWS ? m - r0 : SPQR_OUTLIER_BLOCK_ROWS;
    int64_t cell = -1;
    for (uint32_t e = index[b]; e < index[b + 1]; ++e) {
      const uint32_t d = entries[e] & 0xFFFFu, v = entries[e] >> 16;
      if (d == 0) return -1;
      cell += d;
      if (v == 0xFFFFu) {
        if (d != 0xFFFFu || e + 1 == index[b + 1]) return -1;
        continue;
      }
      if (cell >= nrows * n || (v & 0x7C00u) == 0x7C00u) return -1;
      if (fn) fn(ctx, r0 + cell / n, cell % n, v);
      ++count;
    }
  }
  return count;
}

#endif /* SPQR_OUTLIER_WALK_H */
