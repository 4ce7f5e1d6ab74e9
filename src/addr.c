/* Socket addresses and CIDR ranges as written in the config.
 *
 * Error texts never repeat the input: the caller knows what it passed and
 * may hold a value substituted from a secret. */
#include "addr.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

#define HOST_MAX 64 /* longer than any IPv6 literal */

static void set_err(char *err, size_t errlen, const char *msg)
{
    if (err && errlen)
        snprintf(err, errlen, "%s", msg);
}

/* Digits only, 1..65535. */
static int parse_port(const char *s, int *port)
{
    size_t n = strlen(s);
    if (n == 0 || n > 5)
        return -1;
    int v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    if (v < 1 || v > 65535)
        return -1;
    *port = v;
    return 0;
}

/* Does an unparsable host look like a name rather than a mistyped IPv4? */
static int looks_like_name(const char *h)
{
    for (; *h; h++)
        if ((*h >= 'a' && *h <= 'z') || (*h >= 'A' && *h <= 'Z') || *h == '-' || *h == '_')
            return 1;
    return 0;
}

int addr_parse(const char *s, struct sockaddr_storage *ss, socklen_t *len,
               char *err, size_t errlen)
{
    char host[HOST_MAX];
    const char *port_s;
    size_t hlen;
    int v6 = 0, port;

    if (!s || !*s) {
        set_err(err, errlen, "empty address");
        return -1;
    }
    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        if (!close) {
            set_err(err, errlen, "missing ']' after the IPv6 address");
            return -1;
        }
        if (close[1] != ':') {
            set_err(err, errlen, "missing port (write [IPv6]:port)");
            return -1;
        }
        hlen = (size_t)(close - s - 1);
        if (hlen >= sizeof(host)) {
            set_err(err, errlen, "not an IPv6 address");
            return -1;
        }
        memcpy(host, s + 1, hlen);
        port_s = close + 2;
        v6 = 1;
    } else {
        const char *colon = strrchr(s, ':');
        if (!colon) {
            set_err(err, errlen, "missing port (write IP:port, [IPv6]:port or *:port)");
            return -1;
        }
        if (strchr(s, ':') != colon) {
            set_err(err, errlen, "an IPv6 address must be in brackets, like [::1]:8080");
            return -1;
        }
        hlen = (size_t)(colon - s);
        if (hlen == 0) {
            set_err(err, errlen, "missing IP address before the port (use *:port for any address)");
            return -1;
        }
        if (hlen >= sizeof(host)) {
            set_err(err, errlen, looks_like_name(s) ? "not an IP address (host names are not supported here)"
                                                    : "not an IPv4 address");
            return -1;
        }
        memcpy(host, s, hlen);
        port_s = colon + 1;
    }
    host[hlen] = '\0';
    if (parse_port(port_s, &port) < 0) {
        set_err(err, errlen, "the port must be a number from 1 to 65535");
        return -1;
    }

    memset(ss, 0, sizeof(*ss));
    if (v6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
        if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1) {
            set_err(err, errlen, "not an IPv6 address");
            return -1;
        }
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        *len = sizeof(*sin6);
        return 0;
    }
    struct sockaddr_in *sin = (struct sockaddr_in *)ss;
    if (strcmp(host, "*") == 0) {
        sin->sin_addr.s_addr = htonl(INADDR_ANY);
    } else if (inet_pton(AF_INET, host, &sin->sin_addr) != 1) {
        set_err(err, errlen, looks_like_name(host) ? "not an IP address (host names are not supported here)"
                                                   : "not an IPv4 address");
        return -1;
    }
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)port);
    *len = sizeof(*sin);
    return 0;
}

static int is_v4_mapped(const struct in6_addr *a)
{
    static const uint8_t prefix[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
    return memcmp(a->s6_addr, prefix, sizeof(prefix)) == 0;
}

void addr_format(const struct sockaddr *sa, char *out, size_t outlen)
{
    char ip[INET6_ADDRSTRLEN];
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &sin->sin_addr, ip, sizeof(ip));
        snprintf(out, outlen, "%s:%u", ip, (unsigned)ntohs(sin->sin_port));
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &sin6->sin6_addr, ip, sizeof(ip));
        snprintf(out, outlen, "[%s]:%u", ip, (unsigned)ntohs(sin6->sin6_port));
    } else {
        snprintf(out, outlen, "?");
    }
}

