/* headers: set, add and remove request and response header fields.
 *
 * Config (every part optional, at least one action):
 *   {"request":  {"set": {"Name": "value"}, "add": {"Name": "value" or ["v1", "v2"]},
 *                 "remove": ["Name"]},
 *    "response": { the same }}
 *
 * Request edits happen in on_request, response edits in on_response; in
 * each, remove runs first, then set, then add. Framing and hop-by-hop
 * fields belong to the core and cannot be edited.
 *
 * Values are templates: %{client_ip}, %{route}, %{host}, %{method} and
 * %{path} are the request's own; any other %{name} is the request variable
 * of that name (empty when unset), e.g. %{request_id} when the request_id
 * filter ran earlier. "%%" is a literal '%'; any other '%' is an error.
 * Templates are split into segments at load, so a request only copies. */
#include "module.h"
#include "log.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_SEGS  32 /* per value; bounds the stack array used to expand it */
#define ALNUM     "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
#define TCHARS    ALNUM "!#$%&'*+-.^_`|~" /* RFC 9110 token */
#define VAR_CHARS ALNUM "_.-"

enum seg_kind { SEG_TEXT, SEG_FIELD, SEG_PATH, SEG_VAR };

struct seg {
    enum seg_kind kind;
    char *text; /* literal text (SEG_TEXT) or variable name (SEG_VAR); owned */
    size_t len;
    const char *(*get)(const struct request *r); /* SEG_FIELD */
};

enum edit_op { EDIT_REMOVE, EDIT_SET, EDIT_ADD };

struct edit {
    enum edit_op op;
    char *name;
    char *constant; /* the value when it has no variables, else NULL */
    struct seg *segs;
    size_t nsegs;
};

/* One side's edits in the order they run: removes, sets, adds. */
struct side {
    struct edit *edits;
    size_t n;
};

struct headers_config {
    struct side request, response;
};

static const char *const reserved_names[] = {
    "Content-Length", "Transfer-Encoding", "Connection",       "Host", "Keep-Alive", "TE",
    "Trailer",        "Upgrade",           "Proxy-Connection", NULL,
};

/* The request's own variables; any other name is a request_var(). */
static const struct {
    const char *name;
    enum seg_kind kind;
    const char *(*get)(const struct request *r);
} builtin_vars[] = {
    { "client_ip", SEG_FIELD, request_client_ip },
    { "route", SEG_FIELD, request_route_name },
    { "host", SEG_FIELD, request_host },
    { "method", SEG_FIELD, request_method },
    { "path", SEG_PATH, NULL },
};

/* ---- config ---------------------------------------------------------------- */

/* A header name that may be edited; otherwise "what is wrong" in err. */
static int check_name(const char *name, size_t len, const char *path, char *err, size_t errlen)
{
    if (len == 0 || strspn(name, TCHARS) != len) {
        snprintf(err, errlen, "%s: \"%.64s\" is not a valid header name", path, name);
        return -1;
    }
    for (size_t i = 0; reserved_names[i]; i++) {
        if (strcasecmp(name, reserved_names[i]) == 0) {
            snprintf(err, errlen,
                     "%s: \"%s\" is a framing or hop-by-hop header: it cannot be edited", path,
                     reserved_names[i]);
            return -1;
        }
    }
    return 0;
}

/* Append a segment; text is copied. Adjacent literals are merged. */
static struct seg *seg_push(struct edit *e, enum seg_kind kind, const char *text, size_t len)
{
    struct seg *last = e->nsegs ? &e->segs[e->nsegs - 1] : NULL;
    if (kind == SEG_TEXT && last && last->kind == SEG_TEXT) {
        last->text = xrealloc(last->text, last->len + len + 1);
        memcpy(last->text + last->len, text, len);
        last->text[last->len += len] = '\0';
        return last;
    }
    e->segs = xrealloc(e->segs, (e->nsegs + 1) * sizeof(*e->segs));
    e->segs[e->nsegs] = (struct seg){ .kind = kind, .len = len, .text = xstrndup(text, len) };
    return &e->segs[e->nsegs++];
}

/* Split a value (NUL-terminated, len bytes) into literal and variable
 * segments; "%%" is a literal '%'. */
