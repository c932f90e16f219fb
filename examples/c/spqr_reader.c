/* spqr_reader.c -- see spqr_reader.h.  C99, no dependencies. */
#include "spqr_reader.h"

#include "spqr_gpu.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const unsigned char MAGIC[8] = {0x89, 'S', 'P', 'Q', 'R', 0x0D, 0x0A, 0x1A};

static uint16_t rd16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t rd32(const unsigned char *p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t rd64(const unsigned char *p) { return rd32(p) | ((uint64_t)rd32(p + 4) << 32); }

static int fail(char *err, size_t n, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, n, fmt, ap);
  va_end(ap);
  return -1;
}

static uint64_t ceil_div(uint64_t a, uint64_t b) { return (a + b - 1) / b; }
/* C-5.2: a packed stream of `count` elements of `bits` bits, padded to a whole u32 word */
static uint64_t stream_bytes(uint64_t count, unsigned bits) { return 4 * ceil_div(count * bits, 32); }

static int read_at(FILE *f, uint64_t off, void *buf, size_t len) {
  if (fseek(f, (long)off, SEEK_SET) != 0) return -1;
  return fread(buf, 1, len, f) == len ? 0 : -1;
}

void spqr_free_bilevel(spqr_host_bilevel *t) {
  free(t->codes);
  free(t->stats);
  free(t->stats2);
  free(t->perm);
  free(t->orows);
  free(t->oents);
  memset(t, 0, sizeof(*t));
}

