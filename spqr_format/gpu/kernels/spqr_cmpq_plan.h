/* spqr_cmpq_plan.h -- the launch plan of the channel_mixed (CMPQ) matmul as plain C, the
 * Python layer's default plan (GpuCmpqTensor._plan / matmul_into with no SPQR_GPU_PLAN
 * override): per slice of <= 16 batch rows the path (spqr_cmpq_mv1_b*, spqr_cmpq_tc_b*_nt* or
 * the first design's spqr_cmpq_mm_nb*), the batch columns, the column tiles, the launch groups
 * of the per-width kernels and their k-splits.  Each function mirrors the function of
 * spqr_format/gpu/_kernels.py or codec/cmpq_layout.py named in its comment (keep them in step;
 * tests/test_cmpq_layout_c.py compares them on the CPU, spqr_cmpq_plan_slice against
 * _kernels.cmpq_slice + cmpq_launches).  spqr_cmpq_layout.c (spqr_cmpq_tiles) and
 * spqr_cmpq_host.cu (which builds the tile table on the device with the same spqr_cmpq_tile_at)
 * both use it, so the C launcher and the Python layer launch the same tiles with the same
 * geometry (and give bit-identical results).  The overrides of SPQR_GPU_PLAN (cmpq_v2,
 * cmpq_blocks_per_sm) are not read here: C always runs the default plan.
 * Under nvcc the tile functions are also device functions. */
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
#define SPQR_CMPQ_MM_ROWS 256         /* _kernels.CMPQ_ROWS: rows (= threads) per block of
                                         spqr_cmpq_mm_* and spqr_cmpq_mv1_* (SPQR_CMPQ_ROWS) */
#define SPQR_CMPQ_BLOCKS_PER_SM 4     /* _kernels.CMPQ_BLOCKS_PER_SM (no override in C) */
#define SPQR_CMPQ_MAX_BATCH 16        /* _kernels.CMPQ_MAX_BATCH */
#define SPQR_CMPQ_DQ_ROWS 32          /* _kernels.CMPQ_DQ_ROWS (spqr_cmpq_dequant_*: rows per
                                         step, one per lane) */
#define SPQR_CMPQ_RUN_FIELDS 8        /* i64 fields of a runs / tiles row */
#define SPQR_CMPQ_MAX_RUNS 8          /* one run per width 1..8 */
#define SPQR_CMPQ_TC_TILE_TABLE_CHUNKS 256 /* cmpq_layout.TC_TILE_TABLE_CHUNKS */
#define SPQR_CMPQ_TC_TILE_CHUNKS 16   /* cmpq_layout.TC_TILE_CHUNKS */
/* rows per block of spqr_cmpq_tc_* (cmpq_layout.TC_ROWS = _kernels.CMPQ_TC_ROWS; the kernel's
 * SPQR_CMPQ_TC_ROWS) and its threads (cmpq.py: 128; the kernel's SPQR_CMPQ_TC_WARPS * 32) */
#define SPQR_CMPQ_TC_BLOCK_ROWS 128
#define SPQR_CMPQ_TC_THREADS 128

/* paths of a slice (_kernels.cmpq_path's "mm", "mv1", "tc") */
#define SPQR_CMPQ_PATH_MM 0
#define SPQR_CMPQ_PATH_MV1 1
#define SPQR_CMPQ_PATH_TC 2

/* _kernels.cmpq_nb: batch columns of the kernels for a slice of `batch` <= 16 rows */
SPQR_CMPQ_HD static inline int spqr_cmpq_nb(int batch) {
  return batch <= 1 ? 1 : batch <= 2 ? 2 : batch <= 4 ? 4 : batch <= 8 ? 8 : 16;
}

/* _kernels.cmpq_dq_rows_per_block: rows per block (grid.y) of spqr_cmpq_dequant_*, a multiple
 * of SPQR_CMPQ_DQ_ROWS with ceil(m / rows) <= 65535 */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_dq_rows_per_block(int64_t m) {
  const int64_t need = (m + 65534) / 65535;
  const int64_t steps = (need + SPQR_CMPQ_DQ_ROWS - 1) / SPQR_CMPQ_DQ_ROWS;
  return SPQR_CMPQ_DQ_ROWS * (steps > 1 ? steps : 1);
}

/* cmpq_layout.tile_chunks: chunks of one column tile of spqr_cmpq_mm_nb{nb} for width b */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_tile_chunks(int bits, int nb) {
  const int64_t a = SPQR_CMPQ_TILE_TABLE_CHUNKS >> bits, x = SPQR_CMPQ_TILE_X_CHUNKS / nb;
  const int64_t c = a < x ? a : x;
  return c < 1 ? 1 : c;
}

/* cmpq_layout.tc_tile_chunks: chunks of one column tile of spqr_cmpq_tc_b{bits}_nt* */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_tc_tile_chunks(int bits) {
  const int64_t a = SPQR_CMPQ_TC_TILE_TABLE_CHUNKS >> bits, x = SPQR_CMPQ_TC_TILE_CHUNKS;
  const int64_t c = a < x ? a : x;
  return c < 1 ? 1 : c;
}

