/* The admin listener: its own thread and event loop, never a worker's.
 *
 *   GET  /healthz    200 while the process runs
 *   GET  /readyz     200 when serving; 503 once draining (SIGTERM)
 *   GET  /metrics    Prometheus text (metrics.h), summed over the workers
 *   GET  /config     the running config, secrets redacted
 *   GET  /upstreams  each upstream and endpoint with its request counts
 *   POST /reload     reload the config file, as SIGHUP does; the answer
 *                    says whether it took, and why not
 *
 * With "token" configured, every endpoint but /healthz and /readyz needs
 * "Authorization: Bearer <token>" (probes stay simple, nothing they show
 * is secret). The admin API is served by libevent's evhttp: it is small,
 * local, and not the proxy engine. */
#ifndef PORTICO_ADMIN_H
#define PORTICO_ADMIN_H

#include <stddef.h>

struct config;
struct admin;

/* What the admin thread needs from main. Every callback is thread-safe. */
struct admin_env {
    /* The running config, with a reference the caller drops. */
    struct config *(*config_get)(void *arg);
    /* Ask main to reload; returns a ticket for reload_result. */
    unsigned (*reload_start)(void *arg);
    /* 0 while ticket's reload has not run; else 1 (ok) or -1 (failed, msg). */
    int (*reload_result)(void *arg, unsigned ticket, char *msg, size_t msglen);
    /* Process gauges for /metrics, appended with metrics_printf. */
    void (*gauges)(void *arg, char **buf, size_t *len, size_t *cap);
    int (*draining)(void *arg);
    void *arg;
};

/* Bind the admin address of cfg (or use inherited_fd, a socket already
 * listening there, from a binary upgrade; -1 for none) and start the
 * thread. Returns NULL with a message in err (the address is busy, ...). */
struct admin *admin_start(const struct config *cfg, const struct admin_env *env, int inherited_fd,
                          char *err, size_t errlen);
/* Its listening socket (for a binary upgrade), or -1. */
int admin_fd(const struct admin *a);
void admin_stop(struct admin *a);

#endif
