// spqr_matvec.cu -- embedding proof: read one bilevel tensor from a .spqr file with a C reader,
// upload its sections unchanged, run the fused matvec (spqr_gpu.h level 2) and print a
// checksum.  No Python.  Build (see Makefile):
//
//   nvcc -O2 -std=c++17 -arch=sm_80 -I ../../spqr_format/gpu/kernels \
//        spqr_matvec.cu spqr_reader.c ../../spqr_format/gpu/kernels/spqr_host.cu -o spqr_matvec
//
// Usage: spqr_matvec FILE.spqr [TENSOR_NAME] [SEED] [tc|dq]
// The input x (f16, length n) is generated from SEED by the LCG below; tests/test_gpu_c_example.py
// generates the same x in Python and compares y bit for bit (same kernels, same launch).
// With `tc`, the tensor is repacked on the host into the tile layout (spqr_tile_repack) and
// multiplied on tensor cores (spqr_tc_matmul); build with spqr_tile_layout.c and
// spqr_tc_host.cu too (see Makefile).  With `dq`, the tensor is dequantized to f16
// (spqr_dequantize) and the checksum covers all m * n weights (row-major, bit-exact with the CPU
// reference decoder).

#include <cuda_runtime.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s FILE.spqr [TENSOR_NAME] [SEED] [tc|dq]\n", argv[0]);
    return 1;
  }
  const char* name = argc > 2 && argv[2][0] ? argv[2] : NULL;
  uint64_t seed = argc > 3 ? strtoull(argv[3], NULL, 10) : 1;
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
