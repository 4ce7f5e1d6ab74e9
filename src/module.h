/* The module API: everything a module may see of Portico.
 *
 * A module is one file in modules/ that exports exactly one
 * `const struct module module_<name>` filled with designated initialisers;
 * everything else in the file is static. The module table is generated at
 * configure time (./configure --enable-modules=LIST, --disable-module-NAME,
 * --add-module=DIR) so a module that is not built costs nothing.
 *
 * A route lists filters in order: {"filters": [{"<module>": {config}}, ...]}.
 * Filters listed at the top level ("filters") run before every route's own.
 * Each filter's config is parsed once, at load, by the module's
 * parse_config; all validation happens there.
 *
 * Hooks and what they may return (the meaning is the same everywhere):
 *   FILTER_CONTINUE   go on with the next filter (or the proxy step)
 *   FILTER_RESPONDED  the hook answered with request_respond(); the rest of
 *                     the chain and the proxy step are skipped (response
 *                     hooks of the filters that already ran still run)
 *   FILTER_PAUSED     (on_request only) the hook started asynchronous work;
 *                     the request waits until the module calls
 *                     request_resume() or request_respond() from a later
 *                     event-loop callback. Never call them from inside the
 *                     hook that returned FILTER_PAUSED.
 *
 * Order: on_request runs in chain order; on_response runs in reverse chain
 * order, for every filter whose on_request returned FILTER_CONTINUE (or
 * that paused and was resumed), on proxied answers and local ones alike
 * (so CORS headers reach a 404); the filter that answered a request itself
 * is not asked about its own answer. on_log runs in chain order, for the
 * same filters plus the one that answered, after the response is complete
 * or the client is gone. Requests refused before routing (bad framing,
 * 400/413/414/431...) run no filters at all.
 *
 * Lifetime: per-request memory comes from request_alloc() and is freed
 * with the request in one call. Anything else a module holds for a request
 * (a timer, a pending Redis command) must be released by a cleanup
 * registered with request_cleanup_add(): it runs when the request ends for
 * any reason, including a client that disconnects while the request is
 * paused. After its cleanup has run, the module must not touch the request.
 *
 * Threads: every hook of a request runs on the worker thread that owns it.
 * Configs are shared read-only by all workers. A module never blocks. */
#ifndef PORTICO_MODULE_H
#define PORTICO_MODULE_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct request;
struct event_base;

enum filter_status { FILTER_CONTINUE = 0, FILTER_RESPONDED = 1, FILTER_PAUSED = 2 };

struct module {
    const char *name;
    /* Optional: the top-level config section this module owns, e.g.
     * "jwt_providers" or "redis". parse_global runs once per config load,
     * before any filter config of the module, with the section's value, or
     * NULL when the section is absent (the module may still need defaults).
     * Its result (gcfg, NULL is fine) is passed to every parse_config of
     * the same load; keep a pointer to it in the filter's cfg if the hooks
     * need it. Errors as for parse_config (path is the section's name). */
    const char *global_key;
    int (*parse_global)(json_t *json, const char *path, void **gcfg, char *err, size_t errlen);
    /* Optional: the config that holds gcfg is about to serve (not called
     * for `portico -t`). Start background work here (a key fetcher, say);
     * free_global stops it. Called on the main thread before workers run
     * requests with this config. */
    int (*start_global)(void *gcfg, char *err, size_t errlen);
    void (*free_global)(void *gcfg);
    /* Optional: whether what gcfg depends on (a Redis, a key server) is
     * reachable, for the admin's GET /readyz when the config asks for it
     * ("admin": {"ready_requires": ["modules"]}). Returns 1, or 0 with a
     * short reason in why. Runs on the admin thread: read atomics only. */
    int (*global_ready)(void *gcfg, char *why, size_t whylen);
    /* Parse this filter's config: json is the value under the module's name
     * (an object, usually). path is its JSON path, e.g.
     * "routes[2].filters[0].cors", to start messages with. gcfg is what
     * parse_global returned for this load (NULL without one). Returns 0 and
     * sets *cfg (NULL is fine), or -1 with "path.key: what is wrong" in err. */
    int (*parse_config)(json_t *json, const char *path, void *gcfg, void **cfg, char *err,
                        size_t errlen);
    void (*free_config)(void *cfg); /* optional */
    /* Optional, once per worker thread before it serves anything. */
    int (*worker_init)(int worker_id, struct event_base *base, char *err, size_t errlen);

