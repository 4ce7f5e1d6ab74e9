/* Tests for modules/request_id.c: config validation through the
 * descriptor. Id and traceparent handling on real requests is covered by
 * tests/e2e/test_mod_request_id.py. */
#include "testlib.h"
#include "module.h"

#include <jansson.h>

#include "modules.h"

/* Reached through the module table, so that a build without the module
 * skips this test instead of failing to link. */
static const struct module *the_module;
#define module_request_id (*the_module)

#define PATH "filters[1].request_id"

static char err[512];

/* Parse text as the module's config; returns parse_config's result and
 * frees what it built. */
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
    int rc = module_request_id.parse_config(j, PATH, NULL, &cfg, err, sizeof(err));
    if (rc == 0) {
        CHECK(cfg != NULL);
        module_request_id.free_config(cfg);
    }
    json_decref(j);
    return rc;
}

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

int main(void)
{
    the_module = modules_find("request_id");
    if (!the_module) {
        printf("module request_id is not built in: skipped\n");
        return 77;
    }
    CHECK(strcmp(module_request_id.name, "request_id") == 0);
    CHECK(module_request_id.on_request != NULL && module_request_id.on_response != NULL);

    accepted("{}");
    accepted("{\"header\": \"X-Request-Id\", \"trust_incoming\": true, \"traceparent\": true}");
    accepted("{\"header\": \"X-Correlation-ID\", \"trust_incoming\": false, "
             "\"traceparent\": false, \"sampled\": true}");

    refused("null", PATH ":", "expected an object");
    refused("\"X-Request-Id\"", PATH ":", "expected an object");
    refused("{\"headers\": \"X-Id\"}", PATH ":", "unknown key \"headers\"");
    refused("{\"trust_incoming\": \"yes\"}", PATH ".trust_incoming:", "true or false");
    refused("{\"traceparent\": 1}", PATH ".traceparent:", "true or false");
    refused("{\"sampled\": null}", PATH ".sampled:", "true or false");
    refused("{\"header\": 5}", PATH ".header:", "header name");
    refused("{\"header\": \"\"}", PATH ".header:", "header name");
    refused("{\"header\": \"X Request Id\"}", PATH ".header:", "header name");
    refused("{\"header\": \"X-Id\\u0000\"}", PATH ".header:", "header name");
    refused("{\"header\": \"traceparent\"}", PATH ".header:", "cannot carry");
    refused("{\"header\": \"Host\"}", PATH ".header:", "cannot carry");
    refused("{\"header\": \"content-length\"}", PATH ".header:", "cannot carry");
    refused("{\"header\": \"upgrade\"}", PATH ".header:", "cannot carry");
    return test_summary();
}
