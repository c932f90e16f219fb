// spqr_matvec.cu -- embedding proof: read one bilevel tensor from a .spqr file with a C reader,
// upload its sections unchanged, run the fused matvec (spqr_gpu.h level 2) and print a
// checksum.  No Python.  Build with `make` (Makefile), or by hand with K =
// ../../spqr_format/gpu/kernels (one command):
//
//   nvcc -O2 -std=c++17 -arch=sm_80 -Xcompiler -ffp-contract=off -I $K spqr_matvec.cu
//        spqr_reader.c spqr_cmpq_ref.c $K/spqr_host.cu $K/spqr_tc_host.cu $K/spqr_tile_layout.c
//        $K/spqr_row_layout.c $K/spqr_cmpq_host.cu $K/spqr_cmpq_layout.c -o spqr_matvec
//
// Usage: spqr_matvec FILE.spqr [TENSOR_NAME] [SEED] [tc|dq]
// The input x (f16, length n) is generated from SEED by the LCG below; tests/test_gpu_c_example.py
// generates the same x in Python and compares y bit for bit (same kernels, same launch).
// With `tc`, the tensor is repacked on the host into the tile layout (spqr_tile_repack) and
// multiplied on tensor cores (spqr_tc_matmul); build with spqr_tile_layout.c and
// spqr_tc_host.cu too (see Makefile).  With `dq`, the tensor is dequantized to f16
// (spqr_dequantize) and the checksum covers all m * n weights (row-major, bit-exact with the CPU
// reference decoder).
//
// channel_mixed tensors (SPEC section 12; the tensor named, or, with no name, the first tensor
// that is bilevel or channel_mixed): the reader checks the sections (spqr_read_cmpq), the host
// repack makes the chunk layout (spqr_cmpq_layout_sizes / spqr_cmpq_repack,
// spqr_cmpq_layout.c), the arrays are uploaded into an spqr_cmpq_tensor, and the example checks
// every result against a CPU reference computed from the file's sections (spqr_cmpq_ref.c):
// spqr_cmpq_dequantize to f16, f32 and bf16 must equal the CPU decode bit for bit, and
// spqr_cmpq_matmul (batches 1, 4, 17 with f16 x and y; 3 with f32 x and y; 2 with bf16 x and
// f32 y; x rows from SEED, SEED + 1, ...) must be within SPEC C-7.6's tolerance of the fp64
// product.  It prints one line per result (checksums of the outputs, which
// tests/test_gpu_c_example.py compares with the Python layer's) and "channel_mixed OK", or
// a FAIL line and exit status 4.  With `dq` it only dequantizes.  Build with
// spqr_cmpq_host.cu, spqr_cmpq_layout.c and spqr_cmpq_ref.c (see Makefile).

#include <cuda_runtime.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spqr_cmpq_ref.h"
#include "spqr_gpu.h"
#include "spqr_reader.h"

#define CHECK(call)                                                                   \
  do {                                                                                \
    cudaError_t e_ = (call);                                                          \
    if (e_ != cudaSuccess) {                                                          \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      return 2;                                                                       \
    }                                                                                 \
  } while (0)

// x[j]: sign and mantissa random, exponent 13..15 (|x| in [0.25, 2)), as f16 bits.
static void make_x(uint16_t* x, int64_t n, uint64_t seed) {
  uint64_t s = seed;
  for (int64_t j = 0; j < n; ++j) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    uint32_t r = (uint32_t)(s >> 33);
    x[j] = (uint16_t)(((r >> 30) & 1u) << 15 | (13u + (r >> 10) % 3u) << 10 | (r & 0x3FFu));
  }
}

// FNV-1a over the bit patterns of `count` f16 values, and their sum as doubles
static void print_checksum(const uint16_t* v, int64_t count) {
  uint64_t hash = 1469598103934665603ull;
  double sum = 0;
  for (int64_t i = 0; i < count; ++i) {
    hash = (hash ^ (v[i] & 0xFFu)) * 1099511628211ull;
    hash = (hash ^ (v[i] >> 8)) * 1099511628211ull;
    uint32_t e = (v[i] >> 10) & 0x1Fu, mnt = v[i] & 0x3FFu;
    double x = e == 0 ? mnt * (1.0 / (1 << 24)) : (1024 + mnt) * (double)(1ull << e) / (1ull << 25);
    sum += (v[i] >> 15) ? -x : x;
  }
  printf("checksum fnv1a=%016llx sum=%.17g\n", (unsigned long long)hash, sum);
}

