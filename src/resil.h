/* Upstream resilience: the policy of a config snapshot's upstream
 * (balancer, retries, circuit breaker, health check, limits) and the
 * glue that applies it to a request. The arithmetic lives in balance.c
 * and breaker.c; the health-check thread in health.c; config_resil.c
 * parses the keys.
 *
 * Shared state: each (upstream name, endpoint address) has one
 * struct ep_shared and each upstream name one struct up_shared in a
 * process-wide registry, reference-counted by the config snapshots that
 * name them. A reload that keeps an endpoint keeps its breaker and health
 * state; workers and the health thread touch that state only through
 * atomics. The registry's lock is taken only when a snapshot is built or
 * freed, never on the request path. */
#ifndef PORTICO_RESIL_H
#define PORTICO_RESIL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include "balance.h"
#include "breaker.h"

struct config;
struct config_upstream;
struct http_request;
struct http_response;

enum balance_kind { BAL_ROUND_ROBIN, BAL_LEAST_REQUEST, BAL_RANDOM, BAL_HASH };
enum hash_source { HASH_HEADER, HASH_COOKIE, HASH_CLIENT_ADDRESS };

/* retry.on bits; statuses are in on_status. */
#define RETRY_ON_CONNECT 1u
#define RETRY_ON_RESET   2u
#define RETRY_ON_TIMEOUT 4u

struct resil_retry {
    int attempts;               /* tries in all, the first included; 1 = no retry */
    unsigned on;                /* RETRY_ON_* */
    uint8_t on_status[75];      /* bit per status 100..699 */
    int per_try_timeout_ms;     /* 0 = only timeout_ms */
    int backoff_ms;             /* base; default 25 */
    int max_backoff_ms;         /* default 250 */
    int non_idempotent;         /* retry_non_idempotent */
    int max_replay_body_bytes;  /* default 65536 */
    int budget_percent;         /* default 20 */
    int min_retries_per_second; /* default 3 */
};

struct resil_health {
    int enabled;
    char *path;              /* default "/healthz" */
    char *host;              /* Host header; default the endpoint address */
    uint8_t statuses[75];    /* expected; default 200..399 */
    int interval_ms;         /* default 2000 */
    int timeout_ms;          /* default 1000 */
    int healthy_threshold;   /* default 2 */
    int unhealthy_threshold; /* default 2 */
};

/* Endpoints given by host name (see health.c: the health/DNS thread). */
struct resil_dns {
    int refresh_ms;    /* default 5000 */
    int max_addresses; /* slots per name; default 8 */
    char *hosts_file;  /* /etc/hosts-style file read at each refresh; NULL: none */
    char *nameserver;  /* "ip[:port]"; NULL: /etc/resolv.conf */
};

struct resil_upstream {
    enum balance_kind balance;
    enum hash_source hash_on;
    char *hash_name;    /* header or cookie name */
    int *weights;       /* per endpoint, 1..100 */
    uint16_t *schedule; /* smooth weighted round robin order */
    size_t nschedule;
    struct balance_ring ring; /* hash */
    struct resil_retry retry;
    struct breaker_policy breaker;
    uint8_t failure_status[75]; /* responses the breaker counts as failures */
    struct resil_health health;
    struct resil_dns dns;
    int max_requests; /* in flight, all workers; 0 = no limit */
    int max_pending;  /* waiting for a new connection; 0 = no limit */
    struct up_shared *shared;
    struct ep_shared **eps; /* per endpoint */
    size_t neps;
};

static inline int resil_status_in(const uint8_t *set, int status)
{
    if (status < 100 || status > 699)
        return 0;
    int i = status - 100;
    return (set[i / 8] >> (i % 8)) & 1;
}
static inline void resil_status_add(uint8_t *set, int status)
{
    int i = status - 100;
    set[i / 8] |= (uint8_t)(1u << (i % 8));
}

