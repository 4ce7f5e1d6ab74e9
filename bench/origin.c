/*
 * bench/origin.c: the origin every proxy in bench/run.sh forwards to.
 *
 * A fixed-response HTTP/1.1 server that does as little as a server can
 * (one read and one writev per request, bodies held in memory), so that
 * the core it shares with wrk is not what a case measures: the proxies
 * are. It serves GET and HEAD only; it is a load generator's partner, not
 * a web server, and has no place outside the bench.
 *
 *   origin -p PORT [-l ADDR]... [-d DIR]
 *
 * Listens on each ADDR (default 127.0.0.1) at PORT. Answers "/small" with
 * a 28-byte text body and "/NAME" with the bytes of DIR/NAME, read once
 * at start (regular files at the top of DIR only); anything else is 404.
 * Keep-alive unless the request says "Connection: close" or is HTTP/1.0;
 * pipelined requests are answered in order. A request with a body, a
 * malformed head or a head over 8 KiB is answered 400 and closed.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#define IN_MAX   8192 /* request head limit */
#define Q_MAX    16   /* answers queued per connection before reading stops */
#define HEAD_MAX 256

struct body {
    char path[256];
    size_t path_len;
    const char *type;
    char *data;
    size_t len;
};

struct answer {
    char head[HEAD_MAX];
    size_t head_len;
    const char *body;
    size_t body_len;
};

struct conn {
    int fd;
    int closing;     /* close once the queue is written */
    uint32_t events; /* what epoll watches for it now */
    char in[IN_MAX];
    size_t in_len;
    struct answer q[Q_MAX];
    int q_first, q_count;
    size_t q_off; /* bytes of q[q_first] already written */
};

static struct body *bodies;
static size_t n_bodies;
static char date_line[64];
static time_t date_at;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void add_body(const char *path, const char *type, char *data, size_t len)
{
    bodies = realloc(bodies, (n_bodies + 1) * sizeof(*bodies));
    if (!bodies)
        die("realloc");
    snprintf(bodies[n_bodies].path, sizeof(bodies[n_bodies].path), "%s", path);
    bodies[n_bodies].path_len = strlen(bodies[n_bodies].path);
    bodies[n_bodies].type = type;
    bodies[n_bodies].data = data;
    bodies[n_bodies].len = len;
    n_bodies++;
}

static void load_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        die(dir);
    struct dirent *e;
    while ((e = readdir(d))) {
        char p[4096];
        struct stat st;
        snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
        if (e->d_name[0] == '.' || stat(p, &st) != 0 || !S_ISREG(st.st_mode))
            continue;
        char *data = malloc(st.st_size ? st.st_size : 1);
        FILE *f = fopen(p, "rb");
        if (!data || !f || fread(data, 1, st.st_size, f) != (size_t)st.st_size)
            die(p);
        fclose(f);
        char url[300];
        snprintf(url, sizeof(url), "/%s", e->d_name);
        add_body(url, "application/octet-stream", data, st.st_size);
    }
    closedir(d);
}

/* The Date field, formatted once a second, as a real server sends it. */
static const char *date_now(void)
{
    time_t now = time(NULL);
    if (now != date_at) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(date_line, sizeof(date_line), "%a, %d %b %Y %H:%M:%S GMT", &tm);
        date_at = now;
    }
    return date_line;
}

/* Case-insensitive search for a line starting with `line` in a head;
 * returns what follows it, or NULL. */
static const char *head_find(const char *head, size_t len, const char *line)
{
    size_t n = strlen(line);
    for (const char *p = head; p + n + 2 <= head + len; p++)
        if (p[0] == '\n' && strncasecmp(p + 1, line, n) == 0)
            return p + 1 + n;
    return NULL;
}

/* A request body, which this origin does not read: any Transfer-Encoding,
 * or a Content-Length other than 0. */
static int has_body(const char *head, size_t len)
{
    const char *cl = head_find(head, len, "content-length:");
    if (head_find(head, len, "transfer-encoding:"))
        return 1;
    if (!cl)
        return 0;
    cl += strspn(cl, " \t");
    return cl[0] != '0' || (cl[1] != '\r' && cl[1] != ' ' && cl[1] != '\t');
}

static void queue_answer(struct conn *c, int status, const struct body *b, int head_only)
{
    struct answer *a = &c->q[(c->q_first + c->q_count) % Q_MAX];
    const char *reason = status == 200 ? "OK" : status == 404 ? "Not Found" : "Bad Request";
    size_t len = b ? b->len : 0;
    a->head_len = snprintf(a->head, HEAD_MAX,
                           "HTTP/1.1 %d %s\r\nServer: bench-origin\r\nDate: %s\r\n"
                           "Content-Type: %s\r\nContent-Length: %zu\r\n%s\r\n",
                           status, reason, date_now(), b ? b->type : "text/plain", len,
                           c->closing ? "Connection: close\r\n" : "");
    a->body = b && !head_only ? b->data : NULL;
    a->body_len = b && !head_only ? len : 0;
    c->q_count++;
}

