/* Client connections and the requests they carry.
 *
 * One struct conn per accepted socket, owned by its worker. The socket's
 * event is registered once (EV_READ|EV_WRITE|EV_ET|EV_PERSIST): we read
 * until a short read, write first and wait for writability only after a
 * short write, so a proxied request costs about four syscalls.
 *
 * Connection states:
 *
 *   HEAD --head parsed--> REQUEST --response done, keep-alive--> HEAD
 *     |                     |
 *     |                     +--response done, close--> LINGER --> freed
 *     +--framing error: answer, close---------------------^
 *
 * HEAD: waiting for a request head (idle timeout before its first byte,
 * header timeout after). REQUEST: a local answer or a proxied exchange:
 * the request body streams client -> upstream while the response streams
 * upstream -> client, each through bounded buffers. LINGER: our last
 * bytes are out and the write side is shut; unread client bytes are read
 * and dropped for a short while so the kernel does not answer them with
 * a reset that could destroy the response in flight.
 *
 * A conn is only freed at the end of conn_pump(), never from inside a
 * helper that others may still be using. */
#ifndef PORTICO_CONN_H
#define PORTICO_CONN_H

#include <event2/event.h>
#include <event2/event_struct.h>
#include <netinet/in.h>
#include <stdint.h>
#include "arena.h"
#include "buf.h"
#include "config.h"
#include "http1.h"

struct worker;
struct upconn;

enum conn_state { CS_HEAD, CS_REQUEST, CS_LINGER };

enum req_body_state { RB_NONE, RB_LENGTH, RB_CHUNKED, RB_FLUSH, RB_DONE };
enum resp_state {
    RS_LOCAL,        /* a local answer is in c->out (and maybe a span) */
    RS_WAIT_HEAD,    /* waiting for the upstream's response head */
    RS_BODY_LENGTH,
    RS_BODY_CHUNKED,
    RS_BODY_CLOSE,
    RS_DONE,
    RS_ABORT,        /* response cut short: flush what we have, then close */
};

struct request {
    struct http_request head;      /* spans into c->in until the head is consumed */
    size_t head_len;
    struct arena *arena;
    const struct config_route *route;
    /* copies kept for the access log */
    const char *method;
    const char *host;
    const char *path;              /* normalised, without query */
    size_t path_len;
    const char *query;             /* NULL when none */
    size_t query_len;
    const char *authority;         /* absolute-form target's authority */
    size_t authority_len;
    int keepalive;                 /* the client connection persists afterwards */
    int has_body;
    int status;                    /* sent to the client, 0 until known */
    uint64_t start_us, up_start_us, up_end_us;
    uint64_t bytes_in, bytes_out;
    /* request body */
    enum req_body_state rb;
    uint64_t rb_left;              /* Content-Length bytes not yet handed to the upstream sink */
    uint64_t rb_total;             /* body bytes read so far (for max_body_bytes and rate) */
    uint64_t rb_start_ms;
    struct http_chunked rb_chunk;
    int rb_last_chunk;             /* "0\r\n" emitted upstream */
    /* response */
    enum resp_state rs;
    int resp_started;              /* response head bytes queued to the client */
    int out_chunked;               /* client framing: chunked (1.1) or raw */
    uint64_t rs_left;
    struct http_chunked rs_chunk;
    int rs_last_chunk;
    struct http_response resp;
    size_t resp_scanned;           /* response head parser resume point */
    /* upstream */
    const struct config_endpoint *ep;
    char *up_head;                 /* copy of the upstream head for one retry, or NULL */
    size_t up_head_len;
    int retried;
    int up_eof;                    /* the upstream closed (1) or reset (-1) */
    int head_consumed;             /* the head's bytes were dropped from c->in */
    uint64_t up_activity_ms;       /* last upstream progress, for timeout_ms */
    uint64_t up_connect_deadline_ms;
};

struct conn {
    struct worker *w;
    int fd;
    struct event ev, timer;
    enum conn_state state;
    unsigned readable : 1, writable : 1, eof : 1, dead : 1;
    unsigned close_after : 1;      /* close once the response is out */
    unsigned linger_needed : 1;
    struct sockaddr_storage peer;
    char peer_ip[48];
    int trusted;                   /* peer is a trusted proxy */
    struct buf in, out;
    const char *sp;                /* span written after out: static memory ... */
    struct buf *sp_src;            /* ... or the front of this buffer */
    size_t sp_len;
    size_t scanned;                /* head parser resume point */
    uint64_t idle_since_ms;        /* HEAD with no bytes yet */
    uint64_t head_start_ms;
    uint64_t last_write_ms;
    uint64_t linger_deadline_ms;
    uint64_t timer_at_ms;          /* when the armed timer fires, 0 if none */
    struct upconn *up;
    struct arena arena;
    struct request req;
    struct conn *prev, *next;      /* worker's list */
};

/* Take ownership of an accepted, non-blocking socket. */
void conn_accept(struct worker *w, int fd, const struct sockaddr *sa, socklen_t salen);
/* Drain: close idle connections now, others after their response. */
void conn_drain(struct conn *c);
/* Close at once (drain timeout, shutdown). */
void conn_abort(struct conn *c);

/* proxy.c: build the upstream request head / the client response head. */
struct upconn;
void proxy_build_request(struct conn *c, struct buf *out);
void proxy_build_response(struct conn *c, const struct http_response *resp, int body_kind);
/* Is this header one the proxy handles itself or drops (hop-by-hop)? */
int proxy_is_hop_by_hop(const char *name, size_t len);

#endif
