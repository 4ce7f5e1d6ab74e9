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

#define MAX_SEGS 32 /* per value; bounds the stack array used to expand it */

enum seg_kind { SEG_TEXT, SEG_CLIENT_IP, SEG_ROUTE, SEG_HOST, SEG_METHOD, SEG_PATH, SEG_VAR };

struct seg {
    enum seg_kind kind;
    char *text; /* literal text (SEG_TEXT) or variable name (SEG_VAR); owned */
    size_t len;
};

struct edit {
    char *name;
    char *constant; /* the value when it has no variables, else NULL */
    struct seg *segs;
    size_t nsegs;
};

struct side {
    char **remove;
    size_t nremove;
    struct edit *set, *add;
    size_t nset, nadd;
};

struct headers_config {
    struct side request, response;
};

static const char *const reserved_names[] = {
    "Content-Length", "Transfer-Encoding", "Connection", "Host", "Keep-Alive",
    "TE", "Trailer", "Upgrade", "Proxy-Connection", NULL,
};

static const struct { const char *name; enum seg_kind kind; } builtin_vars[] = {
    { "client_ip", SEG_CLIENT_IP }, { "route", SEG_ROUTE }, { "host", SEG_HOST },
    { "method", SEG_METHOD },       { "path", SEG_PATH },
};

/* ---- config ---------------------------------------------------------------- */

static bool tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static bool var_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '.' || c == '-';
}

/* A header name that may be edited; otherwise "what is wrong" in err. */
static int check_name(const char *name, size_t len, const char *path, char *err, size_t errlen)
{
    for (size_t i = 0; i < len; i++) {
        if (!tchar((unsigned char)name[i])) {
            snprintf(err, errlen, "%s: \"%.64s\" is not a valid header name", path, name);
            return -1;
        }
    }
    if (len == 0) {
        snprintf(err, errlen, "%s: a header name cannot be empty", path);
        return -1;
    }
    for (size_t i = 0; reserved_names[i]; i++) {
        if (strcasecmp(name, reserved_names[i]) == 0) {
            snprintf(err, errlen, "%s: \"%s\" is a framing or hop-by-hop header managed by "
                     "Portico and cannot be edited", path, reserved_names[i]);
            return -1;
        }
    }
    return 0;
}

static void seg_push(struct edit *e, enum seg_kind kind, const char *text, size_t len)
{
    e->segs = xrealloc(e->segs, (e->nsegs + 1) * sizeof(*e->segs));
    e->segs[e->nsegs++] = (struct seg){ .kind = kind, .len = len,
                                        .text = text ? xstrndup(text, len) : NULL };
}

/* Split a value into literal and variable segments; "%%" becomes '%'. */
static int template_parse(struct edit *e, const char *v, size_t len, const char *path, char *err,
                          size_t errlen)
{
    char *lit = xmalloc(len + 1);
    size_t nlit = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)v[i];
        if (c == '\r' || c == '\n' || c == '\0') {
            snprintf(err, errlen, "%s: a value cannot contain CR, LF or NUL", path);
            goto fail;
        }
        if (c != '%') {
            lit[nlit++] = (char)c;
            continue;
        }
        if (i + 1 < len && v[i + 1] == '%') {
            lit[nlit++] = '%';
            i++;
            continue;
        }
        const char *name = v + i + 2, *end = i + 1 < len && v[i + 1] == '{' ?
                                              memchr(name, '}', len - i - 2) : NULL;
        if (!end) {
            snprintf(err, errlen, "%s: '%%' must start %%{name} or be doubled (%%%%)", path);
            goto fail;
        }
        size_t nlen = (size_t)(end - name);
        bool ok = nlen > 0;
        for (size_t k = 0; k < nlen; k++)
            ok = ok && var_char((unsigned char)name[k]);
        if (!ok) {
            snprintf(err, errlen, "%s: \"%%{%.*s}\" is not a variable name (letters, digits, "
                     "'_', '.', '-')", path, (int)(end - name > 64 ? 64 : end - name), name);
            goto fail;
        }
        if (nlit)
            seg_push(e, SEG_TEXT, lit, nlit);
        nlit = 0;
        enum seg_kind kind = SEG_VAR;
        for (size_t k = 0; k < sizeof(builtin_vars) / sizeof(builtin_vars[0]); k++)
            if (strlen(builtin_vars[k].name) == nlen && !memcmp(builtin_vars[k].name, name, nlen))
                kind = builtin_vars[k].kind;
        seg_push(e, kind, kind == SEG_VAR ? name : NULL, nlen);
        i = (size_t)(end - v);
    }
    if (nlit || e->nsegs == 0)
        seg_push(e, SEG_TEXT, lit, nlit);
    free(lit);
    if (e->nsegs > MAX_SEGS) {
        snprintf(err, errlen, "%s: too many parts (at most %d variables and texts)", path, MAX_SEGS);
        return -1;
    }
    if (e->nsegs == 1 && e->segs[0].kind == SEG_TEXT)
        e->constant = e->segs[0].text;
    return 0;