/* _kernels.cmpq_target_tiles(m, sm_count, rows) (CMPQ_BLOCKS_PER_SM blocks a multiprocessor) */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_target_tiles_rows(int64_t m, int sm_count,
                                                               int64_t rows) {
  const int64_t row_tiles = (m + rows - 1) / rows;
  const int64_t t = ((int64_t)SPQR_CMPQ_BLOCKS_PER_SM * sm_count + row_tiles - 1) / row_tiles;
  return t < 1 ? 1 : t;
}

/* _kernels.cmpq_target_tiles (rows = SPQR_CMPQ_MM_ROWS, the default) */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_target_tiles(int64_t m, int sm_count) {
  return spqr_cmpq_target_tiles_rows(m, sm_count, SPQR_CMPQ_MM_ROWS);
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

/* cmpq_layout.tiles: the chunks of a tile of width b, min(tc_tile_chunks(b) if tc else
 * tile_chunks(b, nb), cap) */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_tile_step(int bits, int nb, int tc, int64_t cap) {
  const int64_t step = tc ? spqr_cmpq_tc_tile_chunks(bits) : spqr_cmpq_tile_chunks(bits, nb);
  return cap < step ? cap : step;
}

/* cmpq_layout.tiles: row `t` of the tile table (bits, chunks, first code word, first table
 * entry, first padded column, 0, 0, 0) written to tile[0..7]; returns 0 when t is past the last
 * tile.  With tile NULL, nothing is written: the count of tiles is the first t giving 0.
 * tc: the tiles of spqr_cmpq_tc_* (tiles(..., tc=True); nb does not matter then). */
SPQR_CMPQ_HD static inline int spqr_cmpq_tile_at(const int64_t *runs, int64_t nruns, int64_t m,
                                                 int nb, int tc, int64_t cap, int64_t t,
                                                 int64_t *tile) {
  for (int64_t r = 0; r < nruns; ++r) {
    const int64_t *rd = runs + r * SPQR_CMPQ_RUN_FIELDS;
    const int bits = (int)rd[2];
    const int64_t chunks = rd[6];
    const int64_t step = spqr_cmpq_tile_step(bits, nb, tc, cap);
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

/* cmpq_layout.tiles' shared memory for one tile of nch chunks of width b of spqr_cmpq_mm_nb{nb}
 * / spqr_cmpq_mv1_b* (nb = 1) */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_tile_smem(int64_t nch, int bits, int nb) {
  const int64_t ncols = nch * SPQR_CMPQ_CHUNK;
  return 4 * ((ncols << bits) + (nb > 1 ? ncols * nb : 0));
}

/* cmpq_layout.tc_tile_smem: shared memory for one tile of spqr_cmpq_tc_b{bits}_nt{nt} (the
 * skewed f16 tables, 36 slots per 32 columns, 16-byte aligned, then x' in fragment order) */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_tc_tile_smem(int64_t nch, int bits, int nt) {
  return 16 * ((((nch * 36) << bits) * 2 + 15) / 16) + nch * nt * 512;
}

/* cmpq_layout.tiles: the number of tiles, and the dynamic shared memory of the kernel (bytes,
 * at least 4; tc: spqr_cmpq_tc_*_nt{nb / 8}, else spqr_cmpq_mm_nb{nb} / spqr_cmpq_mv1_*) in
 * *smem.  The largest tile of a run is its first, and the smem grows with the chunks. */
SPQR_CMPQ_HD static inline int64_t spqr_cmpq_tile_count(const int64_t *runs, int64_t nruns, int nb,
                                                       int tc, int64_t cap, int64_t *smem) {
  int64_t count = 0, sm = 4;
  for (int64_t r = 0; r < nruns; ++r) {
    const int64_t *rd = runs + r * SPQR_CMPQ_RUN_FIELDS;
    if (rd[6] < 1) continue; /* no tiles (runs are non-empty: cannot happen) */
    const int bits = (int)rd[2];
    const int64_t step = spqr_cmpq_tile_step(bits, nb, tc, cap);
    count += (rd[6] + step - 1) / step;
    const int64_t nch = rd[6] < step ? rd[6] : step;
    const int64_t need =
        tc ? spqr_cmpq_tc_tile_smem(nch, bits, nb / 8) : spqr_cmpq_tile_smem(nch, bits, nb);
    if (need > sm) sm = need;
  }
  *smem = sm;
  return count;
}

/* _kernels.cmpq_path (no override: cmpq_v2 = 1): batch 1 -> mv1; 2..16 with f16 x (dtype 1)
 * and R % 16 == 0 (R = 0 included) -> tc; otherwise mm */
static inline int spqr_cmpq_path(int batch, int in_dtype, int64_t table_rows) {
  if (batch == 1) return SPQR_CMPQ_PATH_MV1;
  if (in_dtype == 1 && table_rows % 16 == 0) return SPQR_CMPQ_PATH_TC;
  return SPQR_CMPQ_PATH_MM;
}

/* One launch of a slice: spqr_cmpq_mm_nb{nb} over all tiles (bits 0), or the per-width
 * spqr_cmpq_mv1_b{bits} / spqr_cmpq_tc_b{bits}_nt{nb / 8} over the tiles first .. first +
 * count - 1, grid.y = splits, writing the partial sums from split split0 on. */
typedef struct spqr_cmpq_group {
  int bits;
  int64_t first, count, splits, split0;
} spqr_cmpq_group;

/* The plan of one slice of `batch` (1..16) rows: _kernels.cmpq_slice and cmpq_launches. */
typedef struct spqr_cmpq_slice_plan {
  int path;        /* SPQR_CMPQ_PATH_* */
  int nb;          /* the kernels' batch columns (tc: 8 or 16; mv1: 1) */
  int nbp;         /* batch columns of x' f32, of the partial sums and of finish_nb{nbp} */
  int rows;        /* rows per block: grid.x = ceil(m / rows) */
  int threads;     /* threads per block of the fused kernels */
  int64_t target;  /* cmpq_target_tiles(m, sm_count, rows) */
  int64_t cap;     /* chunk cap of the tiles (tiles' min_tiles = target) */
  int64_t ntiles;  /* tiles */
  int64_t smem;    /* dynamic shared memory of every launch of the slice */
  int64_t splits;  /* total k-splits (the finish kernel's) */
  int ngroups;
  spqr_cmpq_group groups[SPQR_CMPQ_MAX_RUNS];
} spqr_cmpq_slice_plan;

/* _kernels.cmpq_slice(batch, in_dtype, R) and cmpq_launches(m, runs, path, nb, sm_count) (the
 * tile table itself: spqr_cmpq_tile_at with p->nb, p->path == SPQR_CMPQ_PATH_TC, p->cap).
 * Returns 0, or -1 for a batch outside 1..16 or nruns outside 1..8. */
static inline int spqr_cmpq_plan_slice(const int64_t *runs, int64_t nruns, int64_t m, int sm_count,
                                       int batch, int in_dtype, int64_t table_rows,
                                       spqr_cmpq_slice_plan *p) {
  if (batch < 1 || batch > SPQR_CMPQ_MAX_BATCH || nruns < 1 || nruns > SPQR_CMPQ_MAX_RUNS)
    return -1;
  p->path = spqr_cmpq_path(batch, in_dtype, table_rows);
  const int tc = p->path == SPQR_CMPQ_PATH_TC;
  p->nbp = spqr_cmpq_nb(batch);
  p->nb = tc ? 8 * ((batch + 7) / 8) : p->nbp;
  p->rows = tc ? SPQR_CMPQ_TC_BLOCK_ROWS : SPQR_CMPQ_MM_ROWS;
  p->threads = tc ? SPQR_CMPQ_TC_THREADS : SPQR_CMPQ_MM_ROWS;
  p->target = spqr_cmpq_target_tiles_rows(m, sm_count, p->rows);
  p->cap = spqr_cmpq_tile_cap(runs, nruns, p->target);
  p->ntiles = spqr_cmpq_tile_count(runs, nruns, p->nb, tc, p->cap, &p->smem);
  p->ngroups = 0;
  p->splits = 0;
  if (p->path == SPQR_CMPQ_PATH_MM) {
    spqr_cmpq_group *g = &p->groups[p->ngroups++];
    g->bits = 0;
    g->first = 0;
    g->count = p->ntiles;
    g->splits = spqr_cmpq_splits(m, p->ntiles, sm_count);
    g->split0 = 0;
    p->splits = g->splits;
    return 0;
  }
  /* cmpq_layout.width_groups: consecutive tiles of one width (runs are in run order) */
  int64_t first = 0;
  for (int64_t r = 0; r < nruns; ++r) {
    const int64_t *rd = runs + r * SPQR_CMPQ_RUN_FIELDS;
    const int bits = (int)rd[2];
    const int64_t step = spqr_cmpq_tile_step(bits, p->nb, tc, p->cap);
    const int64_t count = rd[6] < 1 ? 0 : (rd[6] + step - 1) / step;
    if (count == 0) continue;
    if (p->ngroups && p->groups[p->ngroups - 1].bits == bits) {
      p->groups[p->ngroups - 1].count += count;
    } else {
      spqr_cmpq_group *g = &p->groups[p->ngroups++];
      g->bits = bits;
      g->first = first;
      g->count = count;
    }
    first += count;
  }
  for (int k = 0; k < p->ngroups; ++k) { /* max(1, min(count, target)) each, in order */
    spqr_cmpq_group *g = &p->groups[k];
    const int64_t s = g->count < p->target ? g->count : p->target;
    g->splits = s < 1 ? 1 : s;
    g->split0 = p->splits;
    p->splits += g->splits;
  }
  return 0;
}

#endif /* SPQR_CMPQ_PLAN_H */
