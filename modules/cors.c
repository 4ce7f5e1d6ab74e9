/* cors: Cross-Origin Resource Sharing answers for browsers.
 *
 * Origins are "scheme://host[:port]" (scheme and host compared without case; a
 * default port is dropped at load as browsers never send it), a host pattern
 * "*.example.com" after the scheme (hosts under it at any depth, not example.com
 * itself), or "*" alone (any origin; refused with credentials, as the spec says).
 * A preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered
 * here: 204 with the Access-Control-Allow-* headers (Allow-Headers lists the
 * configured names whatever was asked; a browser that asked for more refuses), or
 * 403 without them for a refused origin or method: the browser fails as on a bare
 * 204, but logs and curl see a refusal. Other requests go on; their answer, proxied
 * or local (a 404, another filter's 401), gets Allow-Origin (+ -Credentials,
 * -Expose-Headers) when the origin is allowed, and "Vary: Origin" unless origins is
 * "*", so that caches keep answers for different origins apart. */
#include "module.h"
#include "log.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define CORS_MAX_AGE_LIMIT  86400
#define CORS_PREFLIGHT_VARY "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
#define CORS_FORBIDDEN_BODY "{\"error\":\"Forbidden\",\"status\":403}"

struct cors_origin {
    char *prefix; /* exact: the whole origin, canonical; pattern: "scheme://" */
    char *suffix; /* pattern: ".domain[:port]"; NULL for an exact origin */
    size_t prefix_len, suffix_len;
};

struct cors_config {
    struct cors_origin *origins;
    size_t norigins;
    int any; /* origins is ["*"] */
    int credentials;
    char *methods;  /* "GET, POST": sent, and what a preflight is checked against */
    char *headers;  /* joined with ", "; NULL when none */
    char *expose;   /* joined with ", "; NULL when none */
    char max_age[16]; /* "" when not configured */
};

/* *ctx of a request going on: NULL (no Origin, or a refused one), or the
 * Access-Control-Allow-Origin value for the answer: any_origin, or a copy of
 * the request's Origin (request headers are only readable in on_request). */
static char any_origin[] = "*";

/* A host name: labels of letters, digits and '-' separated by single dots. */
static int host_name_ok(const char *p, size_t n)
{
    if (n == 0 || p[0] == '.' || p[n - 1] == '.')
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == '.' ? p[i + 1] == '.' : !(isalnum(c) || c == '-'))
            return 0;
    }
    return 1;
}

/* s, n: the Origin header as sent. Browsers send origins in canonical form,
 * so an exact origin is one case-insensitive comparison; a pattern also
 * needs a host name between its prefix and suffix. "null" matches only "*". */
static int origin_matches(const struct cors_origin *c, const char *s, size_t n)
{
    if (!c->suffix)
        return n == c->prefix_len && strncasecmp(s, c->prefix, n) == 0;
    return n > c->prefix_len + c->suffix_len && strncasecmp(s, c->prefix, c->prefix_len) == 0 &&
           strncasecmp(s + n - c->suffix_len, c->suffix, c->suffix_len) == 0 &&
           host_name_ok(s + c->prefix_len, n - c->prefix_len - c->suffix_len);
}

static int origin_allowed(const struct cors_config *c, const char *s, size_t n)
{
    for (size_t i = 0; i < c->norigins; i++)
        if (origin_matches(&c->origins[i], s, n))
            return 1;
    return 0;
}

/* ---- config ------------------------------------------------------------ */

