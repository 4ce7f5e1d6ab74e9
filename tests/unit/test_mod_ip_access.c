/* Tests for modules/ip_access.c: config parsing through the descriptor's
 * parse_config. The allow/deny decision on real client addresses (and
 * trusted proxies) is tested end to end in tests/e2e/test_mod_ip_access.py;
 * the CIDR arithmetic itself in test_config.c (src/addr.c). */
#include "testlib.h"

#include <jansson.h>
#include <stdlib.h>

#include "module.h"

#include "modules.h"

/* Reached through the module table, so that a build without the module
 * skips this test instead of failing to link. */
static const struct module *the_module;
#define module_ip_access (*the_module)

#define PATH "filters[0].ip_access"

/* JSON written with ' for " so the tests stay readable. NUL is allowed
 * in strings here (the config loader refuses it) to check the module does
 * not rely on that. */
static json_t *j(const char *s)
{
    char *text = strdup(s);
    for (char *p = text; *p; p++)
        if (*p == '\'')
            *p = '"';
    json_error_t je;
    json_t *v = json_loads(text, JSON_DECODE_ANY | JSON_ALLOW_NUL, &je);
    if (!v)
        fprintf(stderr, "bad test JSON %s: %s\n", text, je.text);
    free(text);
    return v;
}

static void expect_ok(int line, const char *text)
{
    json_t *v = j(text);
    void *cfg = NULL;
    char err[512] = "";
    int rc = module_ip_access.parse_config(v, PATH, NULL, &cfg, err, sizeof(err));
    if (rc != 0)
        fprintf(stderr, "line %d: refused %s: %s\n", line, text, err);
    CHECK_EQ_INT(rc, 0);
    CHECK(cfg != NULL);
    module_ip_access.free_config(cfg);
    json_decref(v);
}

/* Must fail with a message that starts with PATH + where and contains
 * want (when not NULL). */
static void expect_err(int line, const char *text, const char *where, const char *want)
{
    json_t *v = j(text);
    void *cfg = NULL;
    char err[512] = "", prefix[256];
    int rc = module_ip_access.parse_config(v, PATH, NULL, &cfg, err, sizeof(err));
    snprintf(prefix, sizeof(prefix), "%s%s: ", PATH, where);
    int good =
        rc == -1 && strncmp(err, prefix, strlen(prefix)) == 0 && (!want || strstr(err, want));
    if (!good)
        fprintf(stderr, "line %d: %s -> rc %d, \"%s\"; expected \"%s...%s\"\n", line, text, rc, err,
                prefix, want ? want : "");
    CHECK(good);
    if (rc == 0)
        module_ip_access.free_config(cfg);
    json_decref(v);
}

static void test_valid(void)
{
    expect_ok(__LINE__,
              "{'allow': ['10.0.0.0/8', '127.0.0.1'], 'deny': ['10.0.66.0/24', '::1/128']}");
    expect_ok(__LINE__, "{'allow': ['192.168.0.0/16']}");
    expect_ok(__LINE__, "{'deny': ['0.0.0.0/0', '::/0']}");
    expect_ok(__LINE__, "{'allow': [], 'deny': ['fd00::/8']}");
    expect_ok(__LINE__, "{'allow': ['::ffff:10.0.0.0/104', '2001:db8::1']}");
    module_ip_access.free_config(NULL);
}

static void test_errors(void)
{
    expect_err(__LINE__, "['10.0.0.0/8']", "", "expected an object");
    expect_err(__LINE__, "{}", "", "non-empty");
    expect_err(__LINE__, "{'allow': [], 'deny': []}", "", "non-empty");
    expect_err(__LINE__, "{'allow': ['10.0.0.0/8'], 'bogus': []}", ".bogus", "unknown key");
    expect_err(__LINE__, "{'allow': '10.0.0.0/8'}", ".allow", "expected a list");
    expect_err(__LINE__, "{'deny': {'10.0.0.0/8': true}}", ".deny", "expected a list");
    expect_err(__LINE__, "{'allow': ['10.0.0.0/8', 10]}", ".allow[1]", "expected a string");
    expect_err(__LINE__, "{'allow': ['10.0.0.0/8'], 'deny': ['1.2.3.4', null]}", ".deny[1]",
               "expected a string");
    /* cidr_parse's reason follows the path; only the path is pinned here. */
    static const char *const bad[] = {
        "'10.0.0.0/33'", "'::1/129'",      "'10.0.0.0/'",       "'10.0.0.0/-1'",
        "'10.0.0.0/8x'", "'300.1.1.1'",    "'localhost'",       "''",
        "'/8'",          "'10.0.0.0/8/8'", "'1.2.3.4\\u00005'",
    };
    char text[128];
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(text, sizeof(text), "{'allow': ['127.0.0.1'], 'deny': ['::1', %s]}", bad[i]);
        expect_err(__LINE__, text, ".deny[1]", NULL);
        snprintf(text, sizeof(text), "{'allow': [%s]}", bad[i]);
        expect_err(__LINE__, text, ".allow[0]", NULL);
    }
}

int main(void)
{
    the_module = modules_find("ip_access");
    if (!the_module) {
        printf("module ip_access is not built in: skipped\n");
        return 77;
    }
    test_valid();
    test_errors();
    return test_summary();
}
