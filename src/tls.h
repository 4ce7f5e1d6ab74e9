/* TLS: server contexts for TLS listeners, client contexts for upstreams
 * that speak TLS, and the small I/O shim the core calls instead of
 * read()/write() on a connection that carries an SSL object.
 *
 * Contexts are built while the configuration loads (so `portico -t`
 * reports a missing file, a key that does not match its certificate or an
 * unknown protocol name) and are immutable afterwards: every worker uses
 * the same SSL_CTX objects, which OpenSSL allows from many threads. A
 * connection's SSL object belongs to the worker that owns the connection.
 *
 * Session tickets: the keys are derived from one random secret per process
 * and the current rotation period, so every worker (and a reloaded
 * configuration) encrypts with the same key without sharing mutable state;
 * a ticket stays valid for the period it was made in and the next one.
 *
 * Nothing here logs key material; error messages name files and reasons. */
#ifndef PORTICO_TLS_H
#define PORTICO_TLS_H

#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

typedef struct ssl_st SSL;
struct tls_server;
struct tls_client;

enum tls_verify { TLS_VERIFY_NONE, TLS_VERIFY_OPTIONAL, TLS_VERIFY_REQUIRED };

/* Results of the I/O shim besides a byte count. */
enum {
    TLS_WANT_READ = -1,  /* retry when the socket is readable */
    TLS_WANT_WRITE = -2, /* retry when the socket is writable */
    TLS_FATAL = -3,      /* the connection is broken (reason: tls_last_error) */
};

/* ---- listeners ---------------------------------------------------------- */

/* Server options; zero means the default. */
struct tls_server_opts {
    int min_version;          /* TLS1_2_VERSION etc.; 0 = TLS 1.2 */
    const char *ciphers;      /* TLS 1.2 and below; NULL = secure default */
    const char *ciphersuites; /* TLS 1.3; NULL = OpenSSL's default */
    const char *client_ca;    /* PEM bundle; NULL = no client certificates */
    enum tls_verify verify;   /* with client_ca: optional or required */
    long session_cache;       /* sessions in the server cache; -1 = default (20480), 0 = off */
    int session_tickets;      /* 1 = on */
    int ticket_rotation_s;    /* 0 = 3600 */
    const char *session_id;   /* session id context (the listener's address) */
    unsigned char alpn[16];   /* protocols offered, ALPN wire format, our preference first */
    size_t alpn_len;          /* 0 = "http/1.1" only */
};

/* Parse "TLSv1", "TLSv1.0" ... "TLSv1.3" into an OpenSSL version, or 0. */
int tls_version_parse(const char *name);

/* Start a server: checks the ciphers (message in why, naming the option)
 * and the client CA. Returns NULL with why set. */
struct tls_server *tls_server_new(const struct tls_server_opts *o, char *why, size_t whylen);
/* Add a certificate chain and its key (PEM files). Returns 0, or -1 with
 * why set and *which = 0 (the cert file is at fault) or 1 (the key). A
 * certificate that has expired or is not valid yet is accepted with a
 * message in warn (warn[0] stays 0 otherwise). */
int tls_server_add_cert(struct tls_server *s, const char *cert, const char *key, char *why,
                        size_t whylen, int *which, char *warn, size_t warnlen);
/* Build the contexts once every certificate is in. Returns 0 or -1. */
int tls_server_finish(struct tls_server *s, char *why, size_t whylen);
/* Drop the configuration's reference: the contexts and certificates go
 * when the last connection made from them closes (tls_close). */
void tls_server_free(struct tls_server *s);

/* A new server-side SSL for an accepted socket, or NULL. */
SSL *tls_server_conn(const struct tls_server *s, int fd);

/* Does a certificate name (exact, or "*.example.com" for one label)
 * match host (lowercase, no trailing dot)? Pure. */
int tls_name_match(const char *pattern, const char *host, size_t hostlen);

/* ---- upstreams ---------------------------------------------------------- */

struct tls_client_opts {
    int verify;             /* verify the chain and the name (default on) */
    const char *ca;         /* PEM bundle; NULL = the system's */
    const char *sni;        /* server name sent and verified; NULL = none */
    const char *cert, *key; /* client certificate for mutual TLS, or NULL */
    int h2;                 /* offer ALPN "h2" (and only it) instead of "http/1.1" */
};

/* Returns NULL with why set (*which: 0 = ca, 1 = cert, 2 = key). */
struct tls_client *tls_client_new(const struct tls_client_opts *o, char *why, size_t whylen,
                                  int *which);
void tls_client_free(struct tls_client *c);
/* A client SSL for a connected socket; ip_name is the endpoint's address
 * text, verified against the certificate when no sni was configured.
 * *session is the caller's resumption slot (one per pool, one thread):
 * offered when set, replaced by each new session the server issues. The
 * slot must outlive the SSL; free it with tls_session_free. */
SSL *tls_client_conn(const struct tls_client *c, int fd, const char *ip_name, void **session);
void tls_session_free(void **session);

/* ---- per connection ----------------------------------------------------- */

/* Drive the handshake. Returns 1 when done, or TLS_WANT_*, or TLS_FATAL. */
int tls_handshake(SSL *ssl);
/* Read up to n bytes. Returns > 0, 0 at the peer's end (close_notify or
 * TCP EOF), or TLS_WANT_* / TLS_FATAL. */
ssize_t tls_read(SSL *ssl, void *buf, size_t n);
/* Write the iovecs in order, one record at a time, until all are written
 * or the socket is full. Returns the bytes written (maybe 0) and sets
 * *stop to 0 when everything went, else to TLS_WANT_* / TLS_FATAL.
 * Contract (OpenSSL's retry rule): after a short write the caller calls
 * again with the same bytes first; more may follow. */
ssize_t tls_writev(SSL *ssl, const struct iovec *iov, int n, int *stop);
/* Are bytes (decrypted, or read from the socket and not yet decrypted)
 * waiting inside the SSL object? */
int tls_pending(SSL *ssl);
/* Nothing waits inside the SSL object and the last read from the socket
 * came back short: like a short read() on a plain socket, the next bytes
 * will bring an edge, so the caller may stop reading until then. */
int tls_drained(SSL *ssl);
/* Send close_notify (best effort, never waits) and free; every SSL from
 * tls_server_conn / tls_client_conn must end here. */
void tls_close(SSL *ssl);
/* Send close_notify (best effort, never waits) and keep the session for
 * reading: one direction of a tunnel is done (tunnel.c). */
void tls_shutdown_write(SSL *ssl);
/* Did the handshake fail because the peer spoke plain HTTP? */
int tls_peer_sent_http(void);
/* The reason of the last failure on this thread (for logs), or "". */
const char *tls_last_error(SSL *ssl);

/* Protocol version and cipher names (static strings). */
const char *tls_conn_version(SSL *ssl);
/* 1 when ALPN chose "h2" in the finished handshake. */
int tls_conn_is_h2(SSL *ssl);
/* 1 when the finished handshake resumed a session. */
int tls_session_reused(SSL *ssl);
const char *tls_conn_cipher(SSL *ssl);
/* The verified client certificate's subject (RFC 2253) and SHA-256
 * fingerprint (64 lowercase hex digits), malloc'd; 0, or -1 when there is
 * no verified certificate. */
int tls_conn_client_cert(SSL *ssl, char **subject, char **fingerprint);

#endif
