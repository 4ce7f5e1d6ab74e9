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
 * REQUEST --upstream 101 to a WebSocket upgrade--> TUNNEL --> freed
 * (tunnel.h: a byte stream both ways until both sides are done).
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
#include "accesslog.h"
#include "arena.h"
#include "buf.h"
#include "config.h"
#include "http1.h"
#include "resil.h"

/* A client's IPv4 or IPv6 address and port: 28 bytes where a
 * sockaddr_storage takes 128, and every connection keeps two. */
union peer_addr {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
};
#include "router.h"
#include "tls.h"

struct worker;
struct upconn;
struct h2_session;
struct h2_stream;

enum conn_state { CS_HEAD, CS_REQUEST, CS_LINGER, CS_TUNNEL, CS_H2 };

/* One filter of this request's chain and its per-request slot. */
struct filter_run {
    const struct filter_conf *f;
    void *ctx;
};

enum edit_op { EDIT_SET, EDIT_ADD, EDIT_REMOVE };

/* A header change asked for by a filter; applied when the head is written. */
struct header_edit {
    struct header_edit *next;
    enum edit_op op;
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
};

/* A local answer waiting to be written (see local_commit in conn.c). */
struct local_answer {
    int set;
    int status;
    const char *ctype;
    const char *body;
    size_t len;
    const char *extra;             /* preformatted header lines or NULL */
};

enum req_body_state { RB_NONE, RB_LENGTH, RB_CHUNKED, RB_FLUSH, RB_DONE };
enum resp_state {
    RS_LOCAL,        /* a local answer is in c->out (and maybe a span) */
    RS_WAIT_HEAD,    /* waiting for the upstream's response head */
    RS_BODY_LENGTH,
    RS_BODY_CHUNKED,
    RS_BODY_CLOSE,
    RS_DONE,
    RS_ABORT,        /* response cut short: flush what we have, then close */
    RS_PAUSED,       /* a filter is waiting for something asynchronous */
    RS_BODY_WAIT,    /* reading a small body into a copy before the first try (retries) */
    RS_TUNNEL,       /* the 101 of a WebSocket upgrade: the tunnel carries on (tunnel.c) */
};

struct request {
    struct http_request head;      /* spans into c->in until the head is consumed */
    size_t head_len;
    struct arena *arena;
    const struct config_route *route;
    enum router_result route_result;
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
    int grpc;                      /* content-type application/grpc: errors as grpc-status */
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
    int up_write_failed;           /* the upstream stopped taking the request */
    int up_eof;                    /* the upstream closed (1) or reset (-1) */
    int head_consumed;             /* the head's bytes were dropped from c->in */
    struct buf replay;             /* a kept request body read after the head (arena memory) */
    size_t replay_len;             /* its length: replay is rewound for each try */
    int continue_sent;             /* "100 Continue" already went out */
    /* filters */
    struct filter_run *chain;
    size_t nchain;
    size_t chain_pos;              /* next filter whose on_request runs */
    size_t chain_ok;               /* filters whose on_request let the request through */
    size_t chain_logged;           /* filters owed an on_log */
    int resume_pending;
    int deferring;                 /* inside response/body hooks: request_respond only records */
    int response_hooks_done;
    int body_hooks;                /* some filter has on_request_body */
    struct local_answer local;
    struct header_edit *req_edits, **req_edits_tail;
    struct header_edit *resp_edits, **resp_edits_tail;
    struct kv *log_fields, **log_fields_tail;
    struct kv *vars;
    union peer_addr client_addr;
    int client_addr_set;
    char client_ip[48];            /* INET6_ADDRSTRLEN and then some */
    struct conn *conn;
    uint64_t up_activity_ms;       /* last upstream progress, for timeout_ms */
    /* WebSocket (tunnel.c) */
    int ws;                        /* forwarded as an upgrade: a 101 may open a tunnel */
    unsigned tun_up_eof : 1, tun_up_shut : 1, tun_client_shut : 1;
    uint64_t tun_start_ms, tun_activity_ms;
    uint64_t tun_client_bytes;     /* bytes_in + bytes_out when last looked at */
    const char *tun_end;           /* why the tunnel ended (metric label) */
    uint64_t up_connect_deadline_ms;
    uint64_t grpc_deadline_ms;     /* the client's grpc-timeout, until the answer's head; 0 = none */
    struct resil_req resil;        /* tries, breaker and budget bookkeeping (resil.h) */
};

