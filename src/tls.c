/* TLS contexts and the per-connection I/O shim (see tls.h).
 *
 * A listener's certificates are grouped by the names they cover: entries
 * with the same SAN set (an RSA and an ECDSA certificate for the same
 * names) share one SSL_CTX, and OpenSSL picks the one the client's
 * signature algorithms allow. The servername callback moves a connection
 * to the group whose names match (exact names first, then wildcards); a
 * client without SNI, or with a name nothing matches, gets the first
 * group. */
#include "tls.h"
#include "log.h"

#include <errno.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Mozilla's "intermediate" list for TLS 1.2 (ECDHE only: no DH
 * parameters to manage). */
#define DEFAULT_CIPHERS                                                                        \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:" \
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
/* Added when min_version is below TLS 1.2, unless "ciphers" is given. */
#define LEGACY_CIPHERS \
    "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA"
#define DEFAULT_SESSION_CACHE     20480
#define DEFAULT_TICKET_ROTATION_S 3600
/* One record's worth: the most a single SSL_write puts in one record. */
#define TLS_CHUNK 16384

struct tls_cert {
    X509 *x509;
    EVP_PKEY *key;
    STACK_OF(X509) * chain;
    char **names; /* lowercase SAN DNS names (or the CN) */
    size_t nnames;
    int key_type;
    size_t group;
};

struct tls_server {
    int refs; /* the configuration's, plus one per connection (atomic) */
    int min_version;
    char *ciphers, *ciphersuites, *client_ca, *sid;
    enum tls_verify verify;
    long session_cache;
    int session_tickets;
    int ticket_rotation_s;
    struct tls_cert *certs;
    size_t ncerts;
    SSL_CTX **groups; /* one context per name group; [0] is the default */
    size_t ngroups;
    unsigned char alpn[16]; /* offered protocols, wire format, our preference first */
    unsigned alpn_len;
};

struct tls_client {
    SSL_CTX *ctx;
    int verify;
    char *sni;
};

/* The socket BIO: OpenSSL's socket BIO, plus one fact the core needs
 * to read like it does without TLS: did the last read() from the socket
 * come back short (the socket is drained, and new bytes will bring a new
 * edge)? Then a connection need not be read again until that edge. */
struct sock_bio {
    int fd;
    int drained;
};

static BIO_METHOD *sock_method;
static pthread_once_t sock_once = PTHREAD_ONCE_INIT;

static int sock_read(BIO *b, char *buf, int len)
{
    struct sock_bio *d = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    ssize_t n = read(d->fd, buf, (size_t)len);
    if (n < 0) {
        d->drained = errno == EAGAIN || errno == EWOULDBLOCK;
        if (d->drained || errno == EINTR)
            BIO_set_retry_read(b);
        return -1;
    }
    d->drained = n < len;
    return (int)n;
}

static int sock_write(BIO *b, const char *buf, int len)
{
    struct sock_bio *d = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    ssize_t n = send(d->fd, buf, (size_t)len, MSG_NOSIGNAL);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        BIO_set_retry_write(b);
    return (int)n;
}

static long sock_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    (void)num, (void)ptr;
    struct sock_bio *d = BIO_get_data(b);
    switch (cmd) {
    case BIO_CTRL_FLUSH:
        return 1;
    case BIO_C_GET_FD:
        return d ? d->fd : -1;
    default:
        return 0;
    }
}

static int sock_destroy(BIO *b)
{
    free(BIO_get_data(b));
    BIO_set_data(b, NULL);
    return 1;
}

static void sock_method_init(void)
{
    sock_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "portico socket");
    if (!sock_method)
        die("BIO_meth_new failed");
    BIO_meth_set_read(sock_method, sock_read);
    BIO_meth_set_write(sock_method, sock_write);
    BIO_meth_set_ctrl(sock_method, sock_ctrl);
    BIO_meth_set_destroy(sock_method, sock_destroy);
}

/* Attach fd to ssl through the socket BIO. Returns 0 or -1. */
static int attach_fd(SSL *ssl, int fd)
{
    pthread_once(&sock_once, sock_method_init);
    BIO *b = BIO_new(sock_method);
    if (!b)
        return -1;
    struct sock_bio *d = xcalloc(1, sizeof(*d));
    d->fd = fd;
    BIO_set_data(b, d);
    BIO_set_init(b, 1);
    SSL_set_bio(ssl, b, b); /* one reference, for both directions */
    return 0;
}

static __thread char last_error[256];
static __thread int last_http;

/* ---- errors ------------------------------------------------------------- */

/* The first queued OpenSSL reason (file and key contents never appear in
 * these), cleared from the queue. */