static int template_parse(struct edit *e, const char *v, size_t len, const char *path, char *err,
                          size_t errlen)
{
    if (strcspn(v, "\r\n") < len || strlen(v) < len) {
        snprintf(err, errlen, "%s: a value cannot contain CR, LF or NUL", path);
        return -1;
    }
    for (size_t i = 0; i < len;) {
        size_t n = strcspn(v + i, "%");
        if (n || v[i + 1] == '%') { /* text, or "%%" as one '%' */
            seg_push(e, SEG_TEXT, v + i, n ? n : 1);
            i += n ? n : 2;
            continue;
        }
        if (v[i + 1] != '{') {
            snprintf(err, errlen, "%s: '%%' must start %%{name} or be doubled (%%%%)", path);
            return -1;
        }
        i += 2;
        size_t nlen = strspn(v + i, VAR_CHARS);
        if (nlen == 0 || v[i + nlen] != '}') {
            snprintf(err, errlen,
                     "%s: \"%%{\" must be followed by a name ([A-Za-z0-9_.-]+) and '}'", path);
            return -1;
        }
        struct seg *sg = seg_push(e, SEG_VAR, v + i, nlen);
        for (size_t k = 0; k < sizeof(builtin_vars) / sizeof(builtin_vars[0]); k++) {
            if (strcmp(builtin_vars[k].name, sg->text) == 0) {
                sg->kind = builtin_vars[k].kind;
                sg->get = builtin_vars[k].get;
            }
        }
        i += nlen + 1;
    }
    if (e->nsegs == 0)
        seg_push(e, SEG_TEXT, "", 0);
    if (e->nsegs > MAX_SEGS) {
        snprintf(err, errlen, "%s: too many parts (at most %d)", path, MAX_SEGS);
        return -1;
    }
    if (e->nsegs == 1 && e->segs[0].kind == SEG_TEXT)
        e->constant = e->segs[0].text;
    return 0;
}

static void side_free(struct side *s)
{
    for (size_t i = 0; i < s->n; i++) {
        for (size_t k = 0; k < s->edits[i].nsegs; k++)
            free(s->edits[i].segs[k].text);
        free(s->edits[i].segs);
        free(s->edits[i].name);
    }
    free(s->edits);
}

static void headers_free_config(void *p)
{
    struct headers_config *c = p;
    if (!c)
        return;
    side_free(&c->request);
    side_free(&c->response);
    free(c);
}

static struct edit *edit_push(struct side *s, enum edit_op op, const char *name)
{
    s->edits = xrealloc(s->edits, (s->n + 1) * sizeof(*s->edits));
    s->edits[s->n] = (struct edit){ .op = op, .name = xstrdup(name) };
    return &s->edits[s->n++];
}

/* "set" or "add": {"Name": value}; value is a string (or, for add, an
 * array of strings: one field each). */
static int parse_values(struct side *s, enum edit_op op, json_t *obj, const char *path, char *err,
                        size_t errlen)
{
    const char *name;
    json_t *val;
    bool many = op == EDIT_ADD;
    if (!json_is_object(obj)) {
        snprintf(err, errlen, "%s: expected an object {\"Name\": \"value\"}", path);
        return -1;
    }
    json_object_foreach(obj, name, val)
    {
        if (check_name(name, strlen(name), path, err, errlen) < 0)
            return -1;
        size_t count = json_is_array(val) && many ? json_array_size(val) : 1;
        for (size_t i = 0; i < count; i++) {
            json_t *v = json_is_array(val) && many ? json_array_get(val, i) : val;
            if (!json_is_string(v)) {
                snprintf(err, errlen, "%s: the value of \"%.64s\" must be a string%s", path, name,
                         many ? " or an array of strings" : "");
                return -1;
            }
            struct edit *e = edit_push(s, op, name);
            if (template_parse(e, json_string_value(v), json_string_length(v), path, err, errlen) <
                0)
                return -1;
        }
    }
    return 0;
}

static int parse_remove(struct side *s, json_t *arr, const char *path, char *err, size_t errlen)
{
    if (!json_is_array(arr)) {
        snprintf(err, errlen, "%s: expected an array of header names", path);
        return -1;
    }
    for (size_t i = 0; i < json_array_size(arr); i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_string(v)) {
            snprintf(err, errlen, "%s[%zu]: expected a header name", path, i);
            return -1;
        }
        if (check_name(json_string_value(v), json_string_length(v), path, err, errlen) < 0)
            return -1;
        edit_push(s, EDIT_REMOVE, json_string_value(v));
    }
    return 0;
}

