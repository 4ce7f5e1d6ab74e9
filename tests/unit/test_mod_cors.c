/* Tests for modules/cors.c: config parsing through the descriptor's
 * parse_config. Matching and the headers it adds are tested end to end
 * (tests/e2e/test_mod_cors.py), where real requests exist. */
#include "testlib.h"
#include "testjson.h"

#include <jansson.h>
#include <stdlib.h>

#include "module.h"

#include "modules.h"

/* Reached through the module table, so that a build without the module
 * skips this test instead of failing to link. */
static const struct module *the_module;
#define module_cors (*the_module)

#define PATH "routes[0].filters[1].cors"


static void expect_ok(int line, const char *text)
{
    json_t *v = j(text);
    void *cfg = NULL;
    char err[512] = "";
    int rc = module_cors.parse_config(v, PATH, NULL, &cfg, err, sizeof(err));
    if (rc != 0)
        fprintf(stderr, "line %d: refused %s: %s\n", line, text, err);
    CHECK_EQ_INT(rc, 0);
    CHECK(cfg != NULL);
    module_cors.free_config(cfg);
    json_decref(v);
}

/* Must fail with a message that starts with PATH + where and contains
 * want (when not NULL). */
static void expect_err(int line, const char *text, const char *where, const char *want)
{
    json_t *v = j(text);
    void *cfg = NULL;
    char err[512] = "", prefix[256];
    int rc = module_cors.parse_config(v, PATH, NULL, &cfg, err, sizeof(err));
    snprintf(prefix, sizeof(prefix), "%s%s: ", PATH, where);
    int good =
        rc == -1 && strncmp(err, prefix, strlen(prefix)) == 0 && (!want || strstr(err, want));
    if (!good)
        fprintf(stderr, "line %d: %s -> rc %d, \"%s\"; expected \"%s...%s\"\n", line, text, rc, err,
                prefix, want ? want : "");
    CHECK(good);
    if (rc == 0)
        module_cors.free_config(cfg);
    json_decref(v);
}

static void test_valid(void)
{
    expect_ok(__LINE__, "{'origins': ['https://app.example.com'], 'methods': ['GET', 'POST'],"
                        " 'headers': ['Authorization'], 'credentials': true, 'max_age_s': 600}");
    expect_ok(__LINE__, "{'origins': ['https://app.example.com', 'https://*.example.com'],"
                        " 'expose_headers': ['X-Request-Id', 'ETag'], 'credentials': false}");
    expect_ok(__LINE__, "{'origins': ['*']}");
    expect_ok(__LINE__, "{'origins': ['*'], 'credentials': false, 'methods': ['PUT']}");
    expect_ok(__LINE__, "{'origins': ['HTTPS://App.Example.COM:443', 'http://localhost:3000']}");
    expect_ok(__LINE__, "{'origins': ['http://[::1]:8080', 'http://127.0.0.1:5173']}");
    expect_ok(__LINE__, "{'origins': ['chrome-extension://abcdefghijklmnop']}");
    expect_ok(__LINE__, "{'origins': ['https://*.example.com:8443'], 'headers': [],"
                        " 'expose_headers': [], 'max_age_s': 86400}");
    expect_ok(__LINE__, "{'origins': ['https://a'], 'max_age_s': 1}");
    module_cors.free_config(NULL);
}

static void test_shape_errors(void)
{
    expect_err(__LINE__, "['https://a.example.com']", "", "expected an object");
    expect_err(__LINE__, "{}", ".origins", "required");
    expect_err(__LINE__, "{'origins': []}", ".origins", "non-empty");
    expect_err(__LINE__, "{'origins': 'https://a.example.com'}", ".origins", NULL);
    expect_err(__LINE__, "{'origins': ['https://a.com'], 'bogus': 1}", ".bogus", "unknown key");
    expect_err(__LINE__, "{'origins': ['https://a.com'], 'origins methods': 1}", ".origins methods",
               "unknown key");
    expect_err(__LINE__, "{'origins': ['https://a.com'], 'Origins': 1}", ".Origins", "unknown");
}