static void openssl_reason(char *out, size_t n, const char *fallback)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    snprintf(out, n, "%s", r ? r : fallback);
    ERR_clear_error();
}

const char *tls_last_error(SSL *ssl)
{
    (void)ssl;
    return last_error;
}

int tls_peer_sent_http(void)
{
    return last_http;
}

static int no_passphrase(char *buf, int size, int rw, void *u)
{
    (void)buf, (void)size, (void)rw, (void)u;
    return 0; /* encrypted keys are refused rather than prompted for */
}

/* ---- names -------------------------------------------------------------- */

int tls_name_match(const char *pattern, const char *host, size_t hostlen)
{
    size_t plen = strlen(pattern);
    if (plen > 2 && pattern[0] == '*' && pattern[1] == '.') {
        /* "*.example.com" covers exactly one label in front of the suffix. */
        size_t slen = plen - 1; /* ".example.com" */
        if (hostlen <= slen || memcmp(host + hostlen - slen, pattern + 1, slen) != 0)
            return 0;
        size_t label = hostlen - slen;
        return memchr(host, '.', label) == NULL;
    }
    return plen == hostlen && memcmp(pattern, host, hostlen) == 0;
}

static void add_name(struct tls_cert *c, const char *s, size_t n)
{
    if (n == 0 || memchr(s, '\0', n))
        return;
    char *p = xstrndup(s, n);
    for (size_t i = 0; i < n; i++)
        if (p[i] >= 'A' && p[i] <= 'Z')
            p[i] = (char)(p[i] + 32);
    c->names = xrealloc(c->names, (c->nnames + 1) * sizeof(char *));
    c->names[c->nnames++] = p;
}

static void cert_names(struct tls_cert *c)
{
    GENERAL_NAMES *gens = X509_get_ext_d2i(c->x509, NID_subject_alt_name, NULL, NULL);
    for (int i = 0; gens && i < sk_GENERAL_NAME_num(gens); i++) {
        const GENERAL_NAME *g = sk_GENERAL_NAME_value(gens, i);
        if (g->type == GEN_DNS)
            add_name(c, (const char *)ASN1_STRING_get0_data(g->d.dNSName),
                     (size_t)ASN1_STRING_length(g->d.dNSName));
    }
    GENERAL_NAMES_free(gens);
    if (c->nnames)
        return;
    /* No DNS SAN: the subject's CN, as clients did before SANs. */
    X509_NAME *subj = X509_get_subject_name(c->x509);
    int idx = X509_NAME_get_index_by_NID(subj, NID_commonName, -1);
    if (idx >= 0) {
        ASN1_STRING *d = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subj, idx));
        add_name(c, (const char *)ASN1_STRING_get0_data(d), (size_t)ASN1_STRING_length(d));
    }
}

static int same_names(const struct tls_cert *a, const struct tls_cert *b)
{
    if (a->nnames != b->nnames)
        return 0;
    for (size_t i = 0; i < a->nnames; i++) {
        size_t k = 0;
        while (k < b->nnames && strcmp(a->names[i], b->names[k]) != 0)
            k++;
        if (k == b->nnames)
            return 0;
    }
    return 1;
}

/* ---- session tickets ---------------------------------------------------- */

static unsigned char ticket_master[32];
static pthread_once_t ticket_once = PTHREAD_ONCE_INIT;

static void ticket_master_init(void)
{
    if (RAND_bytes(ticket_master, sizeof(ticket_master)) != 1)
        die("cannot get random bytes for the session ticket keys");
}

/* Key material of a rotation period: name (16 bytes), AES key and HMAC
 * key (32 bytes each), derived with HMAC-SHA256 from the process secret. */
static void ticket_keys(uint64_t period, unsigned char name[16], unsigned char aes[32],
                        unsigned char mac[32])
{
    unsigned char msg[9], out[EVP_MAX_MD_SIZE];
    unsigned int len;
    for (int i = 0; i < 8; i++)
        msg[1 + i] = (unsigned char)(period >> (56 - 8 * i));
    msg[0] = 'n';
    HMAC(EVP_sha256(), ticket_master, sizeof(ticket_master), msg, sizeof(msg), out, &len);
    memcpy(name, out, 16);
    msg[0] = 'a';
    HMAC(EVP_sha256(), ticket_master, sizeof(ticket_master), msg, sizeof(msg), aes, &len);
    msg[0] = 'h';
    HMAC(EVP_sha256(), ticket_master, sizeof(ticket_master), msg, sizeof(msg), mac, &len);
    OPENSSL_cleanse(out, sizeof(out));
}

/* Each worker thread keeps the keys of the last two periods it used: three
 * HMACs per ticket were 7% of a full handshake's CPU. */
