/* Access log: one JSON object per request, one line each, or a text line
 * from a template. The query string is never logged: it may carry tokens. */
#ifndef PORTICO_ACCESSLOG_H
#define PORTICO_ACCESSLOG_H

#include <stddef.h>
#include <stdint.h>

/* A key/value list (extra access-log fields, request variables). */
struct kv {
    struct kv *next;
    const char *key, *value;
};

struct accesslog_entry {
    const char *client;
    const char *method;
    const char *host;
    const char *path;
    size_t path_len;
    const char *protocol;  /* "HTTP/1.0", "HTTP/1.1", "HTTP/2.0"; NULL when the request line was not read */
    int status;
    uint64_t bytes_in, bytes_out;
    uint64_t duration_us;
    uint64_t upstream_us;
    int has_upstream;
    const char *route;     /* NULL when no route matched */
    const char *endpoint;  /* NULL when no upstream was used */
    const char *tls_version, *tls_cipher; /* NULL on plain connections (then not logged) */
    const struct kv *fields; /* added by filters, in order */
};

/* Format e as a JSON line (with the trailing newline) into out; long
 * fields are cut so the line always fits. Returns the length. */
size_t accesslog_format(const struct accesslog_entry *e, char *out, size_t cap);

/* The same as a text line from a template: "%{name}" is replaced by a
 * field (time, client, method, host, path, status, bytes_in, bytes_out,
 * duration_ms, upstream_ms, route, upstream, protocol, tls_version, tls_cipher) or a filter's field
 * (request_id, ...), "-" when absent; values are escaped (\xHH). */
size_t accesslog_format_text(const struct accesslog_entry *e, const char *tmpl, char *out,
                             size_t cap);
/* 0 if the template is well formed, else -1 with a reason. */
int accesslog_template_check(const char *tmpl, char *err, size_t errlen);

#endif
