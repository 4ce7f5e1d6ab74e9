/* rate_limit_events.h: hiredis on libevent over real loopback sockets. A
 * small server in this test stands in for Redis so it can stop reading:
 * a command is written in the turn that queued it, with no EV_WRITE
 * registration; a command larger than the socket takes waits for EV_WRITE
 * and arrives whole; a peer that closes, or is not there, ends the
 * context cleanly (the ASan build checks for leaks). */
#include "testlib.h"
#include "../../modules/rate_limit_events.h"

#include <hiredis/sds.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

struct server {
    int lfd, fd;
    struct event *ev;
    size_t got, want; /* bytes of the command read, and its length */
    unsigned long sum; /* of the bytes read, to compare */
};

static int listen_any(int rcvbuf, int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t al = sizeof(a);
    if (rcvbuf)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf)); /* inherited */
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 4) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &al) < 0)
        abort();
    *port = ntohs(a.sin_port);
    return fd;
}

static void on_server_read(evutil_socket_t fd, short what, void *arg)
{
    struct server *s = arg;
    char buf[65536];
    (void)what;
    ssize_t n;
    while ((n = read(fd, buf, sizeof(buf))) > 0) {
        for (ssize_t i = 0; i < n; i++)
            s->sum += (unsigned char)buf[i];
        s->got += (size_t)n;
    }
    if (s->want && s->got == s->want) {
        s->want = 0;
        if (write(fd, "+OK\r\n", 5) != 5)
            abort();
    }
}

static void server_accept(struct server *s, struct event_base *base)
{
    s->fd = accept(s->lfd, NULL, NULL);
    if (s->fd < 0)
        abort();
    fcntl(s->fd, F_SETFL, O_NONBLOCK);
    s->ev = event_new(base, s->fd, EV_READ | EV_PERSIST, on_server_read, s);
}

/* Run the loop until *flag is set or ms pass. */
static void run_until(struct event_base *base, const int *flag, int ms)
{
    struct timeval tv = { 0, 5000 };
    for (int i = 0; i < ms / 5 && !*flag; i++) {
        event_base_loopexit(base, &tv);
        event_base_dispatch(base);
    }
}

static int connected, connect_status = 99, disconnected, disconnect_status = 99;
static void on_connect(const redisAsyncContext *ac, int status)
{
    (void)ac;
    connected = 1;
    connect_status = status;
}
static void on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)ac;
    disconnected = 1;
    disconnect_status = status;
}

static int replies, nil_replies;
static char last_reply[16];
static void on_reply(redisAsyncContext *ac, void *rv, void *priv)
{
    redisReply *r = rv;
    (void)ac, (void)priv;
    if (!r) {
        nil_replies++;
        return;
    }
    replies++;
    snprintf(last_reply, sizeof(last_reply), "%s", r->type == REDIS_REPLY_STATUS ? r->str : "?");
}

static void reset(void)
{
    connected = disconnected = replies = nil_replies = 0;
    connect_status = disconnect_status = 99;
    last_reply[0] = 0;
}

static redisAsyncContext *client(struct event_base *base, int port)
{
    redisAsyncContext *ac = redisAsyncConnect("127.0.0.1", port);
    CHECK(ac && !ac->err);
    CHECK_EQ_INT(rl_events_attach(ac, base), 0);
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    return ac;
}

/* A client connected to a server of this test, and the server's side
 * accepted (its read event not yet added: the test decides when it reads). */
struct fixture {
    struct event_base *base;
    struct server s;
    redisAsyncContext *ac;
    struct rl_events *e;
};

static void fixture_open(struct fixture *f, int rcvbuf)
{
    int port;
    memset(f, 0, sizeof(*f));
    reset();
    f->base = event_base_new();
    f->s.lfd = listen_any(rcvbuf, &port);
    f->ac = client(f->base, port);
    f->e = f->ac->ev.data;
    run_until(f->base, &connected, 2000);
    CHECK_EQ_INT(connect_status, REDIS_OK);
    server_accept(&f->s, f->base);
}

/* ac: still the client's, or NULL once hiredis freed it. */
static void fixture_close(struct fixture *f, redisAsyncContext *ac)
{
    if (ac)
        redisAsyncFree(ac); /* cleanup frees the events */
    if (f->s.ev)
        event_free(f->s.ev);
    if (f->s.fd >= 0)
        close(f->s.fd);
    close(f->s.lfd);
    event_base_free(f->base);
}