fail:
    free(lit);
    return -1;
}

static void side_free(struct side *s)
{
    for (size_t i = 0; i < s->nremove; i++)
        free(s->remove[i]);
    free(s->remove);
    struct edit *lists[2] = { s->set, s->add };
    size_t counts[2] = { s->nset, s->nadd };
    for (int l = 0; l < 2; l++) {
        for (size_t i = 0; i < counts[l]; i++) {
            for (size_t k = 0; k < lists[l][i].nsegs; k++)
                free(lists[l][i].segs[k].text);
            free(lists[l][i].segs);
            free(lists[l][i].name);
        }
        free(lists[l]);
    }
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

/* One "Name": value pair of set or add; value is a string (or, for add,
 * an array of strings: one field each). */
static int parse_edit(struct edit **list, size_t *n, const char *name, json_t *val, bool many,
                      const char *path, char *err, size_t errlen)
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
        *list = xrealloc(*list, (*n + 1) * sizeof(**list));
        struct edit *e = &(*list)[(*n)++];
        *e = (struct edit){ .name = xstrdup(name) };
        if (template_parse(e, json_string_value(v), json_string_length(v), path, err, errlen) < 0)
            return -1;
    }
    return 0;
}

static int parse_side(json_t *json, struct side *s, const char *path, char *err, size_t errlen)
{
    char sub[512];
    const char *key;
    json_t *val;
    if (!json_is_object(json)) {
        snprintf(err, errlen, "%s: expected an object with \"set\", \"add\" or \"remove\"", path);
        return -1;
    }
    if (json_object_size(json) == 0) {
        snprintf(err, errlen, "%s: no action (expected \"set\", \"add\" or \"remove\")", path);
        return -1;
    }
    json_object_foreach(json, key, val) {
        snprintf(sub, sizeof(sub), "%s.%s", path, key);
        bool is_set = !strcmp(key, "set"), is_add = !strcmp(key, "add");
        if (is_set || is_add) {
            if (!json_is_object(val)) {
                snprintf(err, errlen, "%s: expected an object {\"Name\": \"value\"}", sub);
                return -1;
            }
            const char *name;
            json_t *v;
            json_object_foreach(val, name, v) {
                if (parse_edit(is_set ? &s->set : &s->add, is_set ? &s->nset : &s->nadd, name, v,
                               is_add, sub, err, errlen) < 0)
                    return -1;
            }
        } else if (!strcmp(key, "remove")) {
            if (!json_is_array(val)) {
                snprintf(err, errlen, "%s: expected an array of header names", sub);
                return -1;
            }
            for (size_t i = 0; i < json_array_size(val); i++) {
                json_t *v = json_array_get(val, i);
                if (!json_is_string(v)) {
                    snprintf(err, errlen, "%s[%zu]: expected a header name", sub, i);
                    return -1;
                }
                if (check_name(json_string_value(v), json_string_length(v), sub, err, errlen) < 0)
                    return -1;
                s->remove = xrealloc(s->remove, (s->nremove + 1) * sizeof(*s->remove));
                s->remove[s->nremove++] = xstrdup(json_string_value(v));
            }
        } else {
            snprintf(err, errlen, "%s: unknown key \"%.64s\" (expected set, add, remove)", path, key);
            return -1;
        }
    }
    return 0;
}

static int headers_parse_config(json_t *json, const char *path, void **out, char *err,
                                size_t errlen)
{
    char sub[512];
    const char *key;
    json_t *val;
    if (!json_is_object(json) || json_object_size(json) == 0) {
        snprintf(err, errlen, "%s: expected an object with \"request\" and/or \"response\" "
                 "edits, like {\"request\": {\"set\": {\"X-From\": \"portico\"}}}", path);
        return -1;
    }
    struct headers_config *c = xcalloc(1, sizeof(*c));
    json_object_foreach(json, key, val) {
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
        if (!v)
            *len = 0;
        return v ? v : "";
    case SEG_CLIENT_IP: v = request_client_ip(r); break;
    case SEG_ROUTE: v = request_route_name(r); break;
    case SEG_HOST: v = request_host(r); break;
    case SEG_METHOD: v = request_method(r); break;
    case SEG_VAR: v = request_var(r, s->text); break;
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
    for (size_t i = 0; i < s->nremove; i++)
        (response ? response_remove_header : request_remove_header)(r, s->remove[i]);
    for (size_t i = 0; i < s->nset; i++)
        (response ? response_set_header : request_set_header)(r, s->set[i].name,
                                                              edit_value(r, &s->set[i]));
    for (size_t i = 0; i < s->nadd; i++)
        (response ? response_add_header : request_add_header)(r, s->add[i].name,
                                                              edit_value(r, &s->add[i]));
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