/* What a request carries between attempts (inside struct request). */
struct resil_req {
    int attempts;             /* tries made so far */
    int idx;                  /* endpoint of the current try, -1 none */
    uint64_t tried;           /* endpoints tried (bit idx % 64) */
    int trial;                /* current try is a half-open trial */
    int counted;              /* holds up->shared->active */
    int pending;              /* holds up->shared->pending */
    int verdict;              /* the breaker heard about the current try */
    uint64_t retry_at_ms;     /* a retry waits for its backoff; 0 none */
    uint64_t try_deadline_ms; /* per_try_timeout_ms of the current try */
    int body_kept;            /* the body is in the replay copy */
    struct ep_shared *ep;     /* shared state of the current try */
    struct resil_upstream *ru;
};

/* ---- config (config_resil.c calls these; config.c frees) ---------------- */

/* Attach shared state to a parsed upstream and build its balancer data.
 * u->resil must be set and its endpoints final. */
void resil_upstream_build(struct config_upstream *u);
void resil_upstream_free(struct resil_upstream *ru);

/* ---- the request path (conn.c, on a worker) ---------------------------- */

/* Admission for a new request: 0 ok; -1 over max_requests (answer 503). */
int resil_admit(struct resil_req *rq, struct resil_upstream *ru, uint64_t now_ms);
/* Choose the endpoint of the next try. rr is the worker's counter for
 * this upstream, rnd a uniform [0,1) source. Returns the index, or -1
 * when every endpoint is ejected or unhealthy. */
int resil_pick(struct resil_req *rq, const struct config_upstream *u, uint32_t *rr,
               const struct http_request *h, const char *client_ip, double (*rnd)(void *),
               void *rarg, uint64_t now_ms);
/* The current try connects afresh (1) or finished connecting (0): for
 * max_pending. Returns -1 when a new pending try is over the limit. */
int resil_pending(struct resil_req *rq, int on);
/* The outcome of the current try for the breaker. Returns 1 when it
 * ejected the endpoint. */
int resil_verdict(struct resil_req *rq, int ok, uint64_t now_ms);
/* May a failed try be retried? kind is RETRY_ON_* or 0 with status set.
 * Checks attempts left, the condition list, the method, the budget. On
 * yes the retry is counted. *exhausted is set when only the budget said
 * no. */
int resil_may_retry(struct resil_req *rq, unsigned kind, int status, int idempotent, int replayable,
                    uint64_t now_ms, int *exhausted);
/* Backoff before try number rq->attempts + 1, with jitter (u uniform). */
uint64_t resil_backoff_ms(const struct resil_req *rq, double u);
/* The try is over (retry or end of request): give back what it holds. */
void resil_try_end(struct resil_req *rq);
/* The request is over. */
void resil_req_end(struct resil_req *rq);
/* Seconds from a Retry-After header of resp: -1 when absent or a date. */
int resil_retry_after(const struct http_response *resp);

/* The address of endpoint e of u for a new connection: the literal, or
 * the DNS slot's current one. *gen (may be NULL) tells a change apart.
 * Returns -1 when a DNS slot is empty. Lock-free. */
int resil_endpoint_addr(const struct config_upstream *u, size_t e, struct sockaddr_storage *ss,
                        socklen_t *len, uint32_t *gen);
/* The same from a slot's shared state. */
int resil_slot_addr(struct ep_shared *s, struct sockaddr_storage *ss, socklen_t *len,
                    uint32_t *gen);
/* The DNS thread sets a slot's address (len 0: empty). */
void resil_slot_set(struct ep_shared *s, const struct sockaddr *sa, socklen_t len);

/* ---- admin and main ---------------------------------------------------- */

/* The endpoint's state for GET /upstreams. */
const char *resil_ep_circuit(const struct config_upstream *u, size_t e, uint64_t now_ms);
int resil_ep_healthy(const struct config_upstream *u, size_t e);
int resil_ep_active(const struct config_upstream *u, size_t e);

/* health.c: point the health-check thread at this snapshot's checks
 * (starts it on first use). Called when a snapshot is about to serve. */
void health_apply(const struct config *c);
/* Stop the thread at exit. */
void health_stop(void);
/* Another reference to / drop a reference to registry state. */
struct ep_shared *resil_ep_hold(struct ep_shared *s);
void resil_ep_drop(struct ep_shared *s);

#endif