static void test_small_commands_written_in_their_turn(void)
{
    struct fixture f;
    fixture_open(&f, 0);
    redisAsyncContext *ac = f.ac;
    struct rl_events *e = f.e;
    event_add(f.s.ev, NULL);
    for (int i = 1; i <= 3; i++) {
        static const char cmd[] = "*1\r\n$4\r\nPING\r\n";
        f.s.want = f.s.got + sizeof(cmd) - 1;
        CHECK_EQ_INT(redisAsyncFormattedCommand(ac, on_reply, NULL, cmd, sizeof(cmd) - 1), REDIS_OK);
        /* queued: written by the kick, EV_WRITE not registered */
        CHECK(event_pending(e->kick, EV_TIMEOUT, NULL));
        CHECK(!event_pending(e->wev, EV_WRITE, NULL));
        event_base_loop(f.base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
        CHECK(!event_pending(e->wev, EV_WRITE, NULL));
        CHECK_EQ_INT(sdslen(ac->c.obuf), 0); /* all written */
        run_until(f.base, &replies, 2000);
        CHECK_EQ_INT(replies, 1);
        CHECK_STR(last_reply, strlen(last_reply), "OK");
        CHECK(event_pending(e->rev, EV_READ, NULL)); /* stays registered */
        replies = 0;
    }
    fixture_close(&f, ac);
}

static void test_large_command_waits_for_room(void)
{
    struct fixture f;
    fixture_open(&f, 4096);
    redisAsyncContext *ac = f.ac;
    int sndbuf = 4096;
    setsockopt(ac->c.fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));

    size_t vlen = 4u << 20;
    char *v = malloc(vlen);
    unsigned long sum = 0;
    for (size_t i = 0; i < vlen; i++)
        v[i] = (char)('a' + i % 26);
    CHECK_EQ_INT(redisAsyncCommand(ac, on_reply, NULL, "SET k %b", v, vlen), REDIS_OK);
    size_t len = sdslen(ac->c.obuf);
    for (size_t i = 0; i < len; i++)
        sum += (unsigned char)ac->c.obuf[i];
    f.s.want = len;
    event_base_loop(f.base, EVLOOP_ONCE | EVLOOP_NONBLOCK); /* the kick: a partial write */
    CHECK(sdslen(ac->c.obuf) > 0);
    CHECK(event_pending(f.e->wev, EV_WRITE, NULL));
    event_add(f.s.ev, NULL); /* room again: EV_WRITE writes the rest */
    run_until(f.base, &replies, 10000);
    CHECK_EQ_INT(replies, 1);
    CHECK_EQ_INT(f.s.got, len);
    CHECK_EQ_INT(f.s.sum, sum);
    CHECK(!event_pending(f.e->wev, EV_WRITE, NULL));
    free(v);
    fixture_close(&f, ac);
}

static void test_peer_closes_with_a_command_queued(void)
{
    struct fixture f;
    fixture_open(&f, 0);
    /* RST: the pending command's write or the read sees the error */
    struct linger lg = { 1, 0 };
    setsockopt(f.s.fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    close(f.s.fd);
    f.s.fd = -1;
    CHECK_EQ_INT(redisAsyncCommand(f.ac, on_reply, NULL, "PING"), REDIS_OK);
    run_until(f.base, &disconnected, 2000);
    CHECK_EQ_INT(disconnected, 1);
    CHECK_EQ_INT(disconnect_status, REDIS_ERR);
    CHECK_EQ_INT(nil_replies, 1); /* the callback still runs, without a reply */
    CHECK_EQ_INT(replies, 0);
    fixture_close(&f, NULL); /* hiredis freed the context */
}

static void test_nobody_listening(void)
{
    struct event_base *base = event_base_new();
    int port;
    reset();
    int lfd = listen_any(0, &port);
    close(lfd); /* the port is free now: the connect is refused */
    redisAsyncContext *ac = client(base, port);
    CHECK_EQ_INT(redisAsyncCommand(ac, on_reply, NULL, "PING"), REDIS_OK);
    run_until(base, &connected, 2000);
    CHECK_EQ_INT(connected, 1);
    CHECK_EQ_INT(connect_status, REDIS_ERR);
    CHECK_EQ_INT(nil_replies, 1);
    event_base_free(base);
}

int main(void)
{
    test_small_commands_written_in_their_turn();
    test_large_command_waits_for_room();
    test_peer_closes_with_a_command_queued();
    test_nobody_listening();
    return test_summary();
}
