#include "worker.h"
#include "conn.h"
#include "log.h"
#include "modules.h"
#include "upstream.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define LOG_FLUSH_BYTES 16384
#define LOG_FLUSH_MS 100
#define ACCEPT_BATCH 64
#define TRIM_BATCH 256

int worker_total_conns;

const char *worker_date(struct worker *w)
{
    time_t now = time(NULL);
    if (now != w->date_sec) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(w->date, sizeof(w->date), "%a, %d %b %Y %H:%M:%S GMT", &tm);
        w->date_sec = now;
    }
    return w->date;
}

int worker_listen_socket(const struct config_listener *l, char *err, size_t errlen)
{
    int fd = socket(l->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "%s: socket: %s", l->address, strerror(errno));
        return -1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0) {
        snprintf(err, errlen, "%s: SO_REUSEPORT: %s", l->address, strerror(errno));
        close(fd);
        return -1;
    }
    if (l->addr.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)&l->addr, l->addrlen) < 0) {
        snprintf(err, errlen, "%s: bind: %s", l->address, strerror(errno));
        close(fd);
        return -1;
    }
    if (listen(fd, l->backlog) < 0) {
        snprintf(err, errlen, "%s: listen: %s", l->address, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* ---- access log --------------------------------------------------------- */

static void log_flush(struct worker *w)
{
    size_t len = buf_len(&w->log);
    while (len) {
        ssize_t n = write(w->log_fd, buf_head(&w->log), len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                log_error("access log: write: %s", strerror(errno));
            break; /* drop rather than block or spin */
        }
        buf_consume(&w->log, (size_t)n);
        len = buf_len(&w->log);
    }
    buf_consume(&w->log, buf_len(&w->log));
}

static void on_log_timer(evutil_socket_t fd, short what, void *arg)
{
    struct worker *w = arg;
    w->log_ev_pending = 0;
    log_flush(w);
}

void worker_log_line(struct worker *w, const char *line, size_t len)
{
    if (w->log_fd < 0)
        return;
    if (!buf_can_append(&w->log, len))
        log_flush(w);
    if (!buf_can_append(&w->log, len))
        return;
    buf_append(&w->log, line, len);
    if (buf_len(&w->log) >= LOG_FLUSH_BYTES) {
        log_flush(w);
    } else if (!w->log_ev_pending) {
        /* Lines reach the file within LOG_FLUSH_MS, batched under load. */
        struct timeval tv = { 0, LOG_FLUSH_MS * 1000 };
        event_add(&w->log_ev, &tv);
        w->log_ev_pending = 1;
    }
}

/* ---- accepting ---------------------------------------------------------- */

static void on_accept(evutil_socket_t lfd, short what, void *arg)
{
    struct worker_listener *wl = arg;
    struct worker *w = wl->w;
    for (int i = 0; i < ACCEPT_BATCH && !w->draining; i++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE)
                log_error("accept: %s", strerror(errno));
            return;
        }
        int total = __atomic_add_fetch(&worker_total_conns, 1, __ATOMIC_RELAXED);
        if (total > w->cfg->limits.max_connections) {
            __atomic_sub_fetch(&worker_total_conns, 1, __ATOMIC_RELAXED);
            close(fd);
            continue;
        }
        conn_accept(w, wl->cfg, fd, (struct sockaddr *)&ss, len);
    }
}

void worker_conn_closed(struct worker *w)
{
    w->nconns--;
    __atomic_sub_fetch(&worker_total_conns, 1, __ATOMIC_RELAXED);
    if (w->draining && w->nconns == 0)
        event_base_loopbreak(w->base);
}

/* ---- control and housekeeping ------------------------------------------ */

static void start_drain(struct worker *w)
{
    if (w->draining)
        return;
    /* Take what is already queued on the listening sockets, then close
     * them: those clients get an answer, new ones get refused. */
    for (size_t i = 0; i < w->nlisteners; i++)
        on_accept(w->listeners[i].fd, EV_READ, &w->listeners[i]);
    w->draining = 1;
    for (size_t i = 0; i < w->nlisteners; i++) {
        event_del(&w->listeners[i].ev);
        close(w->listeners[i].fd);
        w->listeners[i].fd = -1;
    }
    struct conn *c = w->conns;
    while (c) {
        struct conn *next = c->next;
        conn_drain(c);
        c = next;
    }
    if (w->nconns == 0)
        event_base_loopbreak(w->base);
}

static void on_ctrl(evutil_socket_t fd, short what, void *arg)
{
    struct worker *w = arg;
    char cmd[16];
    ssize_t n = read(fd, cmd, sizeof(cmd));
    for (ssize_t i = 0; i < n; i++) {
        if (cmd[i] == 'd') {
            start_drain(w);
        } else if (cmd[i] == 's') {
            start_drain(w);
            event_base_loopbreak(w->base);
        }
    }
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    struct worker *w = arg;
    uint64_t now = worker_now_ms(w);
    for (size_t u = 0; u < w->cfg->nupstreams; u++)
        for (size_t e = 0; e < w->cfg->upstreams[u].nendpoints; e++)
            pool_sweep(&w->pools[u][e], now);
    int trimmed = 0;
    for (struct conn *c = w->conns; c; c = c->next)
        trimmed += conn_trim_idle(c, now - 1000);
    /* Freed arena blocks sit between live connections, where free() does
     * not return them to the system; after many, ask malloc to. */
    if (trimmed >= TRIM_BATCH)
        malloc_trim(0);
}

