/* Balancer arithmetic: pure functions, no sockets, no libevent, no
 * threads. The caller (resil.c) owns every array passed in and decides
 * which endpoints are candidates; these functions only choose.
 *
 *   smooth weighted round robin: balance_wrr_schedule precomputes the
 *     nginx-style interleaved sequence once per config; workers walk it
 *     with their own counter, so picking costs an index and no lock.
 *   least_request: balance_p2c, the power of two random choices on
 *     active requests divided by weight.
 *   random: balance_weighted_random.
 *   hash: a consistent ring (balance_ring_*) with weight * 160 points per
 *     endpoint placed by hashing the endpoint's address, not its index:
 *     adding or removing an endpoint moves only the keys of its points. */
#ifndef PORTICO_BALANCE_H
#define PORTICO_BALANCE_H

#include <stddef.h>
#include <stdint.h>

#define BALANCE_MAX_WEIGHT  100
#define BALANCE_RING_POINTS 160 /* per unit of weight */

/* 64-bit FNV-1a followed by a finaliser (splitmix64): good spread for
 * short keys. */
uint64_t balance_hash(const void *data, size_t len);

/* Fill seq (room for the sum of weights) with the smooth weighted round
 * robin order of n endpoints; returns its length. Weights are 1..100. */
size_t balance_wrr_schedule(const int *weights, size_t n, uint16_t *seq);

struct balance_ring {
    uint64_t *hash; /* sorted ascending */
    uint16_t *ep;   /* endpoint index of each point */
    size_t n;
};

/* Build the ring of n endpoints named by addrs. Malloc'd; free with
 * balance_ring_free. Allocation failure aborts. */
void balance_ring_build(struct balance_ring *r, const char *const *addrs, const int *weights,
                        size_t n);
void balance_ring_free(struct balance_ring *r);
/* The position of the first point at or after h (wrapping). r->n > 0. */
size_t balance_ring_find(const struct balance_ring *r, uint64_t h);

/* Weighted random choice among the n candidates cand[] (endpoint indices)
 * with weights[idx]; u is uniform in [0, 1). Returns an endpoint index. */
int balance_weighted_random(const int *cand, size_t n, const int *weights, double u);

/* Power of two choices: two weighted random candidates (u1, u2 uniform),
 * the one with fewer active[idx] / weights[idx] wins (the first on a tie).
 * Returns an endpoint index. */
int balance_p2c(const int *cand, size_t n, const int *weights, const int *active, double u1,
                double u2);

#endif
