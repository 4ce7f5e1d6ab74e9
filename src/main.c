/* portico: command line, config load, listening sockets, worker threads,
 * and signals. The main thread never serves requests: it waits for
 * signals and tells the workers what to do through their pipes. */
#include "admin.h"
#include "config.h"
#include "metrics.h"
#include "upgrade.h"
#include "log.h"
#include "resil.h"
#include "modules.h"
#include "version.h"
#include "worker.h"

#include <errno.h>
#include <event2/event.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SYSCONFDIR
#define SYSCONFDIR "/etc"
#endif
#define DEFAULT_CONFIG SYSCONFDIR "/portico/portico.json"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: portico [-c FILE] [-t] [-V] [-h]\n"
            "  -c FILE  configuration file (default %s)\n"
            "  -t       check the configuration and exit (0 valid, 1 invalid)\n"
            "  -V       print the version and the modules built in\n"
            "  -h       this help\n",
            DEFAULT_CONFIG);
}

static void print_version(void)
{
    printf("portico %s\n", PACKAGE_VERSION);
    printf("libevent %s, %s\n", event_get_version(), "OpenSSL 3, jansson, libjwt, hiredis");
    printf("modules:");
    if (!portico_modules[0])
        printf(" none");
    for (size_t i = 0; portico_modules[i]; i++)
        printf(" %s", portico_modules[i]->name);
    printf("\n");
}

static struct config *load(const char *file)
{
    struct config_errors errs = { 0 };
    struct config *cfg = config_load(file, &errs);
    if (!cfg) {
        for (size_t i = 0; i < errs.n; i++)
            fprintf(stderr, "portico: %s: %s\n", file, errs.msgs[i]);
        if (errs.n == 0)
            fprintf(stderr, "portico: %s: invalid configuration\n", file);
    }
    config_errors_free(&errs);
    for (size_t i = 0; cfg && i < cfg->nwarnings; i++)
        fprintf(stderr, "portico: %s: warning: %s\n", file, cfg->warnings[i]);
    return cfg;
}

/* Open every listening socket (one per listener per worker, so a busy
 * port is an error here, not in a thread), create the workers and start
 * them. Returns -1 after printing why; the caller frees workers[]. */
static int start_workers(struct config *cfg, struct worker **workers, int nw)
{
    char err[512];
    int *fds = xcalloc(cfg->nlisteners ? cfg->nlisteners : 1, sizeof(int));
    for (int i = 0; i < nw; i++) {
        for (size_t l = 0; l < cfg->nlisteners; l++) {
            fds[l] = upgrade_take_fd(cfg->listeners[l].address, &cfg->listeners[l].addr);
            if (fds[l] < 0)
                fds[l] = worker_listen_socket(&cfg->listeners[l], err, sizeof(err));
            if (fds[l] < 0) {
                fprintf(stderr, "portico: %s\n", err);
                while (l-- > 0)
                    close(fds[l]);
                free(fds);
                return -1;
            }
        }
        workers[i] = worker_new(i, cfg, fds, err, sizeof(err));
        if (!workers[i]) {
            fprintf(stderr, "portico: %s\n", err);
            free(fds);
            return -1;
        }
    }
    free(fds);
    for (int i = 0; i < nw; i++) {
        if (worker_start(workers[i]) != 0) {
            fprintf(stderr, "portico: cannot start worker thread %d\n", i);
            /* the started ones must stop before anything is freed */
            for (int j = 0; j < i; j++) {
                worker_request_stop(workers[j]);
                pthread_join(workers[j]->thread, NULL);
            }
            return -1;
        }
    }
    return 0;
}

/* What main shares with the admin thread. cfg changes under lock on
 * reload; the admin thread takes its own reference. */
static struct control {
    pthread_mutex_t lock;
    struct config *cfg;
    struct worker **workers;
    int nw;
    unsigned reload_asked, reload_done; /* admin tickets */
    int reload_ok;
    char reload_msg[1024];
    int draining; /* atomic */
} ctl = { .lock = PTHREAD_MUTEX_INITIALIZER };

static struct config *ctl_config_get(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&ctl.lock);
    struct config *c = config_ref(ctl.cfg);
    pthread_mutex_unlock(&ctl.lock);
    return c;
}

static unsigned ctl_reload_start(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&ctl.lock);
    unsigned t = ++ctl.reload_asked;
    pthread_mutex_unlock(&ctl.lock);
    kill(getpid(), SIGHUP); /* main runs it, as for an operator's SIGHUP */
    return t;
}