static int upload(const void* host, size_t len, void** dev) {
  *dev = NULL;
  if (!host) return 0;
  if (cudaMalloc(dev, len ? len : 16) != cudaSuccess) return -1;
  return cudaMemcpy(*dev, host, len, cudaMemcpyHostToDevice) == cudaSuccess ? 0 : -1;
}

// ---------------------------------------------------------------------------------------------
// channel_mixed

// x[j] as f32 bits: sign and mantissa random, exponent 125..127 (|x| in [0.25, 2)); the same
// LCG as make_x.  bf16 x is the upper half of these bits.
static void make_x32(uint32_t* x, int64_t n, uint64_t seed) {
  uint64_t s = seed;
  for (int64_t j = 0; j < n; ++j) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    uint32_t r = (uint32_t)(s >> 33);
    x[j] = ((r >> 30) & 1u) << 31 | (125u + ((r >> 23) & 0x7Fu) % 3u) << 23 | (r & 0x7FFFFFu);
  }
}

static const char* const DTYPE_NAME[3] = {"f32", "f16", "bf16"};  // SPQR_DTYPE_* codes

static const char* cmpq_error_name(int rc) {
  static const char* const names[6] = {"SPQR_CMPQ_OK", "SPQR_CMPQ_E_LIMIT",
                                       "SPQR_CMPQ_E_BAD_FIELD", "SPQR_CMPQ_E_BAD_OUTLIERS",
                                       "SPQR_CMPQ_E_BAD_PERMUTATION", "SPQR_CMPQ_E_NONFINITE"};
  return rc >= 0 && rc < 6 ? names[rc] : "unknown error";
}

// Host buffers of the chunk layout (spqr_cmpq_repack) and their device copies.
struct CmpqLayout {
  void* host[11];
  void* dev[11];
  size_t bytes[11];
};
enum { L_RUNS, L_CODES, L_TABLES, L_PCOL, L_PERM, L_INV_PERM, L_OROWS, L_OCOL, L_OCOLP, L_OVAL,
       L_OCORR, L_COUNT };

static void free_layout(CmpqLayout* L) {
  for (int k = 0; k < L_COUNT; ++k) {
    free(L->host[k]);
    if (L->dev[k]) cudaFree(L->dev[k]);
  }
  memset(L, 0, sizeof(*L));
}