int spqr_read_bilevel(const char *path, const char *name, spqr_host_bilevel *out, char *err,
                      size_t errlen) {
  unsigned char hdr[64];
  unsigned char *dir = NULL;
  int rc = -1;
  memset(out, 0, sizeof(*out));
  FILE *f = fopen(path, "rb");
  if (!f) return fail(err, errlen, "E_IO: cannot open %s", path);
  if (fseek(f, 0, SEEK_END) != 0) goto io;
  uint64_t fsize = (uint64_t)ftell(f);
  if (fsize < 64 || read_at(f, 0, hdr, 64)) { rc = fail(err, errlen, "E_TRUNCATED: header"); goto done; }
  if (memcmp(hdr, MAGIC, 8)) { rc = fail(err, errlen, "E_BAD_MAGIC"); goto done; }
  if (rd16(hdr + 8) != 1) { rc = fail(err, errlen, "E_UNSUPPORTED_VERSION %u", rd16(hdr + 8)); goto done; }
  if (rd64(hdr + 16) != 0) { rc = fail(err, errlen, "E_UNKNOWN_FEATURE"); goto done; }
  uint32_t ntens = rd32(hdr + 24), nsec = rd32(hdr + 28);
  uint64_t strtab = rd64(hdr + 32);
  if (ntens > (1u << 20) || nsec > 16ull * ntens || strtab > (256ull << 20)) {
    rc = fail(err, errlen, "E_LIMIT: counts");
    goto done;
  }
  uint64_t dirlen = 160ull * ntens + 32ull * nsec + strtab;
  if (64 + dirlen > fsize) { rc = fail(err, errlen, "E_TRUNCATED: records"); goto done; }
  dir = (unsigned char *)malloc(dirlen ? dirlen : 1);
  if (!dir || read_at(f, 64, dir, dirlen)) goto io;
  const unsigned char *secs = dir + 160ull * ntens, *names = secs + 32ull * nsec;
  for (uint32_t ti = 0; ti < ntens; ++ti) {
    const unsigned char *r = dir + 160ull * ti;
    uint32_t no = rd32(r), nl = rd32(r + 4);
    if ((uint64_t)no + nl > strtab) { rc = fail(err, errlen, "E_BAD_LAYOUT: name"); goto done; }
    uint16_t enc = rd16(r + 8);
    if (enc != 2) continue; /* not bilevel */
    if (name && (strlen(name) != nl || memcmp(names + no, name, nl))) continue;
    if (rd16(r + 10) != 1) { rc = fail(err, errlen, "E_UNSUPPORTED_ENCODING_VERSION"); goto done; }
    if (r[13] != 2) { rc = fail(err, errlen, "E_BAD_SHAPE: ndim %u", r[13]); goto done; }
    const unsigned char *pp = r + 120; /* params, SPEC C-5.1 */
    out->m = (int64_t)rd64(r + 24);
    out->n = (int64_t)rd64(r + 32);
    out->dtype = r[12];
    out->bits = pp[0];
    out->stats_bits = pp[1];
    uint16_t flags = rd16(pp + 2);
    out->group_size = (int)rd32(pp + 4);
    out->stats_group_size = (int)rd32(pp + 8);
    out->outlier_entries = rd64(pp + 24);
    const uint64_t outlier_count = rd64(pp + 16);
    int64_t m = out->m, n = out->n;
    if (m < 1 || n < 1 || n >= (1ll << 31) || m >= (1ll << 40) || out->bits < 1 ||
        out->bits > 8 || out->stats_bits > 8 || out->group_size < 1 ||
        (out->stats_bits && out->stats_group_size < 1) || (flags & ~3u) ||
        (((flags & 2) != 0) != (out->outlier_entries > 0)) || out->outlier_entries >= (1ull << 32)) {
      rc = fail(err, errlen, "E_BAD_FIELD: params");
      goto done;
    }
    uint64_t G = ceil_div((uint64_t)n, (uint64_t)out->group_size);
    uint64_t T = out->stats_bits ? ceil_div((uint64_t)m, (uint64_t)out->stats_group_size) : 0;
    /* expected (role, length) list, C-5.1 */
    uint64_t want_len[8] = {0};
    want_len[2] = stream_bytes((uint64_t)m * (uint64_t)n, (unsigned)out->bits);
    want_len[3] = out->stats_bits ? stream_bytes((uint64_t)m * 2 * G, (unsigned)out->stats_bits)
                                  : 4ull * (uint64_t)m * G;
    want_len[4] = out->stats_bits ? 8ull * T * G : 0;
    want_len[5] = (flags & 1) ? (n <= SPQR_PERM_U16_MAX_N ? 2ull : 4ull) * (uint64_t)n : 0;
    want_len[6] = (flags & 2) ? 4ull * (ceil_div((uint64_t)m, SPQR_OUTLIER_BLOCK_ROWS) + 1) : 0;
    want_len[7] = (flags & 2) ? 4ull * out->outlier_entries : 0;
    uint32_t first = rd32(r + 16), count = rd32(r + 20);
    if ((uint64_t)first + count > nsec) { rc = fail(err, errlen, "E_BAD_LAYOUT: sections"); goto done; }
    void **dst[8] = {0};
    size_t *dlen[8] = {0};
    dst[2] = &out->codes; dlen[2] = &out->codes_len;
    dst[3] = &out->stats; dlen[3] = &out->stats_len;
    dst[4] = &out->stats2; dlen[4] = &out->stats2_len;
    dst[5] = &out->perm; dlen[5] = &out->perm_len;
    dst[6] = &out->orows; dlen[6] = &out->orows_len;
    dst[7] = &out->oents; dlen[7] = &out->oents_len;
    int seen = 0;
    for (uint32_t si = first; si < first + count; ++si) {
      const unsigned char *s = secs + 32ull * si;
      uint64_t off = rd64(s), len = rd64(s + 8);
      uint16_t role = rd16(s + 20);
      if (role < 2 || role > 7 || want_len[role] != len || (seen & (1 << role)) ||
          off > fsize || len > fsize - off) {
        rc = fail(err, errlen, "E_BAD_LAYOUT: section role %u length %llu", role,
                  (unsigned long long)len);
        goto done;
      }
      seen |= 1 << role;
      *dst[role] = malloc(len ? len : 1);
      *dlen[role] = (size_t)len;
      if (!*dst[role] || read_at(f, off, *dst[role], (size_t)len)) goto io;
    }
    for (int role = 2; role <= 7; ++role)
      if (want_len[role] && !(seen & (1 << role))) {
        rc = fail(err, errlen, "E_BAD_LAYOUT: missing role %d", role);
        goto done;
      }
    /* data checks the kernels rely on (C-5.7, C-6.1, C-6.2) */
    if (out->perm) {
      unsigned char *hit = (unsigned char *)calloc((size_t)n, 1);
      if (!hit) goto io;
      for (int64_t j = 0; j < n; ++j) {
        const uint64_t pj = n <= SPQR_PERM_U16_MAX_N ? ((const uint16_t *)out->perm)[j]
                                                     : ((const uint32_t *)out->perm)[j];
        if (pj >= (uint64_t)n || hit[pj]) { free(hit); rc = fail(err, errlen, "E_BAD_PERMUTATION"); goto done; }
        hit[pj] = 1;
      }
      free(hit);
    }
    /* the file's dense sections -> the row layout the kernels read (spqr_row_layout.c) */
    spqr_bilevel_sections sec = {(const uint32_t *)out->codes, out->stats,
                                 (const uint16_t *)out->stats2, out->perm,
                                 (const uint32_t *)out->orows, (const uint32_t *)out->oents,
                                 m, n, out->bits, out->stats_bits, out->group_size,
                                 out->stats_group_size, (int64_t)outlier_count,
                                 (int64_t)out->outlier_entries};
    spqr_row_sizes z;
    if (!spqr_row_layout_sizes(&sec, &z)) { rc = fail(err, errlen, "E_BAD_OUTLIERS"); goto done; }
    void *rl[5] = {0};
    const int64_t rl_words[5] = {z.codes_words, z.stats_words, z.perm_words, z.orows_words,
                                 z.oents_words};
    for (int k = 0; k < 5; ++k)
      if (rl_words[k] && !(rl[k] = malloc((size_t)rl_words[k] * 4))) {
        for (int q = 0; q < 5; ++q) free(rl[q]);
        goto io;
      }
    spqr_row_repack(&sec, &z, (uint32_t *)rl[0], (uint32_t *)rl[1], (uint32_t *)rl[2],
                    (uint32_t *)rl[3], (uint32_t *)rl[4]);
    free(out->codes); free(out->stats); free(out->perm); free(out->orows); free(out->oents);
    out->codes = rl[0]; out->codes_len = (size_t)z.codes_words * 4;
    out->stats = rl[1]; out->stats_len = (size_t)z.stats_words * 4;
    out->perm = rl[2]; out->perm_len = (size_t)z.perm_words * 4;
    out->orows = rl[3]; out->orows_len = (size_t)z.orows_words * 4;
    out->oents = rl[4]; out->oents_len = (size_t)z.oents_words * 4;
    out->outlier_entries = (uint64_t)z.oents_words;
    rc = 0;
    goto done;
  }
  rc = fail(err, errlen, "E_NOT_FOUND: %s", name ? name : "(no bilevel tensor)");
  goto done;
io:
  rc = fail(err, errlen, "E_IO: read error or out of memory");
done:
  free(dir);
  fclose(f);
  if (rc) spqr_free_bilevel(out);
  return rc;
}