static void test_origin_errors(void)
{
    static const char *const bad[] = {
        "'app.example.com'",
        "'https://app.example.com/'",
        "'https://app.example.com/api'",
        "'https://'",
        "'https://*.'",
        "'https://*'",
        "'https://*example.com'",
        "'https://a.*.example.com'",
        "'https://app.example.com:0'",
        "'https://a.com:65536'",
        "'https://a.com:'",
        "'https://a.com:80x'",
        "'https://a..com'",
        "'https://.a.com'",
        "'https://a.com.'",
        "'https://user@a.com'",
        "'https://[::g]'",
        "'https://[::1'",
        "'//a.com'",
        "'1http://a.com'",
        "'https:/a.com'",
        "'https://a.com?x'",
        "''",
        "42",
        "null",
        "'https://a b.com'",
        "'https://*.[::1]'",
        "'https://a.com:123456'",
    };
    char text[256];
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(text, sizeof(text), "{'origins': ['https://ok.example.com', %s]}", bad[i]);
        expect_err(__LINE__, text, ".origins[1]", "not an origin");
    }
    expect_err(__LINE__, "{'origins': ['https://a.com', '*']}", ".origins[1]", "only entry");
    expect_err(__LINE__, "{'origins': ['*', 'https://a.com']}", ".origins[0]", "only entry");
}

static void test_list_errors(void)
{
    expect_err(__LINE__, "{'origins': ['*'], 'methods': []}", ".methods", "non-empty");
    expect_err(__LINE__, "{'origins': ['*'], 'methods': 'GET'}", ".methods", NULL);
    expect_err(__LINE__, "{'origins': ['*'], 'methods': ['GET', 'BAD METHOD']}", ".methods[1]",
               "not a method name");
    expect_err(__LINE__, "{'origins': ['*'], 'methods': ['*']}", ".methods[0]", "wildcards");
    expect_err(__LINE__, "{'origins': ['*'], 'methods': ['GET', '']}", ".methods[1]", NULL);
    expect_err(__LINE__, "{'origins': ['*'], 'headers': [1]}", ".headers[0]", "not a header name");
    expect_err(__LINE__, "{'origins': ['*'], 'headers': ['X-A', 'X:B']}", ".headers[1]", NULL);
    expect_err(__LINE__, "{'origins': ['*'], 'headers': ['*']}", ".headers[0]", "wildcards");
    expect_err(__LINE__, "{'origins': ['*'], 'expose_headers': 'X-A'}", ".expose_headers", NULL);
    expect_err(__LINE__, "{'origins': ['*'], 'expose_headers': ['X-A\\r\\nX: y']}",
               ".expose_headers[0]", NULL);
}

static void test_scalar_errors(void)
{
    expect_err(__LINE__, "{'origins': ['*'], 'credentials': true}", ".credentials", "\"*\"");
    expect_err(__LINE__, "{'origins': ['https://a.com'], 'credentials': 'yes'}", ".credentials",
               "true or false");
    expect_err(__LINE__, "{'origins': ['https://a.com'], 'credentials': 1}", ".credentials", NULL);
    static const char *const ages[] = { "0", "-5", "'600'", "1.5", "86401", "true", "null" };
    char text[128];
    for (size_t i = 0; i < sizeof(ages) / sizeof(ages[0]); i++) {
        snprintf(text, sizeof(text), "{'origins': ['https://a.com'], 'max_age_s': %s}", ages[i]);
        expect_err(__LINE__, text, ".max_age_s", "seconds");
    }
}

int main(void)
{
    the_module = modules_find("cors");
    if (!the_module) {
        printf("module cors is not built in: skipped\n");
        return 77;
    }
    test_valid();
    test_shape_errors();
    test_origin_errors();
    test_list_errors();
    test_scalar_errors();
    return test_summary();
}