static int ctl_reload_result(void *arg, unsigned ticket, char *msg, size_t msglen)
{
    (void)arg;
    pthread_mutex_lock(&ctl.lock);
    int rc = ctl.reload_done >= ticket ? (ctl.reload_ok ? 1 : -1) : 0;
    if (rc < 0)
        snprintf(msg, msglen, "%s", ctl.reload_msg);
    pthread_mutex_unlock(&ctl.lock);
    return rc;
}

static int ctl_draining(void *arg)
{
    (void)arg;
    return __atomic_load_n(&ctl.draining, __ATOMIC_ACQUIRE);
}

static void ctl_gauges(void *arg, char **b, size_t *len, size_t *cap)
{
    (void)arg;
    long active = 0;
    int nw = __atomic_load_n(&ctl.nw, __ATOMIC_ACQUIRE);
    for (int i = 0; i < nw; i++)
        active += __atomic_load_n(&ctl.workers[i]->nconns, __ATOMIC_RELAXED);
    metrics_printf(b, len, cap,
                   "# HELP portico_connections_active Client connections open now.\n"
                   "# TYPE portico_connections_active gauge\n"
                   "portico_connections_active %ld\n",
                   active);
    metrics_printf(b, len, cap,
                   "# HELP portico_config_reloads_total Configuration reloads, by result.\n"
                   "# TYPE portico_config_reloads_total counter\n"
                   "portico_config_reloads_total{result=\"ok\"} %llu\n"
                   "portico_config_reloads_total{result=\"failed\"} %llu\n",
                   (unsigned long long)__atomic_load_n(&metrics_globals.reloads_ok, __ATOMIC_RELAXED),
                   (unsigned long long)__atomic_load_n(&metrics_globals.reloads_failed,
                                                       __ATOMIC_RELAXED));
    metrics_printf(b, len, cap,
                   "# HELP portico_draining 1 once SIGTERM started the drain.\n"
                   "# TYPE portico_draining gauge\n"
                   "portico_draining %d\n",
                   ctl_draining(NULL));
    metrics_printf(b, len, cap,
                   "# HELP portico_workers Worker threads.\n"
                   "# TYPE portico_workers gauge\n"
                   "portico_workers %d\n",
                   nw);
    /* Endpoint state, shared by the workers (resil.h), for the running config. */
    struct config *cfg = ctl_config_get(NULL);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
    static const char *const eps_help[3][2] = {
        { "portico_upstream_endpoint_healthy", "1 when the endpoint passes its health checks (or has none)." },
        { "portico_upstream_endpoint_circuit", "1 for the endpoint's circuit state (closed, open, half_open)." },
        { "portico_upstream_endpoint_active_requests", "Requests in flight to the endpoint, all workers." },
    };
    for (int k = 0; k < 3; k++) {
        metrics_printf(b, len, cap, "# HELP %s %s\n# TYPE %s gauge\n", eps_help[k][0], eps_help[k][1],
                       eps_help[k][0]);
        for (size_t u = 0; u < cfg->nupstreams; u++) {
            const struct config_upstream *up = &cfg->upstreams[u];
            for (size_t e = 0; e < up->nendpoints; e++) {
                const char *name = up->name, *addr = up->endpoints[e].address;
                if (k == 0)
                    metrics_printf(b, len, cap, "%s{upstream=\"%s\",endpoint=\"%s\"} %d\n",
                                   eps_help[k][0], name, addr, resil_ep_healthy(up, e) ? 1 : 0);
                else if (k == 1)
                    metrics_printf(b, len, cap, "%s{upstream=\"%s\",endpoint=\"%s\",state=\"%s\"} 1\n",
                                   eps_help[k][0], name, addr, resil_ep_circuit(up, e, now));
                else
                    metrics_printf(b, len, cap, "%s{upstream=\"%s\",endpoint=\"%s\"} %d\n",
                                   eps_help[k][0], name, addr, resil_ep_active(up, e));
            }
        }
    }
    config_unref(cfg);
    metrics_printf(b, len, cap,
                   "# HELP portico_build_info Version and modules built in.\n"
                   "# TYPE portico_build_info gauge\n"
                   "portico_build_info{version=\"%s\",modules=\"",
                   PACKAGE_VERSION);
    for (size_t i = 0; portico_modules[i]; i++)
        metrics_printf(b, len, cap, "%s%s", i ? "," : "", portico_modules[i]->name);
    metrics_printf(b, len, cap, "\"} 1\n");
}

