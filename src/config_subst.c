/* Pass 2 of loading the configuration (see config.c): substitution of
 * ${VAR}, ${VAR:-default}, $$ and @file in one string value. A failure
 * is described in the caller's buffer; config.c records it at the value's
 * JSON path. The substituted text may be a secret, so messages here name
 * the template or the file, never the value. */
#include "config_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#define SECRET_FILE_MAX (1u << 20) /* "@file" values */

struct subst {
    const char *dir; /* config file's directory, NULL = relative to the cwd */
    char *why;       /* the reason of the (one) failure */
    size_t whycap;
};

static void __attribute__((format(printf, 2, 3))) fail(struct subst *sub, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sub->why, sub->whycap, fmt, ap);
    va_end(ap);
}

static int is_var_start(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_';
}

static int is_var_char(char c) { return is_var_start(c) || (c >= '0' && c <= '9'); }

/* Expand s[0..n) into out. Sets *used when a variable was expanded.
 * Returns 0, or -1 after describing the problem (fail). */
static int expand_env(struct subst *sub, const char *s, size_t n, struct sbuf *out, int *used)
{
    size_t i = 0;
    while (i < n) {
        if (s[i] != '$' || i + 1 >= n || (s[i + 1] != '$' && s[i + 1] != '{')) {
            sb_putc(out, s[i++]);
            continue;
        }
        if (s[i + 1] == '$') {
            sb_putc(out, '$');
            i += 2;
            continue;
        }
        const char *close = memchr(s + i + 2, '}', n - i - 2);
        if (!close) {
            fail(sub, "unterminated \"${\" (write \"$$\" for a literal '$')");
            return -1;
        }
        const char *name = s + i + 2, *q = name;
        if (q < close && is_var_start(*q))
            while (q < close && is_var_char(*q))
                q++;
        size_t nlen = (size_t)(q - name);
        int has_default = close - q >= 2 && q[0] == ':' && q[1] == '-';
        if (nlen == 0 || (q != close && !has_default)) {
            fail(sub, "\"${\" must be followed by a variable name and \"}\" or \":-default}\", "
                     "like ${PORT} or ${PORT:-8080}");
            return -1;
        }
        char var[256];
        if (nlen >= sizeof(var)) {
            fail(sub, "environment variable name is too long");
            return -1;
        }
        memcpy(var, name, nlen);
        var[nlen] = '\0';
        const char *val = getenv(var);
        if (has_default && (!val || !*val)) {
            sb_putn(out, q + 2, (size_t)(close - q - 2));
        } else if (!val) {
            fail(sub, "environment variable \"%s\" is not set", var);
            return -1;
        } else {
            sb_puts(out, val);
            *used = 1;
        }
        i = (size_t)(close - s) + 1;
    }
    return 0;
}

/* Read a whole secret file into out, one trailing newline removed.
 * shown names the file in messages. */
static int read_secret(struct subst *sub, const char *path, const char *shown, struct sbuf *out)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        fail(sub, "cannot read \"%s\": %s", shown, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        fail(sub, "\"%s\" is not a regular file", shown);
        close(fd);
        return -1;
    }
    sb_reserve(out, SECRET_FILE_MAX + 1);
    size_t start = out->len;
    for (;;) {
        ssize_t r = read(fd, out->p + out->len, SECRET_FILE_MAX + 1 - (out->len - start));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            fail(sub, "cannot read \"%s\": %s", shown, strerror(errno));
            close(fd);
            return -1;
        }
        out->len += (size_t)r;
        if (r == 0 || out->len - start > SECRET_FILE_MAX)
            break;
    }
    close(fd);
    out->p[out->len] = '\0';
    if (out->len - start > SECRET_FILE_MAX) {
        fail(sub, "\"%s\" is larger than 1 MiB", shown);
        return -1;
    }
    if (memchr(out->p + start, '\0', out->len - start)) {
        fail(sub, "\"%s\" contains a NUL byte", shown);
        return -1;
    }
    if (out->len > start && out->p[out->len - 1] == '\n')
        sb_truncate(out, out->len - 1);
    if (out->len > start && out->p[out->len - 1] == '\r')
        sb_truncate(out, out->len - 1);
    return 0;
}

char *config_resolve_path(const char *dir, const char *p)
{
    if (p[0] == '/' || !dir)
        return xstrdup(p);
    struct sbuf b = { 0 };
    sb_puts(&b, dir);
    sb_putc(&b, '/');
    sb_puts(&b, p);
    return b.p;
}

/* "@path" -> the file's content; "@@x" -> "@x"; else ${...} expansion. */
static int subst_value(struct subst *sub, const char *s, size_t n, struct sbuf *out, int *changed)
{
    int used = 0;
    if (n >= 2 && s[0] == '@' && s[1] == '@') {
        sb_putc(out, '@');
        return expand_env(sub, s + 2, n - 2, out, changed);
    }
    if (n == 0 || s[0] != '@')
        return expand_env(sub, s, n, out, changed);

    struct sbuf path = { 0 };
    int rc = expand_env(sub, s + 1, n - 1, &path, &used);
    if (rc == 0 && path.len == 0) {
        fail(sub, "\"@\" must be followed by a file path (write \"@@\" for a literal '@')");
        rc = -1;
    }
    if (rc == 0) {
        char *full = config_resolve_path(sub->dir, path.p);
        struct sbuf shown = { 0 };
        if (used) /* the path itself came from the environment: show the template */
            sb_put_escaped(&shown, s + 1, n - 1, SHOW_MAX);
        else
            sb_put_escaped(&shown, full, strlen(full), 4 * SHOW_MAX);
        rc = read_secret(sub, full, shown.p, out);
        free(full);
        free(shown.p);
        *changed = 1;
    }
    free(path.p);
    return rc;
}

int config_subst_string(json_t *v, const char *dir, char **template, char *why, size_t whycap)
{
    struct subst sub = { dir, why, whycap };
    const char *s = json_string_value(v);
    size_t n = json_string_length(v);
    int rc = 0;
    *template = NULL;
    if (!memchr(s, '$', n) && (n == 0 || s[0] != '@'))
        return 0;
    struct sbuf out = { 0 };
    int changed = 0;
    sb_reserve(&out, n);
    if (subst_value(&sub, s, n, &out, &changed) < 0) {
        rc = -1;
    } else if (changed) {
        char *copy = xstrndup(s, n); /* s goes with the old value */
        /* json_string_setn checks UTF-8: environment values and files may not be. */
        if (json_string_setn(v, out.p, out.len) < 0) {
            fail(&sub, "the substituted value is not valid UTF-8");
            free(copy);
            rc = -1;
        } else {
            *template = copy;
            rc = 1;
        }
    } else if (out.len != n || memcmp(out.p, s, n) != 0) {
        json_string_setn(v, out.p, out.len); /* only "$$" or "@@": valid UTF-8 stays valid */
    }
    free(out.p);
    return rc;
}
