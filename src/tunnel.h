/* WebSocket tunnels: after an upstream's 101 to a WebSocket upgrade, the
 * client connection and its upstream connection become one bidirectional
 * byte stream (connection state TUNNEL, see conn.h).
 *
 *   REQUEST --upgrade request, route "websocket": true, upstream 101
 *             with Upgrade: websocket--> TUNNEL --both sides done,
 *             idle timeout, max lifetime, error--> freed
 *
 * Bytes move client c->in -> upstream socket, and upstream u->in ->
 * client socket (as a span of u->in behind c->out, written by conn.c's
 * client_flush). Each side reads only while the buffer it fills has room,
 * which is the back-pressure both ways: memory stays at the two buffers.
 * An EOF on one side, once what it sent is delivered, shuts the write
 * side of the other (TLS: close_notify, then SHUT_WR); the tunnel ends
 * when both directions are shut. The upstream connection is never pooled
 * again.
 *
 * Only WebSocket is tunnelled: every other Upgrade (h2c in particular) is
 * dropped from the forwarded request as a hop-by-hop field. */
#ifndef PORTICO_TUNNEL_H
#define PORTICO_TUNNEL_H

#include <stdint.h>
#include "http1.h"

struct conn;

/* Is this head a WebSocket upgrade we may forward as one: GET, HTTP/1.1,
 * no body, a Connection field listing "upgrade" and an Upgrade field
 * listing "websocket" (tokens case-insensitive)? */
int tunnel_request_is_upgrade(const struct http_request *h);
/* Does this 101 accept a WebSocket upgrade (Upgrade: websocket)? */
int tunnel_response_ok(const struct http_response *resp);
/* The 101 head is parsed at the front of c->up->in (head_len bytes):
 * queue ours to the client and enter TUNNEL. */
void tunnel_begin(struct conn *c, size_t head_len);
/* One round of moves in TUNNEL. Returns 1 on progress. */
int tunnel_step(struct conn *c);
/* The nearest tunnel deadline (idle, lifetime), 0 if none. */
uint64_t tunnel_deadline(const struct conn *c);
/* Act on a passed deadline. Returns 1 if the tunnel ended. */
int tunnel_timeouts(struct conn *c, uint64_t now);
/* The connection in TUNNEL is about to be freed: count and time it. */
void tunnel_end(struct conn *c);

#endif
