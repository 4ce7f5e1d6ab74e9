/* Tests for src/arena.c. */
#include "testlib.h"
#include "arena.h"

#include <stdint.h>

static void test_alignment(void)
{
    struct arena a;
    arena_init(&a, 256);
    for (size_t n = 1; n < 100; n += 7) {
        unsigned char *p = arena_alloc(&a, n);
        CHECK_EQ_INT((uintptr_t)p % 16, 0);
        memset(p, 0xab, n); /* ASan would catch an overrun into metadata */
    }
    CHECK_EQ_INT((uintptr_t)arena_alloc(&a, 0) % 16, 0);
    unsigned char *z = arena_calloc(&a, 40);
    int zero = 1;
    for (int i = 0; i < 40; i++)
        zero &= z[i] == 0;
    CHECK(zero);
    char *s = arena_strndup(&a, "hello world", 5);
    CHECK(strcmp(s, "hello") == 0);
    arena_destroy(&a);
}

static void test_distinct_allocations(void)
{
    struct arena a;
    arena_init(&a, 0);
    char *p[200];
    for (int i = 0; i < 200; i++) {
        p[i] = arena_alloc(&a, 48);
        memset(p[i], i, 48);
    }
    int ok = 1;
    for (int i = 0; i < 200; i++)
        for (int j = 0; j < 48; j++)
            ok &= (unsigned char)p[i][j] == (unsigned char)i;
    CHECK(ok);
    CHECK(a.used_total >= 200 * 48);
    arena_destroy(&a);
}

static void test_big_allocations(void)
{
    struct arena a;
    arena_init(&a, 1024);
    char *small1 = arena_alloc(&a, 16);
    char *big = arena_alloc(&a, 100000);
    CHECK_EQ_INT((uintptr_t)big % 16, 0);
    memset(big, 1, 100000);
    /* The current block keeps serving small requests after a big one. */
    char *small2 = arena_alloc(&a, 16);
    CHECK(small2 == small1 + 16);
    char *big2 = arena_alloc(&a, 5000);
    memset(big2, 2, 5000);
    CHECK(big[99999] == 1 && big2[0] == 2);
    arena_destroy(&a);
    CHECK(a.head == NULL);
}

static char order[16];
static size_t norder;

static void record(void *arg)
{
    order[norder++] = *(char *)arg;
}

static void test_cleanups(void)
{
    static char ca = 'a', cb = 'b', cc = 'c';
    struct arena a;
    arena_init(&a, 128);
    arena_cleanup_add(&a, record, &ca);
    arena_cleanup_add(&a, record, &cb);
    arena_cleanup_add(&a, record, &cc);
    norder = 0;
    arena_reset(&a);
    CHECK_STR(order, norder, "cba");
    /* Cleanups run once: a second reset has none left. */
    arena_reset(&a);
    CHECK_STR(order, norder, "cba");

    norder = 0;
    arena_cleanup_add(&a, record, &cb);
    arena_cleanup_add(&a, record, &ca);
    arena_destroy(&a);
    CHECK_STR(order, norder, "ab");
}

static void test_reset_reuses(void)
{
    struct arena a;
    arena_init(&a, 512);
    char *first = arena_alloc(&a, 32);
    for (int i = 0; i < 50; i++)
        arena_alloc(&a, 100); /* spills into more blocks */
    arena_alloc(&a, 10000);
    CHECK(a.used_total > 5000);
    arena_reset(&a);
    CHECK_EQ_INT(a.used_total, 0);
    /* After reset the first (usual-size) block is kept and reused from
     * its start. */
    char *again = arena_alloc(&a, 32);
    CHECK(again == first);
    CHECK(a.head != NULL);
    arena_destroy(&a);
}

int main(void)
{
    test_alignment();
    test_distinct_allocations();
    test_big_allocations();
    test_cleanups();
    test_reset_reuses();
    return test_summary();
}
