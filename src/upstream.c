#include "upstream.h"
#include "h2up.h"
#include "log.h"
#include "tls.h"
#include "resil.h"
#include "worker.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void pool_unlink(struct pool *p, struct upconn *u)
{
    if (u->prev)
        u->prev->next = u->next;
    else
        p->idle = u->next;
    if (u->next)
        u->next->prev = u->prev;
    u->prev = u->next = NULL;
    p->nidle--;
}

static void upconn_event(struct upconn *u, short what);

static void on_upconn_event(evutil_socket_t fd, short what, void *arg)
{
    int entered = worker_clock_enter();
    worker_io_events++;
    upconn_event(arg, what);
    worker_clock_leave(entered);
}

static void upconn_event(struct upconn *u, short what)
{
    if (u->state == UP_IDLE) {
        if (!(what & (EV_READ | EV_CLOSED))) {
            u->writable = 1;
            return;
        }
        /* Nobody is waiting for bytes on an idle connection: EOF, an error
         * or unsolicited data all mean it cannot carry a request. */
        pool_unlink(u->pool, u);
        upconn_close(u);
        return;
    }
    if (what & (EV_READ | EV_CLOSED)) {
        u->readable = 1;
        if (u->tls_wr)
            u->writable = 1;
    }
    if (what & EV_CLOSED)
        u->rdhup = 1;
    if (what & EV_WRITE) {
        u->writable = 1;
        if (u->tls_rw)
            u->readable = 1;
    }
    if (u->owner)
        conn_on_upstream_event(u->owner, u, what);
}

struct upconn *upconn_get(struct pool *p, struct conn *owner, size_t in_cap, size_t out_cap)
{
    uint64_t now = worker_now_ms(p->w);
    struct sockaddr_storage ss;
    socklen_t sslen;
    uint32_t gen;
    if (resil_endpoint_addr(p->up, (size_t)(p->ep - p->up->endpoints), &ss, &sslen, &gen) < 0) {
        errno = EADDRNOTAVAIL; /* a host name slot the DNS thread emptied */
        return NULL;
    }
    while (p->idle) {
        struct upconn *u = p->idle;
        pool_unlink(p, u);
        if (now - u->idle_since_ms >= (uint64_t)p->up->keepalive_timeout_ms || u->addr_gen != gen) {
            upconn_close(u);
            continue;
        }
        u->state = UP_ACTIVE;
        u->owner = owner;
        u->reused = 1;
        /* Optimistic: a write that cannot go returns EAGAIN and we wait. */
        u->writable = 1;
        return u;
    }

    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return NULL;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    int rc = connect(fd, (const struct sockaddr *)&ss, sslen);
    if (rc < 0 && errno != EINPROGRESS) {
        int e = errno;
        close(fd);
        errno = e;
        return NULL;
    }
    struct upconn *u = xcalloc(1, sizeof(*u));
    u->fd = fd;
    u->state = UP_CONNECTING;
    u->pool = p;
    u->owner = owner;
    u->addr_gen = gen;
    buf_init(&u->in, in_cap);
    buf_init(&u->out, out_cap);
    event_assign(&u->ev, worker_base(p->w), fd, EV_READ | EV_WRITE | EV_CLOSED | EV_ET | EV_PERSIST,
                 on_upconn_event, u);
    event_add(&u->ev, NULL);
    return u;
}

void upconn_release(struct upconn *u)
{
    struct pool *p = u->pool;
    u->owner = NULL;
    u->span_src = NULL;
    u->span_len = 0;
    if (u->ssl && u->readable && !buf_len(&u->in) && !tls_pending(u->ssl)) {
        /* TLS reads stop at OpenSSL's word, not at a short read: ask once
         * more, so a connection with nothing more to say can be pooled. */
        char probe;
        if (tls_read(u->ssl, &probe, 1) == TLS_WANT_READ)
            u->readable = 0;
    }
    /* Pending input (bytes nobody asked for, or the upstream's FIN) means
     * the connection cannot carry another exchange. */
    if (p->up->h2) {
        /* The session read what the socket had; it says if it can go on. */
        if (h2up_reusable(u))
            u->readable = 0;
        else
            u->rdhup = 1;
    }
    if (p->nidle >= p->up->keepalive || u->requests >= p->up->keepalive_requests ||
        buf_len(&u->in) || buf_len(&u->out) || u->readable || u->rdhup ||
        (u->ssl && tls_pending(u->ssl)) || worker_draining(p->w)) {
        upconn_close(u);
        return;
    }
    buf_release_if_empty(&u->in);
    buf_release_if_empty(&u->out);
    u->state = UP_IDLE;
    u->readable = 0;
    u->idle_since_ms = worker_now_ms(p->w);
    u->prev = NULL;
    u->next = p->idle;
    if (p->idle)
        p->idle->prev = u;
    p->idle = u;
    p->nidle++;
}

