/* Route table layout (built once, read-only afterwards):
 *
 *   router
 *     hosts[]  exact-host groups, sorted by host: bsearch
 *     wild[]   wildcard groups keyed by suffix (".example.com"), sorted:
 *              for a request host, each suffix starting at one of its dots
 *              is looked up with bsearch, leftmost (longest) first
 *     any      the group of routes without a host (or NULL)
 *   group
 *     exact[]  exact paths, sorted: bsearch
 *     trie     prefixes in a byte trie
 *   entry      a slice of rt[]: the routes sharing one group, path and kind,
 *              in config order (they differ by methods)
 *
 * Prefixes use a byte trie rather than a sorted array probed from the
 * longest candidate: the walk costs one step per path byte whatever the
 * number or nesting of prefixes, and each node links to its nearest
 * ancestor holding routes, so going from the longest to the shorter
 * matching prefixes skips the nodes in between. Children of a node are
 * stored as a sorted byte array (binary search), which keeps the trie
 * compact for the few distinct bytes route paths use.
 *
 * Matching is O(log hosts * host length + path length), with no
 * allocation: the request host is lowercased into a stack buffer. */
#include "router.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"

#define HOST_MAX 255

struct entry {
    uint32_t first; /* index into router.rt */
    uint32_t n;     /* 0: no routes */
};

struct exact_path {
    const char *path;
    size_t len;
    struct entry e;
};

struct trie_node {
    uint32_t off; /* children: keys[off..off+nkids), kids[...] */
    uint32_t nkids;
    struct entry e;
    int32_t up; /* nearest strict ancestor with routes, -1 if none */
};

struct trie {
    struct trie_node *nodes; /* nodes[0] is the root (empty prefix) */
    unsigned char *keys;
    uint32_t *kids;
};

struct group {
    char *host; /* lowercased, no trailing dot; for wildcards the suffix ".x.y" */
    size_t host_len;
    struct exact_path *exact;
    size_t nexact;
    struct trie trie;
};

struct router {
    const struct config_route **rt;
    struct group *groups; /* all groups: hosts, then wildcards, then any */
    size_t ngroups;
    struct group *hosts, *wild, *any;
    size_t nhosts, nwild;
};

/* Byte strings ordered by content, then length: the one order used for
 * sorting and for searching. */
static int bytes_cmp(const char *a, size_t alen, const char *b, size_t blen)
{
    int c = memcmp(a, b, alen < blen ? alen : blen);
    if (c)
        return c;
    return alen < blen ? -1 : alen > blen;
}

/* ---- methods ---- */

static int route_any_method(const struct config_route *rt)
{
    return rt->methods == 0 && rt->nother_methods == 0;
}

static int route_allows(const struct config_route *rt, enum http_method m,
                        const struct http_str *ms)
{
    if (route_any_method(rt))
        return 1;
    if (m != HTTP_M_OTHER)
        return (rt->methods & ROUTE_METHOD_BIT(m)) != 0;
    if (!ms)
        return 0;
    for (size_t i = 0; i < rt->nother_methods; i++)
        if (strlen(rt->other_methods[i]) == ms->len &&
            memcmp(rt->other_methods[i], ms->p, ms->len) == 0)
            return 1;
    return 0;
}

static int methods_overlap(const struct config_route *a, const struct config_route *b)
{
    if (route_any_method(a) || route_any_method(b))
        return 1;
    if (a->methods & b->methods & ~ROUTE_METHOD_BIT(HTTP_M_OTHER))
        return 1;
    for (size_t i = 0; i < a->nother_methods; i++)
        for (size_t j = 0; j < b->nother_methods; j++)
            if (strcmp(a->other_methods[i], b->other_methods[j]) == 0)
                return 1;
    return 0;
}

/* ---- build: sorting routes into groups and entries ---- */

enum host_kind { KIND_EXACT, KIND_WILD, KIND_ANY };

struct item {
    const struct config_route *rt;
    size_t pos; /* config order */
    int kind;
    char *key; /* normalised host or wildcard suffix; NULL for KIND_ANY */
    size_t key_len;
};

static int item_cmp(const void *pa, const void *pb)
{
    const struct item *a = pa, *b = pb;
    if (a->kind != b->kind)
        return a->kind - b->kind;
    if (a->kind != KIND_ANY) {
        int c = bytes_cmp(a->key, a->key_len, b->key, b->key_len);
        if (c)
            return c;
    }
    if (!a->rt->exact != !b->rt->exact)
        return a->rt->exact ? -1 : 1;
    int c = bytes_cmp(a->rt->path, a->rt->path_len, b->rt->path, b->rt->path_len);
    if (c)
        return c;
    return a->pos < b->pos ? -1 : a->pos > b->pos;
}

