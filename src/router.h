/* The route table: host + path (+ method) -> route. Pure code.
 *
 * Built once per config load and immutable afterwards, so every worker can
 * read it without locks. Matching rules:
 *   - host: a route with an exact host beats one with a wildcard
 *     ("*.example.com" matches one or more labels before ".example.com",
 *     not "example.com" itself), which beats a route with no host.
 *     Host comparison is case-insensitive; a ":port" suffix and a trailing
 *     dot in the request's Host are ignored.
 *     Among wildcards, the longest suffix is the most specific. A Host
 *     over 255 bytes (after those removals) only reaches host-less routes.
 *   - host fall-through: the groups are tried from the most specific
 *     (exact host, then wildcards longest suffix first, then no host); a
 *     group where no route matches the path at all (whatever the method)
 *     passes the request on to the next one. So a host-less "/" route is a
 *     catch-all even for hosts that have routes of their own.
 *   - path, within that first group with a path match: an exact path beats
 *     every prefix; otherwise the longest prefix wins; ties keep config
 *     order. A prefix is a plain byte prefix: "/api" also matches "/apix"
 *     (write "/api/" for the directory). Paths compare case-sensitively.
 *   - methods: a route with a method list matches only those methods: the
 *     known ones in config_route.methods, unknown tokens (HTTP_M_OTHER,
 *     compared with method_str, case-sensitively) in other_methods; a
 *     route with neither allows every method. Within the group, the
 *     candidates are tried in the order above (exact, then longer to
 *     shorter prefixes, config order among equals) and the first allowing
 *     the method wins, so "GET /x exact" can sit on top of a "/" catch-all
 *     taking every other method. When routes match the path but none
 *     allows the method, the result is "method not allowed" (405) rather
 *     than falling through to another host group.
 * The path given must already be normalised (uri_normalize_path). */
#ifndef PORTICO_ROUTER_H
#define PORTICO_ROUTER_H

#include <stddef.h>
#include "http1.h"

struct config_route;
struct router;

/* Build the table over routes[0..n) (pointers are kept, not copied; the
 * routes must outlive the router). Returns NULL with a reason in err on
 * failure: two routes with the same host, path, kind and overlapping
 * methods (the later one could never match), a path not starting with '/',
 * or a wildcard host not of the form "*.suffix". Out of memory aborts. */
struct router *router_build(struct config_route *const *routes, size_t n,
                            char *err, size_t errlen);
void router_free(struct router *r);

enum router_result { ROUTER_MATCH, ROUTER_NOT_FOUND, ROUTER_METHOD_NOT_ALLOWED };

/* Find the route for a request. On ROUTER_MATCH, *out is the route.
 * Never allocates; safe to call from any thread. */
enum router_result router_match(const struct router *r,
                                const char *host, size_t host_len,
                                const char *path, size_t path_len,
                                enum http_method method, const struct http_str *method_str,
                                const struct config_route **out);

#endif
