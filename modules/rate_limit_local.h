/* The in-process state of modules/rate_limit.c: a fixed-size table of GCRA
 * timestamps shared by every worker thread, and the keyed hash of its keys.
 * No libevent, no request: included by the module and by its unit test.
 *
 * The table: buckets of RL_WAYS slots {key hash, TAT}; a spinlock per shard
 * of buckets (buckets interleave over at most 256 shards), held only for the
 * compares of one decision. A slot whose TAT has passed is free (its key is
 * fully recovered: forgetting it changes nothing); when a bucket is full of
 * live keys, the one closest to recovery is evicted (that key gets a fresh
 * burst). Memory is fixed at creation: 16 bytes per slot. */
#ifndef PORTICO_RATE_LIMIT_LOCAL_H
#define PORTICO_RATE_LIMIT_LOCAL_H

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "rate_limit_gcra.h"

#define RL_MAX_LIMITS 8 /* limits decided together */
#define RL_WAYS       8

struct rl_slot {
    uint64_t hash; /* 0: never used */
    uint64_t tat;  /* ns, CLOCK_MONOTONIC */
};

struct rl_shard {
    pthread_spinlock_t lock;
    char pad[64 - sizeof(pthread_spinlock_t)];
};

/* Shared by all workers: written only under the shard lock of the bucket. */
struct rl_table {
    size_t bucket_mask, shard_mask;
    struct rl_shard *shards;
    struct rl_slot *slots; /* (bucket_mask + 1) * RL_WAYS */
    uint64_t evictions;    /* atomic */
};

static inline size_t rl_pow2(size_t n)
{
    size_t p = 1;
    while (p < n)
        p <<= 1;
    return p;
}

#define RL_ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define RL_SIPROUND                                                     \
    do {                                                                \
        v0 += v1, v1 = RL_ROTL(v1, 13), v1 ^= v0, v0 = RL_ROTL(v0, 32); \
        v2 += v3, v3 = RL_ROTL(v3, 16), v3 ^= v2;                       \
        v0 += v3, v3 = RL_ROTL(v3, 21), v3 ^= v0;                       \
        v2 += v1, v1 = RL_ROTL(v1, 17), v1 ^= v2, v2 = RL_ROTL(v2, 32); \
    } while (0)

/* SipHash-2-4 under the key (k0, k1), reading 8-byte words in host order
 * (little-endian hosts give the reference vectors). rate_limit.c keys it at
 * random per process: clients cannot choose values that collide with
 * another client's bucket. */
