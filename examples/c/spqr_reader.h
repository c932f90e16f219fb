/* spqr_reader.h -- a minimal reader of the .spqr container (SPEC.md section 2) in plain C99.
 *
 * It reads the fixed header, the tensor and section records and the names, checks the
 * structure a GPU launch depends on, and loads the sections of one tensor into host memory:
 *
 *  - bilevel (spqr_read_bilevel): magic, version, caps, section bounds and lengths derived
 *    from the bilevel parameters, permutation, outlier stream; the sections are converted to
 *    the row layout the kernels read (spqr_row_repack, spqr_gpu.h).
 *  - channel_mixed (spqr_read_cmpq, SPEC section 12): params, shape, width counts, the exact
 *    list of section roles and lengths, then the data checks of SPEC C-12.8 in their order
 *    (permutation, finite tables, outlier stream); the sections are returned as the file has
 *    them (spqr_cmpq_repack, spqr_gpu.h, makes the chunk layout of the kernels from them;
 *    spqr_cmpq_ref.h decodes them on the CPU).
 *
 * It does not check CRCs or digests: use `spqr verify`.  Little-endian hosts only (SPEC C-1.1:
 * the sections are used in place as u16 / u32 arrays).
 */
#ifndef SPQR_READER_H
#define SPQR_READER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SPQR_ENCODING_BILEVEL 2       /* SPEC C-3.4 */
#define SPQR_ENCODING_CHANNEL_MIXED 3 /* SPEC C-3.4, section 12 */

typedef struct spqr_host_bilevel {
  int64_t m, n;
  int bits, stats_bits, group_size, stats_group_size;
  int dtype;                   /* C-3.3: 1 f32, 2 f16, 3 bf16 */
  uint64_t outlier_entries;    /* entries of the row-layout outlier stream (oents) */
  /* row-layout arrays (spqr_gpu.h; malloc'ed; NULL when absent) and their byte lengths */
  void *codes, *stats, *stats2, *perm, *orows, *oents;
  size_t codes_len, stats_len, stats2_len, perm_len, orows_len, oents_len;
} spqr_host_bilevel;

/* One channel_mixed tensor: its params and its sections as the file has them (SPEC C-12.1 ..
 * C-12.6), checked by spqr_read_cmpq. */
typedef struct spqr_host_cmpq {
  int64_t m, n;
  int dtype;                   /* C-3.3: 1 f32, 2 f16, 3 bf16 */
  uint32_t width_counts[8];    /* c_b for b = 1..8 at index b - 1 */
  int64_t table_rows;          /* R: 0 = one table per column */
  int64_t table_blocks;        /* T = 1 (R = 0) or ceil(m / R) */
  int64_t table_entries;       /* L = sum of c_b * 2^b: entries of one table block */
  int64_t outlier_entries;     /* E, skips included (0: no outlier sections) */
  int64_t outliers;            /* the non-skip entries of the stream */
  /* sections (malloc'ed; oindex / oents NULL when E = 0) and their byte lengths */
  uint32_t *codes;             /* the runs' packed streams (C-12.3) */
  void *perm;                  /* u16 [n] when n <= 65536, else u32 [n] (C-12.4) */
  uint32_t *oindex, *oents;    /* outlier_index [ceil(m/16) + 1], outlier_entries [E] */
  uint16_t *tables;            /* f16 bits [T][L] (C-12.5) */
  size_t codes_len, perm_len, oindex_len, oents_len, tables_len;
} spqr_host_cmpq;

/* The encoding (SPQR_ENCODING_*) of tensor `name` of the file at `path`, or of the first
 * tensor that is bilevel or channel_mixed when name is NULL.  Returns the encoding id (any
 * value the record holds), or -1 with a message in `err` (size errlen). */
int spqr_tensor_encoding(const char *path, const char *name, char *err, size_t errlen);

/* Load tensor `name` (or the first bilevel tensor when name is NULL) of the file at `path`.
 * Returns 0 on success, else writes a message to `err` (size errlen) and returns -1. */
int spqr_read_bilevel(const char *path, const char *name, spqr_host_bilevel *out, char *err,
                      size_t errlen);

void spqr_free_bilevel(spqr_host_bilevel *t);

/* Load the channel_mixed tensor `name` (or the first channel_mixed tensor when name is NULL)
 * of the file at `path` and check it (SPEC C-12.1 .. C-12.8, except CRCs and the digest).
 * Returns 0 on success, else writes "E_CODE: file: tensor 'name': what" to `err` and returns
 * -1.  Limits of this reader beyond SPEC's caps: m and n below 2^31 (the kernels' indices),
 * E_LIMIT. */
int spqr_read_cmpq(const char *path, const char *name, spqr_host_cmpq *out, char *err,
                   size_t errlen);

void spqr_free_cmpq(spqr_host_cmpq *t);

#ifdef __cplusplus
}
#endif

#endif
