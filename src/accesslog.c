#include "accesslog.h"

#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

struct out {
    char *p;
    size_t len, cap;
};

static void put(struct out *o, const char *s, size_t n)
{
    if (o->len + n > o->cap)
        n = o->cap - o->len;
    memcpy(o->p + o->len, s, n);
    o->len += n;
}

/* A JSON string, escaped; at most max input bytes. */
static void put_str(struct out *o, const char *s, size_t n, size_t max)
{
    static const char hex[] = "0123456789abcdef";
    if (n > max)
        n = max;
    put(o, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') {
            char e[2] = { '\\', (char)ch };
            put(o, e, 2);
        } else if (ch < 0x20 || ch >= 0x7f) {
            /* Bytes from the network are not trusted to be UTF-8. */
            char e[6] = { '\\', 'u', '0', '0', hex[ch >> 4], hex[ch & 15] };
            put(o, e, 6);
        } else {
            put(o, (const char *)&ch, 1);
        }
    }
    put(o, "\"", 1);
}

size_t accesslog_format(const struct accesslog_entry *e, char *out, size_t cap)
{
    struct out o = { out, 0, cap - 1 };
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    char tmp[128];
    int n = snprintf(tmp, sizeof(tmp), "{\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\",\"client\":",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     (long)(tv.tv_usec / 1000));
    put(&o, tmp, (size_t)n);
    put_str(&o, e->client, strlen(e->client), 64);
    put(&o, ",\"method\":", 10);
    put_str(&o, e->method, strlen(e->method), 32);
    put(&o, ",\"host\":", 8);
    put_str(&o, e->host, strlen(e->host), 256);
    put(&o, ",\"path\":", 8);
    put_str(&o, e->path, e->path_len, 1024);
    put(&o, ",\"protocol\":", 12);
    if (e->protocol)
        put_str(&o, e->protocol, strlen(e->protocol), 16);
    else
        put(&o, "null", 4);
    n = snprintf(tmp, sizeof(tmp),
                 ",\"status\":%d,\"bytes_in\":%llu,\"bytes_out\":%llu,\"duration_ms\":%.3f,\"upstream_ms\":",
                 e->status, (unsigned long long)e->bytes_in, (unsigned long long)e->bytes_out,
                 (double)e->duration_us / 1000.0);
    put(&o, tmp, (size_t)n);
    if (e->has_upstream) {
        n = snprintf(tmp, sizeof(tmp), "%.3f", (double)e->upstream_us / 1000.0);
        put(&o, tmp, (size_t)n);
    } else {
        put(&o, "null", 4);
    }
    put(&o, ",\"route\":", 9);
    if (e->route)
        put_str(&o, e->route, strlen(e->route), 128);
    else
        put(&o, "null", 4);
    put(&o, ",\"upstream\":", 12);
    if (e->endpoint)
        put_str(&o, e->endpoint, strlen(e->endpoint), 128);
    else
        put(&o, "null", 4);
    if (e->tls_version) {
        put(&o, ",\"tls_version\":", 15);
        put_str(&o, e->tls_version, strlen(e->tls_version), 32);
        put(&o, ",\"tls_cipher\":", 14);
        put_str(&o, e->tls_cipher, strlen(e->tls_cipher), 64);
    }
    /* Filters' fields, bounded so the line always fits. */
    size_t budget = 2048;
    for (const struct kv *f = e->fields; f && budget > 0; f = f->next) {
        size_t kl = strlen(f->key), vl = strlen(f->value);
        if (kl > 64)
            kl = 64;
        if (vl > 256)
            vl = 256;
        if ((kl + vl) * 6 + 8 > budget)
            break;
        budget -= (kl + vl) * 6 + 8;
        put(&o, ",", 1);
        put_str(&o, f->key, kl, 64);
        put(&o, ":", 1);
        put_str(&o, f->value, vl, 256);
    }
    put(&o, "}", 1);
    out[o.len++] = '\n';
    return o.len;
}

/* Text: printable ASCII as is, '"' and '\' escaped, anything else \xHH,
 * so a request cannot forge a log line. */
