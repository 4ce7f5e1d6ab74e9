/* GCRA (the generic cell rate algorithm) for modules/rate_limit.c: pure
 * arithmetic, no clock, no locks, included by the module and by its unit
 * test. The Redis backend runs the same rule in Lua (RL_SCRIPT in
 * rate_limit.c); both must agree.
 *
 * A policy is a rate "count per period" and a burst b >= 1. Let
 * T = period / count (the emission interval). The state of a key is one
 * timestamp, its TAT (theoretical arrival time); a key never seen, or whose
 * TAT is in the past, is fully recovered. A request arriving at `now`:
 *
 *   base = max(TAT, now)        new = base + T        used = new - now
 *   allowed  iff  used <= b * T      (then TAT := new)
 *
 * So a recovered key may send b requests at once; then one every T. Nothing
 * is charged for a refused request. After the answer:
 *   remaining = floor((b*T - used) / T)   requests that would pass right now
 *   reset     = time until the key is fully recovered (TAT - now, >= 0)
 *   retry     = for a refusal, time until one request would pass
 *               (used - b*T); 0 when allowed
 * This is redis-cell's GCRA with its max_burst = b - 1 (redis-cell's
 * "limit" is max_burst + 1 = b). */
#ifndef PORTICO_RATE_LIMIT_GCRA_H
#define PORTICO_RATE_LIMIT_GCRA_H

#include <stdint.h>

struct gcra_policy {
    uint64_t interval; /* T, in clock units (ns locally); >= 1 */
    uint64_t burst;    /* b >= 1; interval * burst must fit in 62 bits */
};

struct gcra_result {
    int allowed;
    uint64_t remaining;
    uint64_t reset; /* clock units */
    uint64_t retry; /* clock units; 0 when allowed */
};

/* Decide one request at `now` for a key whose stored TAT is `tat` (0 for a
 * key never seen). Returns the TAT to store: the new one when allowed, the
 * unchanged one when refused. */
static inline uint64_t gcra_decide(uint64_t tat, uint64_t now, const struct gcra_policy *p,
                                   struct gcra_result *out)
{
    uint64_t cap = p->interval * p->burst;
    uint64_t base = tat > now ? tat : now;
    uint64_t used = base - now + p->interval;
    if (used > cap) {
        out->allowed = 0;
        out->remaining = 0;
        out->reset = base - now;
        out->retry = used - cap;
        return tat;
    }
    out->allowed = 1;
    out->remaining = (cap - used) / p->interval;
    out->reset = used;
    out->retry = 0;
    return base + p->interval;
}

#endif
