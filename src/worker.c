#include "worker.h"
#include "conn.h"
#include "log.h"
#include "modules.h"
#include "upstream.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <sched.h>
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
/* Pools are swept and idle connections give their request arena back this
 * often, so an idle connection holds no arena after 2 ticks at most. */
#define TICK_MS 250

int worker_total_conns;
__thread unsigned worker_io_events;
__thread uint64_t worker_clock_ns;

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

static void accept_some(evutil_socket_t lfd, void *arg);

static void on_accept(evutil_socket_t lfd, short what, void *arg)
{
    int entered = worker_clock_enter();
    worker_io_events++;
    accept_some(lfd, arg);
    worker_clock_leave(entered);
}

static void accept_some(evutil_socket_t lfd, void *arg)
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

static int open_access_log(struct worker *w, const struct config *cfg, char *err, size_t errlen);
static void reload_apply(struct worker *w);

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
        } else if (cmd[i] == 'r') {
            reload_apply(w);
        } else if (cmd[i] == 'o') {
            char err[256];
            if (open_access_log(w, w->cfg, err, sizeof(err)) < 0)
                log_error("worker %d: %s; access log off", w->id, err);
        }
    }
}

/* ---- pool sets (one per config snapshot) --------------------------------- */

static struct poolset *poolset_new(struct worker *w, struct config *cfg)
{
    struct poolset *ps = xcalloc(1, sizeof(*ps));
    ps->cfg = cfg;
    ps->pools = xcalloc(cfg->nupstreams ? cfg->nupstreams : 1, sizeof(*ps->pools));
    ps->rr = xcalloc(cfg->nupstreams ? cfg->nupstreams : 1, sizeof(*ps->rr));
    for (size_t u = 0; u < cfg->nupstreams; u++) {
        const struct config_upstream *up = &cfg->upstreams[u];
        ps->pools[u] = xcalloc(up->nendpoints, sizeof(struct pool));
        for (size_t e = 0; e < up->nendpoints; e++) {
            ps->pools[u][e].w = w;
            ps->pools[u][e].up = up;
            ps->pools[u][e].ep = &up->endpoints[e];
        }
        /* Workers start at different endpoints so they do not move in step. */
        ps->rr[u] = (uint32_t)w->id;
    }
    return ps;
}

static void poolset_free(struct poolset *ps)
{
    const struct config *cfg = ps->cfg;
    for (size_t u = 0; u < cfg->nupstreams; u++) {
        for (size_t e = 0; e < cfg->upstreams[u].nendpoints; e++) {
            pool_close_all(&ps->pools[u][e]);
            tls_session_free(&ps->pools[u][e].tls_session);
        }
        free(ps->pools[u]);
    }
    free(ps->pools);
    free(ps->rr);
    free(ps->route_series);
    config_unref(ps->cfg);
    free(ps);
}

/* Idle connections of an upstream the reload left as it was (same name,
 * endpoint address and connection settings) move to the new set, so a
 * reload does not cost the upstreams a wave of new connections. */
static void poolset_adopt_idle(struct poolset *to, struct poolset *from)
{
    for (size_t u = 0; u < to->cfg->nupstreams; u++) {
        const struct config_upstream *nu = &to->cfg->upstreams[u];
        const struct config_upstream *ou = config_find_upstream(from->cfg, nu->name);
        if (!ou || !config_upstream_same_connections(ou, nu))
            continue;
        for (size_t e = 0; e < nu->nendpoints; e++) {
            for (size_t k = 0; k < ou->nendpoints; k++) {
                if (strcmp(ou->endpoints[k].address, nu->endpoints[e].address) != 0)
                    continue;
                pool_move_idle(&to->pools[u][e], &from->pools[ou->index][k]);
                break;
            }
        }
        to->rr[u] = from->rr[ou->index];
    }
}

struct poolset *poolset_take(struct worker *w)
{
    w->ps->users++;
    return w->ps;
}

void poolset_put(struct worker *w, struct poolset *ps)
{
    if (--ps->users > 0 || ps == w->ps)
        return;
    for (struct poolset **pp = &w->retired; *pp; pp = &(*pp)->next) {
        if (*pp == ps) {
            *pp = ps->next;
            break;
        }
    }
    poolset_free(ps);
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    struct worker *w = arg;
    uint64_t now = worker_now_ms(w);
    for (struct poolset *ps = w->ps; ps; ps = ps == w->ps ? w->retired : ps->next)
        for (size_t u = 0; u < ps->cfg->nupstreams; u++)
            for (size_t e = 0; e < ps->cfg->upstreams[u].nendpoints; e++)
                pool_sweep(&ps->pools[u][e], now);
    int trimmed = 0;
    for (struct conn *c = w->conns; c; c = c->next)
        trimmed += conn_trim_idle(c, now - TICK_MS);
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
    metrics_init(&w->metrics, 0);
    metrics_register(&w->metrics);
    w->ps = poolset_new(w, config_ref(cfg));
    event_assign(&w->ctrl_ev, w->base, w->ctrl_fd[0], EV_READ | EV_PERSIST, on_ctrl, w);
    event_add(&w->ctrl_ev, NULL);
    event_assign(&w->tick_ev, w->base, -1, EV_PERSIST, on_tick, w);
    struct timeval tick = { 0, TICK_MS * 1000 };
    event_add(&w->tick_ev, &tick);
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
    buf_init(&w->log, 65536);
    event_assign(&w->log_ev, w->base, -1, 0, on_log_timer, w);
    if (open_access_log(w, cfg, err, errlen) < 0) {
        worker_free(w);
        return NULL;
    }
    return w;
}

