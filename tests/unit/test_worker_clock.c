/* Tests for the per-event clock of src/worker.h. */
#include "testlib.h"
#include "worker.h"

#include <stdint.h>
#include <time.h>

static void pause_ms(long ms)
{
    struct timespec ts = { 0, ms * 1000000L };
    nanosleep(&ts, NULL);
}

static void test_outside_an_event_the_clock_moves(void)
{
    uint64_t a = worker_now_ns();
    pause_ms(2);
    uint64_t b = worker_now_ns();
    CHECK(b >= a + 2000000u);
}

static void test_one_event_sees_one_time(void)
{
    int entered = worker_clock_enter();
    CHECK_EQ_INT(entered, 1);
    uint64_t t = worker_now_ns();
    pause_ms(2);
    CHECK(worker_now_ns() == t);
    CHECK(now_us() == t / 1000u);
    CHECK(worker_now_ms(NULL) == t / 1000000u);
    /* a callback run from inside keeps the outer time: never backwards */
    int inner = worker_clock_enter();
    CHECK_EQ_INT(inner, 0);
    CHECK(worker_now_ns() == t);
    worker_clock_leave(inner);
    CHECK(worker_now_ns() == t);
    worker_clock_leave(entered);
    /* after the event, reads are live again */
    CHECK(worker_now_ns() >= t + 2000000u);
}

int main(void)
{
    test_outside_an_event_the_clock_moves();
    test_one_event_sees_one_time();
    return test_summary();
}
