/* Minimal unit-test harness: CHECK records a failure and goes on; the
 * program prints "N passed, M failed" and exits non-zero on any failure. */
#ifndef PORTICO_TESTLIB_H
#define PORTICO_TESTLIB_H
#include <stdio.h>
#include <string.h>

static int t_passed, t_failed;

#define CHECK(cond) do { \
        if (cond) t_passed++; \
        else { t_failed++; fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); } \
    } while (0)
#define CHECK_EQ_INT(a, b) do { \
        long long _a = (long long)(a), _b = (long long)(b); \
        if (_a == _b) t_passed++; \
        else { t_failed++; fprintf(stderr, "%s:%d: %s == %lld, expected %lld\n", __FILE__, __LINE__, #a, _a, _b); } \
    } while (0)
#define CHECK_STR(a, alen, b) do { \
        size_t _bl = strlen(b); \
        if ((size_t)(alen) == _bl && memcmp((a), (b), _bl) == 0) t_passed++; \
        else { t_failed++; fprintf(stderr, "%s:%d: %s is \"%.*s\", expected \"%s\"\n", __FILE__, __LINE__, #a, (int)(alen), (a), (b)); } \
    } while (0)

static inline int test_summary(void)
{
    printf("%d passed, %d failed\n", t_passed, t_failed);
    return t_failed ? 1 : 0;
}
#endif