static const struct admin_env admin_env = {
    .config_get = ctl_config_get,
    .reload_start = ctl_reload_start,
    .reload_result = ctl_reload_result,
    .gauges = ctl_gauges,
    .draining = ctl_draining,
};

static int same_admin(const struct config *a, const struct config *b)
{
    if (a->admin.enabled != b->admin.enabled)
        return 0;
    return !a->admin.enabled || strcmp(a->admin.address, b->admin.address) == 0;
}

/* SIGHUP: load the file again; when it is valid, every worker switches to
 * it between requests (in-flight requests finish on the old one) and the
 * listeners follow it: kept addresses keep their sockets, new ones are
 * opened here (a busy port fails the reload), removed ones close. An
 * invalid file, or a listener that cannot open, changes nothing.
 * Returns 0, or -1 with the first problem in msg. */
static int reload_config(const char *file, struct config **cur, struct worker **workers, int nw,
                         unsigned *gen, char *msg, size_t msglen)
{
    struct config_errors errs = { 0 };
    struct config *nc = config_load(file, &errs);
    if (!nc) {
        for (size_t i = 0; i < errs.n; i++)
            log_error("reload: %s: %s", file, errs.msgs[i]);
        snprintf(msg, msglen, "%s: %s", file, errs.n ? errs.msgs[0] : "invalid configuration");
        config_errors_free(&errs);
        log_error("reload failed: the running configuration stays");
        return -1;
    }
    config_errors_free(&errs);
    if (nc->workers != (*cur)->workers)
        log_warn("reload: workers: changing the number of workers needs a restart; %d stay", nw);
    char err[512] = "";
    if (config_start_modules(nc, err, sizeof(err)) < 0) {
        snprintf(msg, msglen, "%s: %s", file, err);
        log_error("reload failed: %s", msg);
        config_unref(nc);
        return -1;
    }
    size_t nl = nc->nlisteners;
    int *fds = xcalloc((size_t)nw * (nl ? nl : 1), sizeof(int));
    int failed = 0;
    for (int i = 0; i < nw; i++) {
        for (size_t l = 0; l < nl; l++) {
            int *fd = &fds[(size_t)i * nl + l];
            *fd = -1;
            int kept = 0;
            for (size_t k = 0; k < (*cur)->nlisteners && !kept; k++)
                kept = strcmp((*cur)->listeners[k].address, nc->listeners[l].address) == 0;
            if (kept || failed)
                continue;
            *fd = worker_listen_socket(&nc->listeners[l], err, sizeof(err));
            if (*fd < 0) {
                snprintf(msg, msglen, "%s", err);
                failed = 1;
            }
        }
    }
    if (failed) {
        for (size_t i = 0; i < (size_t)nw * nl; i++)
            if (fds[i] >= 0)
                close(fds[i]);
        free(fds);
        config_unref(nc);
        log_error("reload failed: %s; the running configuration stays", msg);
        return -1;
    }
    (*gen)++;
    for (int i = 0; i < nw; i++)
        worker_reload(workers[i], config_ref(nc), &fds[(size_t)i * nl]);
    free(fds);
    /* The old snapshot lives on in the workers' connections that use it. */
    pthread_mutex_lock(&ctl.lock);
    config_unref(*cur);
    *cur = nc;
    ctl.cfg = nc;
    pthread_mutex_unlock(&ctl.lock);
    health_apply(nc); /* checks and lookups follow the snapshot that serves */
    int lvl = log_level_parse(nc->log_level ? nc->log_level : "info");
    log_min_level = lvl < 0 ? LOG_INFO : lvl;
    for (int i = 0; i < nw; i++)
        for (int t = 0; t < 500 && !worker_reload_done(workers[i], *gen); t++)
            usleep(2000);
    log_info("reloaded %s", file);
    return 0;
}

/* A reload, its counters, and the answer for the admin tickets it covers;
 * the admin listener follows a changed address. */