// spqr_cmpq_layout_sizes + spqr_cmpq_repack on the host, upload, fill *t.  0, 1 (the repack
// refuses the sections), 2 (out of memory, CUDA error).
static int cmpq_upload(const spqr_host_cmpq* h, CmpqLayout* L, spqr_cmpq_tensor* t) {
  memset(L, 0, sizeof(*L));
  spqr_cmpq_sections s;
  memset(&s, 0, sizeof s);
  s.codes = h->codes;
  s.perm = h->perm;
  s.oindex = h->oindex;
  s.oents = h->oents;
  s.tables = h->tables;
  s.m = h->m;
  s.n = h->n;
  memcpy(s.width_counts, h->width_counts, sizeof s.width_counts);
  s.table_rows = h->table_rows;
  s.outlier_entries = h->outlier_entries;
  spqr_cmpq_sizes z;
  int rc = spqr_cmpq_layout_sizes(&s, &z);
  if (rc != SPQR_CMPQ_OK) {
    fprintf(stderr, "spqr_cmpq_layout_sizes refused the tensor: %s\n", cmpq_error_name(rc));
    return 1;
  }
  const int64_t k = z.outliers;
  const int64_t count[L_COUNT] = {z.nruns * 8 /* i64 [nruns][8] */, z.codes_words,
                                  z.table_entries, z.np, h->n, h->n, k ? z.orows_words : 0,
                                  k, k, k, k};
  const size_t size[L_COUNT] = {8, 4, 2, 4, 4, 4, 4, 4, 4, 2, 4};
  for (int a = 0; a < L_COUNT; ++a) {
    L->bytes[a] = (size_t)count[a] * size[a];
    if (count[a] && !(L->host[a] = malloc(L->bytes[a]))) {
      fprintf(stderr, "out of memory\n");
      return 2;
    }
  }
  rc = spqr_cmpq_repack(&s, &z, (int64_t*)L->host[L_RUNS], (uint32_t*)L->host[L_CODES],
                        (uint16_t*)L->host[L_TABLES], (uint32_t*)L->host[L_PCOL],
                        (uint32_t*)L->host[L_PERM], (uint32_t*)L->host[L_INV_PERM],
                        (uint32_t*)L->host[L_OROWS], (uint32_t*)L->host[L_OCOL],
                        (uint32_t*)L->host[L_OCOLP], (uint16_t*)L->host[L_OVAL],
                        (float*)L->host[L_OCORR]);
  if (rc != SPQR_CMPQ_OK) {
    fprintf(stderr, "spqr_cmpq_repack refused the tensor: %s\n", cmpq_error_name(rc));
    return 1;
  }
  for (int a = 0; a < L_COUNT; ++a)
    if (upload(L->host[a], L->bytes[a], &L->dev[a])) {
      fprintf(stderr, "upload failed\n");
      return 2;
    }
  memset(t, 0, sizeof(*t));
  t->runs = (const int64_t*)L->dev[L_RUNS];
  t->runs_host = (const int64_t*)L->host[L_RUNS];
  t->codes = (const uint32_t*)L->dev[L_CODES];
  t->tables = (const uint16_t*)L->dev[L_TABLES];
  t->pcol = (const uint32_t*)L->dev[L_PCOL];
  t->perm = (const uint32_t*)L->dev[L_PERM];
  t->inv_perm = (const uint32_t*)L->dev[L_INV_PERM];
  t->orows = (const uint32_t*)L->dev[L_OROWS];
  t->ocol = (const uint32_t*)L->dev[L_OCOL];
  t->ocolp = (const uint32_t*)L->dev[L_OCOLP];
  t->oval = (const uint16_t*)L->dev[L_OVAL];
  t->ocorr = (const float*)L->dev[L_OCORR];
  t->m = h->m;
  t->n = h->n;
  t->table_rows = h->table_rows;
  t->Lp = z.Lp;
  t->np = z.np;
  t->nruns = z.nruns;
  return 0;
}

static void print_result(const char* what, const void* v, int64_t count, int dtype) {
  uint64_t fnv;
  double sum;
  spqr_checksum(v, count, dtype, &fnv, &sum);
  printf("%s checksum fnv1a=%016llx sum=%.17g\n", what, (unsigned long long)fnv, sum);
}

// spqr_cmpq_dequantize to each dtype == the CPU decode, bit for bit.  0, 2 (CUDA), 4 (differs).
static int cmpq_check_dequantize(const spqr_host_cmpq* h, const spqr_cmpq_tensor* t,
                                 cudaStream_t stream) {
  const size_t count = (size_t)h->m * (size_t)h->n;
  const int order[3] = {SPQR_DTYPE_F16, SPQR_DTYPE_F32, SPQR_DTYPE_BF16};
  for (int k = 0; k < 3; ++k) {
    const int d = order[k];
    const size_t bytes = count * (d == SPQR_DTYPE_F32 ? 4 : 2);
    unsigned char* want = (unsigned char*)malloc(bytes);
    unsigned char* got = (unsigned char*)malloc(bytes);
    void* dw = NULL;
    if (!want || !got) {
      fprintf(stderr, "out of memory\n");
      return 2;
    }
    spqr_cmpq_decode(h, d, want);
    CHECK(cudaMalloc(&dw, bytes));
    CHECK(cudaMemset(dw, 0xFF, bytes));  // NaN everywhere: an unwritten weight shows
    CHECK((cudaError_t)spqr_cmpq_dequantize(t, dw, h->n, d, stream));
    CHECK(cudaStreamSynchronize(stream));
    CHECK(cudaMemcpy(got, dw, bytes, cudaMemcpyDeviceToHost));
    CHECK(cudaFree(dw));
    if (memcmp(got, want, bytes)) {
      const size_t es = d == SPQR_DTYPE_F32 ? 4 : 2;
      size_t e = 0;
      while (e < count && !memcmp(got + e * es, want + e * es, es)) ++e;  // the first difference
      fprintf(stderr,
              "FAIL: spqr_cmpq_dequantize %s differs from the CPU decode at row %lld column "
              "%lld: %.9g, expected %.9g\n",
              DTYPE_NAME[d], (long long)(e / (size_t)h->n), (long long)(e % (size_t)h->n),
              spqr_value_f64(got, (int64_t)e, d), spqr_value_f64(want, (int64_t)e, d));
      return 4;
    }
    char what[96];
    snprintf(what, sizeof what, "dequantize %s: bit-exact with the CPU decode (%lld weights)",
             DTYPE_NAME[d], (long long)count);
    print_result(what, got, (int64_t)count, d);
    free(want);
    free(got);
  }
  return 0;
}