static void put_text(struct out *o, const char *s, size_t n, size_t max)
{
    static const char hex[] = "0123456789abcdef";
    if (n > max)
        n = max;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') {
            char e[2] = { '\\', (char)ch };
            put(o, e, 2);
        } else if (ch < 0x20 || ch >= 0x7f) {
            char e[4] = { '\\', 'x', hex[ch >> 4], hex[ch & 15] };
            put(o, e, 4);
        } else {
            put(o, (const char *)&ch, 1);
        }
    }
}

int accesslog_template_check(const char *t, char *err, size_t errlen)
{
    for (const char *p = t; *p; p++) {
        if (p[0] != '%' || p[1] != '{')
            continue;
        const char *end = strchr(p + 2, '}');
        if (!end) {
            snprintf(err, errlen, "\"%%{\" without a closing \"}\"");
            return -1;
        }
        if (end == p + 2) {
            snprintf(err, errlen, "empty variable \"%%{}\"");
            return -1;
        }
        p = end;
    }
    return 0;
}

static void put_var(struct out *o, const struct accesslog_entry *e, const char *name, size_t n)
{
    char tmp[64];
    int k = -1;
#define IS(s) (n == sizeof(s) - 1 && memcmp(name, s, n) == 0)
    if (IS("time")) {
        struct timeval tv;
        struct tm tm;
        gettimeofday(&tv, NULL);
        gmtime_r(&tv.tv_sec, &tm);
        k = snprintf(tmp, sizeof(tmp), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     (long)(tv.tv_usec / 1000));
    } else if (IS("client")) {
        put_text(o, e->client, strlen(e->client), 64);
    } else if (IS("method")) {
        put_text(o, e->method, strlen(e->method), 32);
    } else if (IS("host")) {
        put_text(o, e->host, strlen(e->host), 256);
    } else if (IS("path")) {
        put_text(o, e->path, e->path_len, 1024);
    } else if (IS("status")) {
        k = snprintf(tmp, sizeof(tmp), "%d", e->status);
    } else if (IS("bytes_in")) {
        k = snprintf(tmp, sizeof(tmp), "%llu", (unsigned long long)e->bytes_in);
    } else if (IS("bytes_out")) {
        k = snprintf(tmp, sizeof(tmp), "%llu", (unsigned long long)e->bytes_out);
    } else if (IS("duration_ms")) {
        k = snprintf(tmp, sizeof(tmp), "%.3f", (double)e->duration_us / 1000.0);
    } else if (IS("upstream_ms")) {
        k = e->has_upstream ? snprintf(tmp, sizeof(tmp), "%.3f", (double)e->upstream_us / 1000.0)
                            : snprintf(tmp, sizeof(tmp), "-");
    } else if (IS("route")) {
        if (e->route)
            put_text(o, e->route, strlen(e->route), 128);
        else
            put(o, "-", 1);
    } else if (IS("protocol")) {
        if (e->protocol)
            put_text(o, e->protocol, strlen(e->protocol), 16);
        else
            put(o, "-", 1);
    } else if (IS("tls_version") || IS("tls_cipher")) {
        const char *v = n == 11 ? e->tls_version : e->tls_cipher;
        if (v)
            put_text(o, v, strlen(v), 64);
        else
            put(o, "-", 1);
    } else if (IS("upstream")) {
        if (e->endpoint)
            put_text(o, e->endpoint, strlen(e->endpoint), 128);
        else
            put(o, "-", 1);
    } else {
        for (const struct kv *f = e->fields; f; f = f->next) {
            if (strlen(f->key) == n && memcmp(f->key, name, n) == 0) {
                put_text(o, f->value, strlen(f->value), 256);
                return;
            }
        }
        put(o, "-", 1);
    }
#undef IS
    if (k > 0)
        put(o, tmp, (size_t)k);
}

size_t accesslog_format_text(const struct accesslog_entry *e, const char *t, char *out, size_t cap)
{
    struct out o = { out, 0, cap - 1 };
    for (const char *p = t; *p;) {
        const char *end;
        if (p[0] == '%' && p[1] == '{' && (end = strchr(p + 2, '}')) != NULL) {
            put_var(&o, e, p + 2, (size_t)(end - p - 2));
            p = end + 1;
        } else {
            const char *next = strstr(p + 1, "%{");
            size_t n = next ? (size_t)(next - p) : strlen(p);
            put(&o, p, n);
            p += n;
        }
    }
    out[o.len++] = '\n';
    return o.len;
}
