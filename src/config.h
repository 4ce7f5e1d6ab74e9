/* The configuration: a JSON file (jansson) turned into an immutable,
 * reference-counted snapshot.
 *
 * Loading validates everything: unknown keys, wrong types, bad addresses,
 * dangling upstream names. Each problem is reported once as
 * "<json.path>: <what is wrong> (line N)" through config_errors; nothing
 * is printed by this file.
 *
 * String values may be "${VAR}" / "${VAR:-default}" (substituted from the
 * environment, anywhere in the string; "$$" is a literal '$') or
 * "@/path/file" (the whole value is read from the file, one trailing
 * newline removed; "@@" at the start is a literal '@'). */
#ifndef PORTICO_CONFIG_H
#define PORTICO_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <jansson.h>
#include "addr.h"
#include "http1.h"
#include "modules.h"

struct router;
struct tls_server;
struct tls_client;
struct resil_upstream;

struct config_listener {
    char *address;                 /* as written */
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int backlog;                   /* default 511 */
    struct tls_server *tls;        /* NULL: plain HTTP; shared by every worker */
    int tls_handshake_timeout_ms;  /* default 10000 */
    char *client_subject_header;   /* mTLS: header carrying the verified subject, or NULL */
    char *client_fp_header;        /* mTLS: header carrying its SHA-256 fingerprint, or NULL */
    int redirect_to_https;         /* plain listener: answer every request with a redirect */
    int redirect_port;             /* port written in the Location; 0 = none (443) */
};

struct config_admin {
    int enabled;                   /* "admin" present */
    char *address;                 /* default 127.0.0.1:9901 */
    struct sockaddr_storage addr;
    socklen_t addrlen;
    char *token;                   /* bearer token, NULL = none (loopback only) */
    int ready_modules;             /* "ready_requires": ["modules"] */
    int ready_endpoints;           /* "ready_requires": ["healthy_endpoints"] */
};

struct config_limits {
    size_t max_header_bytes;       /* request line + fields; default 16384 */
    size_t max_headers;            /* default 100 */
    size_t max_uri_bytes;          /* default 8192 */
    uint64_t max_body_bytes;       /* default 10485760; 0 = unlimited */
    int header_timeout_ms;         /* whole request head; default 10000 -> 408 */
    int body_timeout_ms;           /* grace before the minimum rate applies; default 30000 */
    uint64_t body_min_rate;        /* bytes/s the body must average after the grace; default 1024; 0 = off (then body_timeout_ms is a total deadline) */
    int idle_timeout_ms;           /* keep-alive idle between requests; default 60000 */
    int send_timeout_ms;           /* client not reading our response; default 60000 */
    int max_connections;           /* whole process; default 10000 */
    int drain_timeout_ms;          /* on SIGTERM; default 30000 */
    int drain_idle_ms;             /* idle keep-alive grace while draining; default 1000 */
};

struct config_endpoint {
    char *address;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    /* A host name endpoint is one of "dns.max_addresses" slots whose
     * address the DNS thread fills in (resil.h); addr is then unused. */
    char *dns_host;                /* NULL for an IP literal */
    int dns_port;
    int dns_slot;
};

/* HTTP/2 to clients (h2.c): the "http2" section. */
struct config_http2 {
    int max_concurrent_streams;    /* SETTINGS_MAX_CONCURRENT_STREAMS; default 128 */
    int initial_window_size;       /* per stream, request bodies; default 65535 */
    int connection_window_size;    /* whole connection; default 1048576 */
    int max_requests;              /* streams per connection, then GOAWAY; default 10000 */
    int max_resets_per_s;          /* client RST_STREAMs per second ... */
    int reset_burst;               /* ... with this burst; default 33/s, burst 200 */
    int max_control_frames_per_s;  /* SETTINGS, PING, PRIORITY received; default 100 */
    int max_empty_frames;          /* consecutive frames carrying nothing; default 10 */
    int max_continuations;         /* CONTINUATION frames per header block; default 8 */
};

/* "workers": 0 takes the CPUs the process may use; a cgroup v2
 * "cpu.max" line ("200000 100000") gives its quota in CPUs, rounded up,
 * or 0 when there is none ("max 100000"). */
long config_cpu_quota(const char *cpu_max);

struct config_upstream {
    char *name;
    size_t index;                  /* position in config.upstreams */
    struct config_endpoint *endpoints;
    size_t nendpoints;
    int connect_timeout_ms;        /* default 1000 -> 502 on expiry */
    int timeout_ms;                /* waiting for response bytes (head, and between body reads); default 60000 -> 504 */
    int keepalive;                 /* idle pooled connections per worker per endpoint; default 64; 0 = no pooling */
    int keepalive_timeout_ms;      /* idle pooled connection lifetime; default 30000 */
    int keepalive_requests;        /* requests per upstream connection; default 10000 */
    struct tls_client *tls;        /* NULL: plain HTTP to the endpoints */
    int h2;                        /* "protocol": "h2c" or "h2" (h2up.h); default HTTP/1.1 */
    struct resil_upstream *resil;  /* balancer, retries, breaker, health (resil.h) */
};