struct conn {
    struct worker *w;
    struct poolset *ps;            /* config snapshot + pools of the current request */
    const struct config_listener *lc; /* the listener it came in on ... */
    struct config *lc_cfg;            /* ... and the config holding it (a reference) */
    int fd;
    SSL *ssl;                   /* NULL on a plain listener: the plain path pays one branch */
    unsigned tls_hs : 1;        /* handshake in progress (state stays HEAD) */
    unsigned tls_hs_ww : 1;     /* the handshake waits for writability */
    unsigned tls_rw : 1;        /* a read waits for writability (TLS may write to read) */
    unsigned tls_wr : 1;        /* a write waits for readability */
    signed char tls_cert;       /* client certificate looked at: 1 verified, -1 none, 0 not yet */
    char *tls_subject, *tls_fp; /* verified client certificate, when tls_cert == 1 */
    uint64_t accept_ms;
    struct event ev, timer;
    struct event *resume_ev;       /* made on the first pause: most never pause */
    enum conn_state state;
    unsigned readable : 1, writable : 1, eof : 1, dead : 1, rdhup : 1;
    unsigned close_after : 1;      /* close once the response is out */
    unsigned linger_needed : 1;
    union peer_addr peer;
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
    struct h2_session *h2;         /* CS_H2: the HTTP/2 session on this socket */
    struct h2_stream *h2s;         /* a stream's conn: no socket (fd -1), ssl borrowed */
    struct arena arena;
    struct request req;
    struct conn *prev, *next;      /* worker's list */
};

/* Take ownership of an accepted, non-blocking socket. */
void conn_accept(struct worker *w, const struct config_listener *lc, int fd,
                 const struct sockaddr *sa, socklen_t salen);
/* A conn for one HTTP/2 stream of parent, reading head (an HTTP/1.1
 * request head h2.c made) first; it runs from the next loop turn. */
struct conn *conn_stream_open(struct conn *parent, struct h2_stream *st, const char *head,
                              size_t len);
/* Give back the request arena of a keep-alive connection idle since
 * before idle_before_ms (the worker's tick): idle connections then hold
 * little more than their struct (and, with TLS, the SSL object).
 * Returns 1 if memory was freed. */
int conn_trim_idle(struct conn *c, uint64_t idle_before_ms);
/* Drain: close idle connections now, others after their response. */
void conn_drain(struct conn *c);
/* Close at once (drain timeout, shutdown). */
void conn_abort(struct conn *c);

/* filter.c: the chain runner (conn.c calls these). */
void filter_chain_setup(struct conn *c);
enum filter_status filter_run_request(struct conn *c);
void filter_run_response(struct conn *c);
enum filter_status filter_run_body(struct conn *c, const char *data, size_t len);
void filter_run_log(struct conn *c);
/* Is this (set or removed) header name changed by an edit in list? */
int filter_edits_drop(const struct header_edit *list, const char *name, size_t len);
/* Write the SET/ADD edits that survive later edits of the same name. */
void filter_edits_emit(const struct header_edit *list, struct buf *out);
/* Queue or commit a local answer (conn.c). */
void conn_local_answer(struct conn *c, int status, const char *ctype, const char *body,
                       size_t len, const char *extra);
void conn_schedule(struct conn *c);

/* proxy.c: build the upstream request head / the client response head. */
struct upconn;
void proxy_build_request(struct conn *c, struct buf *out);
void proxy_build_response(struct conn *c, const struct http_response *resp, int body_kind);
/* Is this header one the proxy handles itself or drops (hop-by-hop)? */
int proxy_is_hop_by_hop(const char *name, size_t len);

#endif
