/* portico: command line, config load, listening sockets, worker threads,
 * and signals. The main thread never serves requests: it waits for
 * signals and tells the workers what to do through their pipes. */
#include "config.h"
#include "log.h"
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

int main(int argc, char **argv)
{
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
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    char merr[512] = "";
    if (config_start_modules(cfg, merr, sizeof(merr)) < 0) {
        fprintf(stderr, "portico: %s: %s\n", file, merr[0] ? merr : "a module failed to start");
        config_unref(cfg);
        return 1;
    }

    int nw = cfg->workers;
    struct worker **workers = xcalloc((size_t)nw, sizeof(*workers));
    if (start_workers(cfg, workers, nw) < 0) {
        for (int i = 0; i < nw; i++)
            worker_free(workers[i]);
        free(workers);
        config_unref(cfg);
        return 1;
    }
    for (size_t l = 0; l < cfg->nlisteners; l++)
        log_info("listening on %s", cfg->listeners[l].address);
    log_info("portico %s started: %d worker%s, config %s", PACKAGE_VERSION, nw, nw == 1 ? "" : "s",
             file);

    int draining = 0;
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
            log_warn("SIGHUP: configuration reload is not supported by this build yet; ignoring");
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
    for (int i = 0; i < nw; i++)
        worker_request_stop(workers[i]);
    for (int i = 0; i < nw; i++) {
        pthread_join(workers[i]->thread, NULL);
        worker_free(workers[i]);
    }
    free(workers);
    config_unref(cfg);
    log_info("stopped");
    return 0;
}
