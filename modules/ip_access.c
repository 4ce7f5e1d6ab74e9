/* ip_access: allow or deny requests by the real client address.
 *
 * Config: {"allow": ["10.0.0.0/8", "127.0.0.1"], "deny": ["10.0.66.0/24", "::1/128"]}
 * Either list may be absent or empty, not both. Entries are CIDR ranges or
 * bare addresses (IPv4 or IPv6), parsed once at load.
 *
 * Rule, deny wins: an address inside any deny range gets 403; otherwise, if
 * allow is non-empty, an address outside every allow range gets 403;
 * otherwise the request goes on. There is no "most specific range" logic:
 * to let one host of a denied block through, narrow the deny list instead.
 * The address is request_client_addr(): the peer, or the X-Forwarded-For
 * address when the peer is one of the top-level "trusted_proxies". An
 * IPv4-mapped IPv6 client (::ffff:10.1.2.3) matches IPv4 ranges.
 *
 * Uses the core's pure CIDR helpers from addr.h (no sockets, no state). */
#include "module.h"
#include "addr.h"
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IP_ACCESS_FORBIDDEN_BODY "{\"error\":\"Forbidden\",\"status\":403}"

struct ip_access_config {
    struct cidr *allow, *deny;
    size_t nallow, ndeny;
};

__attribute__((format(printf, 3, 4))) static int fail(char *err, size_t errlen,
                                                      const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

/* The ranges under key: absent is the same as empty. On error *out may be
 * allocated already; the caller frees it. */
static int parse_ranges(const json_t *json, const char *path, const char *key,
                        struct cidr **out, size_t *n, char *err, size_t errlen)
{
    const json_t *arr = json_object_get(json, key), *v;
    char why[128];
    size_t i;
    if (!arr)
        return 0;
    if (!json_is_array(arr))
        return fail(err, errlen, "%s.%s: expected a list like [\"10.0.0.0/8\", \"::1\"]", path,
                    key);
    *out = xcalloc(json_array_size(arr) + 1, sizeof(**out));
    json_array_foreach(arr, i, v) {
        if (!json_is_string(v) || strlen(json_string_value(v)) != json_string_length(v))
            return fail(err, errlen, "%s.%s[%zu]: expected a string like \"10.0.0.0/8\"", path,
                        key, i);
        if (cidr_parse(json_string_value(v), &(*out)[i], why, sizeof(why)) != 0)
            return fail(err, errlen, "%s.%s[%zu]: %s", path, key, i, why);
        *n = i + 1;
    }
    return 0;
}

static void ip_access_free(void *cfg)
{
    struct ip_access_config *c = cfg;
    if (!c)
        return;
    free(c->allow);
    free(c->deny);
    free(c);
}

static int ip_access_parse(json_t *json, const char *path, void *gcfg, void **cfg, char *err, size_t errlen)
{
    (void)gcfg;
    const char *key;
    json_t *v;
    if (!json_is_object(json))
        return fail(err, errlen, "%s: expected an object like {\"allow\": [\"10.0.0.0/8\"]}",
                    path);
    json_object_foreach(json, key, v) {
        if (strcmp(key, "allow") != 0 && strcmp(key, "deny") != 0)
            return fail(err, errlen, "%s.%.64s: unknown key (known: allow, deny)", path, key);
    }
    struct ip_access_config *c = xcalloc(1, sizeof(*c));
    if (parse_ranges(json, path, "allow", &c->allow, &c->nallow, err, errlen) != 0 ||
        parse_ranges(json, path, "deny", &c->deny, &c->ndeny, err, errlen) != 0) {
        ip_access_free(c);
        return -1;
    }
    if (c->nallow == 0 && c->ndeny == 0) {
        ip_access_free(c);
        return fail(err, errlen, "%s: needs a non-empty \"allow\" or \"deny\" list", path);
    }
    *cfg = c;
    return 0;
}

static int ranges_match(const struct cidr *c, size_t n, const struct sockaddr *sa)
{
    for (size_t i = 0; i < n; i++)
        if (cidr_match(&c[i], sa))
            return 1;
    return 0;
}

static enum filter_status ip_access_on_request(struct request *r, void *cfg, void **ctx)
{
    const struct ip_access_config *c = cfg;
    const struct sockaddr *sa = request_client_addr(r);
    const char *why = NULL;
    (void)ctx;
    if (sa && ranges_match(c->deny, c->ndeny, sa))
        why = "denied";
    else if (c->nallow && !(sa && ranges_match(c->allow, c->nallow, sa)))
        why = "not_allowed";
    if (!why)
        return FILTER_CONTINUE;
    request_log_field(r, "ip_access", why);
    request_respond(r, 403, NULL, IP_ACCESS_FORBIDDEN_BODY, strlen(IP_ACCESS_FORBIDDEN_BODY));
    return FILTER_RESPONDED;
}

const struct module module_ip_access = {
    .name = "ip_access",
    .parse_config = ip_access_parse,
    .free_config = ip_access_free,
    .on_request = ip_access_on_request,
};