/* Parsed in a fixed order so that removes run before sets and adds. */
static int parse_side(json_t *json, struct side *s, const char *path, char *err, size_t errlen)
{
    char sub[640]; /* our caller's path (< 512) plus a key */
    const char *key;
    json_t *val;
    if (!json_is_object(json) || json_object_size(json) == 0) {
        snprintf(err, errlen, "%s: no action (expected an object with set, add or remove)", path);
        return -1;
    }
    json_object_foreach(json, key, val)
    {
        if (strcmp(key, "set") && strcmp(key, "add") && strcmp(key, "remove")) {
            snprintf(err, errlen, "%s: unknown key \"%.64s\" (expected set, add, remove)", path,
                     key);
            return -1;
        }
    }
    static const char *const keys[] = {
        [EDIT_REMOVE] = "remove", [EDIT_SET] = "set", [EDIT_ADD] = "add"
    };
    for (enum edit_op op = EDIT_REMOVE; op <= EDIT_ADD; op++) {
        if (!(val = json_object_get(json, keys[op])))
            continue;
        snprintf(sub, sizeof(sub), "%s.%s", path, keys[op]);
        if ((op == EDIT_REMOVE ? parse_remove(s, val, sub, err, errlen)
                               : parse_values(s, op, val, sub, err, errlen)) < 0)
            return -1;
    }
    return 0;
}

static int headers_parse_config(json_t *json, const char *path, void *gcfg, void **out, char *err,
                                size_t errlen)
{
    (void)gcfg;
    char sub[512];
    const char *key;
    json_t *val;
    if (!json_is_object(json) || json_object_size(json) == 0) {
        snprintf(err, errlen, "%s: expected an object with \"request\" and/or \"response\"", path);
        return -1;
    }
    struct headers_config *c = xcalloc(1, sizeof(*c));
    json_object_foreach(json, key, val)
    {
        bool req = !strcmp(key, "request");
        if (!req && strcmp(key, "response")) {
            snprintf(err, errlen, "%s: unknown key \"%.64s\" (expected request, response)", path,
                     key);
            goto fail;
        }
        snprintf(sub, sizeof(sub), "%s.%s", path, key);
        if (parse_side(val, req ? &c->request : &c->response, sub, err, errlen) < 0)
            goto fail;
    }
    *out = c;
    return 0;
fail:
    headers_free_config(c);
    return -1;
}

/* ---- hooks ----------------------------------------------------------------- */

static const char *seg_value(struct request *r, const struct seg *s, size_t *len)
{
    const char *v = NULL;
    switch (s->kind) {
    case SEG_TEXT:
        *len = s->len;
        return s->text;
    case SEG_PATH:
        v = request_path(r, len);
        return v ? v : (*len = 0, "");
    case SEG_FIELD:
        v = s->get(r);
        break;
    case SEG_VAR:
        v = request_var(r, s->text);
        break;
    }
    if (!v)
        v = "";
    *len = strlen(v);
    return v;
}

/* The value of an edit for this request, in request memory. */
static const char *edit_value(struct request *r, const struct edit *e)
{
    if (e->constant)
        return e->constant;
    const char *parts[MAX_SEGS];
    size_t lens[MAX_SEGS], total = 0;
    for (size_t i = 0; i < e->nsegs; i++) {
        parts[i] = seg_value(r, &e->segs[i], &lens[i]);
        total += lens[i];
    }
    char *out = request_alloc(r, total + 1), *p = out;
    for (size_t i = 0; i < e->nsegs; i++) {
        memcpy(p, parts[i], lens[i]);
        p += lens[i];
    }
    return out;
}

/* A value that turns out to hold CR or LF (from a variable) is refused by
 * the setters; that field is then simply not sent. */
static void side_apply(struct request *r, const struct side *s, bool response)
{
    if (s->n == 0)
        return; /* edits may be NULL then: no pointer arithmetic on it */
    for (const struct edit *e = s->edits; e < s->edits + s->n; e++) {
        if (e->op == EDIT_REMOVE)
            (response ? response_remove_header : request_remove_header)(r, e->name);
        else if (e->op == EDIT_SET)
            (response ? response_set_header : request_set_header)(r, e->name, edit_value(r, e));
        else
            (response ? response_add_header : request_add_header)(r, e->name, edit_value(r, e));
    }
}

static enum filter_status headers_on_request(struct request *r, void *p, void **ctx)
{
    side_apply(r, &((struct headers_config *)p)->request, false);
    return FILTER_CONTINUE;
}

static enum filter_status headers_on_response(struct request *r, void *p, void **ctx)
{
    side_apply(r, &((struct headers_config *)p)->response, true);
    return FILTER_CONTINUE;
}

const struct module module_headers = {
    .name = "headers",
    .parse_config = headers_parse_config,
    .free_config = headers_free_config,
    .on_request = headers_on_request,
    .on_response = headers_on_response,
};
