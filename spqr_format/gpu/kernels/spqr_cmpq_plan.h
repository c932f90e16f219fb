/* spqr_cmpq_plan.h -- the launch plan of the channel_mixed (CMPQ) first design as plain C: the
 * batch columns of a slice, the column tiles of spqr_cmpq_mm_nb* and their k-splits.  Each
 * function mirrors the function of spqr_format/gpu/_kernels.py or codec/cmpq_layout.py named in
 * its comment (keep them in step).  spqr_cmpq_layout.c (spqr_cmpq_tiles, tested on the CPU
 * against cmpq_layout.tiles by tests/test_cmpq_layout_c.py) and spqr_cmpq_host.cu (which
 * builds the tile table on the device with the same spqr_cmpq_tile_at) both use it, so the C
 * launcher and the Python layer launch the same tiles (and give bit-identical results).
 * Under nvcc the functions are also device functions. */
#ifndef SPQR_CMPQ_PLAN_H
#define SPQR_CMPQ_PLAN_H

#include <stdint.h>

#ifdef __CUDACC__
#define SPQR_CMPQ_HD __host__ __device__
#else
#define SPQR_CMPQ_HD
#endif

#define SPQR_CMPQ_CHUNK 32            /* cmpq_layout.CHUNK */
#define SPQR_CMPQ_TILE_TABLE_CHUNKS 128 /* cmpq_layout.TILE_TABLE_CHUNKS */
#define SPQR_CMPQ_TILE_X_CHUNKS 64    /* cmpq_layout.TILE_X_CHUNKS */
#define SPQR_CMPQ_MM_ROWS 256         /* _kernels.CMPQ_ROWS (SPQR_CMPQ_ROWS of spqr_cmpq.cu) */
#define SPQR_CMPQ_BLOCKS_PER_SM 4     /* _kernels.CMPQ_BLOCKS_PER_SM (no override in C) */
#define SPQR_CMPQ_MAX_BATCH 16        /* _kernels.CMPQ_MAX_BATCH */
#define SPQR_CMPQ_DQ_ROWS 16          /* _kernels.CMPQ_DQ_ROWS */
#define SPQR_CMPQ_RUN_FIELDS 8        /* i64 fields of a runs / tiles row */

/* _kernels.cmpq_nb: batch columns of the kernels for a slice of `batch` <= 16 rows */
SPQR_CMPQ_HD static inline int spqr_cmpq_nb(int batch) {
  return batch <= 1 ? 1 : batch <= 2 ? 2 : batch <= 4 ? 4 : batch <= 8 ? 8 : 16;
}

/* cmpq_layout.tile_chunks: chunks of one column tile of spqr_cmpq_mm_nb{nb} for width b */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_tile_chunks(int bits, int nb) {
  const int64_t a = SPQR_CMPQ_TILE_TABLE_CHUNKS >> bits, x = SPQR_CMPQ_TILE_X_CHUNKS / nb;
  const int64_t c = a < x ? a : x;
  return c < 1 ? 1 : c;
}

/* _kernels.cmpq_target_tiles (rows = SPQR_CMPQ_MM_ROWS) */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_target_tiles(int64_t m, int sm_count) {
  const int64_t row_tiles = (m + SPQR_CMPQ_MM_ROWS - 1) / SPQR_CMPQ_MM_ROWS;
  const int64_t t = ((int64_t)SPQR_CMPQ_BLOCKS_PER_SM * sm_count + row_tiles - 1) / row_tiles;
  return t < 1 ? 1 : t;
}

/* _kernels.cmpq_splits: k-splits (grid.y) of spqr_cmpq_mm_* */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_splits(int64_t m, int64_t ntiles, int sm_count) {
  const int64_t t = spqr_cmpq_target_tiles(m, sm_count);
  const int64_t s = ntiles < t ? ntiles : t;
  return s < 1 ? 1 : s;
}

/* cmpq_layout.tiles: the chunk cap max(1, total chunks // max(1, min_tiles)) */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_tile_cap(const int64_t *runs, int64_t nruns,
                                                     int64_t min_tiles) {
  int64_t total = 0;
  for (int64_t r = 0; r < nruns; ++r) total += runs[r * SPQR_CMPQ_RUN_FIELDS + 6];
  const int64_t c = total / (min_tiles < 1 ? 1 : min_tiles);
  return c < 1 ? 1 : c;
}

/* cmpq_layout.tiles: row `t` of the tile table (bits, chunks, first code word, first table
 * entry, first padded column, 0, 0, 0) written to tile[0..7]; returns 0 when t is past the last
 * tile.  With tile NULL, nothing is written: the count of tiles is the first t giving 0. */
SPQR_CMPQ_HD static inline int spqr_cmpq_tile_at(const int64_t *runs, int64_t nruns, int64_t m,
                                                 int nb, int64_t cap, int64_t t, int64_t *tile) {
  for (int64_t r = 0; r < nruns; ++r) {
    const int64_t *rd = runs + r * SPQR_CMPQ_RUN_FIELDS;
    const int bits = (int)rd[2];
    const int64_t chunks = rd[6];
    int64_t step = spqr_cmpq_tile_chunks(bits, nb);
    if (cap < step) step = cap;
    const int64_t count = (chunks + step - 1) / step;
    if (t >= count) {
      t -= count;
      continue;
    }
    if (tile) {
      const int64_t k0 = t * step, left = chunks - k0;
      tile[0] = bits;
      tile[1] = left < step ? left : step;
      tile[2] = rd[3] + k0 * bits * m;
      tile[3] = rd[4] + ((k0 * SPQR_CMPQ_CHUNK) << bits);
      tile[4] = rd[5] + k0 * SPQR_CMPQ_CHUNK;
      tile[5] = tile[6] = tile[7] = 0;
    }
    return 1;
  }
  return 0;
}

/* cmpq_layout.tiles' shared memory for one tile of nch chunks of width b (nb batch columns) */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_tile_smem(int64_t nch, int bits, int nb) {
  const int64_t ncols = nch * SPQR_CMPQ_CHUNK;
  return 4 * ((ncols << bits) + (nb > 1 ? ncols * nb : 0));
}

/* cmpq_layout.tiles: the number of tiles, and the dynamic shared memory of spqr_cmpq_mm_nb{nb}
 * (bytes, at least 4) in *smem */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_tile_count(const int64_t *runs, int64_t nruns, int nb,
                                                       int64_t cap, int64_t *smem) {
  int64_t count = 0, sm = 4;
  for (int64_t r = 0; r < nruns; ++r) {
    const int64_t *rd = runs + r * SPQR_CMPQ_RUN_FIELDS;
    const int bits = (int)rd[2];
    int64_t step = spqr_cmpq_tile_chunks(bits, nb);
    if (cap < step) step = cap;
    count += (rd[6] + step - 1) / step;
    const int64_t need = spqr_cmpq_tile_smem(rd[6] < step ? rd[6] : step, bits, nb);
    if (need > sm) sm = need;
  }
  *smem = sm;
  return count;
}

#endif /* SPQR_CMPQ_PLAN_H */
