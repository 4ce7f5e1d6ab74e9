/* Pass 4 of loading the configuration (see config.c): line numbers for
 * messages. The text parsed fine, so a small scanner can walk it and note
 * the line where each wanted path's key (or array element) starts. Any
 * surprise just stops the scan: lines are a help, not a must. The paths
 * are written by config_path_put_*, here, which the validator uses too. */
#include "config_internal.h"

#include <stdlib.h>

void config_path_put_key(struct sbuf *b, const char *key, size_t n)
{
    int plain = n > 0;
    for (size_t i = 0; i < n && plain; i++) {
        char c = key[i];
        plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                c == '_' || c == '-';
    }
    if (plain) {
        if (b->len)
            sb_putc(b, '.');
        sb_putn(b, key, n);
    } else {
        sb_puts(b, "[\"");
        sb_put_escaped(b, key, n, SIZE_MAX);
        sb_puts(b, "\"]");
    }
}

void config_path_put_index(struct sbuf *b, size_t i)
{
    char tmp[32];
    snprintf(tmp, sizeof(tmp), "[%zu]", i);
    sb_puts(b, tmp);
}

/* ------------------------------------------------------------------ */
/* The scanner.                                                         */

struct scan {
    const char *p, *end;
    int line, depth;
    struct sbuf path, key;
    struct config_line_query *needles; /* sorted by path */
    size_t nneedles;
};

static int needle_cmp(const void *a, const void *b)
{
    const struct config_line_query *x = a, *y = b;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->path, y->path, n);
    return c ? c : (x->len < y->len ? -1 : x->len > y->len);
}

static void scan_hit(struct scan *sc, int line)
{
    struct config_line_query key = { sc->path.p, sc->path.len, NULL };
    struct config_line_query *hit =
        bsearch(&key, sc->needles, sc->nneedles, sizeof(key), needle_cmp);
    if (!hit)
        return;
    struct config_line_query *lo = hit, *hi = hit;
    while (lo > sc->needles && needle_cmp(lo - 1, &key) == 0)
        lo--;
    while (hi + 1 < sc->needles + sc->nneedles && needle_cmp(hi + 1, &key) == 0)
        hi++;
    for (; lo <= hi; lo++)
        if (*lo->line == 0)
            *lo->line = line;
}

static void scan_ws(struct scan *sc)
{
    while (sc->p < sc->end && (*sc->p == ' ' || *sc->p == '\t' || *sc->p == '\r' || *sc->p == '\n')) {
        if (*sc->p == '\n')
            sc->line++;
        sc->p++;
    }
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static int scan_hex4(struct scan *sc, unsigned *out)
{
    if (sc->end - sc->p < 4)
        return -1;
    *out = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(sc->p[i]);
        if (h < 0)
            return -1;
        *out = *out << 4 | (unsigned)h;
    }
    sc->p += 4;
    return 0;
}

static void put_utf8(struct sbuf *b, unsigned cp)
{
    char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (char)cp, n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xc0 | cp >> 6), u[1] = (char)(0x80 | (cp & 0x3f)), n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xe0 | cp >> 12), u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        u[2] = (char)(0x80 | (cp & 0x3f)), n = 3;
    } else {
        u[0] = (char)(0xf0 | cp >> 18), u[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3f)), u[3] = (char)(0x80 | (cp & 0x3f)), n = 4;
    }
    sb_putn(b, u, n);
}

/* A string at sc->p (the opening quote); decoded into out when out. */
static int scan_string(struct scan *sc, struct sbuf *out)
{
    sc->p++;
    while (sc->p < sc->end && *sc->p != '"') {
        char c = *sc->p++;
        if (c != '\\') {
            if (out)
                sb_putc(out, c);
            continue;
        }
        if (sc->p >= sc->end)
            return -1;
        c = *sc->p++;
        if (c == 'u') {
            unsigned cp, lo;
            if (scan_hex4(sc, &cp) < 0)
                return -1;
            if (cp >= 0xd800 && cp < 0xdc00) {
                if (sc->end - sc->p < 2 || sc->p[0] != '\\' || sc->p[1] != 'u')
                    return -1;
                sc->p += 2;
                if (scan_hex4(sc, &lo) < 0 || lo < 0xdc00 || lo > 0xdfff)
                    return -1;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            }
            if (out)
                put_utf8(out, cp);
        } else if (out) {
            const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
            const char *f = strchr(from, c);
            if (!f || !c)
                return -1;
            sb_putc(out, to[f - from]);
        }
    }
    if (sc->p >= sc->end)
        return -1;
    sc->p++;
    return 0;
}

static int scan_value(struct scan *sc);

static int scan_object(struct scan *sc)
{
    sc->p++;
    scan_ws(sc);
    if (sc->p < sc->end && *sc->p == '}') {
        sc->p++;
        return 0;
    }
    for (;;) {
        scan_ws(sc);
        if (sc->p >= sc->end || *sc->p != '"')
            return -1;
        int line = sc->line;
        sb_truncate(&sc->key, 0);
        if (scan_string(sc, &sc->key) < 0)
            return -1;
        size_t mark = sc->path.len;
        config_path_put_key(&sc->path, sc->key.p ? sc->key.p : "", sc->key.len);
        scan_hit(sc, line);
        scan_ws(sc);
        if (sc->p >= sc->end || *sc->p++ != ':' || scan_value(sc) < 0)
            return -1;
        sb_truncate(&sc->path, mark);
        scan_ws(sc);
        if (sc->p >= sc->end)
            return -1;
        char c = *sc->p++;
        if (c == '}')
            return 0;
        if (c != ',')
            return -1;
    }
}

static int scan_array(struct scan *sc)
{
    sc->p++;
    scan_ws(sc);
    if (sc->p < sc->end && *sc->p == ']') {
        sc->p++;
        return 0;
    }
    for (size_t i = 0;; i++) {
        scan_ws(sc);
        size_t mark = sc->path.len;
        config_path_put_index(&sc->path, i);
        scan_hit(sc, sc->line);
        if (scan_value(sc) < 0)
            return -1;
        sb_truncate(&sc->path, mark);
        scan_ws(sc);
        if (sc->p >= sc->end)
            return -1;
        char c = *sc->p++;
        if (c == ']')
            return 0;
        if (c != ',')
            return -1;
    }
}

static int scan_value(struct scan *sc)
{
    int rc;
    scan_ws(sc);
    if (sc->p >= sc->end || sc->depth > 4096)
        return -1;
    sc->depth++;
    if (*sc->p == '{')
        rc = scan_object(sc);
    else if (*sc->p == '[')
        rc = scan_array(sc);
    else if (*sc->p == '"')
        rc = scan_string(sc, NULL);
    else {
        const char *start = sc->p;
        while (sc->p < sc->end && !strchr(",]} \t\r\n", *sc->p))
            sc->p++;
        rc = sc->p > start ? 0 : -1;
    }
    sc->depth--;
    return rc;
}

void config_lines_find(const char *text, struct config_line_query *q, size_t n)
{
    if (n == 0)
        return;
    struct scan sc = { .p = text, .end = text + strlen(text), .line = 1 };
    sc.needles = q;
    sc.nneedles = n;
    qsort(sc.needles, sc.nneedles, sizeof(*sc.needles), needle_cmp);
    sb_reserve(&sc.path, 64);
    scan_value(&sc);
    free(sc.path.p);
    free(sc.key.p);
}
