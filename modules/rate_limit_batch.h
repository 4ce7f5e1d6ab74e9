/* The Redis backend's batches for modules/rate_limit.c: pure code (no
 * Redis, no clock, no allocation), included by the module and by its unit
 * test. A batch is one script call deciding the requests of one worker's
 * loop turn, in order (RL_SCRIPT in rate_limit.c):
 *
 *   EVALSHA sha K key_1..key_K  P interval_1 burst_1 .. interval_P burst_P  plan
 *
 * key_1..key_K are the batch's distinct Redis keys (a hot key is read and
 * written once however many requests use it), the P pairs its distinct
 * policies (interval in microseconds, burst), and plan one byte string:
 * per request, its number of keys n (one byte), then per key the 1-based
 * index of the key and of its policy (two bytes each, big-endian). The
 * answer holds one integer per key of each request, in plan order: the
 * key's TAT minus now in nanoseconds before this request (>= 0) when the
 * request passed, -1 minus that when it was refused; rl_batch_decode turns
 * them into the same outcome as rate_limit_gcra.h. */
#ifndef PORTICO_RATE_LIMIT_BATCH_H
#define PORTICO_RATE_LIMIT_BATCH_H

#include "rate_limit_gcra.h"
#include "rate_limit_local.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* A set of byte strings, each given an index in order of first insertion.
 * The strings are not copied: they must outlive the set. */
struct rl_strset {
    size_t mask, n;
    uint32_t *slot; /* index + 1; 0 = empty */
    const char **str;
    size_t *len;
};

/* Bytes of memory for a set of at most max strings. */
static inline size_t rl_strset_mem(size_t max)
{
    size_t slots = rl_pow2(2 * max + 2);
    return slots * sizeof(uint32_t) + max * (sizeof(char *) + sizeof(size_t));
}

/* mem: rl_strset_mem(max) bytes, suitably aligned (from malloc). */
static inline void rl_strset_init(struct rl_strset *s, size_t max, void *mem)
{
    size_t slots = rl_pow2(2 * max + 2);
    s->mask = slots - 1;
    s->n = 0;
    s->str = mem;
    s->len = (size_t *)(s->str + max);
    s->slot = (uint32_t *)(s->len + max);
    memset(s->slot, 0, slots * sizeof(uint32_t));
}

/* The 0-based index of str, added if new (at most max strings in all). */
static inline size_t rl_strset_add(struct rl_strset *s, const char *str, size_t len)
{
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ len, w;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        memcpy(&w, str + i, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
    }
    for (; i < len; i++)
        h = (h ^ (unsigned char)str[i]) * 0x100000001b3ULL;
    h ^= h >> 29;
    for (i = (size_t)h & s->mask;; i = (i + 1) & s->mask) {
        uint32_t k = s->slot[i];
        if (!k) {
            s->str[s->n] = str;
            s->len[s->n] = len;
            s->slot[i] = (uint32_t)++s->n;
            return s->n - 1;
        }
        if (s->len[k - 1] == len && memcmp(s->str[k - 1], str, len) == 0)
            return k - 1;
    }
}

/* The bytes of one argument of a command in RESP ("$len\r\n...\r\n"). */
static inline size_t rl_resp_arg_len(size_t n)
{
    size_t d = 1;
    for (size_t x = n; x >= 10; x /= 10)
        d++;
    return 1 + d + 2 + n + 2;
}

/* Write c then n in decimal then CRLF at p; returns the end. */
static inline char *rl_resp_num(char *p, char c, size_t n)
{
    char tmp[24];
    size_t d = 0;
    do
        tmp[d++] = (char)('0' + n % 10);
    while ((n /= 10) != 0);
    *p++ = c;
    while (d)
        *p++ = tmp[--d];
    *p++ = '\r';
    *p++ = '\n';
    return p;
}

/* Write one argument (rl_resp_arg_len(n) bytes) at p; returns the end. */
static inline char *rl_resp_arg(char *p, const void *s, size_t n)
{
    p = rl_resp_num(p, '$', n);
    memcpy(p, s, n);
    p += n;
    *p++ = '\r';
    *p++ = '\n';
    return p;
}

/* Append one request's part of the plan at p: n keys, key[i] and pol[i]
 * 0-based indices below 65535. Returns the bytes written (1 + 4n). */
static inline size_t rl_plan_put(unsigned char *p, size_t n, const size_t *key, const size_t *pol)
{
    p[0] = (unsigned char)n;
    for (size_t i = 0; i < n; i++) {
        p[1 + 4 * i] = (unsigned char)((key[i] + 1) >> 8);
        p[2 + 4 * i] = (unsigned char)(key[i] + 1);
        p[3 + 4 * i] = (unsigned char)((pol[i] + 1) >> 8);
        p[4 + 4 * i] = (unsigned char)(pol[i] + 1);
    }
    return 1 + 4 * n;
}

/* One request's answer, v[0..n-1] for its keys under the policies pol:
 * the outcome rl_apply takes, as rate_limit_gcra.h would give for TATs
 * that far ahead of now. Returns -1 when the values disagree in sign (not
 * an answer of RL_SCRIPT). */
static inline int rl_batch_decode(const long long *v, size_t n,
                                  const struct gcra_policy *const *pol, struct rl_outcome *o)
{
    if (n == 0 || n > RL_MAX_LIMITS)
        return -1;
    o->allowed = v[0] >= 0;
    for (size_t i = 0; i < n; i++) {
        if ((v[i] >= 0) != o->allowed)
            return -1;
        uint64_t ahead = (uint64_t)(o->allowed ? v[i] : -1 - v[i]);
        struct gcra_result g;
        gcra_decide(ahead, 0, pol[i], &g);
        o->remaining[i] = g.remaining;
        o->reset_ms[i] = rl_ceil_ms(g.reset);
        o->retry_ms[i] = rl_ceil_ms(g.retry);
    }
    return 0;
}

#endif
