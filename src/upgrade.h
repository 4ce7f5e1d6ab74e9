/* Binary upgrade without dropping connections, as nginx does on SIGUSR2.
 *
 * The running process forks and execs the executable at the path it was
 * started from (read from /proc/self/exe at start: after a package
 * upgrade that path holds the new binary) with the same arguments, passing every listening socket (each worker's SO_REUSEPORT
 * socket, and the admin socket) through the environment:
 *   PORTICO_INHERIT_FDS="127.0.0.1:8080=5,6|127.0.0.1:9901=7"
 * The new process takes the sockets for the addresses its config still
 * has (checked with getsockname), opens the rest, and closes inherited
 * ones it does not use. Both processes accept from the same sockets until
 * the operator sends the old one SIGTERM: it stops accepting and drains,
 * and since the sockets stay open in the new process, nothing queued on
 * them is lost (closing an SO_REUSEPORT socket would reset the
 * connections waiting in its own accept queue).
 *
 * Why not only SO_REUSEPORT (start the new one, then drain the old):
 * each process has its own sockets; connections the kernel already put
 * in the old process's queues are reset when it closes them, unless
 * net.ipv4.tcp_migrate_req is set. Passing the sockets avoids depending
 * on that sysctl. */
#ifndef PORTICO_UPGRADE_H
#define PORTICO_UPGRADE_H

#include <stddef.h>
#include <sys/socket.h>
#include <sys/types.h>

/* At start: read (and unset) PORTICO_INHERIT_FDS. */
void upgrade_inherit_load(void);
/* An inherited socket listening on address (as written in the config,
 * and bound to addr), or -1. Each is handed out once. */
int upgrade_take_fd(const char *address, const struct sockaddr_storage *addr);
/* Close the inherited sockets nobody took. */
void upgrade_inherit_done(void);

struct upgrade_socket {
    const char *address;
    int fd;
};
/* Fork and exec exe with argv and the sockets (grouped by address, in
 * order). Returns the child's pid, or -1 with a reason in err. */
pid_t upgrade_spawn(const char *exe, char *const argv[], const struct upgrade_socket *socks,
                    size_t n, char *err, size_t errlen);

#endif