static void reload(const char *file, struct config **cur, struct worker **workers, int nw,
                   unsigned *gen, struct admin **admin)
{
    pthread_mutex_lock(&ctl.lock);
    unsigned upto = ctl.reload_asked;
    pthread_mutex_unlock(&ctl.lock);
    char msg[1024] = "";
    struct config *before = config_ref(*cur);
    int rc = reload_config(file, cur, workers, nw, gen, msg, sizeof(msg));
    __atomic_add_fetch(rc == 0 ? &metrics_globals.reloads_ok : &metrics_globals.reloads_failed, 1,
                       __ATOMIC_RELAXED);
    if (rc == 0 && !same_admin(before, *cur)) {
        admin_stop(*admin);
        *admin = NULL;
        char err[256];
        if ((*cur)->admin.enabled &&
            !(*admin = admin_start(*cur, &admin_env, -1, err, sizeof(err))))
            log_error("reload: %s; the admin listener is off", err);
        else if (*admin)
            log_info("admin listener on %s", (*cur)->admin.address);
    }
    config_unref(before);
    pthread_mutex_lock(&ctl.lock);
    ctl.reload_done = upto;
    ctl.reload_ok = rc == 0;
    snprintf(ctl.reload_msg, sizeof(ctl.reload_msg), "%s", msg);
    pthread_mutex_unlock(&ctl.lock);
}

static char exe_path[4096];
static char **saved_argv;

/* SIGUSR2: start the executable again with our listening sockets (see
 * upgrade.h). Returns the new process's pid, or 0. */
static pid_t binary_upgrade(const struct config *cfg, struct worker **workers, int nw,
                            const struct admin *admin)
{
    if (!exe_path[0]) {
        log_error("binary upgrade: the executable's path is unknown");
        return 0;
    }
    size_t n = 0, cap = cfg->nlisteners * (size_t)nw + 1;
    struct upgrade_socket *socks = xcalloc(cap, sizeof(*socks));
    for (size_t l = 0; l < cfg->nlisteners; l++)
        for (int i = 0; i < nw; i++)
            for (size_t k = 0; k < workers[i]->nlisteners; k++)
                if (workers[i]->listeners[k].fd >= 0 &&
                    strcmp(workers[i]->listeners[k].cfg->address, cfg->listeners[l].address) == 0)
                    socks[n++] = (struct upgrade_socket){ cfg->listeners[l].address,
                                                          workers[i]->listeners[k].fd };
    if (admin_fd(admin) >= 0)
        socks[n++] = (struct upgrade_socket){ cfg->admin.address, admin_fd(admin) };
    char err[256];
    pid_t pid = upgrade_spawn(exe_path, saved_argv, socks, n, err, sizeof(err));
    free(socks);
    if (pid < 0) {
        log_error("binary upgrade: %s", err);
        return 0;
    }
    log_info("binary upgrade: started %s as pid %d with %zu listening sockets; send SIGTERM to "
             "this process (pid %d) once it serves",
             exe_path, (int)pid, n, (int)getpid());
    return pid;
}