static int same_group(const struct item *a, const struct item *b)
{
    return a->kind == b->kind &&
           (a->kind == KIND_ANY || bytes_cmp(a->key, a->key_len, b->key, b->key_len) == 0);
}

static int same_entry(const struct item *a, const struct item *b)
{
    return same_group(a, b) && !a->rt->exact == !b->rt->exact &&
           bytes_cmp(a->rt->path, a->rt->path_len, b->rt->path, b->rt->path_len) == 0;
}

static const char *route_label(const struct config_route *rt, char *buf, size_t len)
{
    if (rt->name)
        return rt->name;
    snprintf(buf, len, "routes[%zu]", rt->index);
    return buf;
}

/* Fill it from routes[pos]: validate and normalise the host pattern. */
static int item_init(struct item *it, const struct config_route *rt, size_t pos, char *err,
                     size_t errlen)
{
    char lb[32];
    it->rt = rt;
    it->pos = pos;
    it->key = NULL;
    it->key_len = 0;
    if (!rt->path || rt->path_len == 0 || rt->path[0] != '/') {
        snprintf(err, errlen, "%s: path must start with '/'", route_label(rt, lb, sizeof(lb)));
        return -1;
    }
    if (!rt->host || !rt->host[0]) {
        it->kind = KIND_ANY;
        return 0;
    }
    const char *h = rt->host;
    size_t n = strlen(h);
    if (n > 1 && h[n - 1] == '.')
        n--;
    if (rt->host_wildcard) {
        if (n < 3 || h[0] != '*' || h[1] != '.') {
            snprintf(err, errlen, "%s: wildcard host must look like \"*.example.com\"",
                     route_label(rt, lb, sizeof(lb)));
            return -1;
        }
        h++;
        n--;
        it->kind = KIND_WILD;
    } else {
        it->kind = KIND_EXACT;
    }
    it->key = xstrndup(h, n);
    for (size_t i = 0; i < n; i++)
        if (it->key[i] >= 'A' && it->key[i] <= 'Z')
            it->key[i] |= 0x20;
    it->key_len = n;
    return 0;
}

/* Refuse a route that an earlier one with the same host, path and kind
 * would always shadow. items[from..to) is one entry. */
static int entry_check(const struct item *items, size_t from, size_t to, char *err, size_t errlen)
{
    char la[32], lb[32];
    for (size_t j = from + 1; j < to; j++)
        for (size_t i = from; i < j; i++)
            if (methods_overlap(items[i].rt, items[j].rt)) {
                snprintf(err, errlen,
                         "%s duplicates %s (same host, path and kind, overlapping methods): "
                         "it could never match",
                         route_label(items[j].rt, la, sizeof(la)),
                         route_label(items[i].rt, lb, sizeof(lb)));
                return -1;
            }
    return 0;
}

/* ---- build: the prefix trie ---- */

struct bnode {
    unsigned char *keys;
    uint32_t *kids;
    uint32_t nkids;
    struct entry e;
};

struct trie_builder {
    struct bnode *v;
    size_t n, cap;
};

static uint32_t builder_node(struct trie_builder *b)
{
    if (b->n == b->cap) {
        b->cap = b->cap ? b->cap * 2 : 16;
        b->v = xrealloc(b->v, b->cap * sizeof(*b->v));
    }
    memset(&b->v[b->n], 0, sizeof(b->v[b->n]));
    return (uint32_t)b->n++;
}

/* Children are kept sorted by byte; returns the child for c, created if
 * absent. */
static uint32_t builder_child(struct trie_builder *b, uint32_t node, unsigned char c)
{
    struct bnode *p = &b->v[node];
    uint32_t i = 0;
    while (i < p->nkids && p->keys[i] < c)
        i++;
    if (i < p->nkids && p->keys[i] == c)
        return p->kids[i];
    uint32_t kid = builder_node(b);
    p = &b->v[node]; /* builder_node may have moved the array */
    p->keys = xrealloc(p->keys, p->nkids + 1);
    p->kids = xrealloc(p->kids, (p->nkids + 1) * sizeof(*p->kids));
    memmove(p->keys + i + 1, p->keys + i, p->nkids - i);
    memmove(p->kids + i + 1, p->kids + i, (p->nkids - i) * sizeof(*p->kids));
    p->keys[i] = c;
    p->kids[i] = kid;
    p->nkids++;
    return kid;
}