/* Parses the complete heads in c->in and queues their answers. */
static void parse(struct conn *c)
{
    size_t used = 0;
    while (!c->closing && c->q_count < Q_MAX) {
        char *start = c->in + used;
        size_t avail = c->in_len - used;
        char *end = memmem(start, avail, "\r\n\r\n", 4);
        if (!end) {
            if (avail >= IN_MAX) {
                c->closing = 1;
                queue_answer(c, 400, NULL, 0);
            }
            break;
        }
        size_t head_len = end + 4 - start;
        used += head_len;
        char *sp1 = memchr(start, ' ', head_len);
        char *sp2 = sp1 ? memchr(sp1 + 1, ' ', end - sp1 - 1) : NULL;
        int get = sp1 && sp1 - start == 3 && memcmp(start, "GET", 3) == 0;
        int head = sp1 && sp1 - start == 4 && memcmp(start, "HEAD", 4) == 0;
        if (!sp2 || (!get && !head) || has_body(start, head_len)) {
            c->closing = 1;
            queue_answer(c, 400, NULL, 0);
            break;
        }
        if (strncmp(sp2 + 1, "HTTP/1.0", 8) == 0 || head_find(start, head_len, "connection: close"))
            c->closing = 1;
        size_t plen = sp2 - sp1 - 1;
        const struct body *b = NULL;
        for (size_t i = 0; i < n_bodies; i++)
            if (bodies[i].path_len == plen && memcmp(bodies[i].path, sp1 + 1, plen) == 0)
                b = &bodies[i];
        if (b)
            queue_answer(c, 200, b, head);
        else {
            static struct body not_found = {"", 0, "text/plain", "not found\n", 10};
            queue_answer(c, 404, &not_found, head);
        }
    }
    memmove(c->in, c->in + used, c->in_len - used);
    c->in_len -= used;
}

/* Writes what is queued in one writev; returns -1 when the connection is
 * to be closed. What the socket did not take waits for EPOLLOUT. */
static int flush(struct conn *c)
{
    if (!c->q_count)
        return c->closing ? -1 : 0;
    struct iovec iov[2 * Q_MAX];
    int n = 0;
    size_t off = c->q_off;
    for (int i = 0; i < c->q_count; i++) {
        struct answer *a = &c->q[(c->q_first + i) % Q_MAX];
        if (off < a->head_len)
            iov[n++] = (struct iovec){a->head + off, a->head_len - off};
        size_t boff = off > a->head_len ? off - a->head_len : 0;
        if (a->body_len > boff)
            iov[n++] = (struct iovec){(char *)a->body + boff, a->body_len - boff};
        off = 0;
    }
    ssize_t w = writev(c->fd, iov, n);
    if (w < 0)
        return errno == EAGAIN ? 0 : -1;
    size_t left = w;
    while (c->q_count) {
        struct answer *a = &c->q[c->q_first];
        size_t rest = a->head_len + a->body_len - c->q_off;
        if (left < rest) {
            c->q_off += left;
            return 0;
        }
        left -= rest;
        c->q_off = 0;
        c->q_first = (c->q_first + 1) % Q_MAX;
        c->q_count--;
    }
    return c->closing ? -1 : 0;
}

/* Changes what epoll watches only when it differs: no system call in the
 * usual case of an answer written whole. */
static void set_events(int ep, struct conn *c)
{
    uint32_t want = (c->q_count ? EPOLLOUT : 0) | (c->q_count < Q_MAX && !c->closing ? EPOLLIN : 0);
    if (want != c->events) {
        struct epoll_event ev = {.events = want, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->events = want;
    }
}

int main(int argc, char **argv)
{
    const char *addrs[8];
    int n_addrs = 0, port = 0, opt;
    static char small[] = "hello from the bench origin\n";
    add_body("/small", "text/plain", small, sizeof(small) - 1);
    while ((opt = getopt(argc, argv, "p:l:d:")) != -1) {
        if (opt == 'p')
            port = atoi(optarg);
        else if (opt == 'l' && n_addrs < 8)
            addrs[n_addrs++] = optarg;
        else if (opt == 'd')
            load_dir(optarg);
        else {
            fprintf(stderr, "usage: %s -p PORT [-l ADDR]... [-d DIR]\n", argv[0]);
            return 2;
        }
    }
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "%s: -p PORT is required\n", argv[0]);
        return 2;
    }
    if (!n_addrs)
        addrs[n_addrs++] = "127.0.0.1";
    signal(SIGPIPE, SIG_IGN);

    int ep = epoll_create1(0);
    if (ep < 0)
        die("epoll_create1");
    for (int i = 0; i < n_addrs; i++) {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
        if (inet_pton(AF_INET, addrs[i], &sa.sin_addr) != 1) {
            fprintf(stderr, "%s: not an IPv4 address: %s\n", argv[0], addrs[i]);
            return 2;
        }
        int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, 4096) != 0)
            die(addrs[i]);
        /* Listening sockets are told apart by a NULL-tagged pointer. */
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)fd << 1 | 1};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }

    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 & 1) {
                int lfd = evs[i].data.u64 >> 1, fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    struct conn *c = calloc(1, sizeof(*c));
                    if (!c) {
                        close(fd);
                        continue;
                    }
                    c->fd = fd;
                    c->events = EPOLLIN;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            struct conn *c = evs[i].data.ptr;
            int dead = 0;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                ssize_t r = read(c->fd, c->in + c->in_len, IN_MAX - c->in_len);
                if (r > 0) {
                    c->in_len += r;
                    parse(c);
                } else if (r == 0 || errno != EAGAIN) {
                    dead = 1;
                }
            }
            /* Write what is queued; when all of it went, answer the
             * requests still buffered (parse() stops at Q_MAX), until the
             * socket is full or no complete request is left. */
            while (!dead) {
                if (flush(c) < 0)
                    dead = 1;
                else if (c->q_count || !c->in_len || c->closing)
                    break;
                else {
                    parse(c);
                    if (!c->q_count)
                        break;
                }
            }
            if (dead) {
                close(c->fd);
                free(c);
                continue;
            }
            set_events(ep, c);
        }
    }
}