struct ticket_key_cache {
    uint64_t period;
    int valid;
    unsigned char name[16], aes[32], mac[32];
};
static __thread struct ticket_key_cache ticket_cache[2];

static const struct ticket_key_cache *ticket_keys_cached(uint64_t period)
{
    for (int i = 0; i < 2; i++)
        if (ticket_cache[i].valid && ticket_cache[i].period == period)
            return &ticket_cache[i];
    /* replace the older of the two */
    struct ticket_key_cache *k = &ticket_cache[0];
    if (ticket_cache[0].valid && (!ticket_cache[1].valid || ticket_cache[1].period < ticket_cache[0].period))
        k = &ticket_cache[1];
    ticket_keys(period, k->name, k->aes, k->mac);
    k->period = period;
    k->valid = 1;
    return k;
}

static int on_ticket_key(SSL *ssl, unsigned char key_name[16], unsigned char *iv,
                         EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx, int enc)
{
    const struct tls_server *s = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    uint64_t period = (uint64_t)time(NULL) / (uint64_t)s->ticket_rotation_s;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
        OSSL_PARAM_construct_end(),
    };
    int rc = 0;
    if (enc) {
        const struct ticket_key_cache *k = ticket_keys_cached(period);
        memcpy(key_name, k->name, 16);
        if (RAND_bytes(iv, EVP_CIPHER_get_iv_length(EVP_aes_256_cbc())) == 1 &&
            EVP_EncryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k->aes, iv) == 1 &&
            EVP_MAC_init(hctx, k->mac, sizeof(k->mac), params) == 1)
            rc = 1;
        else
            rc = -1;
    } else {
        /* This period's key, or the previous one's (then ask for a renewal). */
        for (uint64_t back = 0; back < 2 && back <= period; back++) {
            const struct ticket_key_cache *k = ticket_keys_cached(period - back);
            if (memcmp(key_name, k->name, 16) != 0)
                continue;
            /* 2 asks OpenSSL for a new ticket. TLS 1.3 clients (OpenSSL's,
             * browsers) use a ticket once: without a fresh one after each
             * resumption, every other connection was a full handshake. */
            if (EVP_DecryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k->aes, iv) == 1 &&
                EVP_MAC_init(hctx, k->mac, sizeof(k->mac), params) == 1)
                rc = back || SSL_version(ssl) >= TLS1_3_VERSION ? 2 : 1;
            else
                rc = -1;
            break;
        }
    }
    return rc;
}

/* ---- server callbacks --------------------------------------------------- */