static void builder_insert(struct trie_builder *b, const char *path, size_t len, struct entry e)
{
    uint32_t n = 0;
    for (size_t i = 0; i < len; i++)
        n = builder_child(b, n, (unsigned char)path[i]);
    b->v[n].e = e;
}

/* Flatten into struct trie and free the builder. A child's index is always
 * above its parent's, so one pass in index order can set every node's
 * nearest ancestor with routes. */
static void builder_finish(struct trie_builder *b, struct trie *t)
{
    size_t nedges = b->n - 1;
    t->nodes = xcalloc(b->n, sizeof(*t->nodes));
    t->keys = xmalloc(nedges ? nedges : 1);
    t->kids = xmalloc((nedges ? nedges : 1) * sizeof(*t->kids));
    uint32_t off = 0;
    t->nodes[0].up = -1;
    for (size_t i = 0; i < b->n; i++) {
        struct bnode *p = &b->v[i];
        struct trie_node *q = &t->nodes[i];
        q->off = off;
        q->nkids = p->nkids;
        q->e = p->e;
        if (p->nkids) {
            memcpy(t->keys + off, p->keys, p->nkids);
            memcpy(t->kids + off, p->kids, p->nkids * sizeof(*p->kids));
            off += p->nkids;
        }
        for (uint32_t k = 0; k < p->nkids; k++)
            t->nodes[p->kids[k]].up = q->e.n ? (int32_t)i : q->up;
        free(p->keys);
        free(p->kids);
    }
    free(b->v);
}

/* ---- build: groups ---- */

/* items[from..to) is one host group, already sorted: exact paths first,
 * then prefixes, each by path. */
static int group_build(struct group *g, const struct item *items, size_t from, size_t to, char *err,
                       size_t errlen)
{
    if (items[from].key) {
        g->host = xstrndup(items[from].key, items[from].key_len);
        g->host_len = items[from].key_len;
    }
    struct trie_builder tb = { 0 };
    builder_node(&tb);
    g->exact = xcalloc(to - from, sizeof(*g->exact));
    int rc = 0;
    for (size_t i = from, j; i < to; i = j) {
        for (j = i + 1; j < to && same_entry(&items[i], &items[j]); j++)
            ;
        if (rc == 0 && entry_check(items, i, j, err, errlen) < 0)
            rc = -1;
        struct entry e = { (uint32_t)i, (uint32_t)(j - i) };
        const struct config_route *rt = items[i].rt;
        if (rt->exact)
            g->exact[g->nexact++] = (struct exact_path){ rt->path, rt->path_len, e };
        else
            builder_insert(&tb, rt->path, rt->path_len, e);
    }
    builder_finish(&tb, &g->trie);
    return rc;
}

struct router *router_build(struct config_route *const *routes, size_t n, char *err, size_t errlen)
{
    if (n > UINT32_MAX / 2) {
        snprintf(err, errlen, "too many routes");
        return NULL;
    }
    struct item *items = xcalloc(n ? n : 1, sizeof(*items));
    struct router *r = xcalloc(1, sizeof(*r));
    int rc = 0;
    size_t built = 0;
    for (; built < n && rc == 0; built++)
        rc = item_init(&items[built], routes[built], built, err, errlen);
    if (rc == 0) {
        qsort(items, n, sizeof(*items), item_cmp);
        r->rt = xcalloc(n ? n : 1, sizeof(*r->rt));
        r->groups = xcalloc(n ? n : 1, sizeof(*r->groups));
        for (size_t i = 0; i < n; i++)
            r->rt[i] = items[i].rt;
        for (size_t i = 0, j; i < n && rc == 0; i = j) {
            for (j = i + 1; j < n && same_group(&items[i], &items[j]); j++)
                ;
            rc = group_build(&r->groups[r->ngroups++], items, i, j, err, errlen);
            if (items[i].kind == KIND_EXACT)
                r->nhosts++;
            else if (items[i].kind == KIND_WILD)
                r->nwild++;
        }
        r->hosts = r->groups;
        r->wild = r->groups + r->nhosts;
        if (r->nhosts + r->nwild < r->ngroups)
            r->any = &r->groups[r->ngroups - 1];
    }
    for (size_t i = 0; i < built; i++)
        free(items[i].key);
    free(items);
    if (rc < 0) {
        router_free(r);
        return NULL;
    }
    return r;
}

void router_free(struct router *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->ngroups; i++) {
        struct group *g = &r->groups[i];
        free(g->host);
        free(g->exact);
        free(g->trie.nodes);
        free(g->trie.keys);
        free(g->trie.kids);
    }
    free(r->groups);
    free(r->rt);
    free(r);
}

