#include "breaker.h"

static uint64_t open_time(const struct breaker_policy *p, int ejections)
{
    uint64_t t = (uint64_t)p->open_ms;
    for (int i = 1; i < ejections && t < (uint64_t)p->max_open_ms; i++)
        t *= 2;
    return t < (uint64_t)p->max_open_ms ? t : (uint64_t)p->max_open_ms;
}

int breaker_available(const struct ep_shared *s, const struct breaker_policy *p, uint64_t now_ms)
{
    if (!atomic_load(&s->healthy) || !atomic_load(&s->present))
        return 0;
    if (!p->enabled)
        return 1;
    switch (atomic_load(&s->state)) {
    case BRK_CLOSED:
        return 1;
    case BRK_OPEN:
        return now_ms >= atomic_load(&s->open_until_ms);
    default:
        return atomic_load(&s->trials) < p->half_open_requests;
    }
}

int breaker_acquire(struct ep_shared *s, const struct breaker_policy *p, uint64_t now_ms)
{
    if (!atomic_load(&s->healthy) || !atomic_load(&s->present))
        return 0;
    if (!p->enabled)
        return 1;
    int st = atomic_load(&s->state);
    if (st == BRK_CLOSED)
        return 1;
    if (st == BRK_OPEN) {
        if (now_ms < atomic_load(&s->open_until_ms))
            return 0;
        int expect = BRK_OPEN;
        if (atomic_compare_exchange_strong(&s->state, &expect, BRK_HALF_OPEN))
            atomic_store(&s->trials, 0);
        else if (expect == BRK_CLOSED)
            return 1;
    }
    int t = atomic_fetch_add(&s->trials, 1);
    if (t < p->half_open_requests)
        return 2;
    atomic_fetch_sub(&s->trials, 1);
    return 0;
}

void breaker_release_trial(struct ep_shared *s)
{
    int t = atomic_load(&s->trials);
    while (t > 0 && atomic_load(&s->state) == BRK_HALF_OPEN &&
           !atomic_compare_exchange_weak(&s->trials, &t, t - 1))
        ;
}

static int ejected_count(struct ep_shared *const *eps, size_t n)
{
    int k = 0;
    for (size_t i = 0; i < n; i++)
        if (atomic_load(&eps[i]->state) != BRK_CLOSED)
            k++;
    return k;
}

static int eject(struct ep_shared *const *eps, size_t n, size_t i, const struct breaker_policy *p,
                 uint64_t now_ms)
{
    struct ep_shared *s = eps[i];
    int st = atomic_load(&s->state);
    if (st == BRK_CLOSED &&
        (size_t)(ejected_count(eps, n) + 1) * 100 > (size_t)p->max_ejected_percent * n) {
        atomic_store(&s->consecutive, 0);
        return 0;
    }
    if (st == BRK_CLOSED && now_ms - atomic_load(&s->closed_at_ms) >= (uint64_t)p->max_open_ms)
        atomic_store(&s->ejections, 0);
    int ej = atomic_fetch_add(&s->ejections, 1) + 1;
    atomic_store(&s->open_until_ms, now_ms + open_time(p, ej));
    atomic_store(&s->state, BRK_OPEN);
    atomic_store(&s->consecutive, 0);
    atomic_store(&s->trials, 0);
    atomic_fetch_add(&s->total_ejections, 1);
    return st != BRK_OPEN;
}

int breaker_report(struct ep_shared *const *eps, size_t n, size_t i, const struct breaker_policy *p,
                   int ok, uint64_t now_ms)
{
    struct ep_shared *s = eps[i];
    if (!p->enabled)
        return 0;
    uint32_t wr = 0, wf = 0;
    if (p->failure_percent) {
        uint64_t ws = atomic_load(&s->win_start_ms);
        if (now_ms - ws >= (uint64_t)p->window_ms &&
            atomic_compare_exchange_strong(&s->win_start_ms, &ws, now_ms)) {
            atomic_store(&s->win_requests, 0);
            atomic_store(&s->win_failures, 0);
        }
        wr = atomic_fetch_add(&s->win_requests, 1) + 1;
        wf = ok ? atomic_load(&s->win_failures) : atomic_fetch_add(&s->win_failures, 1) + 1;
    }
    int st = atomic_load(&s->state);
    if (ok) {
        /* Only a write when there is something to reset: the line stays
         * shared between the workers' caches on the success path. */
        if (atomic_load(&s->consecutive))
            atomic_store(&s->consecutive, 0);
        if (st == BRK_HALF_OPEN) {
            int expect = BRK_HALF_OPEN;
            if (atomic_compare_exchange_strong(&s->state, &expect, BRK_CLOSED)) {
                atomic_store(&s->closed_at_ms, now_ms);
                atomic_store(&s->win_start_ms, now_ms);
                atomic_store(&s->win_requests, 0);
                atomic_store(&s->win_failures, 0);
            }
        }
        return 0;
    }
    if (st == BRK_HALF_OPEN)
        return eject(eps, n, i, p, now_ms);
    if (st == BRK_OPEN)
        return 0; /* a request that started before the ejection */
    int cf = atomic_fetch_add(&s->consecutive, 1) + 1;
    if (cf >= p->consecutive_failures || (p->failure_percent && wr >= (uint32_t)p->min_requests &&
                                          (uint64_t)wf * 100 >= (uint64_t)p->failure_percent * wr))
        return eject(eps, n, i, p, now_ms);
    return 0;
}

enum breaker_state breaker_state_now(const struct ep_shared *s, uint64_t now_ms)
{
    int st = atomic_load(&s->state);
    if (st == BRK_OPEN && now_ms >= atomic_load(&s->open_until_ms))
        return BRK_HALF_OPEN;
    return (enum breaker_state)st;
}

const char *breaker_state_name(enum breaker_state st)
{
    return st == BRK_CLOSED ? "closed" : st == BRK_OPEN ? "open" : "half_open";
}

static struct budget_slot *slot_for(struct up_shared *u, uint64_t sec)
{
    struct budget_slot *s = &u->slots[sec % BUDGET_SLOTS];
    uint64_t old = atomic_load(&s->sec);
    if (old != sec && atomic_compare_exchange_strong(&s->sec, &old, sec)) {
        atomic_store(&s->requests, 0);
        atomic_store(&s->retries, 0);
    }
    return s;
}

void budget_note_request(struct up_shared *u, uint64_t now_ms)
{
    atomic_fetch_add(&slot_for(u, now_ms / 1000)->requests, 1);
}

int budget_take_retry(struct up_shared *u, int percent, int min_per_second, uint64_t now_ms)
{
    uint64_t sec = now_ms / 1000;
    uint64_t req = 0, ret = 0;
    for (int i = 0; i < BUDGET_SLOTS; i++) {
        struct budget_slot *s = &u->slots[i];
        uint64_t ss = atomic_load(&s->sec);
        if (ss + BUDGET_SLOTS > sec && ss <= sec) {
            req += atomic_load(&s->requests);
            ret += atomic_load(&s->retries);
        }
    }
    uint64_t allowed = req * (uint64_t)percent / 100 + (uint64_t)min_per_second * BUDGET_SLOTS;
    if (ret >= allowed)
        return 0;
    atomic_fetch_add(&slot_for(u, sec)->retries, 1);
    return 1;
}