/* Our preference wins: the first protocol of ours the client also offers. */
static int on_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                   const unsigned char *in, unsigned int inlen, void *arg)
{
    const struct tls_server *s = arg;
    unsigned char *sel;
    (void)ssl;
    if (SSL_select_next_proto(&sel, outlen, s->alpn, s->alpn_len, in, inlen) !=
        OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_ALERT_FATAL; /* RFC 7301: no protocol in common */
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

static int on_servername(SSL *ssl, int *alert, void *arg)
{
    const struct tls_server *s = arg;
    (void)alert;
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (!name || s->ngroups < 2)
        return SSL_TLSEXT_ERR_OK;
    char host[256];
    size_t n = strlen(name);
    if (n >= sizeof(host))
        return SSL_TLSEXT_ERR_OK;
    for (size_t i = 0; i < n; i++)
        host[i] = (name[i] >= 'A' && name[i] <= 'Z') ? (char)(name[i] + 32) : name[i];
    if (n && host[n - 1] == '.')
        n--;
    host[n] = '\0';
    size_t found = SIZE_MAX;
    for (int wild = 0; wild < 2 && found == SIZE_MAX; wild++)
        for (size_t i = 0; i < s->ncerts && found == SIZE_MAX; i++)
            for (size_t k = 0; k < s->certs[i].nnames; k++) {
                const char *p = s->certs[i].names[k];
                if ((p[0] == '*') == wild && tls_name_match(p, host, n)) {
                    found = s->certs[i].group;
                    break;
                }
            }
    if (found != SIZE_MAX && found != 0)
        SSL_set_SSL_CTX(ssl, s->groups[found]);
    return SSL_TLSEXT_ERR_OK;
}

/* Optional client certificates: the handshake goes on whatever the
 * verification says; tls_conn_client_cert reports only verified ones. */
static int on_verify_optional(int ok, X509_STORE_CTX *x)
{
    (void)ok, (void)x;
    return 1;
}

/* ---- server setup ------------------------------------------------------- */

int tls_version_parse(const char *name)
{
    static const struct {
        const char *name;
        int v;
    } vs[] = { { "TLSv1", TLS1_VERSION },
               { "TLSv1.0", TLS1_VERSION },
               { "TLSv1.1", TLS1_1_VERSION },
               { "TLSv1.2", TLS1_2_VERSION },
               { "TLSv1.3", TLS1_3_VERSION } };
    for (size_t i = 0; i < sizeof(vs) / sizeof(vs[0]); i++)
        if (strcmp(name, vs[i].name) == 0)
            return vs[i].v;
    return 0;
}

/* Settings every context of a server shares. Returns 0 or -1 (why set). */
static int ctx_common(const struct tls_server *s, SSL_CTX *ctx, char *why, size_t whylen)
{
    SSL_CTX_set_app_data(ctx, (void *)s);
    if (s->min_version < TLS1_2_VERSION)
        SSL_CTX_set_security_level(ctx, 0); /* OpenSSL 3 refuses TLS < 1.2 above level 0 */
    SSL_CTX_set_min_proto_version(ctx, s->min_version);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION |
                                 SSL_OP_IGNORE_UNEXPECTED_EOF |
                                 (s->session_tickets ? 0 : SSL_OP_NO_TICKET));
    /* NO_AUTO_CHAIN: send the chain given in the file; building one from
     * the trust store on every handshake costs more than the handshake. */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE |
                              SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_NO_AUTO_CHAIN);
    /* Read what the socket has in one call, not header then body. */
    SSL_CTX_set_read_ahead(ctx, 1);
    char list[1024];
    /* TLS 1.0 and 1.1 have no AEAD ciphers: asking for them brings the
     * CBC ones, and OpenSSL 3 allows those versions only at level 0. */
    snprintf(list, sizeof(list), "%s%s",
             s->ciphers                        ? s->ciphers
             : s->min_version < TLS1_2_VERSION ? DEFAULT_CIPHERS ":" LEGACY_CIPHERS
                                               : DEFAULT_CIPHERS,
             s->min_version < TLS1_2_VERSION ? ":@SECLEVEL=0" : "");
    if (SSL_CTX_set_cipher_list(ctx, list) != 1) {
        snprintf(why, whylen, "ciphers: no cipher in the list is known or allowed");
        ERR_clear_error();
        return -1;
    }
    if (s->ciphersuites && SSL_CTX_set_ciphersuites(ctx, s->ciphersuites) != 1) {
        snprintf(why, whylen, "ciphersuites: not a valid TLS 1.3 cipher suite list");
        ERR_clear_error();
        return -1;
    }
    SSL_CTX_set_alpn_select_cb(ctx, on_alpn, (void *)s);
    SSL_CTX_set_tlsext_servername_callback(ctx, on_servername);
    SSL_CTX_set_tlsext_servername_arg(ctx, (void *)s);
    SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, on_ticket_key);
    SSL_CTX_set_num_tickets(ctx, s->session_tickets ? 1 : 0);
    SSL_CTX_set_timeout(ctx, s->ticket_rotation_s);
    if (s->session_cache == 0) {
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    } else {
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
        SSL_CTX_sess_set_cache_size(ctx, s->session_cache);
    }
    SSL_CTX_set_session_id_context(ctx, (const unsigned char *)s->sid, (unsigned)strlen(s->sid));
    if (s->client_ca) {
        if (SSL_CTX_load_verify_locations(ctx, s->client_ca, NULL) != 1) {
            snprintf(why, whylen, "client_ca: cannot load %s", s->client_ca);
            openssl_reason(why + strlen(why), whylen - strlen(why), "");
            return -1;
        }
        STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(s->client_ca);
        if (names)
            SSL_CTX_set_client_CA_list(ctx, names);
        if (s->verify == TLS_VERIFY_REQUIRED)
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
        else
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, on_verify_optional);
    }
    return 0;
}

