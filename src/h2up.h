/* HTTP/2 to upstreams ("protocol": "h2c" or "h2"), for gRPC services.
 *
 * The proxy writes an HTTP/1.1 request into the upstream connection's
 * output and reads an HTTP/1.1 response from its input, as for any
 * upstream; for an HTTP/2 upstream this file stands between those buffers
 * and the socket. It turns the request head into a HEADERS frame (adding
 * "te: trailers", which gRPC servers require) and its body into DATA
 * frames, and turns the response's HEADERS, DATA and trailers back into an
 * HTTP/1.1 head and a chunked body whose trailer section carries the
 * HTTP/2 trailers (grpc-status, grpc-message), which the client side then
 * passes on: as HTTP/2 trailers to an HTTP/2 client, as chunked trailers
 * to an HTTP/1.1 one. One request at a time per connection; a connection
 * is pooled and reused for the next request like an HTTP/1.1 one. */
#ifndef PORTICO_H2UP_H
#define PORTICO_H2UP_H

struct conn;
struct upconn;

/* In place of the socket write / read of upstream_flush and
 * upstream_read in conn.c; same return conventions. */
int h2up_flush(struct conn *c, struct upconn *u);
int h2up_read(struct conn *c, struct upconn *u, int *eof);
/* The response is over and the connection may be pooled: 1 if the
 * session can carry another request. */
int h2up_reusable(struct upconn *u);
void h2up_free(struct upconn *u);

#endif