/* HTTP methods a route allows, as a bit mask over enum http_method. */
#define ROUTE_METHOD_BIT(m) (1u << (m))

struct config_route {
    char *name;                    /* "name", default "routes[i]" */
    size_t index;
    char *host;                    /* lowercased; NULL = any host */
    int host_wildcard;             /* host is "*.suffix"; host points at the whole pattern */
    char *path;                    /* the path pattern */
    size_t path_len;
    int exact;                     /* "exact": true */
    uint32_t methods;              /* 0 = any; else ROUTE_METHOD_BIT mask */
    char **other_methods;          /* method tokens outside enum http_method */
    size_t nother_methods;
    struct config_upstream *upstream; /* NULL for a respond route */
    char *strip_prefix;            /* removed from the front of the path before forwarding */
    char *prefix_rewrite;          /* replaces the matched path prefix */
    /* respond route */
    int respond_status;            /* 0 when not a respond route */
    char *respond_body;
    size_t respond_body_len;
    char *respond_content_type;    /* default "text/plain; charset=utf-8" */
    struct filter_conf *filters;   /* the route's own filters, in order */
    size_t nfilters;
    double log_sample;             /* "log_sample"; -1 = access_log.sample */
    int retry_non_idempotent;      /* retries may resend POST etc. (resil.h) */
    /* WebSocket tunnels (tunnel.h): off unless "websocket": true */
    int websocket;
    int websocket_idle_timeout_ms;   /* no byte either way this long: close; default 60000 */
    int64_t websocket_max_lifetime_ms; /* 0 = no limit (the default) */
};

#define ACCESSLOG_TEXT_DEFAULT                                                                    \
    "%{time} %{client} \"%{method} %{host}%{path}\" %{status} %{bytes_out} %{duration_ms}ms "    \
    "route=%{route} upstream=%{upstream} request_id=%{request_id}"

struct config_access_log {
    char *path;                    /* file path, "-" (stdout) or "off"; default "-" */
    int text;                      /* "format": "text" */
    char *template;                /* the text line; ACCESSLOG_TEXT_DEFAULT by default */
    double sample;                 /* share of 1xx-3xx answers logged; default 1 */
};

struct config {
    int refcount;                  /* atomic; see config_ref / config_unref */
    char *file;
    int workers;                   /* resolved: >= 1 ("workers": 0 = one per CPU) */
    unsigned busy_poll_us;         /* 0: workers sleep as soon as idle (worker.c) */
    char *log_level;               /* "debug", "info", "warn", "error"; default "info" */
    struct config_listener *listeners;
    size_t nlisteners;
    struct config_admin admin;
    struct config_limits limits;
    struct config_http2 http2;
    struct config_access_log access_log;
    struct cidr *trusted_proxies;
    size_t ntrusted_proxies;
    int via;                       /* add "Via: 1.1 portico"; default false */
    struct config_upstream *upstreams;
    size_t nupstreams;
    struct config_route **routes;  /* array of pointers, config order */
    size_t nroutes;
    struct router *router;
    struct filter_conf *filters;   /* global filters: run before every route's */
    size_t nfilters;
    json_t *json;                  /* the substituted document */
    json_t *json_redacted;         /* the same for showing: secrets replaced (admin /config) */
    void **module_globals;         /* per portico_modules[] index: parse_global's result */
    char **warnings; /* load-time warnings (expired certificate...), printed by main */
    size_t nwarnings;
};

/* Collected load errors. */
struct config_errors {
    char **msgs;
    size_t n;
};
void config_errors_free(struct config_errors *e);

/* Load and validate a file. Returns a snapshot with refcount 1, or NULL
 * with at least one message in errs (the caller prefixes the file name). */
struct config *config_load(const char *file, struct config_errors *errs);
/* The same from a string already in memory (tests, fuzzing); file is used
 * only for messages and relative paths, may be NULL. */
struct config *config_load_string(const char *json, const char *file, struct config_errors *errs);

struct config *config_ref(struct config *c);
void config_unref(struct config *c);

/* What module m's parse_global returned for this config (NULL if none). */
struct module;
void *config_module_global(const struct config *c, const struct module *m);
/* Run start_global of every module with a section: the config is about to
 * serve. Returns 0, or -1 with a message in err. */
int config_start_modules(struct config *c, char *err, size_t errlen);

/* Whether pooled connections of upstream a may serve upstream b of a
 * newer config (a reload): same connection settings. Endpoint addresses
 * are compared per endpoint by the caller. Extend it with every new
 * setting that shapes a connection (TLS, ...). */
int config_upstream_same_connections(const struct config_upstream *a, const struct config_upstream *b);

/* Every module's global_ready: 1, or 0 with the first reason in why. */
int config_modules_ready(const struct config *c, char *why, size_t whylen);

/* Find an upstream by name; NULL if absent. */
struct config_upstream *config_find_upstream(const struct config *c, const char *name);

#endif