struct tls_server *tls_server_new(const struct tls_server_opts *o, char *why, size_t whylen)
{
    pthread_once(&ticket_once, ticket_master_init);
    struct tls_server *s = xcalloc(1, sizeof(*s));
    s->refs = 1;
    s->min_version = o->min_version ? o->min_version : TLS1_2_VERSION;
    s->ciphers = o->ciphers ? xstrdup(o->ciphers) : NULL;
    s->ciphersuites = o->ciphersuites ? xstrdup(o->ciphersuites) : NULL;
    s->client_ca = o->client_ca ? xstrdup(o->client_ca) : NULL;
    s->verify = o->verify;
    s->session_cache = o->session_cache < 0 ? DEFAULT_SESSION_CACHE : o->session_cache;
    s->session_tickets = o->session_tickets;
    s->ticket_rotation_s =
        o->ticket_rotation_s > 0 ? o->ticket_rotation_s : DEFAULT_TICKET_ROTATION_S;
    /* SSL_MAX_SID_CTX_LENGTH is 32: keep the tail, where the port is. */
    if (o->alpn_len && o->alpn_len <= sizeof(s->alpn)) {
        memcpy(s->alpn, o->alpn, o->alpn_len);
        s->alpn_len = (unsigned)o->alpn_len;
    } else {
        memcpy(s->alpn, "\x08http/1.1", 9);
        s->alpn_len = 9;
    }
    const char *sid = o->session_id ? o->session_id : "portico";
    size_t sl = strlen(sid);
    s->sid = xstrdup(sl > 32 ? sid + sl - 32 : sid);
    if (s->client_ca) {
        FILE *f = fopen(s->client_ca, "r");
        if (!f) {
            snprintf(why, whylen, "client_ca: cannot open %s: %s", s->client_ca, strerror(errno));
            tls_server_free(s);
            return NULL;
        }
        fclose(f);
    }
    /* Check the option strings now, on a scratch context. */
    SSL_CTX *probe = SSL_CTX_new(TLS_server_method());
    if (!probe)
        die("SSL_CTX_new failed");
    int rc = ctx_common(s, probe, why, whylen);
    SSL_CTX_free(probe);
    if (rc < 0) {
        tls_server_free(s);
        return NULL;
    }
    return s;
}

static int read_file_error(const char *what, const char *path, char *why, size_t whylen)
{
    snprintf(why, whylen, "cannot open %s %s: %s", what, path, strerror(errno));
    return -1;
}

int tls_server_add_cert(struct tls_server *s, const char *cert, const char *key, char *why,
                        size_t whylen, int *which, char *warn, size_t warnlen)
{
    struct tls_cert c = { 0 };
    warn[0] = '\0';
    *which = 0;
    FILE *f = fopen(cert, "r");
    if (!f)
        return read_file_error("certificate", cert, why, whylen);
    c.x509 = PEM_read_X509_AUX(f, NULL, no_passphrase, NULL);
    if (c.x509) {
        c.chain = sk_X509_new_null();
        X509 *x;
        while ((x = PEM_read_X509(f, NULL, no_passphrase, NULL)))
            sk_X509_push(c.chain, x);
    }
    fclose(f);
    ERR_clear_error();
    if (!c.x509) {
        snprintf(why, whylen, "no PEM certificate in %s", cert);
        return -1;
    }
    *which = 1;
    f = fopen(key, "r");
    if (!f) {
        read_file_error("key", key, why, whylen);
        goto fail;
    }
    c.key = PEM_read_PrivateKey(f, NULL, no_passphrase, NULL);
    fclose(f);
    ERR_clear_error();
    if (!c.key) {
        snprintf(why, whylen, "no PEM private key in %s (encrypted keys are not supported)", key);
        goto fail;
    }
    if (X509_check_private_key(c.x509, c.key) != 1) {
        ERR_clear_error();
        snprintf(why, whylen, "the key in %s does not match the certificate in %s", key, cert);
        goto fail;
    }
    if (X509_cmp_current_time(X509_get0_notAfter(c.x509)) < 0)
        snprintf(warn, warnlen, "the certificate in %s has expired", cert);
    else if (X509_cmp_current_time(X509_get0_notBefore(c.x509)) > 0)
        snprintf(warn, warnlen, "the certificate in %s is not valid yet", cert);
    c.key_type = EVP_PKEY_get_base_id(c.key);
    cert_names(&c);
    /* Same names as an earlier entry: same group, if the key type differs. */
    c.group = SIZE_MAX;
    for (size_t i = 0; i < s->ncerts; i++) {
        if (!same_names(&s->certs[i], &c))
            continue;
        if (s->certs[i].key_type == c.key_type) {
            *which = 0;
            snprintf(why, whylen, "the same names and key type as certificates[%zu]", i);
            goto fail;
        }
        c.group = s->certs[i].group;
    }
    if (c.group == SIZE_MAX)
        c.group = s->ngroups++;
    s->certs = xrealloc(s->certs, (s->ncerts + 1) * sizeof(*s->certs));
    s->certs[s->ncerts++] = c;
    return 0;
fail:
    X509_free(c.x509);
    EVP_PKEY_free(c.key);
    sk_X509_pop_free(c.chain, X509_free);
    for (size_t i = 0; i < c.nnames; i++)
        free(c.names[i]);
    free(c.names);
    return -1;
}

