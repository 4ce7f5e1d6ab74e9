/* Binary upgrade without dropping connections (see upgrade.h). */
#include "upgrade.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define ENV_NAME "PORTICO_INHERIT_FDS"
#define MAX_INHERIT 1024

/* "ADDRESS=fd,fd,...|ADDRESS=fd,..." as read at start. */
static struct inherited {
    char *address;
    int fd;
} inherited[MAX_INHERIT];
static size_t ninherited;

static int same_sockaddr(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return 0;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
        return x->sin6_port == y->sin6_port &&
               memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
    }
    return 0;
}

void upgrade_inherit_load(void)
{
    const char *env = getenv(ENV_NAME);
    if (!env)
        return;
    char *copy = xstrdup(env), *save = NULL;
    for (char *item = strtok_r(copy, "|", &save); item; item = strtok_r(NULL, "|", &save)) {
        char *eq = strrchr(item, '=');
        if (!eq)
            continue;
        *eq = '\0';
        char *save2 = NULL;
        for (char *n = strtok_r(eq + 1, ",", &save2); n; n = strtok_r(NULL, ",", &save2)) {
            char *end;
            long fd = strtol(n, &end, 10);
            if (*end || fd < 3 || fd > 65535 || ninherited == MAX_INHERIT)
                continue;
            inherited[ninherited].address = xstrdup(item);
            inherited[ninherited++].fd = (int)fd;
        }
    }
    free(copy);
    unsetenv(ENV_NAME); /* not for our own children */
}

int upgrade_take_fd(const char *address, const struct sockaddr_storage *addr)
{
    for (size_t i = 0; i < ninherited; i++) {
        if (inherited[i].fd < 0 || strcmp(inherited[i].address, address) != 0)
            continue;
        int fd = inherited[i].fd;
        inherited[i].fd = -1;
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int listening = 0;
        socklen_t ll = sizeof(listening);
        if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0 || !same_sockaddr(&ss, addr) ||
            getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &ll) < 0 || !listening) {
            log_warn("binary upgrade: inherited fd %d is not a socket listening on %s; ignored", fd,
                     address);
            close(fd);
            continue;
        }
        fcntl(fd, F_SETFD, FD_CLOEXEC);
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        return fd;
    }
    return -1;
}

void upgrade_inherit_done(void)
{
    for (size_t i = 0; i < ninherited; i++) {
        if (inherited[i].fd >= 0)
            close(inherited[i].fd);
        free(inherited[i].address);
    }
    ninherited = 0;
}

pid_t upgrade_spawn(const char *exe, char *const argv[], const struct upgrade_socket *socks,
                    size_t n, char *err, size_t errlen)
{
    /* Build the variable before fork: the child only execs. */
    size_t cap = 64, len = 0;
    char *env = xmalloc(cap);
    env[0] = 0;
    for (size_t i = 0; i < n; i++) {
        char part[256];
        int k = (i == 0 || strcmp(socks[i].address, socks[i - 1].address) != 0)
                    ? snprintf(part, sizeof(part), "%s%s=%d", i ? "|" : "", socks[i].address,
                               socks[i].fd)
                    : snprintf(part, sizeof(part), ",%d", socks[i].fd);
        if (k < 0 || (size_t)k >= sizeof(part))
            continue;
        if (len + (size_t)k + 1 > cap) {
            cap = (cap + (size_t)k + 1) * 2;
            env = xrealloc(env, cap);
        }
        memcpy(env + len, part, (size_t)k + 1);
        len += (size_t)k;
    }
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(err, errlen, "fork: %s", strerror(errno));
        free(env);
        return -1;
    }
    if (pid == 0) {
        for (size_t i = 0; i < n; i++)
            fcntl(socks[i].fd, F_SETFD, 0); /* these survive exec */
        setenv(ENV_NAME, env, 1);
        execv(exe, argv);
        _exit(127);
    }
    free(env);
    return pid;
}
