/* spqr_reader.h -- a minimal reader of the .spqr container (SPEC.md section 2) in plain C99.
 *
 * It reads the fixed header, the tensor and section records and the names, checks the
 * structure a GPU launch depends on (magic, version, caps, section bounds and lengths derived
 * from the bilevel parameters, permutation, outlier stream), loads the sections of one
 * bilevel tensor into host memory and converts them to the row layout the kernels read
 * (spqr_row_repack, spqr_gpu.h).  It does not check CRCs or digests: use `spqr verify`.
 */
#ifndef SPQR_READER_H
#define SPQR_READER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct spqr_host_bilevel {
  int64_t m, n;
  int bits, stats_bits, group_size, stats_group_size;
  int dtype;                   /* C-3.3: 1 f32, 2 f16, 3 bf16 */
  uint64_t outlier_entries;    /* entries of the row-layout outlier stream (oents) */
  /* row-layout arrays (spqr_gpu.h; malloc'ed; NULL when absent) and their byte lengths */
  void *codes, *stats, *stats2, *perm, *orows, *oents;
  size_t codes_len, stats_len, stats2_len, perm_len, orows_len, oents_len;
} spqr_host_bilevel;

/* Load tensor `name` (or the first bilevel tensor when name is NULL) of the file at `path`.
 * Returns 0 on success, else writes a message to `err` (size errlen) and returns -1. */
int spqr_read_bilevel(const char *path, const char *name, spqr_host_bilevel *out, char *err,
                      size_t errlen);

void spqr_free_bilevel(spqr_host_bilevel *t);

#ifdef __cplusplus
}
#endif

#endif
