/* spqr_cmpq_cpu.c -- CPU-only decoder of one channel_mixed tensor (no CUDA): read and check it
 * with spqr_reader.c, decode it with spqr_cmpq_ref.c (the reference spqr_matvec checks the GPU
 * against), print its shape and a checksum, and optionally write the weights.
 *
 * Usage: spqr_cmpq_cpu FILE.spqr [TENSOR_NAME] [f32|f16|bf16] [OUT]
 *   TENSOR_NAME  "" or absent: the first channel_mixed tensor
 *   dtype        absent: the tensor's own dtype
 *   OUT          the decoded W[m][n] (row-major, original column order, little-endian)
 * Exit status: 0, 1 (usage, or a file the reader refuses: the message names the error code,
 * the file and the tensor), 2 (out of memory, write error).
 *
 * Build: cc -std=c99 -O2 -ffp-contract=off -I ../../spqr_format/gpu/kernels spqr_cmpq_cpu.c \
 *          spqr_reader.c spqr_cmpq_ref.c ../../spqr_format/gpu/kernels/spqr_row_layout.c
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spqr_cmpq_ref.h"
#include "spqr_reader.h"

static const char *const DTYPE_NAMES[3] = {"f32", "f16", "bf16"};

int main(int argc, char **argv) {
  if (argc < 2 || argc > 5) {
    fprintf(stderr, "usage: %s FILE.spqr [TENSOR_NAME] [f32|f16|bf16] [OUT]\n", argv[0]);
    return 1;
  }
  const char *name = argc > 2 && argv[2][0] ? argv[2] : NULL;
  spqr_host_cmpq t;
  char err[512];
  if (spqr_read_cmpq(argv[1], name, &t, err, sizeof err)) {
    fprintf(stderr, "%s\n", err);
    return 1;
  }
  int dtype = t.dtype - 1; /* SPEC dtype id 1 / 2 / 3 -> code 0 / 1 / 2 */
  if (argc > 3 && argv[3][0]) {
    dtype = -1;
    for (int k = 0; k < 3; ++k)
      if (!strcmp(argv[3], DTYPE_NAMES[k])) dtype = k;
    if (dtype < 0) {
      fprintf(stderr, "unknown dtype '%s' (f32, f16 or bf16)\n", argv[3]);
      spqr_free_cmpq(&t);
      return 1;
    }
  }
  const size_t count = (size_t)t.m * (size_t)t.n, size = dtype == 0 ? 4 : 2;
  void *w = malloc(count * size);
  if (!w) {
    fprintf(stderr, "out of memory (%zu bytes)\n", count * size);
    spqr_free_cmpq(&t);
    return 2;
  }
  spqr_cmpq_decode(&t, dtype, w);
  uint64_t fnv;
  double sum;
  spqr_checksum(w, (int64_t)count, dtype, &fnv, &sum);
  printf("channel_mixed m=%lld n=%lld widths=%u,%u,%u,%u,%u,%u,%u,%u table_rows=%lld "
         "outlier_entries=%lld outliers=%lld dtype=%s\n",
         (long long)t.m, (long long)t.n, t.width_counts[0], t.width_counts[1], t.width_counts[2],
         t.width_counts[3], t.width_counts[4], t.width_counts[5], t.width_counts[6],
         t.width_counts[7], (long long)t.table_rows, (long long)t.outlier_entries,
         (long long)t.outliers, DTYPE_NAMES[dtype]);
  printf("checksum fnv1a=%016llx sum=%.17g\n", (unsigned long long)fnv, sum);
  int rc = 0;
  if (argc > 4) {
    FILE *f = fopen(argv[4], "wb");
    if (!f || fwrite(w, size, count, f) != count) {
      fprintf(stderr, "cannot write %s\n", argv[4]);
      rc = 2;
    }
    if (f && fclose(f) != 0 && !rc) {
      fprintf(stderr, "cannot write %s\n", argv[4]);
      rc = 2;
    }
  }
  free(w);
  spqr_free_cmpq(&t);
  return rc;
}