/* (Re)open the access log the config names; what is buffered goes to the
 * old file first. Called at start, on reload and on reopen (SIGUSR1). */
static int open_access_log(struct worker *w, const struct config *cfg, char *err, size_t errlen)
{
    if (w->log_fd >= 0) {
        log_flush(w);
        if (w->log_fd != STDOUT_FILENO && w->log_fd != STDERR_FILENO)
            close(w->log_fd);
        w->log_fd = -1;
    }
    free(w->log_path);
    w->log_path = NULL;
    const char *lp = cfg->access_log.path ? cfg->access_log.path : "-";
    if (strcmp(lp, "off") == 0)
        return 0;
    if (strcmp(lp, "-") == 0) {
        w->log_fd = STDOUT_FILENO;
    } else if (strcmp(lp, "stderr") == 0) {
        w->log_fd = STDERR_FILENO; /* beside the error log, as containers often want */
    } else {
        w->log_fd = open(lp, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
        if (w->log_fd < 0) {
            snprintf(err, errlen, "access_log.path: cannot open %s: %s", lp, strerror(errno));
            return -1;
        }
    }
    w->log_path = xstrdup(lp);
    return 0;
}

static int loop_stopped(struct worker *w, int rc)
{
    return rc != 0 || event_base_got_break(w->base) || event_base_got_exit(w->base);
}

/* Busy polling ("busy_poll_us", off by default; HAProxy's busy-polling):
 * after handling events, keep polling without sleeping until that long
 * passes with nothing new, then sleep in epoll_wait as usual. On a VM,
 * waking a sleeping vCPU costs an interrupt sent through the hypervisor,
 * paid by the CPU that sends it (the clients' and upstreams' cores): at
 * tens of thousands of wake-ups a second that is what limits throughput.
 * An idle worker polls for at most busy_poll_us after its last event. The
 * value is read every turn, so a reload changes it. */
static void worker_loop(struct worker *w)
{
    for (;;) {
        unsigned spin = w->cfg->busy_poll_us;
        if (loop_stopped(w, event_base_loop(w->base, EVLOOP_ONCE)))
            return;
        if (!spin)
            continue;
        uint64_t deadline = now_us() + spin;
        for (;;) {
            unsigned seen = worker_io_events;
            if (loop_stopped(w, event_base_loop(w->base, EVLOOP_NONBLOCK)))
                return;
            uint64_t now = now_us();
            if (worker_io_events != seen)
                deadline = now + spin;
            else if (now >= deadline)
                break;
            else
                sched_yield(); /* a client or upstream on this core runs now */
        }
    }
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    metrics_set_thread(&w->metrics);
    worker_loop(w);
    /* Whatever is still open (drain timeout) is closed now. */
    while (w->conns)
        conn_abort(w->conns);
    if (w->log_fd >= 0)
        log_flush(w);
    buf_cache_flush();
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

/* ---- reload --------------------------------------------------------------- */

void worker_reload(struct worker *w, struct config *cfg, const int *listen_fds)
{
    struct worker_reload_msg *m = xcalloc(1, sizeof(*m));
    m->cfg = cfg;
    m->listen_fds = xcalloc(cfg->nlisteners ? cfg->nlisteners : 1, sizeof(int));
    memcpy(m->listen_fds, listen_fds, cfg->nlisteners * sizeof(int));
    struct worker_reload_msg *old = __atomic_exchange_n(&w->pending, m, __ATOMIC_ACQ_REL);
    if (old) { /* main waits for each reload: cannot happen; never leak */
        for (size_t i = 0; i < old->cfg->nlisteners; i++)
            if (old->listen_fds[i] >= 0)
                close(old->listen_fds[i]);
        config_unref(old->cfg);
        free(old->listen_fds);
        free(old);
    }
    ctrl_send(w, 'r');
}

int worker_reload_done(struct worker *w, unsigned gen)
{
    return __atomic_load_n(&w->reload_gen, __ATOMIC_ACQUIRE) >= gen;
}

/* On the worker: switch to the new config between requests. Listeners
 * whose address stays keep their socket (and its accept queue); removed
 * ones take what is queued, then close; added ones start accepting. */
static void reload_apply(struct worker *w)
{
    struct worker_reload_msg *m = __atomic_exchange_n(&w->pending, NULL, __ATOMIC_ACQ_REL);
    if (!m)
        return;
    struct config *cfg = m->cfg;
    if (w->draining) { /* a stopping worker keeps what it has */
        for (size_t i = 0; i < cfg->nlisteners; i++)
            if (m->listen_fds[i] >= 0)
                close(m->listen_fds[i]);
        config_unref(cfg);
        goto done;
    }
    struct worker_listener *nl = xcalloc(cfg->nlisteners ? cfg->nlisteners : 1, sizeof(*nl));
    for (size_t i = 0; i < cfg->nlisteners; i++) {
        nl[i].fd = -1;
        nl[i].w = w;
        nl[i].cfg = &cfg->listeners[i];
        if (m->listen_fds[i] >= 0) {
            nl[i].fd = m->listen_fds[i];
            continue;
        }
        for (size_t k = 0; k < w->nlisteners; k++) {
            if (w->listeners[k].fd >= 0 &&
                strcmp(w->listeners[k].cfg->address, cfg->listeners[i].address) == 0) {
                event_del(&w->listeners[k].ev);
                nl[i].fd = w->listeners[k].fd;
                w->listeners[k].fd = -1;
                break;
            }
        }
    }
    for (size_t k = 0; k < w->nlisteners; k++) {
        if (w->listeners[k].fd < 0)
            continue;
        on_accept(w->listeners[k].fd, EV_READ, &w->listeners[k]); /* its queue, then it goes */
        event_del(&w->listeners[k].ev);
        close(w->listeners[k].fd);
    }
    free(w->listeners);
    w->listeners = nl;
    w->nlisteners = cfg->nlisteners;
    for (size_t i = 0; i < w->nlisteners; i++) {
        if (nl[i].fd < 0) { /* main opens every new address: cannot happen */
            log_error("worker %d: no socket for listener %s", w->id, nl[i].cfg->address);
            continue;
        }
        event_assign(&nl[i].ev, w->base, nl[i].fd, EV_READ | EV_PERSIST, on_accept, &nl[i]);
        event_add(&nl[i].ev, NULL);
    }

    struct poolset *ps = poolset_new(w, cfg), *old = w->ps;
    poolset_adopt_idle(ps, old);
    w->ps = ps;
    w->cfg = cfg;
    if (old->users == 0) {
        poolset_free(old);
    } else {
        old->next = w->retired;
        w->retired = old;
    }

    const char *op = w->log_path ? w->log_path : "off";
    const char *np = cfg->access_log.path ? cfg->access_log.path : "-";
    if (strcmp(op, np) != 0) {
        char err[256];
        if (open_access_log(w, cfg, err, sizeof(err)) < 0)
            log_error("worker %d: %s; access log off", w->id, err);
    }
done:
    free(m->listen_fds);
    free(m);
    __atomic_add_fetch(&w->reload_gen, 1, __ATOMIC_ACQ_REL);
}

void worker_request_drain(struct worker *w) { ctrl_send(w, 'd'); }
void worker_reopen_log(struct worker *w) { ctrl_send(w, 'o'); }
void worker_request_stop(struct worker *w) { ctrl_send(w, 's'); }

void worker_free(struct worker *w)
{
    if (!w)
        return;
    while (w->retired) {
        struct poolset *ps = w->retired;
        w->retired = ps->next;
        poolset_free(ps);
    }
    if (w->ps)
        poolset_free(w->ps);
    struct worker_reload_msg *m = __atomic_exchange_n(&w->pending, NULL, __ATOMIC_ACQ_REL);
    if (m) {
        for (size_t i = 0; i < m->cfg->nlisteners; i++)
            if (m->listen_fds[i] >= 0)
                close(m->listen_fds[i]);
        config_unref(m->cfg);
        free(m->listen_fds);
        free(m);
    }
    for (size_t i = 0; i < w->nlisteners; i++) {
        if (w->listeners[i].fd >= 0) {
            event_del(&w->listeners[i].ev);
            close(w->listeners[i].fd);
        }
    }
    free(w->listeners);
    if (w->log_fd >= 0 && w->log_fd != STDOUT_FILENO && w->log_fd != STDERR_FILENO)
        close(w->log_fd);
    if (w->log_ev_pending)
        event_del(&w->log_ev);
    free(w->log_path);
    buf_free(&w->log);
    event_del(&w->ctrl_ev);
    event_del(&w->tick_ev);
    close(w->ctrl_fd[0]);
    close(w->ctrl_fd[1]);
    event_base_free(w->base);
    metrics_unregister(&w->metrics);
    metrics_free(&w->metrics);
    free(w);
    buf_cache_flush(); /* what the pools and the log gave back on this thread */
}
