/* Circuit breaker and retry budget: the per-endpoint and per-upstream
 * state every worker and the health thread share. Pure arithmetic over
 * C11 atomics: no locks, no clock of its own (callers pass now_ms), no
 * libevent, so it is unit-tested in isolation.
 *
 * Breaker states of one endpoint:
 *
 *   CLOSED --consecutive_failures in a row, or failure_percent of at
 *   least min_requests in the current window--> OPEN
 *   OPEN --open_until passed, next acquire--> HALF_OPEN (trials = 0)
 *   HALF_OPEN --a trial succeeds--> CLOSED
 *   HALF_OPEN --a trial fails--> OPEN, for longer
 *
 * Each ejection lasts open_ms << (ejections - 1), capped at max_open_ms;
 * the count starts again when the endpoint stayed closed for max_open_ms.
 * An ejection that would leave more than max_ejected_percent of the
 * upstream's endpoints open is not made (the failures are still counted).
 * Health (set by the health thread) is separate: an unhealthy endpoint is
 * not picked whatever its breaker says. */
#ifndef PORTICO_BREAKER_H
#define PORTICO_BREAKER_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

enum breaker_state { BRK_CLOSED = 0, BRK_OPEN = 1, BRK_HALF_OPEN = 2 };

struct breaker_policy {
    int enabled;
    int consecutive_failures; /* default 5 */
    int failure_percent;      /* 0 = off */
    int min_requests;         /* in a window before the ratio counts; default 10 */
    int window_ms;            /* default 10000 */
    int open_ms;              /* default 10000 */
    int max_open_ms;          /* default 300000 */
    int half_open_requests;   /* concurrent trials; default 1 */
    int max_ejected_percent;  /* default 100 */
};

struct ep_shared {
    _Atomic int state;
    _Atomic uint64_t open_until_ms;
    _Atomic uint64_t closed_at_ms;
    _Atomic int consecutive;
    _Atomic int ejections;
    _Atomic int trials;
    _Atomic int active;  /* requests in flight on this endpoint, all workers */
    _Atomic int healthy; /* 1 unless the health thread says otherwise */
    _Atomic uint64_t win_start_ms;
    _Atomic uint32_t win_requests, win_failures;
    _Atomic uint64_t total_ejections;
    /* The address of a host name slot: written by the DNS thread only,
     * read under the sequence lock seq (odd while being written). */
    _Atomic int present; /* 1 for IP literals; DNS slots when filled */
    _Atomic uint32_t seq;
    _Atomic uint32_t gen; /* bumped when the address changes */
    struct sockaddr_storage addr;
    socklen_t addrlen;
};

/* Can a request be sent now (no side effect)? */
int breaker_available(const struct ep_shared *s, const struct breaker_policy *p, uint64_t now_ms);
/* Take the right to send: 0 refused, 1 normal, 2 as a half-open trial. */
int breaker_acquire(struct ep_shared *s, const struct breaker_policy *p, uint64_t now_ms);
/* Give back a trial that ended without a verdict (client left). */
void breaker_release_trial(struct ep_shared *s);
/* Record one outcome on eps[i] of an upstream's n endpoints. Returns 1
 * when this outcome ejected the endpoint. */
int breaker_report(struct ep_shared *const *eps, size_t n, size_t i, const struct breaker_policy *p,
                   int ok, uint64_t now_ms);
/* The state to show: OPEN while ejected, HALF_OPEN once the time is up. */
enum breaker_state breaker_state_now(const struct ep_shared *s, uint64_t now_ms);
const char *breaker_state_name(enum breaker_state st);

/* Retry budget of one upstream: retries may be at most percent of the
 * requests of the last BUDGET_SLOTS seconds, plus min_per_second. */
#define BUDGET_SLOTS 10
struct budget_slot {
    _Atomic uint64_t sec;
    _Atomic uint32_t requests, retries;
};
struct up_shared {
    struct budget_slot slots[BUDGET_SLOTS];
    _Atomic int active;  /* requests in flight, all workers */
    _Atomic int pending; /* of which waiting for a new connection */
};

void budget_note_request(struct up_shared *u, uint64_t now_ms);
/* Take one retry from the budget: 1 allowed (counted), 0 exhausted. */
int budget_take_retry(struct up_shared *u, int percent, int min_per_second, uint64_t now_ms);

#endif
