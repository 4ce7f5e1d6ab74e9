/* HTTP/2 to clients (RFC 9113), through libnghttp2.
 *
 * A TLS connection whose handshake chose ALPN "h2" becomes a session
 * (conn state CS_H2). nghttp2 parses and writes the frames; each request
 * stream gets a conn of its own (conn_stream_open) that reads an HTTP/1.1
 * head made from the stream's header list, then the stream's DATA (framed
 * by Content-Length, or chunked when the length is unknown), and writes an
 * ordinary HTTP/1.1 response, which this file parses back into a HEADERS
 * frame, DATA frames and trailers. So every stream goes through the same
 * routing, filters, upstream pools, retries, limits and logs as an
 * HTTP/1.1 request, and the strict HTTP/1.1 parser checks what the
 * stream's fields became.
 *
 * Bounded: a stream's request bytes wait in a buffer no larger than its
 * window (WINDOW_UPDATE only as the stream's conn takes them), and its
 * response in two buffers that stop the stream's conn when full. Flood
 * limits (config_http2) end the session with GOAWAY ENHANCE_YOUR_CALM. */
#ifndef PORTICO_H2_H
#define PORTICO_H2_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

struct conn;

/* After the handshake: start the session if ALPN chose h2 (returns 1,
 * the conn is then CS_H2), else 0. */
int h2_start(struct conn *c);
/* The session's share of conn_pump: frames in, frames out. 1 on progress. */
int h2_step(struct conn *c);
/* When the session's timer must fire (idle), 0 for none; act on it. */
uint64_t h2_deadline(const struct conn *c);
int h2_timeouts(struct conn *c, uint64_t now);
/* Draining: GOAWAY now, close once the open streams are answered. */
void h2_drain(struct conn *c);
/* The socket is going: end every stream's conn, free the session. */
void h2_free(struct conn *c);

/* A stream's conn takes request bytes into c->in (1 on progress) ... */
int h2_stream_read(struct conn *sc);
/* ... and gives response bytes: returns how many of iov it took (0: the
 * stream's buffer is full, wait), or -1 when the client reset the stream. */
ssize_t h2_stream_write(struct conn *sc, const struct iovec *iov, int n);
/* The stream's conn is being freed. */
void h2_stream_gone(struct conn *sc);

#endif