ssize_t upconn_read(struct upconn *u, char *dst, size_t space)
{
    ssize_t n;
    if (u->ssl) {
        /* TLS records may sit inside the SSL object, where no edge will
         * announce them: readable until OpenSSL says it holds nothing. */
        n = tls_read(u->ssl, dst, space);
        u->tls_rw = n == TLS_WANT_WRITE;
        if (n == TLS_WANT_READ || n == TLS_WANT_WRITE) {
            u->readable = 0;
            errno = EAGAIN;
            return -1;
        }
        if (n == TLS_FATAL) {
            log_debug("upstream TLS read: %s", tls_last_error(u->ssl));
            errno = ECONNRESET;
            return -1;
        }
        if (n > 0 && !u->rdhup && tls_drained(u->ssl))
            u->readable = 0;
    } else {
        n = read(u->fd, dst, space);
        if (n > 0 && (size_t)n < space && !u->rdhup)
            u->readable = 0;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            u->readable = 0;
            errno = EAGAIN;
        }
    }
    if (n == 0)
        u->readable = 0;
    return n;
}

ssize_t upconn_writev(struct upconn *u, const struct iovec *iov, int n)
{
    size_t len = 0;
    for (int i = 0; i < n; i++)
        len += iov[i].iov_len;
    ssize_t wr;
    if (u->ssl) {
        int stop;
        wr = tls_writev(u->ssl, iov, n, &stop);
        u->tls_wr = stop == TLS_WANT_READ;
        if (stop == TLS_FATAL && wr == 0) {
            log_debug("upstream TLS write: %s", tls_last_error(u->ssl));
            errno = EPIPE;
            return -1;
        }
        if (wr == 0) {
            u->writable = 0;
            errno = EAGAIN;
            return -1;
        }
    } else {
        struct msghdr mh = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n };
        wr = sendmsg(u->fd, &mh, MSG_NOSIGNAL);
        if (wr < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                u->writable = 0;
                errno = EAGAIN;
            }
            return -1;
        }
    }
    if ((size_t)wr < len)
        u->writable = 0;
    return wr;
}

void upconn_close(struct upconn *u)
{
    h2up_free(u);
    event_del(&u->ev);
    if (u->ssl)
        tls_close(u->ssl);
    close(u->fd);
    buf_free(&u->in);
    buf_free(&u->out);
    free(u);
}

void pool_sweep(struct pool *p, uint64_t now_ms)
{
    /* The list is most-recent-first, so expired ones sit at the tail;
     * walking it all is fine: it is at most `keepalive` long. */
    struct upconn *u = p->idle;
    while (u) {
        struct upconn *next = u->next;
        if (now_ms - u->idle_since_ms >= (uint64_t)p->up->keepalive_timeout_ms) {
            pool_unlink(p, u);
            upconn_close(u);
        }
        u = next;
    }
}

void pool_move_idle(struct pool *to, struct pool *from)
{
    /* from is most-recent-first: append in that order, within to's bound. */
    struct upconn *tail = to->idle;
    while (tail && tail->next)
        tail = tail->next;
    while (from->idle) {
        struct upconn *u = from->idle;
        pool_unlink(from, u);
        if (to->nidle >= to->up->keepalive) {
            upconn_close(u);
            continue;
        }
        u->pool = to;
        u->prev = tail;
        if (tail)
            tail->next = u;
        else
            to->idle = u;
        tail = u;
        to->nidle++;
    }
}

void pool_close_all(struct pool *p)
{
    while (p->idle) {
        struct upconn *u = p->idle;
        pool_unlink(p, u);
        upconn_close(u);
    }
}
