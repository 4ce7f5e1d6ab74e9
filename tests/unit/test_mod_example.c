/* Tests for modules/example.c: its config parser (the hooks are exercised
 * end to end by tests/e2e/test_chain.py). */
#include "testlib.h"

#include <jansson.h>
#include <stdlib.h>

#include "module.h"
#include "modules.h"

/* Reached through the module table, so that a build without the module
 * skips this test instead of failing to link. */
static const struct module *the_module;
#define module_example (*the_module)

#define PATH "routes[0].filters[1].example"

/* JSON written with ' for " so the tests stay readable. */
static json_t *j(const char *s)
{
    char *text = strdup(s);
    for (char *p = text; *p; p++)
        if (*p == '\'')
            *p = '"';
    json_error_t e;
    json_t *v = json_loads(text, JSON_DECODE_ANY, &e);
    if (!v) {
        fprintf(stderr, "bad test JSON %s: %s\n", s, e.text);
        exit(2);
    }
    free(text);
    return v;
}

static void expect_ok(int line, const char *text)
{
    json_t *v = j(text);
    void *cfg = NULL;
    char err[256] = "";
    int rc = module_example.parse_config(v, PATH, NULL, &cfg, err, sizeof(err));
    if (rc != 0)
        fprintf(stderr, "line %d: %s refused: %s\n", line, text, err);
    CHECK_EQ_INT(rc, 0);
    CHECK(cfg != NULL);
    module_example.free_config(cfg);
    json_decref(v);
}

/* The parse must fail with exactly want as the message. */
static void expect_error(int line, const char *text, const char *want)
{
    json_t *v = j(text);
    void *cfg = NULL;
    char err[256] = "";
    int rc = module_example.parse_config(v, PATH, NULL, &cfg, err, sizeof(err));
    if (rc != -1 || strcmp(err, want) != 0)
        fprintf(stderr, "line %d: %s\n    got rc %d, \"%s\"\n    want \"%s\"\n", line, text, rc,
                err, want);
    CHECK_EQ_INT(rc, -1);
    CHECK(strcmp(err, want) == 0);
    json_decref(v);
}

static void test_valid(void)
{
    expect_ok(__LINE__, "{}");
    expect_ok(__LINE__, "{'name': 'a'}");
    expect_ok(__LINE__, "{'name': 'Route_2-b', 'on_request': 'respond', 'status': 200}");
    expect_ok(__LINE__, "{'on_request': 'pause', 'pause_ms': 0}");
    expect_ok(__LINE__, "{'on_request': 'pause_respond', 'pause_ms': 60000, 'status': 599}");
    expect_ok(__LINE__, "{'on_request': 'continue', 'on_response': 'mark'}");
    expect_ok(__LINE__, "{'on_response': 'respond', 'status': 503}");
    expect_ok(__LINE__, "{'on_response': 'continue', 'body_bytes': true}");
    expect_ok(__LINE__, "{'body_bytes': false}");
    /* The longest name allowed: 32 characters. */
    expect_ok(__LINE__, "{'name': 'abcdefghijklmnopqrstuvwxyz012345'}");
}

static void test_errors(void)
{
    expect_error(__LINE__, "[]", PATH ": must be an object");
    expect_error(__LINE__, "'a'", PATH ": must be an object");
    expect_error(__LINE__, "{'nmae': 'a'}", PATH ".nmae: unknown key");
    expect_error(__LINE__, "{'name': ''}",
                 PATH ".name: must be 1 to 32 letters, digits, '_' or '-'");
    expect_error(__LINE__, "{'name': 7}",
                 PATH ".name: must be 1 to 32 letters, digits, '_' or '-'");
    expect_error(__LINE__, "{'name': 'a b'}",
                 PATH ".name: must be 1 to 32 letters, digits, '_' or '-'");
    expect_error(__LINE__, "{'name': 'a:b'}",
                 PATH ".name: must be 1 to 32 letters, digits, '_' or '-'");
    expect_error(__LINE__, "{'name': 'abcdefghijklmnopqrstuvwxyz0123456'}",
                 PATH ".name: must be 1 to 32 letters, digits, '_' or '-'");
    expect_error(__LINE__, "{'on_request': 'stop'}",
                 PATH ".on_request: must be one of \"continue\", \"respond\", \"pause\", "
                      "\"pause_respond\"");
    expect_error(__LINE__, "{'on_request': true}",
                 PATH ".on_request: must be one of \"continue\", \"respond\", \"pause\", "
                      "\"pause_respond\"");
    expect_error(__LINE__, "{'on_response': 'pause'}",
                 PATH ".on_response: must be one of \"continue\", \"respond\", \"mark\"");
    expect_error(__LINE__, "{'status': 199}", PATH ".status: must be an integer from 200 to 599");
    expect_error(__LINE__, "{'status': 600}", PATH ".status: must be an integer from 200 to 599");
    expect_error(__LINE__, "{'status': '418'}", PATH ".status: must be an integer from 200 to 599");
    expect_error(__LINE__, "{'status': 418.0}", PATH ".status: must be an integer from 200 to 599");
    expect_error(__LINE__, "{'pause_ms': -1}",
                 PATH ".pause_ms: must be an integer from 0 to 60000");
    expect_error(__LINE__, "{'pause_ms': 60001}",
                 PATH ".pause_ms: must be an integer from 0 to 60000");
    expect_error(__LINE__, "{'pause_ms': 9999999999999}",
                 PATH ".pause_ms: must be an integer from 0 to 60000");
    expect_error(__LINE__, "{'body_bytes': 1}", PATH ".body_bytes: must be true or false");
    expect_error(__LINE__, "{'body_bytes': 'yes'}", PATH ".body_bytes: must be true or false");
}

/* A message longer than the buffer is cut, never overflowed. */
static void test_small_error_buffer(void)
{
    json_t *v = j("{'on_request': 'x'}");
    void *cfg = NULL;
    char err[24];
    memset(err, 'Z', sizeof(err));
    CHECK_EQ_INT(module_example.parse_config(v, PATH, NULL, &cfg, err, 16), -1);
    CHECK_EQ_INT(strlen(err), 15);
    CHECK(err[16] == 'Z');
    json_decref(v);
}

static void test_descriptor(void)
{
    CHECK(strcmp(module_example.name, "example") == 0);
    CHECK(module_example.parse_config && module_example.free_config);
    CHECK(module_example.worker_init && module_example.on_request);
    CHECK(module_example.on_request_body && module_example.on_response);
    CHECK(module_example.on_log);
}

int main(void)
{
    the_module = modules_find("example");
    if (!the_module) {
        printf("module example is not built in: skipped\n");
        return 77;
    }
    test_descriptor();
    test_valid();
    test_errors();
    test_small_error_buffer();
    return test_summary();
}