int tls_server_finish(struct tls_server *s, char *why, size_t whylen)
{
    s->groups = xcalloc(s->ngroups ? s->ngroups : 1, sizeof(SSL_CTX *));
    for (size_t g = 0; g < s->ngroups; g++) {
        s->groups[g] = SSL_CTX_new(TLS_server_method());
        if (!s->groups[g])
            die("SSL_CTX_new failed");
        if (ctx_common(s, s->groups[g], why, whylen) < 0)
            return -1;
    }
    for (size_t i = 0; i < s->ncerts; i++) {
        struct tls_cert *c = &s->certs[i];
        if (SSL_CTX_use_cert_and_key(s->groups[c->group], c->x509, c->key, c->chain, 1) != 1) {
            snprintf(why, whylen, "certificates[%zu]: ", i);
            openssl_reason(why + strlen(why), whylen - strlen(why), "cannot use this certificate");
            return -1;
        }
    }
    return 0;
}

/* The last reference is gone: no connection can call back into s. */
static void server_destroy(struct tls_server *s)
{
    for (size_t i = 0; i < s->ngroups && s->groups; i++)
        SSL_CTX_free(s->groups[i]);
    free(s->groups);
    for (size_t i = 0; i < s->ncerts; i++) {
        struct tls_cert *c = &s->certs[i];
        X509_free(c->x509);
        EVP_PKEY_free(c->key);
        sk_X509_pop_free(c->chain, X509_free);
        for (size_t k = 0; k < c->nnames; k++)
            free(c->names[k]);
        free(c->names);
    }
    free(s->certs);
    free(s->ciphers);
    free(s->ciphersuites);
    free(s->client_ca);
    free(s->sid);
    free(s);
}

static void server_unref(struct tls_server *s)
{
    if (__atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) == 0)
        server_destroy(s);
}

/* The configuration lets go; connections still in a handshake keep s
 * (SNI and ticket callbacks read it) until they close. */
void tls_server_free(struct tls_server *s)
{
    if (s)
        server_unref(s);
}

SSL *tls_server_conn(const struct tls_server *s, int fd)
{
    SSL *ssl = SSL_new(s->groups[0]);
    if (!ssl)
        return NULL;
    if (attach_fd(ssl, fd) < 0) {
        SSL_free(ssl);
        return NULL;
    }
    SSL_set_accept_state(ssl);
    __atomic_add_fetch(&((struct tls_server *)s)->refs, 1, __ATOMIC_RELAXED);
    return ssl;
}

/* ---- upstream clients --------------------------------------------------- */

/* A new session for a client connection: keep it in the pool's slot. */
static int on_client_session(SSL *ssl, SSL_SESSION *sess)
{
    void **slot = SSL_get_app_data(ssl);
    if (!slot || !SSL_SESSION_is_resumable(sess))
        return 0;
    if (*slot)
        SSL_SESSION_free(*slot);
    *slot = sess;
    return 1; /* we keep the reference */
}

struct tls_client *tls_client_new(const struct tls_client_opts *o, char *why, size_t whylen,
                                  int *which)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx)
        die("SSL_CTX_new failed");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION |
                                 SSL_OP_IGNORE_UNEXPECTED_EOF);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE |
                              SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_passwd_cb(ctx, no_passphrase);
    static const unsigned char alpn[] = "\x08http/1.1", alpn_h2[] = "\x02h2";
    if (o->h2)
        SSL_CTX_set_alpn_protos(ctx, alpn_h2, sizeof(alpn_h2) - 1);
    else
        SSL_CTX_set_alpn_protos(ctx, alpn, sizeof(alpn) - 1);
    *which = 0;
    if (o->ca) {
        FILE *f = fopen(o->ca, "r");
        if (!f) {
            read_file_error("CA bundle", o->ca, why, whylen);
            goto fail;
        }
        fclose(f);
        if (SSL_CTX_load_verify_locations(ctx, o->ca, NULL) != 1) {
            snprintf(why, whylen, "cannot load %s: ", o->ca);
            openssl_reason(why + strlen(why), whylen - strlen(why), "no certificate");
            goto fail;
        }
    } else if (o->verify) {
        SSL_CTX_set_default_verify_paths(ctx);
    }
    if (o->cert) {
        *which = 1;
        FILE *f = fopen(o->cert, "r");
        if (!f) {
            read_file_error("certificate", o->cert, why, whylen);
            goto fail;
        }
        fclose(f);
        if (SSL_CTX_use_certificate_chain_file(ctx, o->cert) != 1) {
            snprintf(why, whylen, "no PEM certificate in %s", o->cert);
            ERR_clear_error();
            goto fail;
        }
        *which = 2;
        f = fopen(o->key, "r");
        if (!f) {
            read_file_error("key", o->key, why, whylen);
            goto fail;
        }
        EVP_PKEY *pk = PEM_read_PrivateKey(f, NULL, no_passphrase, NULL);
        fclose(f);
        ERR_clear_error();
        if (!pk) {
            snprintf(why, whylen, "no PEM private key in %s (encrypted keys are not supported)",
                     o->key);
            goto fail;
        }
        int match = X509_check_private_key(SSL_CTX_get0_certificate(ctx), pk) == 1;
        if (!match || SSL_CTX_use_PrivateKey(ctx, pk) != 1) {
            snprintf(why, whylen, "the key in %s does not match the certificate in %s", o->key,
                     o->cert);
            ERR_clear_error();
            EVP_PKEY_free(pk);
            goto fail;
        }
        EVP_PKEY_free(pk);
    }
    SSL_CTX_set_verify(ctx, o->verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    /* Sessions live in each worker's pool (no shared cache, no lock). */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, on_client_session);
    struct tls_client *c = xcalloc(1, sizeof(*c));
    c->ctx = ctx;
    c->verify = o->verify;
    c->sni = o->sni ? xstrdup(o->sni) : NULL;
    return c;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