struct MatmulCase {
  int batch, in_dtype, out_dtype;
};
// batch 1: spqr_cmpq_mv1_b*; 4 and 17 with f16 x: the tensor-core kernels when table_rows % 16
// == 0 (17 = a slice of 16 rows, then one of 1); f32 / bf16 x: the first design (mm_nb*).
static const MatmulCase CMPQ_CASES[] = {{1, SPQR_DTYPE_F16, SPQR_DTYPE_F16},
                                        {4, SPQR_DTYPE_F16, SPQR_DTYPE_F16},
                                        {17, SPQR_DTYPE_F16, SPQR_DTYPE_F16},
                                        {3, SPQR_DTYPE_F32, SPQR_DTYPE_F32},
                                        {2, SPQR_DTYPE_BF16, SPQR_DTYPE_F32}};

// spqr_cmpq_matmul of one case within SPEC C-7.6's tolerance of the fp64 product of the CPU
// decode.  0, 2 (CUDA, memory), 4 (out of tolerance).
static int cmpq_check_matmul(const spqr_host_cmpq* h, const spqr_cmpq_tensor* t,
                             const float* w32, const MatmulCase& c, uint64_t seed,
                             cudaStream_t stream) {
  const int64_t m = h->m, n = h->n, B = c.batch;
  const size_t xsize = c.in_dtype == SPQR_DTYPE_F32 ? 4 : 2;
  const size_t ysize = c.out_dtype == SPQR_DTYPE_F32 ? 4 : 2;
  void* x = malloc((size_t)(B * n) * xsize);
  void* y = malloc((size_t)(B * m) * ysize);
  double* xd = (double*)malloc(sizeof(double) * (size_t)(B * n));
  double* ref = (double*)malloc(sizeof(double) * (size_t)(B * m));
  double* tol = (double*)malloc(sizeof(double) * (size_t)(B * m));
  uint32_t* row32 = (uint32_t*)malloc(sizeof(uint32_t) * (size_t)n);
  if (!x || !y || !xd || !ref || !tol || !row32) {
    fprintf(stderr, "out of memory\n");
    return 2;
  }
  for (int64_t b = 0; b < B; ++b) {  // row b of X from seed + b
    if (c.in_dtype == SPQR_DTYPE_F16) {
      make_x((uint16_t*)x + b * n, n, seed + (uint64_t)b);
    } else {
      make_x32(row32, n, seed + (uint64_t)b);
      for (int64_t j = 0; j < n; ++j) {
        if (c.in_dtype == SPQR_DTYPE_F32)
          ((uint32_t*)x)[b * n + j] = row32[j];
        else
          ((uint16_t*)x)[b * n + j] = (uint16_t)(row32[j] >> 16);
      }
    }
  }
  for (int64_t e = 0; e < B * n; ++e) xd[e] = spqr_value_f64(x, e, c.in_dtype);
  spqr_reference_matmul(w32, m, n, xd, (int)B, ref, tol);
  void *dx, *dy, *ws;
  const size_t wsb = spqr_cmpq_workspace_bytes(t, (int)B);
  CHECK(cudaMalloc(&dx, (size_t)(B * n) * xsize));
  CHECK(cudaMalloc(&dy, (size_t)(B * m) * ysize));
  CHECK(cudaMalloc(&ws, wsb ? wsb : 16));
  CHECK(cudaMemcpy(dx, x, (size_t)(B * n) * xsize, cudaMemcpyHostToDevice));
  CHECK(cudaMemset(dy, 0xFF, (size_t)(B * m) * ysize));  // NaN: an unwritten output fails
  CHECK((cudaError_t)spqr_cmpq_matmul(t, dx, n, c.in_dtype, dy, m, c.out_dtype, (int)B, ws,
                                      stream));
  CHECK(cudaStreamSynchronize(stream));
  CHECK(cudaMemcpy(y, dy, (size_t)(B * m) * ysize, cudaMemcpyDeviceToHost));
  CHECK(cudaFree(dx));
  CHECK(cudaFree(dy));
  CHECK(cudaFree(ws));
  double worst = 0;
  for (int64_t e = 0; e < B * m; ++e) {
    const double got = spqr_value_f64(y, e, c.out_dtype), err = got - ref[e];
    if (!((err < 0 ? -err : err) <= tol[e])) {  // NaN fails too
      fprintf(stderr,
              "FAIL: spqr_cmpq_matmul batch %lld x %s y %s: y[%lld][%lld] = %.9g, fp64 "
              "reference %.9g, tolerance %.3g (SPEC C-7.6)\n",
              (long long)B, DTYPE_NAME[c.in_dtype], DTYPE_NAME[c.out_dtype],
              (long long)(e / m), (long long)(e % m), got, ref[e], tol[e]);
      return 4;
    }
    const double r = (err < 0 ? -err : err) / tol[e];
    if (r > worst) worst = r;
  }
  char what[128];
  snprintf(what, sizeof what, "matmul batch=%lld x=%s y=%s max_err/tol=%.4f", (long long)B,
           DTYPE_NAME[c.in_dtype], DTYPE_NAME[c.out_dtype], worst);
  print_result(what, y, B * m, c.out_dtype);
  free(x);
  free(y);
  free(xd);
  free(ref);
  free(tol);
  free(row32);
  return 0;
}