int main(int argc, char **argv)
{
    saved_argv = argv;
    ssize_t el = readlink("/proc/self/exe", exe_path, sizeof(exe_path) - 1);
    exe_path[el > 0 ? el : 0] = '\0';
    upgrade_inherit_load();
    const char *file = DEFAULT_CONFIG;
    int test_only = 0, opt;
    while ((opt = getopt(argc, argv, "c:tVh")) != -1) {
        switch (opt) {
        case 'c':
            file = optarg;
            break;
        case 't':
            test_only = 1;
            break;
        case 'V':
            print_version();
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }

    struct config *cfg = load(file);
    if (!cfg)
        return 1;
    if (test_only) {
        printf("portico: %s: configuration ok\n", file);
        config_unref(cfg);
        return 0;
    }
    int lvl = log_level_parse(cfg->log_level ? cfg->log_level : "info");
    log_min_level = lvl < 0 ? LOG_INFO : lvl;

    /* Signals go to the main thread only: block them before any worker
     * exists so the workers inherit the mask. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGUSR2);
    sigaddset(&set, SIGCHLD);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    char merr[512] = "";
    if (config_start_modules(cfg, merr, sizeof(merr)) < 0) {
        fprintf(stderr, "portico: %s: %s\n", file, merr[0] ? merr : "a module failed to start");
        config_unref(cfg);
        return 1;
    }
    health_apply(cfg);

    int nw = cfg->workers;
    struct worker **workers = xcalloc((size_t)nw, sizeof(*workers));
    ctl.cfg = cfg;
    ctl.workers = workers;
    /* The admin port first: when it is busy, nothing else has started. */
    struct admin *admin = NULL;
    if (cfg->admin.enabled) {
        char aerr[256];
        admin = admin_start(cfg, &admin_env, upgrade_take_fd(cfg->admin.address, &cfg->admin.addr),
                            aerr, sizeof(aerr));
        if (!admin) {
            fprintf(stderr, "portico: %s\n", aerr);
            free(workers);
            config_unref(cfg);
            return 1;
        }
    }
    if (start_workers(cfg, workers, nw) < 0) {
        admin_stop(admin);
        for (int i = 0; i < nw; i++)
            worker_free(workers[i]);
        free(workers);
        config_unref(cfg);
        return 1;
    }
    __atomic_store_n(&ctl.nw, nw, __ATOMIC_RELEASE); /* the admin's gauges may read them now */
    upgrade_inherit_done();
    if (admin)
        log_info("admin listener on %s", cfg->admin.address);
    for (size_t l = 0; l < cfg->nlisteners; l++)
        log_info("listening on %s", cfg->listeners[l].address);
    log_info("portico %s started: %d worker%s, config %s", PACKAGE_VERSION, nw, nw == 1 ? "" : "s",
             file);

    int draining = 0;
    unsigned reload_gen = 0;
    pid_t upgrade_pid = 0;
    struct timespec deadline = { 0, 0 };
    for (;;) {
        struct timespec tick = { 0, 100 * 1000 * 1000 };
        int sig = sigtimedwait(&set, NULL, &tick);
        if (sig == SIGTERM || sig == SIGINT) {
            if (draining) {
                log_warn("second %s: stopping now", sig == SIGTERM ? "SIGTERM" : "SIGINT");
                break;
            }
            log_info("%s: draining (up to %d ms)", sig == SIGTERM ? "SIGTERM" : "SIGINT",
                     cfg->limits.drain_timeout_ms);
            draining = 1;
            __atomic_store_n(&ctl.draining, 1, __ATOMIC_RELEASE);
            clock_gettime(CLOCK_MONOTONIC, &deadline);
            deadline.tv_sec += cfg->limits.drain_timeout_ms / 1000;
            deadline.tv_nsec += (long)(cfg->limits.drain_timeout_ms % 1000) * 1000000L;
            if (deadline.tv_nsec >= 1000000000L) {
                deadline.tv_sec++;
                deadline.tv_nsec -= 1000000000L;
            }
            for (int i = 0; i < nw; i++)
                worker_request_drain(workers[i]);
        } else if (sig == SIGHUP) {
            if (draining) {
                log_warn("SIGHUP while draining: ignored");
            } else {
                reload(file, &cfg, workers, nw, &reload_gen, &admin);
            }
        } else if (sig == SIGUSR2) {
            if (draining)
                log_warn("SIGUSR2 while draining: ignored");
            else if (upgrade_pid > 0)
                log_warn("SIGUSR2: a new process (pid %d) is already running; ignored",
                         (int)upgrade_pid);
            else
                upgrade_pid = binary_upgrade(cfg, workers, nw, admin);
        } else if (sig == SIGCHLD) {
            int st;
            pid_t pid;
            while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
                if (pid != upgrade_pid)
                    continue;
                log_error("binary upgrade: the new process (pid %d) exited with %s %d; this one "
                          "keeps serving",
                          (int)pid, WIFEXITED(st) ? "status" : "signal",
                          WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
                upgrade_pid = 0;
            }
        } else if (sig == SIGUSR1) {
            log_info("SIGUSR1: reopening the access log");
            for (int i = 0; i < nw; i++)
                worker_reopen_log(workers[i]);
        }
        if (draining) {
            int done = 1;
            for (int i = 0; i < nw; i++)
                done &= __atomic_load_n(&workers[i]->done, __ATOMIC_ACQUIRE);
            if (done)
                break;
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec > deadline.tv_sec ||
                (now.tv_sec == deadline.tv_sec && now.tv_nsec >= deadline.tv_nsec)) {
                log_warn("drain timeout: closing the remaining connections");
                break;
            }
        }
    }
    admin_stop(admin);
    for (int i = 0; i < nw; i++)
        worker_request_stop(workers[i]);
    for (int i = 0; i < nw; i++) {
        pthread_join(workers[i]->thread, NULL);
        worker_free(workers[i]);
    }
    free(workers);
    health_stop();
    config_unref(cfg);
    log_info("stopped");
    return 0;
}
