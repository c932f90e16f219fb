/* spqr_cmpq_ref.h -- the CPU reference of a channel_mixed tensor (SPEC section 12), C99, no
 * CUDA: decode W from the file's sections (SPEC C-12.7) and the fp64 product of SPEC C-7.6
 * with its default tolerance.  spqr_matvec.cu checks the GPU results against it;
 * spqr_cmpq_cpu.c is a CPU-only decoder built on it (tests/test_c_example_cmpq_cpu.py checks
 * it bit for bit against spqr_format.codec.channel_mixed_ref). */
#ifndef SPQR_CMPQ_REF_H
#define SPQR_CMPQ_REF_H

#include <stddef.h>
#include <stdint.h>

#include "spqr_reader.h"

#ifdef __cplusplus
extern "C" {
#endif

/* W[m][n] (row-major, original column order) in out_dtype (0 f32, 1 f16, 2 bf16: the
 * SPQR_DTYPE_* codes of spqr_gpu.h) into `w` (m * n elements of 4, 2, 2 bytes).  Every value
 * is an f16 table entry or outlier value: f16 output copies its bits, f32 widens it exactly,
 * bf16 rounds the f32 value to nearest-even (SPEC C-7.5).  `t` as spqr_read_cmpq leaves it
 * (checked).  Returns 0, or -1 for a bad out_dtype. */
int spqr_cmpq_decode(const spqr_host_cmpq *t, int out_dtype, void *w);

/* f16 bits -> f32 bits (exact), f32 bits -> bf16 bits (round to nearest-even, finite input). */
uint32_t spqr_f16_to_f32_bits(uint16_t h);
uint16_t spqr_f32_to_bf16_bits(uint32_t f);
/* An element of dtype code 0 / 1 / 2 (bits) as a double (exact). */
double spqr_value_f64(const void *base, int64_t index, int dtype);

/* FNV-1a over the little-endian bytes of `count` elements of dtype code 0 / 1 / 2 and their
 * sum as doubles (for 16-bit elements the hash spqr_matvec.cu prints for bilevel tensors). */
void spqr_checksum(const void *v, int64_t count, int dtype, uint64_t *fnv1a, double *sum);

/* SPEC C-7.6: ref[b * m + i] = sum_j w32[i][j] * x[b * n + j] in fp64 and
 * tol[b * m + i] = 2^-9 * sum_j |w32[i][j] * x[b * n + j]| + 2^-24, for b < batch.  (Each
 * product is exact in fp64: f16 weights times x of at most 24 significant bits; only the sums
 * round, by far less than the tolerance.) */
void spqr_reference_matmul(const float *w32, int64_t m, int64_t n, const double *x, int batch,
                           double *ref, double *tol);

#ifdef __cplusplus
}
#endif

#endif
