#include "balance.h"
#include "log.h"

#include <stdlib.h>
#include <string.h>

uint64_t balance_hash(const void *data, size_t len)
{
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;
    return h;
}

size_t balance_wrr_schedule(const int *weights, size_t n, uint16_t *seq)
{
    int total = 0;
    for (size_t i = 0; i < n; i++)
        total += weights[i];
    int *cur = xcalloc(n ? n : 1, sizeof(*cur));
    for (int k = 0; k < total; k++) {
        size_t best = 0;
        for (size_t i = 0; i < n; i++) {
            cur[i] += weights[i];
            if (cur[i] > cur[best])
                best = i;
        }
        cur[best] -= total;
        seq[k] = (uint16_t)best;
    }
    free(cur);
    return (size_t)total;
}

struct point {
    uint64_t h;
    uint16_t ep;
};

static int point_cmp(const void *a, const void *b)
{
    const struct point *x = a, *y = b;
    if (x->h != y->h)
        return x->h < y->h ? -1 : 1;
    return x->ep < y->ep ? -1 : x->ep > y->ep;
}

void balance_ring_build(struct balance_ring *r, const char *const *addrs, const int *weights,
                        size_t n)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += (size_t)weights[i] * BALANCE_RING_POINTS;
    struct point *pts = xcalloc(total ? total : 1, sizeof(*pts));
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        size_t alen = strlen(addrs[i]);
        char *key = xmalloc(alen + 16);
        for (int j = 0; j < weights[i] * BALANCE_RING_POINTS; j++) {
            memcpy(key, addrs[i], alen);
            key[alen] = '#';
            size_t kl = alen + 1;
            for (int v = j;; v /= 10) {
                key[kl++] = (char)('0' + v % 10);
                if (v < 10)
                    break;
            }
            pts[k].h = balance_hash(key, kl);
            pts[k].ep = (uint16_t)i;
            k++;
        }
        free(key);
    }
    qsort(pts, total, sizeof(*pts), point_cmp);
    r->n = total;
    r->hash = xcalloc(total ? total : 1, sizeof(*r->hash));
    r->ep = xcalloc(total ? total : 1, sizeof(*r->ep));
    for (size_t i = 0; i < total; i++) {
        r->hash[i] = pts[i].h;
        r->ep[i] = pts[i].ep;
    }
    free(pts);
}

void balance_ring_free(struct balance_ring *r)
{
    free(r->hash);
    free(r->ep);
    r->hash = NULL;
    r->ep = NULL;
    r->n = 0;
}

size_t balance_ring_find(const struct balance_ring *r, uint64_t h)
{
    size_t lo = 0, hi = r->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (r->hash[mid] < h)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo == r->n ? 0 : lo;
}

int balance_weighted_random(const int *cand, size_t n, const int *weights, double u)
{
    int total = 0;
    for (size_t i = 0; i < n; i++)
        total += weights[cand[i]];
    double x = u * total;
    for (size_t i = 0; i < n; i++) {
        x -= weights[cand[i]];
        if (x < 0)
            return cand[i];
    }
    return cand[n - 1];
}

int balance_p2c(const int *cand, size_t n, const int *weights, const int *active, double u1,
                double u2)
{
    int a = balance_weighted_random(cand, n, weights, u1);
    if (n == 1)
        return a;
    int b = balance_weighted_random(cand, n, weights, u2);
    if (a == b) {
        /* Same pick twice: compare with the next candidate instead, so two
         * endpoints are always weighed against each other. */
        for (size_t i = 0; i < n; i++)
            if (cand[i] == a) {
                b = cand[(i + 1) % n];
                break;
            }
    }
    /* active/weight compared without division. */
    long la = (long)active[a] * weights[b], lb = (long)active[b] * weights[a];
    return lb < la ? b : a;
}