static inline uint64_t rl_siphash(uint64_t k0, uint64_t k1, const unsigned char *in, size_t len)
{
    uint64_t v0 = 0x736f6d6570736575ULL ^ k0, v1 = 0x646f72616e646f6dULL ^ k1;
    uint64_t v2 = 0x6c7967656e657261ULL ^ k0, v3 = 0x7465646279746573ULL ^ k1;
    uint64_t b = (uint64_t)len << 56, m;
    const unsigned char *end = in + (len & ~(size_t)7);
    for (; in != end; in += 8) {
        memcpy(&m, in, 8);
        v3 ^= m;
        RL_SIPROUND;
        RL_SIPROUND;
        v0 ^= m;
    }
    for (size_t i = len & 7; i > 0; i--)
        b |= (uint64_t)in[i - 1] << (8 * (i - 1));
    v3 ^= b;
    RL_SIPROUND;
    RL_SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    RL_SIPROUND;
    RL_SIPROUND;
    RL_SIPROUND;
    RL_SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static inline struct rl_table *rl_table_new(size_t max_keys)
{
    struct rl_table *t = xcalloc(1, sizeof(*t));
    size_t buckets = rl_pow2((max_keys + RL_WAYS - 1) / RL_WAYS);
    size_t shards = buckets < 256 ? buckets : 256;
    t->bucket_mask = buckets - 1;
    t->shard_mask = shards - 1;
    /* calloc: pages are touched only as keys arrive */
    t->slots = xcalloc(buckets * RL_WAYS, sizeof(*t->slots));
    if (posix_memalign((void **)&t->shards, 64, shards * sizeof(*t->shards)) != 0)
        die("rate_limit: out of memory");
    for (size_t i = 0; i < shards; i++)
        pthread_spin_init(&t->shards[i].lock, PTHREAD_PROCESS_PRIVATE);
    return t;
}

static inline void rl_table_free(struct rl_table *t)
{
    if (!t)
        return;
    for (size_t i = 0; i <= t->shard_mask; i++)
        pthread_spin_destroy(&t->shards[i].lock);
    free(t->shards);
    free(t->slots);
    free(t);
}

static inline struct rl_slot *rl_find(struct rl_table *t, uint64_t h)
{
    struct rl_slot *b = &t->slots[(h & t->bucket_mask) * RL_WAYS];
    for (int i = 0; i < RL_WAYS; i++)
        if (b[i].hash == h)
            return &b[i];
    return NULL;
}

/* A slot for a new key: a free or recovered one, else the live key closest
 * to recovery (evicted: it starts again with a full burst). */
static inline struct rl_slot *rl_victim(struct rl_table *t, uint64_t h, uint64_t now)
{
    struct rl_slot *b = &t->slots[(h & t->bucket_mask) * RL_WAYS], *v = &b[0];
    for (int i = 0; i < RL_WAYS; i++) {
        if (b[i].hash == 0 || b[i].tat <= now)
            return &b[i];
        if (b[i].tat < v->tat)
            v = &b[i];
    }
    __atomic_add_fetch(&t->evictions, 1, __ATOMIC_RELAXED);
    return v;
}

/* Results of one decision, per active limit, in ms. */
struct rl_outcome {
    int allowed;
    uint64_t remaining[RL_MAX_LIMITS], reset_ms[RL_MAX_LIMITS], retry_ms[RL_MAX_LIMITS];
};

static inline uint64_t rl_ceil_ms(uint64_t ns)
{
    return (ns + 999999) / 1000000;
}

/* Decide n limits of one request at once: every shard involved is locked
 * (in index order, so no two threads deadlock), all are checked, and the
 * new TATs are stored only when all pass. */
static inline void rl_local_decide(struct rl_table *t, const uint64_t *hash,
                                   const struct gcra_policy *const *pol, size_t n, uint64_t now,
                                   struct rl_outcome *out)
{
    size_t shard[RL_MAX_LIMITS], order[RL_MAX_LIMITS], nord = 0;
    for (size_t i = 0; i < n; i++) {
        shard[i] = (hash[i] & t->bucket_mask) & t->shard_mask;
        size_t k = 0;
        while (k < nord && order[k] < shard[i])
            k++;
        if (k < nord && order[k] == shard[i])
            continue;
        memmove(&order[k + 1], &order[k], (nord - k) * sizeof(order[0]));
        order[k] = shard[i];
        nord++;
    }
    for (size_t k = 0; k < nord; k++)
        pthread_spin_lock(&t->shards[order[k]].lock);
    uint64_t newtat[RL_MAX_LIMITS];
    out->allowed = 1;
    for (size_t i = 0; i < n; i++) {
        struct rl_slot *s = rl_find(t, hash[i]);
        uint64_t tat = s ? s->tat : 0;
        struct gcra_result g;
        newtat[i] = gcra_decide(tat, now, pol[i], &g);
        out->allowed &= g.allowed;
        out->remaining[i] = g.remaining;
        out->reset_ms[i] = rl_ceil_ms(g.reset);
        out->retry_ms[i] = rl_ceil_ms(g.retry);
    }
    if (out->allowed) {
        for (size_t i = 0; i < n; i++) {
            struct rl_slot *s = rl_find(t, hash[i]);
            if (!s)
                s = rl_victim(t, hash[i], now);
            s->hash = hash[i];
            s->tat = newtat[i];
        }
    }
    for (size_t k = nord; k-- > 0;)
        pthread_spin_unlock(&t->shards[order[k]].lock);
}

#endif
