#include "arena.h"
#include "log.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct arena_block {
    struct arena_block *next;
    size_t size;   /* usable bytes in data */
    size_t used;
    _Alignas(16) unsigned char data[];
};

struct arena_cleanup {
    struct arena_cleanup *next;
    void (*fn)(void *);
    void *arg;
};

static struct arena_block *block_new(size_t size)
{
    struct arena_block *b = malloc(sizeof(*b) + size);
    if (!b)
        die("out of memory (arena block of %zu bytes)", size);
    b->next = NULL;
    b->size = size;
    b->used = 0;
    return b;
}

void arena_init(struct arena *a, size_t block_size)
{
    a->block_size = block_size ? block_size : 4096;
    a->head = NULL;
    a->cleanups = NULL;
    a->used_total = 0;
}

void *arena_alloc(struct arena *a, size_t n)
{
    size_t need = (n + 15) & ~(size_t)15;
    if (need < n)
        die("arena allocation overflow");
    struct arena_block *b = a->head;
    if (!b || b->size - b->used < need) {
        /* Large requests get a block of their own placed behind the
         * current one, so the current block's free space stays usable. */
        if (need > a->block_size / 2 && b) {
            struct arena_block *big = block_new(need);
            big->used = need;
            big->next = b->next;
            b->next = big;
            a->used_total += need;
            return big->data;
        }
        b = block_new(need > a->block_size ? need : a->block_size);
        b->next = a->head;
        a->head = b;
    }
    void *p = b->data + b->used;
    b->used += need;
    a->used_total += need;
    return p;
}

void *arena_calloc(struct arena *a, size_t n)
{
    void *p = arena_alloc(a, n);
    memset(p, 0, n);
    return p;
}

char *arena_strndup(struct arena *a, const char *s, size_t n)
{
    char *p = arena_alloc(a, n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

void arena_cleanup_add(struct arena *a, void (*fn)(void *), void *arg)
{
    struct arena_cleanup *c = arena_alloc(a, sizeof(*c));
    c->fn = fn;
    c->arg = arg;
    c->next = a->cleanups;
    a->cleanups = c;
}

static void run_cleanups(struct arena *a)
{
    /* A cleanup may not allocate from the arena it belongs to. */
    struct arena_cleanup *c = a->cleanups;
    a->cleanups = NULL;
    for (; c; c = c->next)
        c->fn(c->arg);
}

void arena_reset(struct arena *a)
{
    run_cleanups(a);
    if (!a->head)
        return;
    /* Keep the oldest block (the last in the chain): it is the usual size. */
    struct arena_block *b = a->head, *keep = NULL;
    while (b) {
        struct arena_block *next = b->next;
        if (!next && b->size == a->block_size)
            keep = b;
        else
            free(b);
        b = next;
    }
    if (keep) {
        keep->used = 0;
        keep->next = NULL;
    }
    a->head = keep;
    a->used_total = 0;
}

void arena_destroy(struct arena *a)
{
    run_cleanups(a);
    struct arena_block *b = a->head;
    while (b) {
        struct arena_block *next = b->next;
        free(b);
        b = next;
    }
    a->head = NULL;
    a->used_total = 0;
}
