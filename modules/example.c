/* example: a small module that implements every hook of struct module, for
 * reading (modules/README.md walks through it) and for testing the filter
 * chain itself (tests/e2e/test_chain.py), like HAProxy's trace filter.
 *
 *   { "example": { "name": "a",
 *                  "on_request": "continue" | "respond" | "pause" | "pause_respond",
 *                  "status": 418, "pause_ms": 50,
 *                  "on_response": "continue" | "respond" | "mark",
 *                  "body_bytes": false } }
 *
 * Every filter leaves a trace so the order of the chain can be observed:
 * on_request adds "X-Example-Trace: <name>:request" to the request sent
 * upstream, on_response adds "X-Example-Trace: <name>:response" to the
 * answer. Then:
 *   on_request  "respond"        answer locally with "status"
 *               "pause"          wait pause_ms on a timer, then resume
 *               "pause_respond"  wait pause_ms, then answer with "status"
 *   on_response "respond"        replace the proxied answer with "status"
 *               "mark"           also add "X-Example-Mark: <name>"
 *   body_bytes  count the request body bytes (after chunked decoding) and
 *               log them as "example_<name>_body_bytes"
 * on_log always adds "example_<name>": "logged" to the access-log line. */
#include <event2/event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "module.h"

enum ex_request_action { EX_REQ_CONTINUE, EX_REQ_RESPOND, EX_REQ_PAUSE, EX_REQ_PAUSE_RESPOND };
enum ex_response_action { EX_RESP_CONTINUE, EX_RESP_RESPOND, EX_RESP_MARK };

#define EX_NAME_MAX 32

/* One filter's parsed config; shared read-only by every worker. The strings
 * are built once here so the hooks do no formatting. */
struct ex_config {
    char name[EX_NAME_MAX + 1];
    enum ex_request_action on_request;
    enum ex_response_action on_response;
    int status;
    int pause_ms;
    int body_bytes;
    char trace_request[EX_NAME_MAX + 16];  /* "<name>:request" */
    char trace_response[EX_NAME_MAX + 16]; /* "<name>:response" */
    char log_key[EX_NAME_MAX + 16];        /* "example_<name>" */
    char log_bytes_key[EX_NAME_MAX + 32];  /* "example_<name>_body_bytes" */
};

/* Per-request state, in the request's arena (freed with it). */
struct ex_request {
    struct request *r;
    const struct ex_config *cfg;
    struct event *timer; /* while paused; NULL once fired or freed */
    uint64_t body_bytes;
    int answered_locally; /* on_request answered: nothing to replace later */
};

/* ---- config ------------------------------------------------------------- */

struct ex_choice {
    const char *word;
    int value;
};

static const struct ex_choice request_actions[] = {
    { "continue", EX_REQ_CONTINUE },
    { "respond", EX_REQ_RESPOND },
    { "pause", EX_REQ_PAUSE },
    { "pause_respond", EX_REQ_PAUSE_RESPOND },
    { NULL, 0 },
};

static const struct ex_choice response_actions[] = {
    { "continue", EX_RESP_CONTINUE },
    { "respond", EX_RESP_RESPOND },
    { "mark", EX_RESP_MARK },
    { NULL, 0 },
};

/* Reads json's key as one of choices into *out (left alone when absent).
 * Returns 0, or -1 with the message in err. */
static int ex_parse_choice(json_t *json, const char *path, const char *key,
                           const struct ex_choice *choices, int *out, char *err, size_t errlen)
{
    json_t *v = json_object_get(json, key);
    if (!v)
        return 0;
    if (json_is_string(v)) {
        for (const struct ex_choice *c = choices; c->word; c++) {
            if (strcmp(json_string_value(v), c->word) == 0) {
                *out = c->value;
                return 0;
            }
        }
    }
    size_t n = (size_t)snprintf(err, errlen, "%s.%s: must be one of", path, key);
    for (const struct ex_choice *c = choices; c->word && n < errlen; c++)
        n += (size_t)snprintf(err + n, errlen - n, "%s \"%s\"", c == choices ? "" : ",", c->word);
    return -1;
}

/* Reads json's key as an integer in [min, max] into *out (left alone when
 * absent). Returns 0, or -1 with the message in err. */
static int ex_parse_int(json_t *json, const char *path, const char *key, int min, int max, int *out,
                        char *err, size_t errlen)
{
    json_t *v = json_object_get(json, key);
    if (!v)
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max) {
        snprintf(err, errlen, "%s.%s: must be an integer from %d to %d", path, key, min, max);
        return -1;
    }
    *out = (int)json_integer_value(v);
    return 0;
}

