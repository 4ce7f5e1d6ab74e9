/* hiredis on a worker's event base, without an epoll change per call.
 *
 * hiredis' own libevent adapter (adapters/libevent.h) uses a one-shot read
 * event, added again after every reply, and a write event added for every
 * command and removed once it is written: about four epoll_ctl calls and
 * one more loop turn per call. Here the read event stays registered for
 * the connection's life, and a command is written at the end of the loop
 * turn that queued it (an event made active: no system call). Only the
 * connect, or a write the socket does not take whole, waits for EV_WRITE. */
#ifndef PORTICO_RATE_LIMIT_EVENTS_H
#define PORTICO_RATE_LIMIT_EVENTS_H

#include <event2/event.h>
#include <hiredis/async.h>
#include <stdlib.h>

struct rl_events {
    redisAsyncContext *ac;
    struct event *rev;  /* persistent: every reply */
    struct event *wev;  /* persistent while registered: the connect, or the
                         * rest of a write */
    struct event *kick; /* made active: write what was queued this turn */
    int *freed;         /* non-NULL inside our own write (then addWrite means
                         * "not all written"); cleanup sets *freed */
};

static void rl_events_on_read(evutil_socket_t fd, short what, void *arg)
{
    (void)fd, (void)what;
    redisAsyncHandleRead(((struct rl_events *)arg)->ac);
}

/* Write what hiredis holds; a write error frees the context, and e with
 * it (cleanup), so e is not touched after that. */
static void rl_events_write(struct rl_events *e)
{
    int freed = 0;
    e->freed = &freed;
    redisAsyncHandleWrite(e->ac);
    if (!freed)
        e->freed = NULL;
}

/* For both wev (the connect completes or fails, or room again) and kick. */
static void rl_events_on_write(evutil_socket_t fd, short what, void *arg)
{
    (void)fd, (void)what;
    rl_events_write(arg);
}

static void rl_events_add_read(void *priv)
{
    struct rl_events *e = priv;
    if (!event_pending(e->rev, EV_READ, NULL))
        event_add(e->rev, NULL);
}

static void rl_events_del_read(void *priv)
{
    event_del(((struct rl_events *)priv)->rev);
}

static void rl_events_add_write(void *priv)
{
    struct rl_events *e = priv;
    /* Before the connect completes, only EV_WRITE tells (hiredis checks
     * SO_ERROR then); a write that stopped short waits for room. */
    if (e->freed || !(e->ac->c.flags & REDIS_CONNECTED)) {
        if (!event_pending(e->wev, EV_WRITE, NULL))
            event_add(e->wev, NULL);
    } else {
        event_active(e->kick, EV_TIMEOUT, 1);
    }
}

static void rl_events_del_write(void *priv)
{
    struct rl_events *e = priv;
    if (event_pending(e->wev, EV_WRITE, NULL))
        event_del(e->wev);
}

static void rl_events_cleanup(void *priv)
{
    struct rl_events *e = priv;
    if (e->freed)
        *e->freed = 1;
    event_free(e->rev);
    event_free(e->wev);
    event_free(e->kick);
    free(e);
}

/* Like redisLibeventAttach: 0, or -1 when out of memory. */
static inline int rl_events_attach(redisAsyncContext *ac, struct event_base *base)
{
    struct rl_events *e = calloc(1, sizeof(*e));
    if (!e)
        return -1;
    e->ac = ac;
    e->rev = event_new(base, ac->c.fd, EV_READ | EV_PERSIST, rl_events_on_read, e);
    e->wev = event_new(base, ac->c.fd, EV_WRITE | EV_PERSIST, rl_events_on_write, e);
    e->kick = event_new(base, -1, 0, rl_events_on_write, e);
    if (!e->rev || !e->wev || !e->kick) {
        if (e->rev)
            event_free(e->rev);
        if (e->wev)
            event_free(e->wev);
        if (e->kick)
            event_free(e->kick);
        free(e);
        return -1;
    }
    ac->ev.data = e;
    ac->ev.addRead = rl_events_add_read;
    ac->ev.delRead = rl_events_del_read;
    ac->ev.addWrite = rl_events_add_write;
    ac->ev.delWrite = rl_events_del_write;
    ac->ev.cleanup = rl_events_cleanup;
    event_add(e->rev, NULL);
    event_add(e->wev, NULL); /* the connect */
    return 0;
}

#endif