void addr_format_ip(const struct sockaddr *sa, char *out, size_t outlen)
{
    char ip[INET6_ADDRSTRLEN];
    if (sa->sa_family == AF_INET) {
        inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, ip, sizeof(ip));
    } else if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        if (is_v4_mapped(a))
            inet_ntop(AF_INET, a->s6_addr + 12, ip, sizeof(ip));
        else
            inet_ntop(AF_INET6, a, ip, sizeof(ip));
    } else {
        snprintf(ip, sizeof(ip), "?");
    }
    snprintf(out, outlen, "%s", ip);
}

/* Zero every bit of addr after the first prefix bits. */
static void mask_bits(uint8_t *addr, int nbytes, int prefix)
{
    for (int i = 0; i < nbytes; i++) {
        int keep = prefix - i * 8;
        if (keep >= 8)
            continue;
        addr[i] &= keep <= 0 ? 0 : (uint8_t)(0xff << (8 - keep));
    }
}

int cidr_parse(const char *s, struct cidr *c, char *err, size_t errlen)
{
    char host[HOST_MAX];
    const char *slash = s ? strchr(s, '/') : NULL;
    size_t hlen = slash ? (size_t)(slash - s) : (s ? strlen(s) : 0);

    if (hlen == 0) {
        set_err(err, errlen, "missing address (write 10.0.0.0/8 or fd00::/8)");
        return -1;
    }
    if (hlen >= sizeof(host)) {
        set_err(err, errlen, "not an IP address or CIDR range");
        return -1;
    }
    memcpy(host, s, hlen);
    host[hlen] = '\0';
    memset(c, 0, sizeof(*c));
    if (inet_pton(AF_INET, host, c->addr) == 1) {
        c->family = AF_INET;
    } else if (inet_pton(AF_INET6, host, c->addr) == 1) {
        c->family = AF_INET6;
    } else {
        set_err(err, errlen, looks_like_name(host) && !strchr(host, ':')
                                 ? "not an IP address (host names are not supported here)"
                                 : "not an IP address or CIDR range");
        return -1;
    }
    int max = c->family == AF_INET ? 32 : 128;
    c->prefix = max;
    if (slash) {
        const char *p = slash + 1;
        int v = 0;
        if (!*p || strlen(p) > 3) {
            set_err(err, errlen, "the prefix length after '/' must be a number");
            return -1;
        }
        for (; *p; p++) {
            if (*p < '0' || *p > '9') {
                set_err(err, errlen, "the prefix length after '/' must be a number");
                return -1;
            }
            v = v * 10 + (*p - '0');
        }
        if (v > max) {
            set_err(err, errlen, c->family == AF_INET ? "the prefix length must be 0..32 for IPv4"
                                                      : "the prefix length must be 0..128 for IPv6");
            return -1;
        }
        c->prefix = v;
    }
    mask_bits(c->addr, max / 8, c->prefix);
    return 0;
}

/* Compare the first prefix bits of a and b. */
static int prefix_equal(const uint8_t *a, const uint8_t *b, int prefix)
{
    int whole = prefix / 8, rest = prefix % 8;
    if (memcmp(a, b, (size_t)whole) != 0)
        return 0;
    if (rest == 0)
        return 1;
    uint8_t m = (uint8_t)(0xff << (8 - rest));
    return (a[whole] & m) == (b[whole] & m);
}

int cidr_match(const struct cidr *c, const struct sockaddr *sa)
{
    uint8_t v6[16];
    const uint8_t *v4 = NULL;

    if (sa->sa_family == AF_INET) {
        v4 = (const uint8_t *)&((const struct sockaddr_in *)sa)->sin_addr;
        /* The same client seen as ::ffff:a.b.c.d, for IPv6 ranges. */
        memset(v6, 0, 10);
        v6[10] = v6[11] = 0xff;
        memcpy(v6 + 12, v4, 4);
    } else if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        memcpy(v6, a->s6_addr, 16);
        if (is_v4_mapped(a))
            v4 = v6 + 12;
    } else {
        return 0;
    }
    if (c->family == AF_INET)
        return v4 ? prefix_equal(v4, c->addr, c->prefix) : 0;
    if (c->family == AF_INET6)
        return prefix_equal(v6, c->addr, c->prefix);
    return 0;
}

int addr_is_loopback(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        if (IN6_IS_ADDR_LOOPBACK(a))
            return 1;
        return IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127;
    }
    return 0;
}