/* ---- match ---- */

/* The request's Host reduced to what routes name: port and one trailing
 * dot removed, lowercased into buf. Returns its length, or 0 when there
 * is no usable host (absent, empty, or over HOST_MAX bytes). */
static size_t host_key(const char *h, size_t len, char *buf)
{
    if (!h || len == 0)
        return 0;
    size_t n = len;
    if (h[0] == '[') {
        const char *e = memchr(h, ']', len);
        if (!e)
            return 0;
        n = (size_t)(e - h) + 1;
    } else {
        const char *c = memchr(h, ':', len);
        if (c)
            n = (size_t)(c - h);
    }
    if (n > 1 && h[n - 1] == '.')
        n--;
    if (n == 0 || n > HOST_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = h[i];
        buf[i] = c >= 'A' && c <= 'Z' ? (char)(c | 0x20) : c;
    }
    return n;
}

static const struct group *group_find(const struct group *v, size_t n, const char *key, size_t len)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = bytes_cmp(v[mid].host, v[mid].host_len, key, len);
        if (c == 0)
            return &v[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

static const struct exact_path *exact_find(const struct group *g, const char *path, size_t len)
{
    size_t lo = 0, hi = g->nexact;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = bytes_cmp(g->exact[mid].path, g->exact[mid].len, path, len);
        if (c == 0)
            return &g->exact[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* The deepest trie node on path's bytes. */
static uint32_t trie_walk(const struct trie *t, const char *path, size_t len)
{
    uint32_t n = 0;
    for (size_t i = 0; i < len; i++) {
        const struct trie_node *p = &t->nodes[n];
        const unsigned char *keys = t->keys + p->off;
        unsigned char c = (unsigned char)path[i];
        uint32_t lo = 0, hi = p->nkids;
        while (lo < hi) {
            uint32_t mid = (lo + hi) / 2;
            if (keys[mid] < c)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo == p->nkids || keys[lo] != c)
            break;
        n = t->kids[p->off + lo];
    }
    return n;
}

/* The first route of e (config order) allowing the method, or NULL. */
static const struct config_route *entry_pick(const struct router *r, struct entry e,
                                             enum http_method m, const struct http_str *ms)
{
    for (uint32_t i = 0; i < e.n; i++)
        if (route_allows(r->rt[e.first + i], m, ms))
            return r->rt[e.first + i];
    return NULL;
}

static enum router_result group_match(const struct router *r, const struct group *g,
                                      const char *path, size_t len, enum http_method m,
                                      const struct http_str *ms, const struct config_route **out)
{
    int path_matched = 0;
    const struct exact_path *x = exact_find(g, path, len);
    if (x) {
        path_matched = 1;
        if ((*out = entry_pick(r, x->e, m, ms)))
            return ROUTER_MATCH;
    }
    const struct trie *t = &g->trie;
    uint32_t d = trie_walk(t, path, len);
    int32_t n = t->nodes[d].e.n ? (int32_t)d : t->nodes[d].up;
    for (; n >= 0; n = t->nodes[n].up) {
        path_matched = 1;
        if ((*out = entry_pick(r, t->nodes[n].e, m, ms)))
            return ROUTER_MATCH;
    }
    return path_matched ? ROUTER_METHOD_NOT_ALLOWED : ROUTER_NOT_FOUND;
}

enum router_result router_match(const struct router *r, const char *host, size_t host_len,
                                const char *path, size_t path_len, enum http_method method,
                                const struct http_str *method_str, const struct config_route **out)
{
    char buf[HOST_MAX];
    size_t n = host_key(host, host_len, buf);
    enum router_result res;
    *out = NULL;
    if (n) {
        const struct group *g = group_find(r->hosts, r->nhosts, buf, n);
        res = g ? group_match(r, g, path, path_len, method, method_str, out) : ROUTER_NOT_FOUND;
        if (res != ROUTER_NOT_FOUND)
            return res;
        /* Wildcard suffixes start at a dot after at least one byte, the
         * leftmost (longest, most specific) first. */
        for (size_t i = 1; i < n && r->nwild; i++) {
            if (buf[i] != '.')
                continue;
            g = group_find(r->wild, r->nwild, buf + i, n - i);
            res = g ? group_match(r, g, path, path_len, method, method_str, out) : ROUTER_NOT_FOUND;
            if (res != ROUTER_NOT_FOUND)
                return res;
        }
    }
    if (r->any)
        return group_match(r, r->any, path, path_len, method, method_str, out);
    return ROUTER_NOT_FOUND;
}
