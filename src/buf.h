/* A byte buffer owned by one connection: data[start..end) is content,
 * data[end..cap) is free. Fixed capacity chosen at creation; memory is
 * taken lazily (first read) and may be given back when empty, so idle
 * keep-alive connections cost no buffer memory.
 *
 * Memory given back goes first to a small per-thread cache (buf.c): a
 * keep-alive connection releases its buffers after every exchange and
 * takes them again for the next, and malloc/free of 16-64 KiB blocks cost
 * about 7% of a proxied request (callgrind). Requests paused in a filter
 * (a rate limit waiting for Redis) hold their blocks meanwhile, so a
 * worker with dozens of them in flight needs more than a handful cached.
 * The cache is bounded (BUF_CACHE_MAX blocks and BUF_CACHE_BYTES per
 * thread); a thread empties it when it ends. */
#ifndef PORTICO_BUF_H
#define PORTICO_BUF_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "log.h"

struct buf {
    char *data;
    size_t start, end, cap;
};

static inline size_t buf_len(const struct buf *b) { return b->end - b->start; }
static inline char *buf_head(const struct buf *b) { return b->data + b->start; }

static inline void buf_init(struct buf *b, size_t cap)
{
    b->data = NULL;
    b->start = b->end = 0;
    b->cap = cap;
}

#define BUF_CACHE_MAX 64
#define BUF_CACHE_BYTES (2u << 20)
struct buf_cache {
    int n;
    size_t bytes;
    size_t cap[BUF_CACHE_MAX];
    char *data[BUF_CACHE_MAX];
};
extern __thread struct buf_cache buf_cache;

/* A block of cap bytes: the most recently cached one of that size, or a
 * new one. */
static inline char *buf_cache_take(size_t cap)
{
    struct buf_cache *bc = &buf_cache;
    for (int i = bc->n; i-- > 0;) {
        if (bc->cap[i] == cap) {
            char *p = bc->data[i];
            bc->n--;
            bc->bytes -= cap;
            bc->cap[i] = bc->cap[bc->n];
            bc->data[i] = bc->data[bc->n];
            return p;
        }
    }
    return xmalloc(cap);
}

static inline void buf_cache_put(char *p, size_t cap)
{
    struct buf_cache *bc = &buf_cache;
    if (bc->n < BUF_CACHE_MAX && bc->bytes + cap <= BUF_CACHE_BYTES) {
        bc->bytes += cap;
        bc->cap[bc->n] = cap;
        bc->data[bc->n++] = p;
    } else {
        free(p);
    }
}

/* Free every cached block of this thread (at thread exit). */
void buf_cache_flush(void);

static inline void buf_ensure(struct buf *b)
{
    if (!b->data)
        b->data = buf_cache_take(b->cap);
}

/* Free space at the tail after moving content to the front when that
 * gains room. Only call when nobody holds pointers into the content. */
static inline size_t buf_make_room(struct buf *b)
{
    buf_ensure(b);
    if (b->start == b->end) {
        b->start = b->end = 0;
    } else if (b->start > 0 && b->cap - b->end < b->cap / 4) {
        memmove(b->data, b->data + b->start, b->end - b->start);
        b->end -= b->start;
        b->start = 0;
    }
    return b->cap - b->end;
}

static inline size_t buf_space(const struct buf *b)
{
    return b->data ? b->cap - b->end : b->cap;
}

static inline void buf_consume(struct buf *b, size_t n)
{
    b->start += n;
    if (b->start >= b->end)
        b->start = b->end = 0;
}

/* Append; the caller has checked the space (aborts otherwise: a bug). */
static inline void buf_append(struct buf *b, const void *p, size_t n)
{
    if (n == 0)
        return;
    buf_ensure(b);
    if (b->cap - b->end < n) {
        if (b->start > 0) {
            memmove(b->data, b->data + b->start, b->end - b->start);
            b->end -= b->start;
            b->start = 0;
        }
        if (b->cap - b->end < n)
            die("buffer overflow: %zu bytes into %zu free", n, b->cap - b->end);
    }
    memcpy(b->data + b->end, p, n);
    b->end += n;
}

/* Room for appending n bytes, counting what compaction would free. */
static inline int buf_can_append(const struct buf *b, size_t n)
{
    return b->cap - (b->end - b->start) >= n;
}

static inline void buf_release_if_empty(struct buf *b)
{
    if (b->data && b->start == b->end) {
        buf_cache_put(b->data, b->cap);
        b->data = NULL;
        b->start = b->end = 0;
    }
}

static inline void buf_free(struct buf *b)
{
    if (b->data)
        buf_cache_put(b->data, b->cap);
    b->data = NULL;
    b->start = b->end = 0;
}

#endif
