/* Request-target parsing and path normalisation. Pure code.
 *
 * The router matches on the normalised path, and the same normalised path
 * is what goes upstream, so /api/../admin can never reach a route it
 * should not while the upstream sees something else. */
#ifndef PORTICO_URI_H
#define PORTICO_URI_H

#include <stddef.h>

struct uri_target {
    const char *authority;   /* absolute-form only ("host[:port]"), else NULL */
    size_t authority_len;
    const char *path;        /* starts with '/' (origin-form, or the path of absolute-form; "/" if it was empty) */
    size_t path_len;
    const char *query;       /* after '?', without it; NULL when there is no '?' */
    size_t query_len;
    int asterisk;            /* the target was exactly "*" */
};

/* Split a request-target (origin-form, absolute-form with http/https
 * scheme, or "*"). Returns 0, or -1 when it is none of these or contains a
 * byte not allowed in a URI (control, space, non-ASCII, '#', '\\', ...),
 * an invalid %-escape (path, query or authority), userinfo ('@') or an
 * empty authority. Spans point into t, except the "/" given for an empty
 * absolute-form path (a static string). For "*", asterisk is 1 and path,
 * query and authority are NULL. */
int uri_parse_target(const char *t, size_t len, struct uri_target *out);

/* Normalise a path (RFC 3986 section 6.2.2): percent-decode unreserved
 * characters (ALPHA DIGIT - . _ ~), uppercase the hex digits of the
 * remaining escapes, fold runs of '/', and resolve "." and ".." segments
 * (including their percent-encoded forms %2e / %2E). Writes at most
 * out_cap bytes to out and sets *out_len.
 * Returns 0, or -1 for: a path not starting with '/', a byte not allowed
 * in a path, an invalid or truncated %-escape, an encoded NUL (%00), an
 * encoded '/' (%2F) or '\\' (%5C) (ambiguous across upstreams, refused as
 * nginx and Envoy can be set to), a ".." that climbs above the root, or
 * output over out_cap.
 * Unlike RFC 3986 remove_dot_segments, which clamps "/../a" to "/a", a ".."
 * at the root is refused: a client trying to climb out is hostile.
 * A trailing "/." or "/.." leaves a trailing '/' ("/a/b/.." -> "/a/").
 * The output never exceeds the input length, and normalising it again
 * gives the same bytes. out may be the same buffer as in. */
int uri_normalize_path(const char *in, size_t len, char *out, size_t out_cap, size_t *out_len);

#endif
