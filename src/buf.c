/* The per-thread cache of buffer blocks (see buf.h). */
#include "buf.h"

__thread struct buf_cache buf_cache;

void buf_cache_flush(void)
{
    struct buf_cache *bc = &buf_cache;
    while (bc->n > 0)
        free(bc->data[--bc->n]);
    bc->bytes = 0;
}