void tls_client_free(struct tls_client *c)
{
    if (!c)
        return;
    SSL_CTX_free(c->ctx);
    free(c->sni);
    free(c);
}

void tls_session_free(void **session)
{
    if (*session)
        SSL_SESSION_free(*session);
    *session = NULL;
}

SSL *tls_client_conn(const struct tls_client *c, int fd, const char *ip_name, void **session)
{
    SSL *ssl = SSL_new(c->ctx);
    if (!ssl)
        return NULL;
    if (attach_fd(ssl, fd) < 0)
        goto fail;
    SSL_set_app_data(ssl, session);
    if (session && *session)
        SSL_set_session(ssl, *session);
    if (c->sni) {
        if (SSL_set_tlsext_host_name(ssl, c->sni) != 1 ||
            (c->verify && SSL_set1_host(ssl, c->sni) != 1))
            goto fail;
    } else if (c->verify && ip_name) {
        /* "1.2.3.4:80" or "[::1]:80": verify the certificate names the IP. */
        char ip[64];
        const char *p = ip_name, *end;
        if (*p == '[') {
            p++;
            end = strchr(p, ']');
        } else {
            end = strrchr(p, ':');
        }
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n >= sizeof(ip))
            goto fail;
        memcpy(ip, p, n);
        ip[n] = '\0';
        if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), ip) != 1)
            goto fail;
    }
    SSL_set_connect_state(ssl);
    return ssl;
fail:
    ERR_clear_error();
    SSL_free(ssl);
    return NULL;
}

/* ---- I/O ---------------------------------------------------------------- */

/* Map a failed call's SSL_get_error to the shim's codes; note why. */
static int io_error(SSL *ssl, int rc)
{
    int e = SSL_get_error(ssl, rc);
    switch (e) {
    case SSL_ERROR_WANT_READ:
        return TLS_WANT_READ;
    case SSL_ERROR_WANT_WRITE:
        return TLS_WANT_WRITE;
    case SSL_ERROR_ZERO_RETURN:
        return 0;
    case SSL_ERROR_SYSCALL:
        if (ERR_peek_error() == 0) {
            snprintf(last_error, sizeof(last_error), "%s",
                     errno ? strerror(errno) : "connection closed");
            ERR_clear_error();
            return errno ? TLS_FATAL : 0;
        }
        /* fall through */
    default: {
        long v = SSL_get_verify_result(ssl);
        unsigned long err = ERR_peek_last_error();
        if (v != X509_V_OK && ERR_GET_REASON(err) == SSL_R_CERTIFICATE_VERIFY_FAILED)
            snprintf(last_error, sizeof(last_error), "certificate verify failed: %s",
                     X509_verify_cert_error_string(v));
        else
            openssl_reason(last_error, sizeof(last_error), "TLS error");
        ERR_clear_error();
        SSL_set_quiet_shutdown(ssl, 1);
        return TLS_FATAL;
    }
    }
}

int tls_handshake(SSL *ssl)
{
    ERR_clear_error();
    errno = 0;
    last_http = 0;
    int rc = SSL_do_handshake(ssl);
    if (rc == 1)
        return 1;
    unsigned long e = ERR_peek_error();
    if (e && ERR_GET_LIB(e) == ERR_LIB_SSL &&
        (ERR_GET_REASON(e) == SSL_R_HTTP_REQUEST || ERR_GET_REASON(e) == SSL_R_HTTPS_PROXY_REQUEST))
        last_http = 1;
    rc = io_error(ssl, rc);
    if (rc == 0) {
        snprintf(last_error, sizeof(last_error), "connection closed during the handshake");
        rc = TLS_FATAL;
    }
    return rc;
}

ssize_t tls_read(SSL *ssl, void *buf, size_t n)
{
    size_t got = 0;
    ERR_clear_error();
    errno = 0;
    if (SSL_read_ex(ssl, buf, n, &got) == 1)
        return (ssize_t)got;
    return io_error(ssl, 0);
}

