/* Per-request arena: bump allocation from chained blocks, freed in one
 * call, with cleanup callbacks for what is not memory (json_decref,
 * timers, ...). Not thread-safe: an arena belongs to one request on one
 * worker. Allocation failure aborts the process (our single OOM policy). */
#ifndef PORTICO_ARENA_H
#define PORTICO_ARENA_H

#include <stddef.h>

struct arena_block;
struct arena_cleanup;

struct arena {
    struct arena_block *head;    /* current block */
    struct arena_cleanup *cleanups;
    size_t block_size;
    size_t used_total;           /* bytes handed out, for tests and metrics */
};

void arena_init(struct arena *a, size_t block_size); /* block_size 0 = 4096 */
void *arena_alloc(struct arena *a, size_t n);        /* 16-byte aligned; never NULL */
void *arena_calloc(struct arena *a, size_t n);
char *arena_strndup(struct arena *a, const char *s, size_t n);
/* Run fn(arg) when the arena is reset or destroyed (LIFO order). */
void arena_cleanup_add(struct arena *a, void (*fn)(void *), void *arg);
/* Run cleanups and release all blocks but the first, ready for reuse. */
void arena_reset(struct arena *a);
/* Run cleanups and release everything. */
void arena_destroy(struct arena *a);

#endif
