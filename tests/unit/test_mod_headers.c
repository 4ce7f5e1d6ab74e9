/* Tests for modules/headers.c: config validation through the descriptor.
 * What the edits do to real requests is covered by
 * tests/e2e/test_mod_headers.py. */
#include "testlib.h"
#include "module.h"

#include <jansson.h>

#include "modules.h"

/* Reached through the module table, so that a build without the module
 * skips this test instead of failing to link. */
static const struct module *the_module;
#define module_headers (*the_module)

#define PATH "routes[0].filters[0].headers"

static char err[512];

/* Parse text as the module's config; returns parse_config's result and
 * frees what it built. The error buffer keeps the message. */
static int parse(const char *text)
{
    json_error_t jerr;
    json_t *j = json_loads(text, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (!j) {
        fprintf(stderr, "bad test JSON %s: %s\n", text, jerr.text);
        return 99;
    }
    void *cfg = NULL;
    err[0] = '\0';
    int rc = module_headers.parse_config(j, PATH, NULL, &cfg, err, sizeof(err));
    if (rc == 0 && module_headers.free_config)
        module_headers.free_config(cfg);
    json_decref(j);
    return rc;
}

/* The config is refused with a message that starts with prefix (a JSON
 * path) and mentions what. */
static void refused(const char *text, const char *prefix, const char *what)
{
    int rc = parse(text);
    CHECK_EQ_INT(rc, -1);
    if (strncmp(err, prefix, strlen(prefix)) != 0 || !strstr(err, what)) {
        t_failed++;
        fprintf(stderr, "config %s\n  message \"%s\"\n  expected prefix \"%s\" and \"%s\"\n", text,
                err, prefix, what);
    } else {
        t_passed++;
    }
}

static void accepted(const char *text)
{
    int rc = parse(text);
    if (rc != 0)
        fprintf(stderr, "config %s refused: %s\n", text, err);
    CHECK_EQ_INT(rc, 0);
}

static void test_accepts(void)
{
    accepted("{\"request\": {\"set\": {\"X-From\": \"portico\"}, \"add\": {\"Via\": \"portico\"},"
             " \"remove\": [\"X-Debug\"]},"
             " \"response\": {\"set\": {\"X-Served-By\": \"portico\"}, \"remove\": [\"Server\"]}}");
    accepted("{\"response\": {\"remove\": []}}");
    accepted("{\"request\": {\"add\": {\"X-Multi\": [\"a\", \"b\", \"\"]}}}");
    accepted("{\"request\": {\"set\": {\"X-Empty\": \"\"}}}");
    accepted("{\"request\": {\"set\": {\"X-V\": \"%{client_ip} %{route} %{host} %{method} "
             "%{path} %{request_id} %{jwt.sub} %{a-b_c}\"}}}");
    accepted("{\"request\": {\"set\": {\"X-Pct\": \"100%% sure %%{not_a_var}\"}}}");
    accepted("{\"request\": {\"set\": {\"!#$%&'*+-.^_`|~09azAZ\": \"token chars\"}}}");
    accepted("{\"request\": {\"set\": {\"X-Tab\": \"a\\tb\"}}}");
}

static void test_shape_errors(void)
{
    refused("[]", PATH ":", "expected an object");
    refused("{}", PATH ":", "expected an object");
    refused("{\"requests\": {}}", PATH ":", "unknown key \"requests\"");
    refused("{\"request\": []}", PATH ".request:", "expected an object");
    refused("{\"request\": {}}", PATH ".request:", "no action");
    refused("{\"response\": {\"replace\": {}}}", PATH ".response:", "unknown key \"replace\"");
    refused("{\"request\": {\"set\": [\"X-A\"]}}", PATH ".request.set:", "expected an object");
    refused("{\"request\": {\"set\": {\"X-A\": 1}}}", PATH ".request.set:", "must be a string");
    refused("{\"request\": {\"set\": {\"X-A\": [\"a\"]}}}",
            PATH ".request.set:", "must be a string");
    refused("{\"request\": {\"add\": {\"X-A\": [\"a\", 2]}}}",
            PATH ".request.add:", "or an array of strings");
    refused("{\"request\": {\"remove\": \"X-A\"}}", PATH ".request.remove:", "expected an array");
    refused("{\"response\": {\"remove\": [\"X-A\", null]}}",
            PATH ".response.remove[1]:", "expected a header name");
}

static void test_name_errors(void)
{
    refused("{\"request\": {\"set\": {\"X Bad\": \"v\"}}}",
            PATH ".request.set:", "\"X Bad\" is not a valid header name");
    refused("{\"request\": {\"set\": {\"\": \"v\"}}}",
            PATH ".request.set:", "\"\" is not a valid header name");
    refused("{\"response\": {\"add\": {\"X:A\": \"v\"}}}",
            PATH ".response.add:", "not a valid header name");
    refused("{\"request\": {\"remove\": [\"X\\u00e9\"]}}",
            PATH ".request.remove:", "not a valid header name");
    refused("{\"request\": {\"remove\": [\"A\\u0000B\"]}}",
            PATH ".request.remove:", "not a valid header name");
    static const char *const reserved[] = {
        "Content-Length", "transfer-encoding", "CONNECTION",       "Host", "Keep-Alive", "te",
        "Trailer",        "Upgrade",           "Proxy-Connection",
    };
    char text[256];
    for (size_t i = 0; i < sizeof(reserved) / sizeof(reserved[0]); i++) {
        snprintf(text, sizeof(text), "{\"request\": {\"set\": {\"%s\": \"v\"}}}", reserved[i]);
        refused(text, PATH ".request.set:", "cannot be edited");
        snprintf(text, sizeof(text), "{\"response\": {\"add\": {\"%s\": \"v\"}}}", reserved[i]);
        refused(text, PATH ".response.add:", "cannot be edited");
        snprintf(text, sizeof(text), "{\"response\": {\"remove\": [\"%s\"]}}", reserved[i]);
        refused(text, PATH ".response.remove:", "hop-by-hop");
    }
    /* A name that merely contains a reserved one is fine. */
    accepted("{\"request\": {\"set\": {\"X-Host\": \"v\", \"TE2\": \"v\"}}}");
}

static void test_value_errors(void)
{
    refused("{\"request\": {\"set\": {\"X-A\": \"a\\r\\nX-Injected: 1\"}}}",
            PATH ".request.set:", "CR, LF or NUL");
    refused("{\"request\": {\"set\": {\"X-A\": \"a\\nb\"}}}", PATH ".request.set:", "CR, LF");
    refused("{\"response\": {\"add\": {\"X-A\": [\"ok\", \"a\\u0000b\"]}}}",
            PATH ".response.add:", "NUL");
    refused("{\"request\": {\"set\": {\"X-A\": \"100%\"}}}", PATH ".request.set:", "%{name}");
    refused("{\"request\": {\"set\": {\"X-A\": \"50% off\"}}}", PATH ".request.set:", "%%");
    const char *bad_var = "must be followed by a name ([A-Za-z0-9_.-]+) and '}'";
    refused("{\"request\": {\"set\": {\"X-A\": \"%{client_ip\"}}}", PATH ".request.set:", bad_var);
    refused("{\"request\": {\"set\": {\"X-A\": \"%{}\"}}}", PATH ".request.set:", bad_var);
    refused("{\"request\": {\"set\": {\"X-A\": \"%{a b}\"}}}", PATH ".request.set:", bad_var);
    refused("{\"request\": {\"set\": {\"X-A\": \"%{a/b}x\"}}}", PATH ".request.set:", bad_var);
    refused("{\"request\": {\"set\": {\"X-A\": \"%\"}}}", PATH ".request.set:", "%{name}");
    /* 16 variables separated by text: 32 parts pass, one more does not. */
    char text[1024] = "{\"request\": {\"set\": {\"X-A\": \"";
    for (int i = 0; i < 16; i++)
        strcat(text, "%{v}-");
    strcat(text, "\"}}}");
    accepted(text);
    text[strlen(text) - 4] = '\0';
    strcat(text, "%{v}\"}}}");
    refused(text, PATH ".request.set:", "too many parts");
}

int main(void)
{
    the_module = modules_find("headers");
    if (!the_module) {
        printf("module headers is not built in: skipped\n");
        return 77;
    }
    CHECK(strcmp(module_headers.name, "headers") == 0);
    CHECK(module_headers.on_request != NULL && module_headers.on_response != NULL);
    test_accepts();
    test_shape_errors();
    test_name_errors();
    test_value_errors();
    return test_summary();
}