ssize_t tls_writev(SSL *ssl, const struct iovec *iov, int n, int *stop)
{
    static __thread unsigned char scratch[TLS_CHUNK];
    size_t done = 0, off = 0;
    int i = 0;
    *stop = 0;
    for (;;) {
        while (i < n && off == iov[i].iov_len) {
            i++;
            off = 0;
        }
        if (i == n)
            return (ssize_t)done;
        /* Always offer min(what is left, TLS_CHUNK) bytes from the front:
         * the data only grows between calls, so a retry after a short
         * write offers the same bytes or more, as OpenSSL requires. */
        const unsigned char *p = (const unsigned char *)iov[i].iov_base + off;
        size_t len = iov[i].iov_len - off;
        if (len < TLS_CHUNK && i + 1 < n) {
            size_t fill = 0, k = (size_t)i, o = off;
            while (k < (size_t)n && fill < TLS_CHUNK) {
                size_t take = iov[k].iov_len - o;
                if (take > TLS_CHUNK - fill)
                    take = TLS_CHUNK - fill;
                memcpy(scratch + fill, (const unsigned char *)iov[k].iov_base + o, take);
                fill += take;
                k++;
                o = 0;
            }
            p = scratch;
            len = fill;
        } else if (len > TLS_CHUNK) {
            len = TLS_CHUNK;
        }
        size_t w = 0;
        ERR_clear_error();
        errno = 0;
        if (SSL_write_ex(ssl, p, len, &w) != 1) {
            int rc = io_error(ssl, 0);
            *stop = rc == 0 ? TLS_FATAL : rc;
            return (ssize_t)done;
        }
        done += w;
        while (w) {
            size_t take = iov[i].iov_len - off;
            if (take > w)
                take = w;
            off += take;
            w -= take;
            if (off == iov[i].iov_len && w) {
                i++;
                off = 0;
            }
        }
    }
}

int tls_drained(SSL *ssl)
{
    const struct sock_bio *d = BIO_get_data(SSL_get_rbio(ssl));
    return d && d->drained && !SSL_has_pending(ssl);
}

int tls_pending(SSL *ssl)
{
    return SSL_has_pending(ssl);
}

void tls_close(SSL *ssl)
{
    if (!ssl)
        return;
    if (SSL_is_init_finished(ssl) && !(SSL_get_shutdown(ssl) & SSL_SENT_SHUTDOWN)) {
        ERR_clear_error();
        SSL_shutdown(ssl);
        ERR_clear_error();
    }
    /* A server connection holds a reference on its listener's server. */
    struct tls_server *s = SSL_is_server(ssl) ? SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl)) : NULL;
    SSL_free(ssl);
    if (s)
        server_unref(s);
}

void tls_shutdown_write(SSL *ssl)
{
    if (SSL_is_init_finished(ssl) && !(SSL_get_shutdown(ssl) & SSL_SENT_SHUTDOWN)) {
        ERR_clear_error();
        SSL_shutdown(ssl);
        ERR_clear_error();
    }
}

int tls_conn_is_h2(SSL *ssl)
{
    const unsigned char *p;
    unsigned int n;
    SSL_get0_alpn_selected(ssl, &p, &n);
    return n == 2 && p[0] == 'h' && p[1] == '2';
}

int tls_session_reused(SSL *ssl) { return SSL_session_reused(ssl); }


const char *tls_conn_version(SSL *ssl)
{
    return SSL_get_version(ssl);
}

const char *tls_conn_cipher(SSL *ssl)
{
    const char *n = SSL_get_cipher_name(ssl);
    return n ? n : "";
}

int tls_conn_client_cert(SSL *ssl, char **subject, char **fingerprint)
{
    X509 *peer = SSL_get0_peer_certificate(ssl);
    if (!peer || SSL_get_verify_result(ssl) != X509_V_OK)
        return -1;
    BIO *b = BIO_new(BIO_s_mem());
    X509_NAME_print_ex(b, X509_get_subject_name(peer), 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB);
    char *data;
    long n = BIO_get_mem_data(b, &data);
    /* A subject goes into a header: no control bytes. */
    char *s = xstrndup(data, n > 0 ? (size_t)n : 0);
    for (char *p = s; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
    BIO_free(b);
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (X509_digest(peer, EVP_sha256(), md, &mdlen) != 1) {
        free(s);
        ERR_clear_error();
        return -1;
    }
    char *hex = xmalloc(mdlen * 2 + 1);
    for (unsigned i = 0; i < mdlen; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    *subject = s;
    *fingerprint = hex;
    return 0;
}