__attribute__((format(printf, 3, 4))) static int fail(char *err, size_t errlen,
                                                      const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

/* Where "scheme://host[:port]" in s (n bytes) ends before its port, or 0 if
 * s is not one. *port: 0 if absent. *star: the host is "*." + a host name. */
static size_t origin_split(const char *s, size_t n, int *star, unsigned long *port)
{
    size_t i = 0, h, e;
    char ip6[INET6_ADDRSTRLEN];
    struct in6_addr a6;

    while (i < n && (isalpha((unsigned char)s[i]) ||
                     (i && (isdigit((unsigned char)s[i]) || (s[i] && strchr("+-.", s[i]))))))
        i++;
    if (i == 0 || n - i < 3 || memcmp(s + i, "://", 3) != 0)
        return 0;
    h = e = i + 3;
    *star = n - h >= 2 && s[h] == '*' && s[h + 1] == '.';
    *port = 0;
    if (h < n && s[h] == '[') { /* an IPv6 literal */
        while (e < n && s[e] != ']')
            e++;
        if (e == n || e - h - 1 >= sizeof(ip6))
            return 0;
        snprintf(ip6, sizeof(ip6), "%.*s", (int)(e - h - 1), s + h + 1);
        if (inet_pton(AF_INET6, ip6, &a6) != 1)
            return 0;
        e++;
    } else {
        h += *star ? 2 : 0;
        for (e = h; e < n && s[e] != ':';)
            e++;
        if (!host_name_ok(s + h, e - h))
            return 0;
    }
    if (e < n && (s[e] != ':' || n - e - 1 < 1 || n - e - 1 > 5))
        return 0;
    for (i = e + 1; i < n; i++) {
        if (!isdigit((unsigned char)s[i]))
            return 0;
        *port = *port * 10 + (unsigned long)(s[i] - '0');
    }
    return e < n && (*port < 1 || *port > 65535) ? 0 : e;
}

static int parse_origin(const json_t *v, const char *where, struct cors_origin *out, char *err,
                        size_t errlen)
{
    char canon[600];
    const char *s = json_string_value(v);
    size_t n = s ? json_string_length(v) : 0, end;
    unsigned long port;
    int star;

    if (!s || n > 512 || (end = origin_split(s, n, &star, &port)) == 0)
        return fail(err, errlen,
                    "%s: not an origin; write scheme://host[:port] without a path, e.g. "
                    "\"https://app.example.com\" or \"https://*.example.com\"", where);
    snprintf(canon, sizeof(canon), "%.*s", (int)end, s);
    for (char *q = canon; *q; q++)
        *q = (char)tolower((unsigned char)*q);
    /* Browsers leave a default port out of the Origin they send. */
    if (port && !(port == 80 && !strncmp(canon, "http:", 5)) &&
        !(port == 443 && !strncmp(canon, "https:", 6)))
        snprintf(canon + end, sizeof(canon) - end, ":%lu", port);
    if (star) {
        size_t h = (size_t)(strstr(canon, "://") - canon) + 3;
        out->prefix = xstrndup(canon, h);
        out->suffix = xstrdup(canon + h + 1); /* keeps the '.': no match mid-label */
        out->suffix_len = strlen(out->suffix);
    } else {
        out->prefix = xstrdup(canon);
    }
    out->prefix_len = strlen(out->prefix);
    return 0;
}

static int parse_origins(const json_t *json, const char *path, struct cors_config *c, char *err,
                         size_t errlen)
{
    const json_t *arr = json_object_get(json, "origins"), *v;
    char where[512];
    size_t i;
    if (!json_is_array(arr) || json_array_size(arr) == 0)
        return fail(err, errlen, "%s.origins: required, a non-empty list like "
                    "[\"https://app.example.com\"] (or [\"*\"] for any origin)", path);
    c->origins = xcalloc(json_array_size(arr), sizeof(*c->origins));
    json_array_foreach(arr, i, v) {
        snprintf(where, sizeof(where), "%s.origins[%zu]", path, i);
        if (json_is_string(v) && strcmp(json_string_value(v), "*") == 0) {
            if (json_array_size(arr) != 1)
                return fail(err, errlen, "%s: \"*\" (any origin) must be the only entry", where);
            c->any = 1;
        } else if (parse_origin(v, where, &c->origins[c->norigins++], err, errlen) != 0) {
            return -1;
        }
    }
    return 0;
}

/* A list of HTTP tokens (method or header names) under key, joined with
 * ", " into *joined (left NULL for an absent or empty list). */
static int parse_tokens(const json_t *json, const char *path, const char *key, int methods,
                        char **joined, char *err, size_t errlen)
{
    const json_t *arr = json_object_get(json, key), *v;
    size_t i, len = 0;
    if (!arr)
        return 0;
    if (!json_is_array(arr) || (methods && json_array_size(arr) == 0))
        return fail(err, errlen, "%s.%s: expected a %slist of names like [\"%s\"]", path, key,
                    methods ? "non-empty " : "", methods ? "GET" : "Authorization");
    json_array_foreach(arr, i, v) {
        const char *s = json_string_value(v);
        int ok = s && *s;
        for (const char *p = s; ok && *p; p++) /* tchar, without '*' */
            ok = isalnum((unsigned char)*p) || strchr("!#$%&'+-.^_`|~", *p);
        if (!ok)
            return fail(err, errlen, "%s.%s[%zu]: not a %s name%s", path, key, i,
                        methods ? "method" : "header",
                        s && strchr(s, '*') ? " (no wildcards; list the names)" : "");
        len += strlen(s) + 2;
    }
    if (len == 0)
        return 0;
    *joined = xcalloc(1, len);
    json_array_foreach(arr, i, v) {
        if (i)
            strcat(*joined, ", ");
        strcat(*joined, json_string_value(v));
    }
    return 0;
}

static int parse_scalars(const json_t *json, const char *path, struct cors_config *c, char *err,
                         size_t errlen)
{
    const json_t *cred = json_object_get(json, "credentials");
    const json_t *age = json_object_get(json, "max_age_s");
    if (cred && !json_is_boolean(cred))
        return fail(err, errlen, "%s.credentials: expected true or false", path);
    c->credentials = json_is_true(cred);
    if (c->any && c->credentials)
        return fail(err, errlen, "%s.credentials: cannot be true with origins [\"*\"] (the CORS "
                    "spec forbids credentials for any origin); list the origins instead", path);
    if (age && (!json_is_integer(age) || json_integer_value(age) < 1 ||
                json_integer_value(age) > CORS_MAX_AGE_LIMIT))
        return fail(err, errlen, "%s.max_age_s: expected whole seconds from 1 to %d", path,
                    CORS_MAX_AGE_LIMIT);
    if (age)
        snprintf(c->max_age, sizeof(c->max_age), "%lld", (long long)json_integer_value(age));
    return 0;
}

static void cors_free(void *cfg)
{
    struct cors_config *c = cfg;
    if (!c)
        return;
    for (size_t i = 0; i < c->norigins; i++) {
        free(c->origins[i].prefix);
        free(c->origins[i].suffix);
    }
    free(c->origins);
    free(c->methods);
    free(c->headers);
    free(c->expose);
    free(c);
}

static int cors_parse(json_t *json, const char *path, void *gcfg, void **cfg, char *err, size_t errlen)
{
    (void)gcfg;
    static const char known[] = " origins methods headers expose_headers credentials max_age_s ";
    char probe[80];
    const char *key;
    json_t *v;
    if (!json_is_object(json))
        return fail(err, errlen, "%s: expected an object like "
                    "{\"origins\": [\"https://app.example.com\"]}", path);
    json_object_foreach(json, key, v) {
        snprintf(probe, sizeof(probe), " %.64s ", key);
        if (strchr(key, ' ') || !strstr(known, probe))
            return fail(err, errlen, "%s.%.64s: unknown key (known: origins, methods, headers, "
                        "expose_headers, credentials, max_age_s)", path, key);
    }
    struct cors_config *c = xcalloc(1, sizeof(*c));
    if (parse_origins(json, path, c, err, errlen) != 0 ||
        parse_tokens(json, path, "methods", 1, &c->methods, err, errlen) != 0 ||
        parse_tokens(json, path, "headers", 0, &c->headers, err, errlen) != 0 ||
        parse_tokens(json, path, "expose_headers", 0, &c->expose, err, errlen) != 0 ||
        parse_scalars(json, path, c, err, errlen) != 0) {
        cors_free(c);
        return -1;
    }
    if (!c->methods) /* the CORS-safelisted methods */
        c->methods = xstrdup("GET, HEAD, POST");
    *cfg = c;
    return 0;
}

/* ---- hooks ------------------------------------------------------------- */

/* Methods are case-sensitive tokens; the list is short. */
static int method_allowed(const struct cors_config *c, const char *m, size_t n)
{
    for (const char *p = c->methods;; p += 2) {
        size_t len = strcspn(p, ",");
        if (len == n && memcmp(p, m, n) == 0)
            return 1;
        p += len;
        if (!*p)
            return 0;
    }
}

/* The value for Access-Control-Allow-Origin, NULL for a refused origin. */
static char *allow_origin(struct request *r, const struct cors_config *c, const char *o, size_t n)
{
    if (c->any) /* never with credentials: refused at load */
        return any_origin;
    if (!origin_allowed(c, o, n))
        return NULL;
    char *copy = request_alloc(r, n + 1);
    memcpy(copy, o, n);
    return copy;
}

/* The chain does not call on_response for the filter that answered, so
 * this answer is complete as it leaves. */
static enum filter_status preflight(struct request *r, const struct cors_config *c,
                                    const char *allow, const char *m, size_t mlen)
{
    response_set_header(r, "Vary", CORS_PREFLIGHT_VARY);
    if (!allow || !method_allowed(c, m, mlen)) {
        request_respond(r, 403, NULL, CORS_FORBIDDEN_BODY, strlen(CORS_FORBIDDEN_BODY));
        return FILTER_RESPONDED;
    }
    response_set_header(r, "Access-Control-Allow-Origin", allow);
    response_set_header(r, "Access-Control-Allow-Methods", c->methods);
    if (c->headers)
        response_set_header(r, "Access-Control-Allow-Headers", c->headers);
    if (c->credentials)
        response_set_header(r, "Access-Control-Allow-Credentials", "true");
    if (c->max_age[0])
        response_set_header(r, "Access-Control-Max-Age", c->max_age);
    request_respond(r, 204, NULL, "", 0);
    return FILTER_RESPONDED;
}

static enum filter_status cors_on_request(struct request *r, void *cfg, void **ctx)
{
    const struct cors_config *c = cfg;
    size_t olen, mlen;
    const char *origin = request_header(r, "Origin", &olen), *m = NULL;
    if (!origin)
        return FILTER_CONTINUE;
    char *allow = allow_origin(r, c, origin, olen);
    if (strcmp(request_method(r), "OPTIONS") == 0)
        m = request_header(r, "Access-Control-Request-Method", &mlen);
    if (m)
        return preflight(r, c, allow, m, mlen);
    *ctx = allow;
    return FILTER_CONTINUE;
}

static enum filter_status cors_on_response(struct request *r, void *cfg, void **ctx)
{
    const struct cors_config *c = cfg;
    if (!c->any)
        response_add_header(r, "Vary", "Origin");
    if (!*ctx)
        return FILTER_CONTINUE;
    response_set_header(r, "Access-Control-Allow-Origin", *ctx);
    if (c->credentials)
        response_set_header(r, "Access-Control-Allow-Credentials", "true");
    if (c->expose)
        response_set_header(r, "Access-Control-Expose-Headers", c->expose);
    return FILTER_CONTINUE;
}

const struct module module_cors = {
    .name = "cors",
    .parse_config = cors_parse,
    .free_config = cors_free,
    .on_request = cors_on_request,
    .on_response = cors_on_response,
};