/* The name ends up in header values and log keys: keep it to a short word. */
static int ex_parse_name(json_t *json, const char *path, char *out, char *err, size_t errlen)
{
    json_t *v = json_object_get(json, "name");
    if (!v) {
        strcpy(out, "example");
        return 0;
    }
    const char *s = json_is_string(v) ? json_string_value(v) : NULL;
    size_t len = s ? strlen(s) : 0;
    int ok = len >= 1 && len <= EX_NAME_MAX;
    for (size_t i = 0; ok && i < len; i++)
        ok = (s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
             (s[i] >= '0' && s[i] <= '9') || s[i] == '_' || s[i] == '-';
    if (!ok) {
        snprintf(err, errlen, "%s.name: must be 1 to %d letters, digits, '_' or '-'", path,
                 EX_NAME_MAX);
        return -1;
    }
    memcpy(out, s, len + 1);
    return 0;
}

static int ex_check_keys(json_t *json, const char *path, char *err, size_t errlen)
{
    static const char *const known[] = { "name",     "on_request",  "status",
                                         "pause_ms", "on_response", "body_bytes" };
    const char *key;
    json_t *v;
    json_object_foreach (json, key, v) {
        size_t i = 0;
        while (i < sizeof(known) / sizeof(known[0]) && strcmp(key, known[i]) != 0)
            i++;
        if (i == sizeof(known) / sizeof(known[0])) {
            snprintf(err, errlen, "%s.%s: unknown key", path, key);
            return -1;
        }
    }
    return 0;
}

static int ex_parse_config(json_t *json, const char *path, void *gcfg, void **cfgp, char *err, size_t errlen)
{
    (void)gcfg;
    if (!json_is_object(json)) {
        snprintf(err, errlen, "%s: must be an object", path);
        return -1;
    }
    struct ex_config c = { .status = 418, .pause_ms = 50 };
    int req = EX_REQ_CONTINUE, resp = EX_RESP_CONTINUE;
    if (ex_check_keys(json, path, err, errlen) < 0 ||
        ex_parse_name(json, path, c.name, err, errlen) < 0 ||
        ex_parse_choice(json, path, "on_request", request_actions, &req, err, errlen) < 0 ||
        ex_parse_choice(json, path, "on_response", response_actions, &resp, err, errlen) < 0 ||
        ex_parse_int(json, path, "status", 200, 599, &c.status, err, errlen) < 0 ||
        ex_parse_int(json, path, "pause_ms", 0, 60000, &c.pause_ms, err, errlen) < 0)
        return -1;
    json_t *bb = json_object_get(json, "body_bytes");
    if (bb && !json_is_boolean(bb)) {
        snprintf(err, errlen, "%s.body_bytes: must be true or false", path);
        return -1;
    }
    c.body_bytes = bb && json_is_true(bb);
    c.on_request = (enum ex_request_action)req;
    c.on_response = (enum ex_response_action)resp;
    snprintf(c.trace_request, sizeof(c.trace_request), "%s:request", c.name);
    snprintf(c.trace_response, sizeof(c.trace_response), "%s:response", c.name);
    snprintf(c.log_key, sizeof(c.log_key), "example_%s", c.name);
    snprintf(c.log_bytes_key, sizeof(c.log_bytes_key), "example_%s_body_bytes", c.name);

    struct ex_config *out = xmalloc(sizeof(*out));
    *out = c;
    *cfgp = out;
    return 0;
}

static void ex_free_config(void *cfg)
{
    free(cfg);
}

static int ex_worker_init(int worker_id, struct event_base *base, char *err, size_t errlen)
{
    log_debug("example: worker %d ready", worker_id);
    return 0;
}

/* ---- answering ---------------------------------------------------------- */

static void ex_respond(struct request *r, const struct ex_config *cfg, const char *what)
{
    char body[128];
    int n = snprintf(body, sizeof(body), "%s by example filter %s\n", what, cfg->name);
    request_respond(r, cfg->status, "text/plain", body, (size_t)n);
}

/* ---- pausing -------------------------------------------------------------
 * on_request arms a one-shot timer and returns FILTER_PAUSED; the timer's
 * callback resumes (or answers) the request. The timer belongs to the
 * request through a cleanup: if the request ends first (the client went
 * away while paused), the cleanup frees the pending timer, so the callback
 * never runs against a freed request. */

static void ex_timer_cleanup(void *arg)
{
    struct ex_request *st = arg;
    if (st->timer) {
        log_debug("example %s: request ended while paused; timer freed", st->cfg->name);
        event_free(st->timer);
        st->timer = NULL;
    }
}

static void on_example_timer(evutil_socket_t fd, short what, void *arg)
{
    struct ex_request *st = arg;
    /* The one-shot timer is no longer pending: free it now, so the cleanup
     * (which may run inside request_respond/request_resume below) has
     * nothing left to free. libevent allows freeing a non-persistent event
     * from its own callback. */
    event_free(st->timer);
    st->timer = NULL;
    if (st->cfg->on_request == EX_REQ_PAUSE_RESPOND) {
        log_debug("example %s: pause over, answering %d", st->cfg->name, st->cfg->status);
        st->answered_locally = 1;
        ex_respond(st->r, st->cfg, "answered after a pause");
    } else {
        log_debug("example %s: pause over, resuming", st->cfg->name);
        request_resume(st->r);
    }
}

static enum filter_status ex_pause(struct request *r, struct ex_request *st)
{
    st->timer = evtimer_new(request_event_base(r), on_example_timer, st);
    if (!st->timer)
        die("example: evtimer_new failed");
    request_cleanup_add(r, ex_timer_cleanup, st);
    struct timeval tv = { st->cfg->pause_ms / 1000, (st->cfg->pause_ms % 1000) * 1000 };
    evtimer_add(st->timer, &tv);
    log_debug("example %s: paused for %d ms", st->cfg->name, st->cfg->pause_ms);
    return FILTER_PAUSED;
}

/* ---- hooks -------------------------------------------------------------- */

static enum filter_status ex_on_request(struct request *r, void *cfgp, void **ctx)
{
    const struct ex_config *cfg = cfgp;
    struct ex_request *st = request_alloc(r, sizeof(*st));
    st->r = r;
    st->cfg = cfg;
    *ctx = st;
    request_add_header(r, "X-Example-Trace", cfg->trace_request);
    switch (cfg->on_request) {
    case EX_REQ_CONTINUE:
        return FILTER_CONTINUE;
    case EX_REQ_RESPOND:
        st->answered_locally = 1;
        ex_respond(r, cfg, "answered");
        return FILTER_RESPONDED;
    case EX_REQ_PAUSE:
    case EX_REQ_PAUSE_RESPOND:
        return ex_pause(r, st);
    }
    return FILTER_CONTINUE;
}

static enum filter_status ex_on_request_body(struct request *r, void *cfgp, void **ctx,
                                             const char *data, size_t len)
{
    const struct ex_config *cfg = cfgp;
    struct ex_request *st = *ctx;
    if (cfg->body_bytes && st)
        st->body_bytes += len;
    return FILTER_CONTINUE;
}

static enum filter_status ex_on_response(struct request *r, void *cfgp, void **ctx)
{
    const struct ex_config *cfg = cfgp;
    const struct ex_request *st = *ctx;
    response_add_header(r, "X-Example-Trace", cfg->trace_response);
    switch (cfg->on_response) {
    case EX_RESP_CONTINUE:
        break;
    case EX_RESP_MARK:
        response_add_header(r, "X-Example-Mark", cfg->name);
        break;
    case EX_RESP_RESPOND:
        /* Replacing our own local answer would only repeat it. */
        if (st && st->answered_locally)
            break;
        ex_respond(r, cfg, "replaced");
        return FILTER_RESPONDED;
    }
    return FILTER_CONTINUE;
}

static void ex_on_log(struct request *r, void *cfgp, void **ctx)
{
    const struct ex_config *cfg = cfgp;
    const struct ex_request *st = *ctx;
    request_log_field(r, cfg->log_key, "logged");
    if (cfg->body_bytes) {
        char n[24];
        snprintf(n, sizeof(n), "%llu", st ? (unsigned long long)st->body_bytes : 0ULL);
        request_log_field(r, cfg->log_bytes_key, n);
    }
}

const struct module module_example = {
    .name = "example",
    .parse_config = ex_parse_config,
    .free_config = ex_free_config,
    .worker_init = ex_worker_init,
    .on_request = ex_on_request,
    .on_request_body = ex_on_request_body,
    .on_response = ex_on_response,
    .on_log = ex_on_log,
};
