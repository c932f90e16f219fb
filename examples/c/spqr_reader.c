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

/* The fixed header and the directory (tensor records, section records, string table). */
typedef struct container {
  FILE *f;
  uint64_t fsize;
  uint32_t ntens, nsec;
  uint64_t strtab;
  unsigned char *dir;                  /* the records and the string table */
  const unsigned char *secs, *names;   /* into dir */
} container;

static void close_container(container *c) {
  free(c->dir);
  if (c->f) fclose(c->f);
  memset(c, 0, sizeof(*c));
}

/* Opens `path` and reads its directory: 0, or -1 with a message (nothing left open). */
static int open_container(const char *path, container *c, char *err, size_t errlen) {
  unsigned char hdr[64];
  int rc = -1;
  memset(c, 0, sizeof(*c));
  c->f = fopen(path, "rb");
  if (!c->f) return fail(err, errlen, "E_IO: cannot open %s", path);
  if (fseek(c->f, 0, SEEK_END) != 0) goto io;
  const long end = ftell(c->f);
  if (end < 0) goto io;
  c->fsize = (uint64_t)end;
  if (c->fsize < 64 || read_at(c->f, 0, hdr, 64)) {
    rc = fail(err, errlen, "E_TRUNCATED: header");
    goto done;
  }
  if (memcmp(hdr, MAGIC, 8)) { rc = fail(err, errlen, "E_BAD_MAGIC"); goto done; }
  if (rd16(hdr + 8) != 1) {
    rc = fail(err, errlen, "E_UNSUPPORTED_VERSION %u", rd16(hdr + 8));
    goto done;
  }
  if (rd64(hdr + 16) != 0) { rc = fail(err, errlen, "E_UNKNOWN_FEATURE"); goto done; }
  c->ntens = rd32(hdr + 24);
  c->nsec = rd32(hdr + 28);
  c->strtab = rd64(hdr + 32);
  if (c->ntens > (1u << 20) || c->nsec > 16ull * c->ntens || c->strtab > (256ull << 20)) {
    rc = fail(err, errlen, "E_LIMIT: counts");
    goto done;
  }
  const uint64_t dirlen = 160ull * c->ntens + 32ull * c->nsec + c->strtab;
  if (64 + dirlen > c->fsize) { rc = fail(err, errlen, "E_TRUNCATED: records"); goto done; }
  c->dir = (unsigned char *)malloc(dirlen ? dirlen : 1);
  if (!c->dir || read_at(c->f, 64, c->dir, dirlen)) goto io;
  c->secs = c->dir + 160ull * c->ntens;
  c->names = c->secs + 32ull * c->nsec;
  return 0;
io:
  rc = fail(err, errlen, "E_IO: read error or out of memory");
done:
  close_container(c);
  return rc;
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
  container c;
  int rc = -1;
  memset(out, 0, sizeof(*out));
  if (open_container(path, &c, err, errlen)) return -1;
  FILE *f = c.f;
  const uint64_t fsize = c.fsize, strtab = c.strtab;
  const uint32_t ntens = c.ntens, nsec = c.nsec;
  const unsigned char *dir = c.dir, *secs = c.secs, *names = c.names;
  for (uint32_t ti = 0; ti < ntens; ++ti) {
    const unsigned char *r = dir + 160ull * ti;
    uint32_t no = rd32(r), nl = rd32(r + 4);
    if ((uint64_t)no + nl > strtab) { rc = fail(err, errlen, "E_BAD_LAYOUT: name"); goto done; }
    uint16_t enc = rd16(r + 8);
    if (enc != SPQR_ENCODING_BILEVEL) continue;
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
  close_container(&c);
  if (rc) spqr_free_bilevel(out);
  return rc;
}

/* ------------------------------------------------------------------------------------------
 * Tensor lookup and channel_mixed (SPEC section 12)
 * ------------------------------------------------------------------------------------------ */

/* The record of tensor `name` (any encoding), or, with name NULL, of the first tensor whose
 * encoding is `want` or `want2`.  NULL with a message when there is none or a name runs past
 * the string table. */
static const unsigned char *find_tensor(const container *c, const char *path, const char *name,
                                        int want, int want2, char *err, size_t errlen) {
  for (uint32_t ti = 0; ti < c->ntens; ++ti) {
    const unsigned char *r = c->dir + 160ull * ti;
    const uint32_t no = rd32(r), nl = rd32(r + 4);
    if ((uint64_t)no + nl > c->strtab) {
      fail(err, errlen, "E_BAD_LAYOUT: %s: tensor record %u: name_offset %u + name_length %u "
           "past the string table (%llu bytes)", path, ti, no, nl,
           (unsigned long long)c->strtab);
      return NULL;
    }
    const int enc = rd16(r + 8);
    if (name ? (strlen(name) == nl && !memcmp(c->names + no, name, nl))
             : (enc == want || enc == want2))
      return r;
  }
  if (name)
    fail(err, errlen, "E_NOT_FOUND: %s: no tensor named '%s'", path, name);
  else
    fail(err, errlen, "E_NOT_FOUND: %s: no %s tensor", path,
         want2 != want ? "bilevel or channel_mixed" : "channel_mixed");
  return NULL;
}

int spqr_tensor_encoding(const char *path, const char *name, char *err, size_t errlen) {
  container c;
  if (open_container(path, &c, err, errlen)) return -1;
  const unsigned char *r = find_tensor(&c, path, name, SPQR_ENCODING_BILEVEL,
                                       SPQR_ENCODING_CHANNEL_MIXED, err, errlen);
  const int enc = r ? rd16(r + 8) : -1;
  close_container(&c);
  return enc;
}

void spqr_free_cmpq(spqr_host_cmpq *t) {
  free(t->codes);
  free(t->perm);
  free(t->oindex);
  free(t->oents);
  free(t->tables);
  memset(t, 0, sizeof(*t));
}

/* A file's tensor name, printable: at most 96 bytes, bytes outside ASCII 0x20..0x7E as '?'. */
static void printable_name(char *dst, size_t cap, const unsigned char *s, uint32_t len) {
  size_t k = 0;
  for (; k < len && k < 96 && k + 4 < cap; ++k)
    dst[k] = (s[k] >= 0x20 && s[k] < 0x7F) ? (char)s[k] : '?';
  if (k < len && k + 4 < cap) dst[k++] = '.', dst[k++] = '.', dst[k++] = '.';
  dst[k] = 0;
}

/* f16 bits -> is it NaN or infinite (exponent all ones)? */
static int f16_nonfinite(uint32_t h) { return (h & 0x7C00u) == 0x7C00u; }

#define CMPQ_ROLES 5
static const int CMPQ_ROLE_IDS[CMPQ_ROLES] = {2, 5, 6, 7, 8};
static const char *const CMPQ_ROLE_NAMES[CMPQ_ROLES] = {"codes", "perm", "outlier_index",
                                                        "outlier_entries", "tables"};

/* Section k of CMPQ_ROLE_IDS into its field of `t` (which then owns it). */
static void set_section(spqr_host_cmpq *t, int k, void *buf, size_t len) {
  switch (k) {
    case 0: t->codes = (uint32_t *)buf, t->codes_len = len; break;
    case 1: t->perm = buf, t->perm_len = len; break;
    case 2: t->oindex = (uint32_t *)buf, t->oindex_len = len; break;
    case 3: t->oents = (uint32_t *)buf, t->oents_len = len; break;
    default: t->tables = (uint16_t *)buf, t->tables_len = len; break;
  }
}

/* The outlier stream of SPEC C-6.1 / C-6.2 (rule 6 does not apply to channel_mixed, C-12.1),
 * each rule over the whole stream before the next, as C-9.3 orders them.  Returns the number of
 * outliers (non-skip entries), or -1 with `what` describing the first broken rule and *code
 * naming its error code. */
static int64_t check_outlier_stream(const spqr_host_cmpq *t, char *what, size_t cap,
                                    const char **code) {
  const int64_t m = t->m, n = t->n, E = t->outlier_entries;
  const int64_t nb = (m + SPQR_OUTLIER_BLOCK_ROWS - 1) / SPQR_OUTLIER_BLOCK_ROWS;
  const uint32_t *X = t->oindex, *ent = t->oents;
  *code = "E_BAD_OUTLIERS";
  /* rule 1: the index (C-6.1) */
  if (X[0] != 0) return snprintf(what, cap, "outlier_index[0] = %u, expected 0", X[0]), -1;
  for (int64_t k = 0; k < nb; ++k)
    if (X[k + 1] < X[k])
      return snprintf(what, cap, "outlier_index decreases at block %lld (%u > %u)",
                      (long long)k, X[k], X[k + 1]), -1;
  if ((int64_t)X[nb] != E)
    return snprintf(what, cap, "outlier_index[%lld] = %u, expected E = %lld", (long long)nb,
                    X[nb], (long long)E), -1;
  /* rules 2 and 3: every delta >= 1; a skip has delta 65535 */
  for (int64_t e = 0; e < E; ++e)
    if ((ent[e] & 0xFFFFu) == 0)
      return snprintf(what, cap, "outlier entry %lld has delta 0", (long long)e), -1;
  for (int64_t e = 0; e < E; ++e)
    if ((ent[e] >> 16) == 0xFFFFu && (ent[e] & 0xFFFFu) != 0xFFFFu)
      return snprintf(what, cap, "outlier entry %lld is a skip with delta %u, expected 65535",
                      (long long)e, ent[e] & 0xFFFFu), -1;
  /* rule 4: a skip does not end its block */
  for (int64_t k = 0; k < nb; ++k)
    if (X[k + 1] > X[k] && (ent[X[k + 1] - 1] >> 16) == 0xFFFFu)
      return snprintf(what, cap, "block %lld ends with a skip entry", (long long)k), -1;
  /* rule 5: every outlier cell inside its block */
  int64_t count = 0;
  for (int64_t k = 0; k < nb; ++k) {
    const int64_t r0 = k * SPQR_OUTLIER_BLOCK_ROWS;
    const int64_t rows = m - r0 < SPQR_OUTLIER_BLOCK_ROWS ? m - r0 : SPQR_OUTLIER_BLOCK_ROWS;
    int64_t p = -1;
    for (uint32_t e = X[k]; e < X[k + 1]; ++e) {
      p += ent[e] & 0xFFFFu;
      if ((ent[e] >> 16) == 0xFFFFu) continue;
      if (p >= rows * n)
        return snprintf(what, cap, "outlier entry %u: cell %lld past block %lld (%lld cells)",
                        e, (long long)p, (long long)k, (long long)(rows * n)), -1;
      ++count;
    }
  }
  /* rule 7: finite values */
  for (int64_t e = 0; e < E; ++e)
    if ((ent[e] >> 16) != 0xFFFFu && f16_nonfinite(ent[e] >> 16)) {
      *code = "E_NONFINITE";
      return snprintf(what, cap, "outlier entry %lld has value 0x%04x (not finite)",
                      (long long)e, ent[e] >> 16), -1;
    }
  return count;
}

int spqr_read_cmpq(const char *path, const char *name, spqr_host_cmpq *out, char *err,
                   size_t errlen) {
  container c;
  char tn[112];
  memset(out, 0, sizeof(*out));
  if (open_container(path, &c, err, errlen)) return -1;
  int rc = -1;
  const unsigned char *r = find_tensor(&c, path, name, SPQR_ENCODING_CHANNEL_MIXED,
                                       SPQR_ENCODING_CHANNEL_MIXED, err, errlen);
  if (!r) goto done;
  printable_name(tn, sizeof tn, c.names + rd32(r), rd32(r + 4));
#define BAD(code, ...)                                                     \
  do {                                                                     \
    char what_[200];                                                       \
    snprintf(what_, sizeof what_, __VA_ARGS__);                            \
    rc = fail(err, errlen, "%s: %s: tensor '%s': %s", code, path, tn, what_); \
    goto done;                                                             \
  } while (0)
  const int enc = rd16(r + 8);
  if (enc != SPQR_ENCODING_CHANNEL_MIXED)
    BAD("E_BAD_INPUT", "encoding %d, not channel_mixed (%d)", enc, SPQR_ENCODING_CHANNEL_MIXED);
  /* the record (C-2.4, C-3.1 .. C-3.3) */
  const unsigned ndim = r[13];
  if (rd16(r + 14) != 0) BAD("E_BAD_FIELD", "record reserved field is %u, not 0", rd16(r + 14));
  if (r[12] < 1 || r[12] > 3) BAD("E_BAD_FIELD", "dtype %u (1 f32, 2 f16, 3 bf16)", r[12]);
  if (ndim > 8) BAD("E_BAD_FIELD", "ndim %u > 8", ndim);
  uint64_t elements = 1;
  for (unsigned d = 0; d < 8; ++d) {
    const uint64_t v = rd64(r + 24 + 8 * d);
    if (d >= ndim) {
      if (v) BAD("E_BAD_FIELD", "dims[%u] = %llu past ndim %u", d, (unsigned long long)v, ndim);
      continue;
    }
    if (v > (1ull << 40)) BAD("E_LIMIT", "dims[%u] = %llu > 2^40", d, (unsigned long long)v);
    elements = v == 0 ? 0 : (elements > (1ull << 48) / v ? (1ull << 48) + 1 : elements * v);
  }
  if (elements > (1ull << 48)) BAD("E_LIMIT", "more than 2^48 elements");
  const uint32_t first = rd32(r + 16), count = rd32(r + 20);
  if (count > 16) BAD("E_LIMIT", "section_count %u > 16", count);
  if ((uint64_t)first + count > c.nsec)
    BAD("E_BAD_LAYOUT", "sections %u..%u past the %u section records", first,
        first + count - 1, c.nsec);
  if (rd16(r + 10) != 1)
    BAD("E_UNSUPPORTED_ENCODING_VERSION", "channel_mixed version %u (this reader: 1)",
        rd16(r + 10));
  /* params (C-12.1), shape (C-12.2), width counts */
  const unsigned char *pp = r + 120;
  uint64_t sum = 0;
  for (int b = 0; b < 8; ++b) sum += out->width_counts[b] = rd32(pp + 4 * b);
  out->table_rows = rd32(pp + 32);
  out->outlier_entries = rd32(pp + 36);
  out->dtype = r[12];
  if (out->table_rows > (1 << 24))
    BAD("E_BAD_FIELD", "params.table_rows = %lld > 2^24", (long long)out->table_rows);
  const uint64_t m = rd64(r + 24), n = rd64(r + 32);
  if (ndim != 2 || m < 1 || n < 1)
    BAD("E_BAD_SHAPE", "channel_mixed needs 2 dims >= 1 (ndim %u, dims %llu x %llu)", ndim,
        (unsigned long long)m, (unsigned long long)n);
  if (m >= (1ull << 31) || n >= (1ull << 31))
    BAD("E_LIMIT", "shape %llu x %llu: this example handles m, n < 2^31",
        (unsigned long long)m, (unsigned long long)n);
  out->m = (int64_t)m;
  out->n = (int64_t)n;
  if (sum != n)
    BAD("E_BAD_FIELD", "params.width_counts sum to %llu, but n = %llu", (unsigned long long)sum,
        (unsigned long long)n);
  /* section roles and lengths (C-12.2 .. C-12.6); no product below overflows: m * n <= 2^48 */
  const uint64_t T = out->table_rows ? ceil_div(m, (uint64_t)out->table_rows) : 1;
  uint64_t code_bytes = 0, L = 0;
  for (int b = 1; b <= 8; ++b) {
    code_bytes += stream_bytes(m * out->width_counts[b - 1], (unsigned)b);
    L += (uint64_t)out->width_counts[b - 1] << b;
  }
  out->table_blocks = (int64_t)T;
  out->table_entries = (int64_t)L;
  const int has_out = out->outlier_entries > 0;
  const uint64_t want_len[CMPQ_ROLES] = {
      code_bytes, (n <= SPQR_PERM_U16_MAX_N ? 2ull : 4ull) * n,
      has_out ? 4 * (ceil_div(m, SPQR_OUTLIER_BLOCK_ROWS) + 1) : 0,
      4ull * (uint64_t)out->outlier_entries, 2 * T * L};
  const uint32_t want_count = has_out ? 5 : 3;
  if (count != want_count)
    BAD("E_BAD_LAYOUT", "%u sections, expected %u (codes, perm,%s tables)", count, want_count,
        has_out ? " outlier_index, outlier_entries," : "");
  uint32_t si = first;
  for (int k = 0; k < CMPQ_ROLES; ++k) {
    if (!has_out && (k == 2 || k == 3)) continue;
    const unsigned char *s = c.secs + 32ull * si;
    const uint64_t off = rd64(s), len = rd64(s + 8);
    const unsigned role = rd16(s + 20);
    if (rd16(s + 22) != 0 || rd64(s + 24) != 0)
      BAD("E_BAD_FIELD", "section record %u: reserved fields not zero", si);
    if ((int)role != CMPQ_ROLE_IDS[k])
      BAD("E_BAD_LAYOUT", "section %u has role %u, expected %d (%s)", si - first, role,
          CMPQ_ROLE_IDS[k], CMPQ_ROLE_NAMES[k]);
    if (len != want_len[k])
      BAD("E_BAD_LAYOUT", "section %s is %llu bytes, expected %llu", CMPQ_ROLE_NAMES[k],
          (unsigned long long)len, (unsigned long long)want_len[k]);
    if (off > c.fsize || len > c.fsize - off)
      BAD("E_TRUNCATED", "section %s (offset %llu, %llu bytes) past the end of the file "
          "(%llu bytes)", CMPQ_ROLE_NAMES[k], (unsigned long long)off, (unsigned long long)len,
          (unsigned long long)c.fsize);
    /* one spare zero word after each section: straddling reads of packed streams */
    void *buf = calloc((size_t)len + 4, 1);
    if (!buf) BAD("E_IO", "out of memory");
    set_section(out, k, buf, (size_t)len);
    if (read_at(c.f, off, buf, (size_t)len))
      BAD("E_IO", "cannot read section %s", CMPQ_ROLE_NAMES[k]);
    ++si;
  }
  /* data checks, in the order of C-12.8: permutation, finite tables, outlier stream */
  {
    unsigned char *hit = (unsigned char *)calloc((size_t)n, 1);
    if (!hit) BAD("E_IO", "out of memory");
    for (uint64_t j = 0; j < n; ++j) {
      const uint64_t pj = n <= SPQR_PERM_U16_MAX_N ? ((const uint16_t *)out->perm)[j]
                                                   : ((const uint32_t *)out->perm)[j];
      if (pj >= n || hit[pj]) {
        free(hit);
        BAD("E_BAD_PERMUTATION", "perm[%llu] = %llu %s", (unsigned long long)j,
            (unsigned long long)pj, pj >= n ? "is out of range" : "repeats an earlier entry");
      }
      hit[pj] = 1;
    }
    free(hit);
  }
  for (uint64_t e = 0; e < T * L; ++e)
    if (f16_nonfinite(out->tables[e]))
      BAD("E_NONFINITE", "tables entry %llu (block %llu) is 0x%04x (not finite)",
          (unsigned long long)e, (unsigned long long)(e / L), out->tables[e]);
  if (has_out) {
    char what[160];
    const char *code;
    const int64_t k = check_outlier_stream(out, what, sizeof what, &code);
    if (k < 0) BAD(code, "%s", what);
    out->outliers = k;
  }
#undef BAD
  rc = 0;
done:
  close_container(&c);
  if (rc) spqr_free_cmpq(out);
  return rc;
}