    /* Request head parsed and routed, before anything goes upstream.
     * *ctx is a per-request slot for this filter (NULL at first). */
    enum filter_status (*on_request)(struct request *r, void *cfg, void **ctx);
    /* Optional: request body bytes as they pass (decoded from chunked).
     * Returns FILTER_CONTINUE or FILTER_RESPONDED (only while the response
     * has not started). */
    enum filter_status (*on_request_body)(struct request *r, void *cfg, void **ctx,
                                          const char *data, size_t len);
    /* The response head is about to be written: the upstream's, or a local
     * one. Edit it with response_set_header() and friends, or replace a
     * proxied one with request_respond() and return FILTER_RESPONDED. */
    enum filter_status (*on_response)(struct request *r, void *cfg, void **ctx);
    /* The exchange is over; add access-log fields with request_log_field(). */
    void (*on_log)(struct request *r, void *cfg, void **ctx);
};

/* ---- reading the request ------------------------------------------------ */
const char *request_method(const struct request *r);
/* The normalised path (what routing matched), without the query. */
const char *request_path(const struct request *r, size_t *len);
/* The query string without '?', or NULL. */
const char *request_query(const struct request *r, size_t *len);
/* The host (lowercased, as routed; may carry ":port"). */
const char *request_host(const struct request *r);
const char *request_route_name(const struct request *r);
/* The first value of a request header as the client sent it, or NULL.
 * The value is *len bytes, NOT NUL-terminated, and points into the
 * request's input: readable only while on_request (or a paused request's
 * resumption) runs; after the head has been forwarded it returns NULL.
 * Copy what you need later (request_alloc). Edits made by filters are not
 * reflected here. */
const char *request_header(const struct request *r, const char *name, size_t *len);
/* How many fields of that name the request has (same window as
 * request_header): a credential sent twice is ambiguous. */
size_t request_header_count(const struct request *r, const char *name);
/* The real client address: the peer, or, when the peer is a trusted proxy,
 * the right-most X-Forwarded-For address not itself trusted. */
const struct sockaddr *request_client_addr(const struct request *r);
/* The same as text ("1.2.3.4", "::1"). */
const char *request_client_ip(const struct request *r);
/* Did the request arrive over TLS (a listener with "tls")? */
int request_is_tls(const struct request *r);

/* ---- changing what goes upstream --------------------------------------- */
/* Names are matched case-insensitively; name and value are copied. A value
 * with CR, LF or NUL is refused (returns -1). set replaces every field of
 * that name, add appends one, remove drops them all. */
int request_set_header(struct request *r, const char *name, const char *value);
int request_add_header(struct request *r, const char *name, const char *value);
void request_remove_header(struct request *r, const char *name);

/* ---- the response ------------------------------------------------------- */
int response_status(const struct request *r);
/* 1 in on_response when the answer is a local one (Portico's or a
 * filter's), 0 when it is the upstream's. */
int response_is_local(const struct request *r);
/* First value of a response header from the upstream (in on_response of a
 * proxied answer), or NULL. */
const char *response_header(const struct request *r, const char *name, size_t *len);
int response_set_header(struct request *r, const char *name, const char *value);
int response_add_header(struct request *r, const char *name, const char *value);
void response_remove_header(struct request *r, const char *name);

/* Answer the request locally. Callable from on_request (then return
 * FILTER_RESPONDED), from on_response (replaces a proxied answer), or
 * later for a paused request. content_type NULL means application/json.
 * body is copied. Headers set with response_set_header() are included. */
void request_respond(struct request *r, int status, const char *content_type,
                     const char *body, size_t len);
/* Continue the chain of a paused request (from an event callback). */
void request_resume(struct request *r);

/* ---- memory, cleanup, log, loop ---------------------------------------- */
void *request_alloc(struct request *r, size_t n); /* zeroed, freed with the request */
char *request_strdup(struct request *r, const char *s);
void request_cleanup_add(struct request *r, void (*fn)(void *), void *arg);
/* Add "key": "value" to this request's access-log line (both copied). */
void request_log_field(struct request *r, const char *key, const char *value);
/* Per-request variables filters share, e.g. "request_id" set by the
 * request_id module and read by the headers module as %{request_id}
 * (later "jwt.sub" from jwt_auth). Both strings are copied; a later set
 * replaces the value. request_var returns NULL when unset. */
void request_var_set(struct request *r, const char *name, const char *value);
const char *request_var(const struct request *r, const char *name);
struct event_base *request_event_base(const struct request *r);

/* ---- metrics (GET /metrics on the admin listener) ----------------------- */
/* Add n to the counter name ("portico_<module>_..._total") with up to two
 * label pairs (k2 NULL for one, k1 NULL for none). Label values must come
 * from a small fixed set (an outcome, a reason, a route name): never a
 * token, a key or anything a client chose. Callable from any thread: on a
 * worker it costs no lock. */
void module_metric_add(const char *name, uint64_t n, const char *k1, const char *v1,
                       const char *k2, const char *v2);
int request_worker_id(const struct request *r);

#endif
