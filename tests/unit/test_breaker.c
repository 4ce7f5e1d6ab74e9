/* src/breaker.c: the breaker state machine (consecutive failures, ratio,
 * growing ejections, half-open trials, max ejected share) and the retry
 * budget. Time is passed in, so every transition is exact. */
#include "breaker.h"
#include "testlib.h"

#include <stdlib.h>

static struct breaker_policy pol(void)
{
    return (struct breaker_policy){
        .enabled = 1,
        .consecutive_failures = 3,
        .min_requests = 10,
        .window_ms = 10000,
        .open_ms = 1000,
        .max_open_ms = 3500,
        .half_open_requests = 1,
        .max_ejected_percent = 100,
    };
}

static void init(struct ep_shared *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        atomic_store(&s[i].healthy, 1);
        atomic_store(&s[i].present, 1);
    }
}

static void test_consecutive_and_half_open(void)
{
    struct ep_shared s[2] = { 0 };
    init(s, 2);
    struct ep_shared *eps[2] = { &s[0], &s[1] };
    struct breaker_policy p = pol();
    uint64_t t = 100000;
    CHECK_EQ_INT(breaker_report(eps, 2, 0, &p, 0, t), 0);
    CHECK_EQ_INT(breaker_report(eps, 2, 0, &p, 1, t), 0); /* a success resets the run */
    CHECK_EQ_INT(breaker_report(eps, 2, 0, &p, 0, t), 0);
    CHECK_EQ_INT(breaker_report(eps, 2, 0, &p, 0, t), 0);
    CHECK_EQ_INT(breaker_report(eps, 2, 0, &p, 0, t), 1);
    CHECK_EQ_INT(breaker_state_now(&s[0], t), BRK_OPEN);
    CHECK(!breaker_available(&s[0], &p, t + 999));
    CHECK_EQ_INT(breaker_acquire(&s[0], &p, t + 999), 0);
    /* Time is up: one trial at a time. */
    CHECK(breaker_available(&s[0], &p, t + 1000));
    CHECK_EQ_INT(breaker_acquire(&s[0], &p, t + 1000), 2);
    CHECK_EQ_INT(breaker_acquire(&s[0], &p, t + 1000), 0);
    CHECK(!breaker_available(&s[0], &p, t + 1000));
    /* The trial fails: open again, twice as long. */
    CHECK_EQ_INT(breaker_report(eps, 2, 0, &p, 0, t + 1001), 1);
    CHECK(!breaker_available(&s[0], &p, t + 1001 + 1999));
    CHECK_EQ_INT(breaker_acquire(&s[0], &p, t + 1001 + 2000), 2);
    CHECK_EQ_INT(breaker_report(eps, 2, 0, &p, 0, t + 3001), 1);
    /* Capped at max_open_ms (not 4000). */
    CHECK(breaker_available(&s[0], &p, t + 3001 + 3500));
    CHECK_EQ_INT(breaker_acquire(&s[0], &p, t + 6501), 2);
    /* A trial that ends without verdict gives its slot back. */
    breaker_release_trial(&s[0]);
    CHECK_EQ_INT(breaker_acquire(&s[0], &p, t + 6501), 2);
    CHECK_EQ_INT(breaker_report(eps, 2, 0, &p, 1, t + 6502), 0);
    CHECK_EQ_INT(breaker_state_now(&s[0], t + 6502), BRK_CLOSED);
    CHECK_EQ_INT(breaker_acquire(&s[0], &p, t + 6502), 1);
    CHECK_EQ_INT(atomic_load(&s[0].total_ejections), 3);
    /* Unhealthy: never available, breaker or not. */
    atomic_store(&s[1].healthy, 0);
    CHECK(!breaker_available(&s[1], &p, t));
    CHECK_EQ_INT(breaker_acquire(&s[1], &p, t), 0);
    p.enabled = 0;
    CHECK(!breaker_available(&s[1], &p, t));
}

static void test_ratio_and_max_ejected(void)
{
    struct ep_shared s[4] = { 0 };
    init(s, 4);
    struct ep_shared *eps[4] = { &s[0], &s[1], &s[2], &s[3] };
    struct breaker_policy p = pol();
    p.consecutive_failures = 1000;
    p.failure_percent = 50;
    uint64_t t = 5000;
    int opened = 0;
    for (int i = 0; i < 10; i++)
        opened |= breaker_report(eps, 4, 0, &p, i % 2 == 0, t); /* 50% failures */
    CHECK_EQ_INT(opened, 1);
    /* max 50% of 4: a second ejection is allowed, a third is not. */
    p = pol();
    p.max_ejected_percent = 50;
    for (int i = 0; i < 3; i++)
        breaker_report(eps, 4, 1, &p, 0, t);
    CHECK_EQ_INT(breaker_state_now(&s[1], t), BRK_OPEN);
    for (int i = 0; i < 3; i++)
        CHECK_EQ_INT(breaker_report(eps, 4, 2, &p, 0, t), 0);
    CHECK_EQ_INT(breaker_state_now(&s[2], t), BRK_CLOSED);
}

static void test_budget(void)
{
    struct up_shared *u = calloc(1, sizeof(*u));
    uint64_t t = 1000000;
    for (int i = 0; i < 100; i++)
        budget_note_request(u, t);
    int ok = 0;
    for (int i = 0; i < 100; i++)
        ok += budget_take_retry(u, 20, 0, t);
    CHECK_EQ_INT(ok, 20);
    /* min_retries_per_second adds a floor over the window. */
    struct up_shared *v = calloc(1, sizeof(*v));
    ok = 0;
    for (int i = 0; i < 100; i++)
        ok += budget_take_retry(v, 20, 2, t);
    CHECK_EQ_INT(ok, 2 * BUDGET_SLOTS);
    /* The window slides: eleven seconds later the old requests are gone. */
    ok = 0;
    for (int i = 0; i < 10; i++)
        ok += budget_take_retry(u, 20, 0, t + 11000);
    CHECK_EQ_INT(ok, 0);
    free(u);
    free(v);
}

int main(void)
{
    test_consecutive_and_half_open();
    test_ratio_and_max_ejected();
    test_budget();
    return test_summary();
}