static int run_cmpq(const char* path, const char* name, uint64_t seed, const char* mode) {
  const int dq_only = strcmp(mode, "dq") == 0;
  if (mode[0] && !dq_only) {
    fprintf(stderr,
            "mode '%s' is for bilevel tensors: a channel_mixed tensor takes no mode (all checks) "
            "or dq (dequantize only); spqr_cmpq_matmul picks its kernels itself\n",
            mode);
    return 1;
  }
  spqr_host_cmpq h;
  char err[512];
  if (spqr_read_cmpq(path, name, &h, err, sizeof err)) {
    fprintf(stderr, "%s\n", err);
    return 1;
  }
  CmpqLayout L;
  spqr_cmpq_tensor t;
  int rc = cmpq_upload(&h, &L, &t);
  if (rc) return rc;
  printf("channel_mixed m=%lld n=%lld widths=%u,%u,%u,%u,%u,%u,%u,%u table_rows=%lld "
         "outlier_entries=%lld outliers=%lld\n",
         (long long)h.m, (long long)h.n, h.width_counts[0], h.width_counts[1], h.width_counts[2],
         h.width_counts[3], h.width_counts[4], h.width_counts[5], h.width_counts[6],
         h.width_counts[7], (long long)h.table_rows, (long long)h.outlier_entries,
         (long long)h.outliers);
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  rc = cmpq_check_dequantize(&h, &t, stream);
  if (!rc && !dq_only) {
    // the CPU decode as f32 values: the weights of the reference product
    const size_t count = (size_t)h.m * (size_t)h.n;
    uint32_t* bits = (uint32_t*)malloc(4 * count);
    float* w32 = (float*)malloc(4 * count);
    if (!bits || !w32) {
      fprintf(stderr, "out of memory\n");
      return 2;
    }
    spqr_cmpq_decode(&h, SPQR_DTYPE_F32, bits);
    memcpy(w32, bits, 4 * count);
    free(bits);
    for (size_t k = 0; !rc && k < sizeof CMPQ_CASES / sizeof CMPQ_CASES[0]; ++k)
      rc = cmpq_check_matmul(&h, &t, w32, CMPQ_CASES[k], seed, stream);
    free(w32);
  }
  if (!rc) printf("channel_mixed OK\n");
  CHECK(cudaStreamDestroy(stream));
  free_layout(&L);
  spqr_free_cmpq(&h);
  return rc;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s FILE.spqr [TENSOR_NAME] [SEED] [tc|dq]\n", argv[0]);
    return 1;
  }
  const char* name = argc > 2 && argv[2][0] ? argv[2] : NULL;
  uint64_t seed = argc > 3 ? strtoull(argv[3], NULL, 10) : 1;
  {
    char err[512];
    const int enc = spqr_tensor_encoding(argv[1], name, err, sizeof err);
    if (enc < 0) {
      fprintf(stderr, "%s\n", err);
      return 1;
    }
    if (enc == SPQR_ENCODING_CHANNEL_MIXED)
      return run_cmpq(argv[1], name, seed, argc > 4 ? argv[4] : "");
    if (enc != SPQR_ENCODING_BILEVEL) {
      fprintf(stderr,
              "E_UNKNOWN_ENCODING: %s: tensor '%s' has encoding %d; this example reads bilevel "
              "(%d) and channel_mixed (%d) tensors\n",
              argv[1], name ? name : "", enc, SPQR_ENCODING_BILEVEL, SPQR_ENCODING_CHANNEL_MIXED);
      return 1;
    }
  }
  spqr_host_bilevel h;
  char err[256];
  if (spqr_read_bilevel(argv[1], name, &h, err, sizeof err)) {
    fprintf(stderr, "%s\n", err);
    return 1;
  }
  void *codes, *stats, *stats2, *perm, *orows, *oents;
  if (upload(h.codes, h.codes_len, &codes) || upload(h.stats, h.stats_len, &stats) ||
      upload(h.stats2, h.stats2_len, &stats2) || upload(h.perm, h.perm_len, &perm) ||
      upload(h.orows, h.orows_len, &orows) || upload(h.oents, h.oents_len, &oents)) {
    fprintf(stderr, "upload failed\n");
    return 2;
  }
  spqr_bilevel t;
  t.codes = (const uint32_t*)codes;
  t.stats = (const uint32_t*)stats;
  t.stats2 = (const uint16_t*)stats2;
  t.perm = (const uint32_t*)perm;
  t.orows = (const uint32_t*)orows;
  t.oents = (const uint32_t*)oents;
  t.m = h.m;
  t.n = h.n;
  t.bits = h.bits;
  t.stats_bits = h.stats_bits;
  t.group_size = h.group_size;
  t.stats_group_size = h.stats_group_size;

  uint16_t* x = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)h.n);
  uint16_t* y = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)h.m);
  make_x(x, h.n, seed);
  void *dx, *dy, *ws = NULL;
  CHECK(cudaMalloc(&dx, sizeof(uint16_t) * (size_t)h.n));
  CHECK(cudaMalloc(&dy, sizeof(uint16_t) * (size_t)h.m));
  CHECK(cudaMemcpy(dx, x, sizeof(uint16_t) * (size_t)h.n, cudaMemcpyHostToDevice));
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  int rc;
  if (argc > 4 && strcmp(argv[4], "dq") == 0) {
    // dequantize to f16 (spqr_dequantize, bit-exact with SPEC section 7): checksum of W
    const size_t count = (size_t)h.m * (size_t)h.n;
    uint16_t *dw, *w = (uint16_t*)malloc(sizeof(uint16_t) * count);
    if (!w) {
      fprintf(stderr, "out of memory\n");
      return 2;
    }
    CHECK(cudaMalloc((void**)&dw, sizeof(uint16_t) * count));
    CHECK((cudaError_t)spqr_dequantize(&t, dw, h.n, SPQR_DTYPE_F16, stream));
    CHECK(cudaStreamSynchronize(stream));
    CHECK(cudaMemcpy(w, dw, sizeof(uint16_t) * count, cudaMemcpyDeviceToHost));
    printf("m=%lld n=%lld bits=%d stats_bits=%d\n", (long long)h.m, (long long)h.n, h.bits,
           h.stats_bits);
    print_checksum(w, (int64_t)count);
    spqr_free_bilevel(&h);
    return 0;
  }
  const int use_tc = argc > 4 && strcmp(argv[4], "tc") == 0;
  if (use_tc) {
    // host repack from host copies of the sections, then upload the tile arrays
    spqr_bilevel th = t;
    th.codes = (const uint32_t*)h.codes;
    th.stats = (const uint32_t*)h.stats;
    th.stats2 = (const uint16_t*)h.stats2;
    th.perm = (const uint32_t*)h.perm;
    th.orows = (const uint32_t*)h.orows;
    th.oents = (const uint32_t*)h.oents;
    spqr_tile_dims d;
    if (!spqr_tile_dims_of(h.m, h.n, h.bits, h.stats_bits, h.group_size, h.stats_group_size,
                           &d)) {
      fprintf(stderr, "no tensor-core path for bits=%d group_size=%d stats_bits=%d\n", h.bits,
              h.group_size, h.stats_bits);
      return 3;
    }
    const size_t ncodes = (size_t)(d.RB * d.NC * d.SLABS * 32 * 4);
    const size_t nstats = (size_t)(d.RB * d.NC * 32 * d.SWL), nst2 = (size_t)(d.RB * d.KT * 2);
    const size_t nent = (size_t)h.outlier_entries;
    uint32_t* tl_codes = (uint32_t*)malloc(4 * ncodes);
    uint32_t* tl_stats = (uint32_t*)malloc(4 * nstats);
    uint32_t* tl_stats2 = (uint32_t*)malloc(4 * nst2);
    uint32_t* tl_oents = nent ? (uint32_t*)malloc(4 * nent) : NULL;
    if (!tl_codes || !tl_stats || !tl_stats2 || (nent && !tl_oents)) {
      fprintf(stderr, "out of memory\n");
      return 2;
    }
    if (!spqr_tile_repack(&th, tl_codes, tl_stats, tl_stats2, tl_oents)) {
      fprintf(stderr, "tile repack refused (statistics or outlier corrections beyond f16)\n");
      return 3;
    }
    void *dcodes, *dstats, *dstats2, *doents;
    if (upload(tl_codes, 4 * ncodes, &dcodes) || upload(tl_stats, 4 * nstats, &dstats) ||
        upload(tl_stats2, 4 * nst2, &dstats2) ||
        upload(tl_oents, 4 * nent, &doents)) {
      fprintf(stderr, "upload failed\n");
      return 2;
    }
    spqr_tile tt;
    tt.codes = (const uint32_t*)dcodes;
    tt.stats = (const uint32_t*)dstats;
    tt.stats2 = (const uint32_t*)dstats2;
    tt.oents = (const uint32_t*)doents;
    tt.orows = t.orows;
    tt.perm = t.perm;
    tt.m = h.m;
    tt.n = h.n;
    tt.outlier_entries = (int64_t)nent;
    tt.bits = h.bits;
    tt.stats_bits = h.stats_bits;
    tt.d = d;
    CHECK(cudaMalloc(&ws, spqr_tc_workspace_bytes(&tt, 1)));
    rc = spqr_tc_matmul(&tt, dx, h.n, dy, h.m, SPQR_DTYPE_F16, 1, ws, stream);
  } else if (spqr_matvec_supported(&t)) {
    CHECK(cudaMalloc(&ws, spqr_matvec_workspace_bytes(&t, 1)));
    rc = spqr_matvec(&t, dx, h.n, SPQR_DTYPE_F16, dy, h.m, SPQR_DTYPE_F16, 1, ws, stream);
  } else {
    fprintf(stderr, "no fused kernel for bits=%d group_size=%d\n", h.bits, h.group_size);
    return 3;
  }
  CHECK((cudaError_t)rc);
  CHECK(cudaStreamSynchronize(stream));
  CHECK(cudaMemcpy(y, dy, sizeof(uint16_t) * (size_t)h.m, cudaMemcpyDeviceToHost));
  printf("m=%lld n=%lld bits=%d stats_bits=%d\n", (long long)h.m, (long long)h.n, h.bits,
         h.stats_bits);
  print_checksum(y, h.m);
  spqr_free_bilevel(&h);
  return 0;
}