struct worker *worker_new(int id, struct config *cfg, const int *listen_fds, char *err, size_t errlen)
{
    struct worker *w = xcalloc(1, sizeof(*w));
    w->id = id;
    w->cfg = cfg;
    w->log_fd = -1;
    struct event_config *ec = event_config_new();
    /* One thread per base; the main thread only writes to the pipe. */
    event_config_set_flag(ec, EVENT_BASE_FLAG_NOLOCK);
    w->base = event_base_new_with_config(ec);
    event_config_free(ec);
    if (!w->base) {
        snprintf(err, errlen, "worker %d: cannot create an event base", id);
        for (size_t i = 0; i < cfg->nlisteners; i++)
            close(listen_fds[i]);
        free(w);
        return NULL;
    }
    if (pipe2(w->ctrl_fd, O_NONBLOCK | O_CLOEXEC) < 0) {
        snprintf(err, errlen, "worker %d: pipe: %s", id, strerror(errno));
        for (size_t i = 0; i < cfg->nlisteners; i++)
            close(listen_fds[i]);
        event_base_free(w->base);
        free(w);
        return NULL;
    }
    w->nlisteners = cfg->nlisteners;
    w->listeners = xcalloc(cfg->nlisteners, sizeof(*w->listeners));
    for (size_t i = 0; i < cfg->nlisteners; i++) {
        w->listeners[i].w = w;
        w->listeners[i].fd = listen_fds[i];
        w->listeners[i].cfg = &cfg->listeners[i];
        event_assign(&w->listeners[i].ev, w->base, listen_fds[i], EV_READ | EV_PERSIST, on_accept,
                     &w->listeners[i]);
        event_add(&w->listeners[i].ev, NULL);
    }
    w->pools = xcalloc(cfg->nupstreams ? cfg->nupstreams : 1, sizeof(*w->pools));
    w->rr = xcalloc(cfg->nupstreams ? cfg->nupstreams : 1, sizeof(*w->rr));
    for (size_t u = 0; u < cfg->nupstreams; u++) {
        const struct config_upstream *up = &cfg->upstreams[u];
        w->pools[u] = xcalloc(up->nendpoints, sizeof(struct pool));
        for (size_t e = 0; e < up->nendpoints; e++) {
            w->pools[u][e].w = w;
            w->pools[u][e].up = up;
            w->pools[u][e].ep = &up->endpoints[e];
        }
        /* Workers start at different endpoints so they do not move in step. */
        w->rr[u] = (uint32_t)id;
    }
    event_assign(&w->ctrl_ev, w->base, w->ctrl_fd[0], EV_READ | EV_PERSIST, on_ctrl, w);
    event_add(&w->ctrl_ev, NULL);
    event_assign(&w->tick_ev, w->base, -1, EV_PERSIST, on_tick, w);
    struct timeval one_sec = { 1, 0 };
    event_add(&w->tick_ev, &one_sec);
    /* Each module built in gets its per-worker start, on this worker's loop. */
    for (size_t i = 0; portico_modules[i]; i++) {
        const struct module *m = portico_modules[i];
        char merr[256] = "";
        if (m->worker_init && m->worker_init(id, w->base, merr, sizeof(merr)) < 0) {
            snprintf(err, errlen, "worker %d: module %s: %s", id, m->name, merr[0] ? merr : "init failed");
            worker_free(w);
            return NULL;
        }
    }
    const char *lp = cfg->access_log.path;
    if (lp && strcmp(lp, "off") != 0) {
        if (strcmp(lp, "-") == 0) {
            w->log_fd = STDOUT_FILENO;
        } else {
            w->log_fd = open(lp, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
            if (w->log_fd < 0) {
                snprintf(err, errlen, "access_log.path: cannot open %s: %s", lp, strerror(errno));
                worker_free(w);
                return NULL;
            }
        }
        buf_init(&w->log, 65536);
        event_assign(&w->log_ev, w->base, -1, 0, on_log_timer, w);
    }
    return w;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    event_base_dispatch(w->base);
    /* Whatever is still open (drain timeout) is closed now. */
    while (w->conns)
        conn_abort(w->conns);
    if (w->log_fd >= 0)
        log_flush(w);
    __atomic_store_n(&w->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

int worker_start(struct worker *w)
{
    return pthread_create(&w->thread, NULL, worker_main, w);
}

static void ctrl_send(struct worker *w, char cmd)
{
    ssize_t n;
    do
        n = write(w->ctrl_fd[1], &cmd, 1);
    while (n < 0 && errno == EINTR);
}

void worker_request_drain(struct worker *w) { ctrl_send(w, 'd'); }
void worker_request_stop(struct worker *w) { ctrl_send(w, 's'); }

void worker_free(struct worker *w)
{
    if (!w)
        return;
    for (size_t u = 0; u < w->cfg->nupstreams && w->pools; u++) {
        for (size_t e = 0; e < w->cfg->upstreams[u].nendpoints && w->pools[u]; e++) {
            pool_close_all(&w->pools[u][e]);
            tls_session_free(&w->pools[u][e].tls_session);
        }
        free(w->pools[u]);
    }
    free(w->pools);
    free(w->rr);
    for (size_t i = 0; i < w->nlisteners; i++) {
        if (w->listeners[i].fd >= 0) {
            event_del(&w->listeners[i].ev);
            close(w->listeners[i].fd);
        }
    }
    free(w->listeners);
    if (w->log_fd >= 0) {
        event_del(&w->log_ev);
        if (w->log_fd != STDOUT_FILENO)
            close(w->log_fd);
    }
    buf_free(&w->log);
    event_del(&w->ctrl_ev);
    event_del(&w->tick_ev);
    close(w->ctrl_fd[0]);
    close(w->ctrl_fd[1]);
    event_base_free(w->base);
    free(w);
}
