/* src/balance.c: smooth weighted round robin order, the consistent ring
 * (only the removed/added endpoint's keys move), weighted random and
 * power of two choices. */
#include "balance.h"
#include "testlib.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void test_wrr(void)
{
    int w[3] = { 5, 1, 1 };
    uint16_t seq[7];
    CHECK_EQ_INT(balance_wrr_schedule(w, 3, seq), 7);
    /* nginx's smooth order for 5:1:1 is a a b a c a a. */
    static const uint16_t want[7] = { 0, 0, 1, 0, 2, 0, 0 };
    CHECK(memcmp(seq, want, sizeof(want)) == 0);
    int eq[4] = { 1, 1, 1, 1 };
    uint16_t s4[4];
    CHECK_EQ_INT(balance_wrr_schedule(eq, 4, s4), 4);
    for (int i = 0; i < 4; i++)
        CHECK_EQ_INT(s4[i], i);
}

static int owner(const struct balance_ring *r, int key)
{
    char k[32];
    int n = snprintf(k, sizeof(k), "key-%d", key);
    return r->ep[balance_ring_find(r, balance_hash(k, (size_t)n))];
}

static void test_ring_movement(void)
{
    const char *four[] = { "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80" };
    int w[4] = { 1, 1, 1, 1 };
    struct balance_ring r3, r4;
    balance_ring_build(&r3, four, w, 3);
    balance_ring_build(&r4, four, w, 4);
    CHECK_EQ_INT(r3.n, 3 * BALANCE_RING_POINTS);
    int keys = 10000, moved = 0, wrong = 0, count[4] = { 0 };
    for (int k = 0; k < keys; k++) {
        int a = owner(&r3, k), b = owner(&r4, k);
        count[b]++;
        if (a != b) {
            moved++;
            if (b != 3)
                wrong++; /* moved between old endpoints */
        }
    }
    CHECK_EQ_INT(wrong, 0);
    /* About a quarter move, to the new endpoint only. */
    CHECK(moved > keys / 8 && moved < keys * 3 / 8);
    for (int i = 0; i < 4; i++)
        CHECK(count[i] > keys / 8 && count[i] < keys * 3 / 8);
    /* Removing endpoint 1 from the first three: only its keys move. */
    const char *two[] = { "10.0.0.1:80", "10.0.0.3:80" };
    struct balance_ring r2;
    balance_ring_build(&r2, two, w, 2);
    int bad = 0;
    for (int k = 0; k < keys; k++) {
        int a = owner(&r3, k), b = owner(&r2, k);
        int b_as3 = b == 0 ? 0 : 2;
        if (a != 1 && a != b_as3)
            bad++;
    }
    CHECK_EQ_INT(bad, 0);
    balance_ring_free(&r2);
    balance_ring_free(&r3);
    balance_ring_free(&r4);
    /* Weights double the share. */
    int w2[2] = { 2, 1 };
    struct balance_ring rw;
    balance_ring_build(&rw, four, w2, 2);
    int c0 = 0;
    for (int k = 0; k < keys; k++)
        c0 += owner(&rw, k) == 0;
    CHECK(c0 > keys * 55 / 100 && c0 < keys * 78 / 100);
    balance_ring_free(&rw);
}

static void test_random_and_p2c(void)
{
    int w[3] = { 1, 2, 1 };
    int cand[3] = { 0, 1, 2 };
    CHECK_EQ_INT(balance_weighted_random(cand, 3, w, 0.0), 0);
    CHECK_EQ_INT(balance_weighted_random(cand, 3, w, 0.3), 1);
    CHECK_EQ_INT(balance_weighted_random(cand, 3, w, 0.74), 1);
    CHECK_EQ_INT(balance_weighted_random(cand, 3, w, 0.99), 2);
    int sub[1] = { 2 };
    CHECK_EQ_INT(balance_weighted_random(sub, 1, w, 0.5), 2);

    int eq[2] = { 1, 1 };
    int two[2] = { 0, 1 };
    int act[2] = { 5, 0 };
    /* Whatever the two draws, the idle endpoint wins. */
    for (double u = 0; u < 1; u += 0.1)
        for (double v = 0; v < 1; v += 0.1)
            CHECK_EQ_INT(balance_p2c(two, 2, eq, act, u, v), 1);
    /* Weighted: 4 active on weight 4 beats 2 active on weight 1. */
    int wq[2] = { 4, 1 };
    int act2[2] = { 4, 2 };
    CHECK_EQ_INT(balance_p2c(two, 2, wq, act2, 0.0, 0.99), 0);
}

int main(void)
{
    test_wrr();
    test_ring_movement();
    test_random_and_p2c();
    return test_summary();
}
