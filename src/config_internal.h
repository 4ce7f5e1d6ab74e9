/* Shared by the configuration loader's files only, never included outside
 * src/config*.c:
 *   config.c        validation, snapshot lifetime, entry points (config.h),
 *   config_subst.c  ${VAR} / @file substitution of one string value,
 *   config_lines.c  the raw-text scanner that maps a JSON path to a line.
 * The growable buffer below is static inline (as in buf.h) so that nothing
 * but the functions declared here leaves those files. */
#ifndef PORTICO_CONFIG_INTERNAL_H
#define PORTICO_CONFIG_INTERNAL_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "log.h"

#define SHOW_MAX 96 /* longest value quoted in a message */

/* ------------------------------------------------------------------ */
/* Growable byte buffer. p is NULL until the first write, then always
 * NUL-terminated. The declarer owns p and frees it with free(b.p).
 * Allocation failure aborts (xrealloc). */

struct sbuf {
    char *p;
    size_t len, cap;
};

static inline void sb_reserve(struct sbuf *b, size_t more)
{
    if (b->len + more + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + more + 1)
        cap *= 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
}

static inline void sb_putn(struct sbuf *b, const char *s, size_t n)
{
    sb_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static inline void sb_putc(struct sbuf *b, char c) { sb_putn(b, &c, 1); }
static inline void sb_puts(struct sbuf *b, const char *s) { sb_putn(b, s, strlen(s)); }

static inline void sb_truncate(struct sbuf *b, size_t len)
{
    b->len = len;
    if (b->p)
        b->p[len] = '\0';
}

/* Append s as the inside of a JSON-style quoted string: quotes,
 * backslashes and control bytes escaped; cut to max bytes with "...". */
static inline void sb_put_escaped(struct sbuf *b, const char *s, size_t n, size_t max)
{
    size_t i;
    for (i = 0; i < n && i < max; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            sb_putc(b, '\\');
            sb_putc(b, (char)c);
        } else if (c < 0x20 || c == 0x7f) {
            char esc[8];
            snprintf(esc, sizeof(esc), "\\u%04x", c);
            sb_puts(b, esc);
        } else {
            sb_putc(b, (char)c);
        }
    }
    if (i < n)
        sb_puts(b, "...");
}

/* ------------------------------------------------------------------ */
/* config_lines.c: JSON paths and their lines in the text.              */

/* Append one component of a JSON path to b: ".key" (or "key" first) for
 * plain keys, else ["key"] escaped; "[i]" for an array index. The
 * validator builds its paths with these and the line scanner matches
 * with them, so the two agree. */
void config_path_put_key(struct sbuf *b, const char *key, size_t n);
void config_path_put_index(struct sbuf *b, size_t i);

/* One wanted path: path[0..len) as built by config_path_put_*. */
struct config_line_query {
    const char *path;
    size_t len;
    int *line; /* out: 1-based line where that key or element starts */
};

/* Scan text (NUL-terminated, already accepted by json_loads) and, for each
 * query whose *line is 0, store the line where its path is first found.
 * Queries not found keep 0, as do those not reached when the scan stops
 * at something it does not expect: lines are a help, not a must.
 * Reorders q; the caller owns q, the paths and the line slots. */
void config_lines_find(const char *text, struct config_line_query *q, size_t n);

/* ------------------------------------------------------------------ */
/* config_subst.c: ${VAR}, ${VAR:-default}, $$, @file and @@.           */

/* Substitute the string value v in place. Relative @file paths are taken
 * from dir (NULL: the current directory). Returns
 *   0   nothing came from the environment or a file (v unchanged, or only
 *       "$$" / "@@" unescaped);
 *   1   v now holds substituted text, which may be a secret: *template is
 *       set to a malloc'd copy of the text written in the file, owned by
 *       the caller, for messages to quote instead of the value;
 *  -1   v unchanged, and why holds the reason (cut to whycap bytes).
 * Reads the environment and files; prints nothing. */
int config_subst_string(json_t *v, const char *dir, char **template, char *why, size_t whycap);

/* p itself if absolute or dir is NULL, else dir "/" p: relative paths in
 * the configuration (@file, access_log.path) are taken from the config
 * file's directory. Returns a malloc'd string owned by the caller. */
char *config_resolve_path(const char *dir, const char *p);

/* ------------------------------------------------------------------ */
/* config.c's problem recording, for the other config*.c files.         */

struct load;
struct config_upstream;
/* Record a problem at the current JSON path (config.c's err). */
void config_err(struct load *ld, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void config_push_key(struct load *ld, const char *key);
void config_push_index(struct load *ld, size_t i);
void config_pop(struct load *ld);
/* v quoted for a message (config.c's show): a substituted value, which
 * may be a secret, is shown as the template written in the file. */
#define CONFIG_SHOW_BUF (SHOW_MAX * 6 + 64)
const char *config_show(const struct load *ld, const json_t *v, char *buf, size_t cap);

/* config_resil.c: an endpoint entry, "host:port" or {"address": ..,
 * "weight": n}: returns the address string value or NULL (recorded). */
json_t *config_endpoint_address(struct load *ld, json_t *v);
/* The resilience keys of upstream obj (balance, hash_on, retry,
 * circuit_breaker, health_check, max_requests, max_pending, endpoint
 * weights) into u->resil, then the shared state. Endpoints parsed first. */
void config_parse_resilience(struct load *ld, json_t *obj, struct config_upstream *u);
/* A "name:port" endpoint (v a string addr_parse called a host name):
 * fills e for the DNS thread; 0, or -1 with the problem recorded. */
struct config_endpoint;
int config_endpoint_name(struct load *ld, json_t *v, struct config_endpoint *e);

#endif
