/* jwt_auth: authenticate requests with JSON Web Tokens (RFC 7519), as strictly
 * as RFC 8725 asks.
 *
 * Providers are named in the top-level "jwt_providers" section (parsed here,
 * global_key): an issuer, the accepted audiences and algorithms, a clock
 * leeway, and keys from one source: a shared secret, a PEM public key, a JWKS
 * file, a JWKS URI, or OpenID Connect discovery from the issuer. Every key is
 * turned into an OpenSSL EVP_PKEY once, when loaded. A route filter names one
 * provider or several; the token's "iss" picks among them.
 *
 * Verification does not trust the token: the algorithm must be one the
 * provider accepts AND one the key's type allows (a secret verifies only
 * HS*, an RSA key only RS*, an EC key only the ES* of its curve), so "none"
 * or an HS256 token signed with an RSA public key are refused whatever the
 * token says. Signatures are checked with OpenSSL directly (libjwt 1.10 takes
 * the algorithm from the token). The header and payload are parsed strictly
 * (canonical base64url, no duplicate keys, no "crit").
 *
 * Remote key sets (jwks_uri, discovery) are fetched by one thread per config
 * with its own event loop (evhttp, evdns, bufferevent_openssl), never on a
 * worker: at start, every jwks_refresh_s, and early when a token names an
 * unknown kid (at most once per jwks_min_refetch_s per provider, so a flood
 * of random kids cannot hammer the key server). A failed fetch keeps the last
 * good set. Workers read the current set through a refcounted pointer swapped
 * under a short mutex; no lock is held while a request is verified.
 *
 * Verified tokens are cached per worker thread (LRU keyed by SHA-256 of the
 * token, per provider); an entry dies at the token's exp and whenever the
 * provider's key set changes (each set has a unique generation).
 *
 * The file is long because the project's rule is one module, one file, one
 * exported symbol. Its sections, in order: algorithms, keys and base64url;
 * JWK to OpenSSL keys; token decoding and signatures; providers and their
 * key sets; claims; the cache; verification; the jwt_providers config; the
 * key fetcher; the route config; the hooks. Everything is static, so the
 * unit test and the fuzz target reach the parts by including this file. */
#include "module.h"
#include "log.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/dns.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <fcntl.h>
#include <math.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define JWT_MAX_TOKEN_DEFAULT 8192
#define JWT_MAX_TOKEN_LIMIT   65536
#define JWT_MAX_KEYS          64
#define JWT_CACHE_DEFAULT     1024
#define JWT_CACHE_LIMIT       1000000
#define JWT_KEY_FILE_MAX      (1u << 20)
#define JWT_CLAIM_NAME_MAX    64
#define JWT_RSA_MIN_BITS      2048
/* An entry for a token without exp (require_exp false) is kept this long. */
#define JWT_CACHE_NO_EXP_TTL 300

/* ---- algorithms and keys -------------------------------------------------- */

enum key_kind { KEY_HMAC, KEY_RSA, KEY_EC };

enum jwt_alg { HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384, ES512, ALG_COUNT };

static const struct alg_info {
    const char *name;
    enum key_kind kind;
    int md_bits;    /* SHA-2 size */
    int coord_size; /* ES*: bytes of r and of s */
    const char *curve;
} alg_table[ALG_COUNT] = {
    [HS256] = { "HS256", KEY_HMAC, 256, 0, NULL },
    [HS384] = { "HS384", KEY_HMAC, 384, 0, NULL },
    [HS512] = { "HS512", KEY_HMAC, 512, 0, NULL },
    [RS256] = { "RS256", KEY_RSA, 256, 0, NULL },
    [RS384] = { "RS384", KEY_RSA, 384, 0, NULL },
    [RS512] = { "RS512", KEY_RSA, 512, 0, NULL },
    [ES256] = { "ES256", KEY_EC, 256, 32, "prime256v1" },
    [ES384] = { "ES384", KEY_EC, 384, 48, "secp384r1" },
    [ES512] = { "ES512", KEY_EC, 512, 66, "secp521r1" },
};

#define ALG_BIT(a) (1u << (a))
#define ALGS_HMAC  (ALG_BIT(HS256) | ALG_BIT(HS384) | ALG_BIT(HS512))
#define ALGS_RSA   (ALG_BIT(RS256) | ALG_BIT(RS384) | ALG_BIT(RS512))
#define ALGS_EC    (ALG_BIT(ES256) | ALG_BIT(ES384) | ALG_BIT(ES512))

static int alg_find(const char *name)
{
    for (int a = 0; a < ALG_COUNT; a++)
        if (strcmp(alg_table[a].name, name) == 0)
            return a;
    return -1;
}

/* The SHA-2 digests, fetched once: OpenSSL 3 looks a legacy EVP_sha256()
 * up again at every EVP_DigestVerifyInit, a measurable part of a
 * verification. */
static EVP_MD *md_fetched[3];
static pthread_once_t md_once = PTHREAD_ONCE_INIT;

static void md_fetch(void)
{
    static const char *const names[3] = { "SHA256", "SHA384", "SHA512" };
    for (int i = 0; i < 3; i++)
        if (!(md_fetched[i] = EVP_MD_fetch(NULL, names[i], NULL)))
            die("jwt_auth: OpenSSL has no %s", names[i]);
}

static const EVP_MD *alg_md(int a)
{
    pthread_once(&md_once, md_fetch);
    return md_fetched[alg_table[a].md_bits == 256 ? 0 : alg_table[a].md_bits == 384 ? 1 : 2];
}

/* One verification key. alg_mask: the algorithms it may verify, already
 * narrowed to its type, its curve, its JWK "alg" and the provider's list. */
struct jwt_key {
    char *kid; /* NULL when the key has none */
    enum key_kind kind;
    unsigned alg_mask;
    EVP_PKEY *pkey;        /* RSA, EC */
    unsigned char *secret; /* HMAC */
    size_t secret_len;
};

/* A provider's keys, immutable once published. Shared by workers and the
 * fetcher through a reference count. gen is unique across all key sets of
 * the process, so a cache entry can tell the set it was verified with. */
struct jwt_keyset {
    int refs;
    uint64_t gen;
    size_t n;
    struct jwt_key *keys;
};

static uint64_t keyset_gen_counter;

static void key_clear(struct jwt_key *k)
{
    free(k->kid);
    EVP_PKEY_free(k->pkey);
    if (k->secret)
        OPENSSL_clear_free(k->secret, k->secret_len);
    memset(k, 0, sizeof(*k));
}

static struct jwt_keyset *keyset_new(void)
{
    struct jwt_keyset *ks = xcalloc(1, sizeof(*ks));
    ks->refs = 1;
    ks->gen = __atomic_add_fetch(&keyset_gen_counter, 1, __ATOMIC_RELAXED);
    ks->keys = xcalloc(JWT_MAX_KEYS, sizeof(*ks->keys));
    return ks;
}

static void keyset_unref(struct jwt_keyset *ks)
{
    if (!ks || __atomic_sub_fetch(&ks->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    for (size_t i = 0; i < ks->n; i++)
        key_clear(&ks->keys[i]);
    free(ks->keys);
    free(ks);
}

/* The algorithms an OpenSSL public key may verify, or 0 (with *why) for a
 * key type or size that is not accepted. */
static unsigned pkey_algs(EVP_PKEY *pk, const char **why)
{
    if (EVP_PKEY_is_a(pk, "RSA")) {
        if (EVP_PKEY_get_bits(pk) < JWT_RSA_MIN_BITS) {
            *why = "RSA keys must have at least 2048 bits (RFC 7518)";
            return 0;
        }
        return ALGS_RSA;
    }
    if (EVP_PKEY_is_a(pk, "EC")) {
        char group[64] = "";
        size_t glen = 0;
        if (EVP_PKEY_get_utf8_string_param(pk, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group),
                                           &glen) == 1)
            for (int a = ES256; a <= ES512; a++)
                if (strcmp(group, alg_table[a].curve) == 0)
                    return ALG_BIT(a);
        *why = "EC keys must be on P-256, P-384 or P-521";
        return 0;
    }
    *why = "only RSA and EC public keys are supported";
    return 0;
}

/* ---- base64url ---------------------------------------------------------- */

static int b64url_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

/* Decode unpadded base64url s[0..n) into out, which holds at least
 * n * 3 / 4 + 1 bytes. Returns the decoded length, or -1 for a character
 * outside the alphabet (padding included), a length of 4k+1, or set bits
 * after the last byte (a non-canonical encoding: two texts for one
 * signature would defeat the cache key and hide tampering). */
static long b64url_decode(const char *s, size_t n, unsigned char *out)
{
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    if (n % 4 == 1)
        return -1;
    for (size_t i = 0; i < n; i++) {
        int v = b64url_value((unsigned char)s[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    if (acc != 0)
        return -1;
    return (long)o;
}

/* A malloc'ed, NUL-terminated decoding of a base64url JWK member, or NULL. */
static unsigned char *b64url_member(json_t *jwk, const char *name, size_t *len)
{
    json_t *v = json_object_get(jwk, name);
    const char *s = json_string_value(v);
    if (!s || !*s)
        return NULL;
    size_t n = json_string_length(v);
    unsigned char *out = xmalloc(n * 3 / 4 + 2);
    long r = b64url_decode(s, n, out);
    if (r <= 0) {
        free(out);
        return NULL;
    }
    out[r] = '\0';
    *len = (size_t)r;
    return out;
}

/* ---- JWK -> EVP_PKEY -------------------------------------------------------- */

static EVP_PKEY *pkey_fromdata(const char *type, OSSL_PARAM_BLD *bld)
{
    EVP_PKEY *pk = NULL;
    OSSL_PARAM *params = OSSL_PARAM_BLD_to_param(bld);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, type, NULL);
    if (params && ctx && EVP_PKEY_fromdata_init(ctx) == 1 &&
        EVP_PKEY_fromdata(ctx, &pk, EVP_PKEY_PUBLIC_KEY, params) != 1)
        pk = NULL;
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    return pk;
}

static EVP_PKEY *jwk_rsa(json_t *jwk, const char **why)
{
    size_t nlen = 0, elen = 0;
    unsigned char *n = b64url_member(jwk, "n", &nlen), *e = b64url_member(jwk, "e", &elen);
    EVP_PKEY *pk = NULL;
    if (!n || !e || elen > 8) {
        *why = "an RSA key needs \"n\" and \"e\" in base64url";
    } else {
        BIGNUM *bn = BN_bin2bn(n, (int)nlen, NULL), *be = BN_bin2bn(e, (int)elen, NULL);
        OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
        if (bn && be && bld && OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn) &&
            OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, be))
            pk = pkey_fromdata("RSA", bld);
        if (!pk)
            *why = "not a valid RSA public key";
        OSSL_PARAM_BLD_free(bld);
        BN_free(bn);
        BN_free(be);
    }
    free(n);
    free(e);
    return pk;
}

static EVP_PKEY *jwk_ec(json_t *jwk, const char **why)
{
    static const struct {
        const char *crv, *group;
        size_t size;
    } curves[] = { { "P-256", "prime256v1", 32 },
                   { "P-384", "secp384r1", 48 },
                   { "P-521", "secp521r1", 66 } };
    const char *crv = json_string_value(json_object_get(jwk, "crv"));
    size_t c = 0, xlen = 0, ylen = 0;
    while (crv && c < 3 && strcmp(crv, curves[c].crv) != 0)
        c++;
    if (!crv || c == 3) {
        *why = "an EC key needs \"crv\" P-256, P-384 or P-521";
        return NULL;
    }
    unsigned char *x = b64url_member(jwk, "x", &xlen), *y = b64url_member(jwk, "y", &ylen);
    EVP_PKEY *pk = NULL;
    if (!x || !y || xlen != curves[c].size || ylen != curves[c].size) {
        *why = "an EC key needs \"x\" and \"y\" of the curve's size in base64url";
    } else {
        unsigned char pub[1 + 2 * 66];
        pub[0] = 0x04; /* uncompressed point */
        memcpy(pub + 1, x, xlen);
        memcpy(pub + 1 + xlen, y, ylen);
        OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
        if (bld &&
            OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, curves[c].group, 0) &&
            OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pub, 1 + 2 * xlen))
            pk = pkey_fromdata("EC", bld);
        OSSL_PARAM_BLD_free(bld);
        if (pk) { /* fromdata decodes the point; make sure it is on the curve */
            EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, pk, NULL);
            if (!ctx || EVP_PKEY_public_check(ctx) != 1) {
                EVP_PKEY_free(pk);
                pk = NULL;
            }
            EVP_PKEY_CTX_free(ctx);
        }
        if (!pk)
            *why = "not a valid EC public key (is the point on the curve?)";
    }
    free(x);
    free(y);
    return pk;
}

/* Fill k from one JWK. Returns 1 (usable), 0 (not for us: another key type,
 * an encryption key, or no algorithm left in common with allowed), or -1
 * (malformed: *why says how). */
static int jwk_load(json_t *jwk, unsigned allowed, struct jwt_key *k, const char **why)
{
    const char *kty = json_string_value(json_object_get(jwk, "kty"));
    json_t *use = json_object_get(jwk, "use"), *kid = json_object_get(jwk, "kid");
    json_t *alg = json_object_get(jwk, "alg"), *ops = json_object_get(jwk, "key_ops");
    memset(k, 0, sizeof(*k));
    if (!json_is_object(jwk) || !kty) {
        *why = "a JWK must be an object with \"kty\"";
        return -1;
    }
    if ((use && !json_is_string(use)) || (kid && !json_is_string(kid)) ||
        (alg && !json_is_string(alg)) || (ops && !json_is_array(ops))) {
        *why = "\"use\", \"kid\" and \"alg\" must be strings, \"key_ops\" a list";
        return -1;
    }
    if (use && strcmp(json_string_value(use), "sig") != 0)
        return 0;
    if (ops) {
        size_t i;
        json_t *op;
        int verify = 0;
        json_array_foreach (ops, i, op)
            verify |= json_is_string(op) && strcmp(json_string_value(op), "verify") == 0;
        if (!verify)
            return 0;
    }
    unsigned mask = allowed;
    if (alg) {
        int a = alg_find(json_string_value(alg));
        mask &= a < 0 ? 0 : ALG_BIT(a);
    }
    if (strcmp(kty, "RSA") == 0 || strcmp(kty, "EC") == 0) {
        int rsa = kty[0] == 'R';
        if (!(mask & (rsa ? ALGS_RSA : ALGS_EC)))
            return 0;
        k->pkey = rsa ? jwk_rsa(jwk, why) : jwk_ec(jwk, why);
        if (!k->pkey)
            return -1;
        k->kind = rsa ? KEY_RSA : KEY_EC;
        mask &= pkey_algs(k->pkey, why);
        if (!mask) {
            key_clear(k);
            return rsa ? -1 : 0;
        }
    } else if (strcmp(kty, "oct") == 0) {
        if (!(mask & ALGS_HMAC))
            return 0;
        k->secret = b64url_member(jwk, "k", &k->secret_len);
        if (!k->secret || k->secret_len < 32) {
            free(k->secret);
            k->secret = NULL;
            *why = "an oct key needs \"k\": at least 32 bytes in base64url";
            return -1;
        }
        k->kind = KEY_HMAC;
        /* RFC 7518 3.2: a key at least as long as the hash output */
        mask &= ALG_BIT(HS256) | (k->secret_len >= 48 ? ALG_BIT(HS384) : 0) |
                (k->secret_len >= 64 ? ALG_BIT(HS512) : 0);
        if (!mask) {
            *why = "this oct key is too short for the algorithms accepted (RFC 7518)";
            key_clear(k);
            return -1;
        }
    } else {
        return 0;
    }
    k->alg_mask = mask;
    if (kid)
        k->kid = xstrdup(json_string_value(kid));
    return 1;
}

/* Parse a JWK Set. strict (a file given in the config): a malformed key or a
 * duplicate kid is an error; otherwise (fetched) such keys are skipped.
 * Returns the set, or NULL with the reason in why. */
static struct jwt_keyset *jwks_parse(const char *text, size_t len, unsigned allowed, int strict,
                                     char *why, size_t whylen)
{
    json_error_t je;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je), *keys, *jwk;
    size_t i;
    if (!root) {
        snprintf(why, whylen, "not JSON (line %d: %s)", je.line, je.text);
        return NULL;
    }
    keys = json_object_get(root, "keys");
    if (!json_is_array(keys)) {
        snprintf(why, whylen, "a JWK Set must be an object with a \"keys\" list");
        json_decref(root);
        return NULL;
    }
    struct jwt_keyset *ks = keyset_new();
    json_array_foreach (keys, i, jwk) {
        const char *kwhy = NULL;
        struct jwt_key *k = &ks->keys[ks->n];
        if (ks->n == JWT_MAX_KEYS) {
            snprintf(why, whylen, "more than %d keys", JWT_MAX_KEYS);
            goto fail;
        }
        int rc = jwk_load(jwk, allowed, k, &kwhy);
        if (rc < 0 && strict) {
            snprintf(why, whylen, "keys[%zu]: %s", i, kwhy);
            goto fail;
        }
        if (rc <= 0)
            continue;
        for (size_t d = 0; d < ks->n; d++) {
            if (k->kid && ks->keys[d].kid && strcmp(k->kid, ks->keys[d].kid) == 0) {
                if (strict) {
                    snprintf(why, whylen, "keys[%zu]: kid \"%.64s\" appears twice", i, k->kid);
                    key_clear(k);
                    goto fail;
                }
                key_clear(k);
                rc = 0;
                break;
            }
        }
        if (rc > 0)
            ks->n++;
    }
    json_decref(root);
    if (ks->n == 0) {
        snprintf(why, whylen, "no usable signing key for the provider's algorithms");
        keyset_unref(ks);
        return NULL;
    }
    return ks;
fail:
    json_decref(root);
    keyset_unref(ks);
    return NULL;
}

/* ---- tokens ----------------------------------------------------------------- */

/* A decoded token. The buffers are malloc'ed; token_free releases them. */
struct jwt_token {
    const char *signing_input; /* "header.payload", not NUL-terminated */
    size_t signing_len;
    unsigned char *sig;
    size_t sig_len;
    int alg;
    const char *kid; /* in header; NULL when absent */
    json_t *header, *claims;
};

static void token_free(struct jwt_token *t)
{
    free(t->sig);
    json_decref(t->header);
    json_decref(t->claims);
    memset(t, 0, sizeof(*t));
}

/* Decode one segment as a JSON object, strictly. */
static json_t *segment_json(const char *s, size_t n)
{
    unsigned char *buf = xmalloc(n * 3 / 4 + 1);
    long len = b64url_decode(s, n, buf);
    json_t *j = NULL;
    if (len > 0)
        j = json_loadb((const char *)buf, (size_t)len, JSON_REJECT_DUPLICATES, NULL);
    free(buf);
    if (j && !json_is_object(j)) {
        json_decref(j);
        j = NULL;
    }
    return j;
}

/* Split, decode and parse a compact JWS (tok, len bytes; the caller has
 * checked the size limit). Returns NULL with *t filled, or the reason for
 * the refusal (a static string; t is then empty). Nothing is verified. */
static const char *token_decode(const char *tok, size_t len, struct jwt_token *t)
{
    const char *dot1 = memchr(tok, '.', len), *dot2;
    memset(t, 0, sizeof(*t));
    if (!dot1 || !(dot2 = memchr(dot1 + 1, '.', len - (size_t)(dot1 - tok) - 1)) ||
        memchr(dot2 + 1, '.', len - (size_t)(dot2 - tok) - 1))
        return "malformed token (not three segments)";
    size_t hlen = (size_t)(dot1 - tok), plen = (size_t)(dot2 - dot1 - 1);
    size_t slen = len - (size_t)(dot2 - tok) - 1;
    if (hlen == 0 || plen == 0)
        return "malformed token (empty segment)";
    if (slen == 0)
        return "missing signature";
    t->header = segment_json(tok, hlen);
    if (!t->header) {
        token_free(t);
        return "malformed token header";
    }
    json_t *alg = json_object_get(t->header, "alg"), *kid = json_object_get(t->header, "kid");
    const char *reason = NULL;
    if (!json_is_string(alg))
        reason = "token header has no alg";
    else if ((t->alg = alg_find(json_string_value(alg))) < 0)
        reason = "unsupported alg";
    else if (kid && (!json_is_string(kid) || json_string_length(kid) == 0))
        reason = "bad kid";
    else if (json_object_get(t->header, "crit"))
        reason = "unsupported crit header";
    if (reason) {
        token_free(t);
        return reason;
    }
    t->kid = kid ? json_string_value(kid) : NULL;
    t->claims = segment_json(dot1 + 1, plen);
    if (!t->claims) {
        token_free(t);
        return "malformed token payload";
    }
    t->sig = xmalloc(slen * 3 / 4 + 1);
    long sl = b64url_decode(dot2 + 1, slen, t->sig);
    if (sl <= 0) {
        token_free(t);
        return "malformed signature";
    }
    t->sig_len = (size_t)sl;
    t->signing_input = tok;
    t->signing_len = (size_t)(dot2 - tok);
    return NULL;
}

/* Raw ECDSA r||s (JWS) to the DER that OpenSSL verifies. Returns the DER
 * length in *der (malloc'ed), or 0. */
static int ecdsa_raw_to_der(const unsigned char *sig, size_t half, unsigned char **der)
{
    ECDSA_SIG *es = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(sig, (int)half, NULL), *s = BN_bin2bn(sig + half, (int)half, NULL);
    int n = 0;
    *der = NULL;
    if (es && r && s && ECDSA_SIG_set0(es, r, s) == 1) {
        r = s = NULL; /* owned by es now */
        n = i2d_ECDSA_SIG(es, der);
        if (n < 0)
            n = 0;
    }
    BN_free(r);
    BN_free(s);
    ECDSA_SIG_free(es);
    return n;
}

/* 1 when t's signature verifies with k under t->alg, else 0. The caller has
 * checked that k->alg_mask holds t->alg. */
static int token_verify_sig(const struct jwt_token *t, const struct jwt_key *k)
{
    const struct alg_info *ai = &alg_table[t->alg];
    if (k->kind == KEY_HMAC) {
        unsigned char mac[EVP_MAX_MD_SIZE];
        unsigned int maclen = 0;
        if (!HMAC(alg_md(t->alg), k->secret, (int)k->secret_len,
                  (const unsigned char *)t->signing_input, t->signing_len, mac, &maclen))
            return 0;
        return t->sig_len == maclen && CRYPTO_memcmp(mac, t->sig, maclen) == 0;
    }
    const unsigned char *sig = t->sig;
    size_t sig_len = t->sig_len;
    unsigned char *der = NULL;
    if (k->kind == KEY_EC) {
        if (t->sig_len != 2 * (size_t)ai->coord_size)
            return 0;
        int n = ecdsa_raw_to_der(t->sig, (size_t)ai->coord_size, &der);
        if (!n)
            return 0;
        sig = der;
        sig_len = (size_t)n;
    } else if (t->sig_len != (size_t)EVP_PKEY_get_size(k->pkey)) {
        return 0;
    }
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx && EVP_DigestVerifyInit(ctx, NULL, alg_md(t->alg), NULL, k->pkey) == 1 &&
             EVP_DigestVerify(ctx, sig, sig_len, (const unsigned char *)t->signing_input,
                              t->signing_len) == 1;
    EVP_MD_CTX_free(ctx);
    OPENSSL_free(der);
    ERR_clear_error();
    return ok;
}

/* ---- providers ---------------------------------------------------------- */

struct jwt_global;

struct jwt_provider {
    char *name;
    uint64_t id; /* unique in the process: cache entries name their provider by it */
    char *issuer;
    char **audiences; /* none: "aud" is not checked */
    size_t naudiences;
    unsigned algs;
    long leeway;
    bool require_exp;
    char *typ;         /* required header "typ" (RFC 8725 3.11), or NULL */
    size_t cache_size; /* entries per worker; 0: no cache */

    pthread_mutex_t lock;    /* held only to read or swap keys (and take a ref) */
    struct jwt_keyset *keys; /* NULL until a remote set has been fetched */
    uint64_t gen;            /* keys->gen, atomically readable without the lock */

    /* Remote keys: jwks_uri as configured, or discovery_url (the issuer's
     * openid-configuration) that names it. Static keys: both NULL. */
    char *jwks_uri, *discovery_url;
    int refresh_s, min_refetch_s, timeout_ms;
    size_t max_bytes;
    SSL_CTX *ssl_ctx; /* https only */

    /* Written by workers, read by the fetcher (atomics). */
    int64_t last_early; /* CLOCK_MONOTONIC ms of the last early refetch asked */
    int early;          /* an early refetch is wanted */
    uint64_t fetch_failures;
    uint64_t fetches_done; /* attempts finished, failed or not */

    /* The fetcher thread's own. */
    struct jwt_global *g;
    struct event *timer;
    struct evhttp_connection *conn;        /* of the request going on */
    struct evhttp_connection *conn_old[2]; /* finished: discovery's, the JWKS's */
    bool busy, failing, have_hash, stage_discovery;
    unsigned char last_hash[SHA256_DIGEST_LENGTH];
    char *found_jwks_uri; /* from discovery */
};

struct jwt_global {
    struct jwt_provider **p;
    size_t n;
    bool remote; /* some provider fetches its keys */
    /* The fetcher: a thread with its own loop, from start_global to free_global. */
    bool running;
    int stop; /* atomic */
    pthread_t thread;
    struct event_base *base;
    struct evdns_base *dns;
    int wake_fd; /* eventfd: workers wake the fetcher for early refetches; -1 before start */
    struct event *wake_ev;
};

static uint64_t provider_id_counter;

/* A reference to p's current key set (NULL before the first fetch). The
 * caller drops it with keyset_unref, within the same hook. */
static struct jwt_keyset *provider_keys(struct jwt_provider *p)
{
    pthread_mutex_lock(&p->lock);
    struct jwt_keyset *ks = p->keys;
    if (ks)
        __atomic_add_fetch(&ks->refs, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&p->lock);
    return ks;
}

/* Publish ks as p's key set (takes the caller's reference). */
static void provider_set_keys(struct jwt_provider *p, struct jwt_keyset *ks)
{
    pthread_mutex_lock(&p->lock);
    struct jwt_keyset *old = p->keys;
    p->keys = ks;
    __atomic_store_n(&p->gen, ks->gen, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->lock);
    keyset_unref(old);
}

static int64_t monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* From a worker: ask the fetcher to refetch p's keys now, unless one was
 * asked less than min_refetch_s ago. Returns 1 when asked. Never blocks
 * (the eventfd is non-blocking; a full counter means a wake-up is already
 * pending). */
static int provider_refetch_early(struct jwt_provider *p)
{
    struct jwt_global *g = p->g;
    if (!p->jwks_uri && !p->discovery_url)
        return 0;
    int64_t now = monotonic_ms(), last = __atomic_load_n(&p->last_early, __ATOMIC_RELAXED);
    if (now - last < (int64_t)p->min_refetch_s * 1000 ||
        !__atomic_compare_exchange_n(&p->last_early, &last, now, false, __ATOMIC_ACQ_REL,
                                     __ATOMIC_RELAXED))
        return 0;
    int fd = __atomic_load_n(&g->wake_fd, __ATOMIC_ACQUIRE);
    if (fd < 0)
        return 0; /* no fetcher (portico -t, tests) */
    __atomic_store_n(&p->early, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        log_warn("jwt_auth: cannot wake the key fetcher: %s", strerror(errno));
    return 1;
}

/* ---- claims ------------------------------------------------------------- */

static int numeric_date(json_t *v, double *out)
{
    if (json_is_integer(v))
        *out = (double)json_integer_value(v);
    else if (json_is_real(v) && isfinite(json_real_value(v)))
        *out = json_real_value(v);
    else
        return 0;
    return 1;
}

static int audience_ok(const struct jwt_provider *p, json_t *aud)
{
    size_t i;
    json_t *v;
    if (json_is_string(aud)) {
        for (size_t k = 0; k < p->naudiences; k++)
            if (strcmp(json_string_value(aud), p->audiences[k]) == 0)
                return 1;
        return 0;
    }
    if (!json_is_array(aud))
        return 0;
    json_array_foreach (aud, i, v)
        if (json_is_string(v) && audience_ok(p, v))
            return 1;
    return 0;
}

/* The registered claims p requires of a token whose signature holds, at
 * time now. Returns NULL, or the reason for a refusal. */
static const char *claims_check(const struct jwt_provider *p, json_t *c, double now)
{
    json_t *exp = json_object_get(c, "exp"), *nbf = json_object_get(c, "nbf");
    json_t *iat = json_object_get(c, "iat"), *aud = json_object_get(c, "aud");
    const char *iss = json_string_value(json_object_get(c, "iss"));
    double t;
    if (!iss || strcmp(iss, p->issuer) != 0)
        return "wrong issuer";
    if (exp) {
        if (!numeric_date(exp, &t))
            return "exp is not a number";
        if (now >= t + (double)p->leeway)
            return "token expired";
    } else if (p->require_exp) {
        return "token has no exp";
    }
    if (nbf) {
        if (!numeric_date(nbf, &t))
            return "nbf is not a number";
        if (now + (double)p->leeway < t)
            return "token not yet valid";
    }
    if (iat) {
        if (!numeric_date(iat, &t))
            return "iat is not a number";
        if (t > now + (double)p->leeway)
            return "token issued in the future";
    }
    if (p->naudiences) {
        if (!aud)
            return "token has no aud";
        if (!audience_ok(p, aud))
            return "wrong audience";
    }
    return NULL;
}

/* ---- the per-worker cache of verified tokens ------------------------------
 * One LRU per provider per worker thread, found by the provider's id (never
 * through a pointer to it, so a dropped config leaves nothing dangling).
 * Entries are chained in hash buckets and in a doubly linked use list; the
 * least recently used one is reused when the cache is full. */

struct cache_entry {
    unsigned char hash[SHA256_DIGEST_LENGTH];
    uint64_t gen;   /* key set it was verified with */
    double expires; /* exp + leeway */
    json_t *claims;
    int bucket_next, prev, next; /* -1: none */
};

struct jwt_cache {
    uint64_t provider_id;
    size_t cap, n, nbuckets;
    struct cache_entry *e;
    int *buckets;
    int head, tail; /* most / least recently used */
};

#define CACHES_MAX 32

/* A worker thread's caches. */
struct jwt_caches {
    struct jwt_cache *c[CACHES_MAX];
    size_t n;
};

static pthread_key_t caches_key;
static pthread_once_t caches_once = PTHREAD_ONCE_INIT;

static void cache_free(struct jwt_cache *c)
{
    for (size_t i = 0; i < c->n; i++)
        json_decref(c->e[i].claims);
    free(c->e);
    free(c->buckets);
    free(c);
}

static void caches_free(void *arg)
{
    struct jwt_caches *cs = arg;
    for (size_t i = 0; i < cs->n; i++)
        cache_free(cs->c[i]);
    free(cs);
}

static void caches_key_init(void)
{
    if (pthread_key_create(&caches_key, caches_free) != 0)
        die("jwt_auth: pthread_key_create failed");
}

/* This thread's state, created on first use and freed when the thread
 * exits (the key's destructor). */
static struct jwt_caches *thread_caches(void)
{
    pthread_once(&caches_once, caches_key_init);
    struct jwt_caches *cs = pthread_getspecific(caches_key);
    if (!cs) {
        cs = xcalloc(1, sizeof(*cs));
        if (pthread_setspecific(caches_key, cs) != 0)
            die("jwt_auth: pthread_setspecific failed");
    }
    return cs;
}

/* This thread's cache for p, created on first use; NULL when p caches
 * nothing. */
static struct jwt_cache *cache_for(const struct jwt_provider *p)
{
    if (!p->cache_size)
        return NULL;
    struct jwt_caches *cs = thread_caches();
    for (size_t i = 0; i < cs->n; i++)
        if (cs->c[i]->provider_id == p->id)
            return cs->c[i];
    if (cs->n == CACHES_MAX) { /* providers of configs long gone, most likely */
        cache_free(cs->c[0]);
        memmove(cs->c, cs->c + 1, (CACHES_MAX - 1) * sizeof(cs->c[0]));
        cs->n--;
    }
    struct jwt_cache *c = xcalloc(1, sizeof(*c));
    c->provider_id = p->id;
    c->cap = p->cache_size;
    c->e = xcalloc(c->cap, sizeof(*c->e));
    for (c->nbuckets = 16; c->nbuckets < c->cap; c->nbuckets *= 2)
        ;
    c->buckets = xmalloc(c->nbuckets * sizeof(*c->buckets));
    memset(c->buckets, 0xff, c->nbuckets * sizeof(*c->buckets));
    c->head = c->tail = -1;
    cs->c[cs->n++] = c;
    return c;
}

static size_t cache_bucket(const struct jwt_cache *c, const unsigned char *hash)
{
    uint64_t h;
    memcpy(&h, hash, sizeof(h));
    return (size_t)(h & (c->nbuckets - 1));
}

static void lru_unlink(struct jwt_cache *c, int i)
{
    struct cache_entry *e = &c->e[i];
    if (e->prev >= 0)
        c->e[e->prev].next = e->next;
    else
        c->head = e->next;
    if (e->next >= 0)
        c->e[e->next].prev = e->prev;
    else
        c->tail = e->prev;
}

static void lru_push_front(struct jwt_cache *c, int i)
{
    c->e[i].prev = -1;
    c->e[i].next = c->head;
    if (c->head >= 0)
        c->e[c->head].prev = i;
    c->head = i;
    if (c->tail < 0)
        c->tail = i;
}

static void bucket_unlink(struct jwt_cache *c, int i)
{
    int *pp = &c->buckets[cache_bucket(c, c->e[i].hash)];
    while (*pp != i)
        pp = &c->e[*pp].bucket_next;
    *pp = c->e[i].bucket_next;
}

/* The claims of a cached token verified by p's current keys and not yet
 * expired (borrowed: valid until this thread's next cache_put), or NULL. */
static json_t *cache_get(const struct jwt_provider *p, const unsigned char *hash, double now)
{
    struct jwt_cache *c = cache_for(p);
    if (!c)
        return NULL;
    for (int i = c->buckets[cache_bucket(c, hash)]; i >= 0; i = c->e[i].bucket_next) {
        struct cache_entry *e = &c->e[i];
        if (memcmp(e->hash, hash, sizeof(e->hash)) != 0)
            continue;
        if (e->gen != __atomic_load_n(&p->gen, __ATOMIC_ACQUIRE) || now >= e->expires)
            return NULL; /* left for the LRU to reuse */
        lru_unlink(c, i);
        lru_push_front(c, i);
        return e->claims;
    }
    return NULL;
}

static void cache_put(const struct jwt_provider *p, const unsigned char *hash, uint64_t gen,
                      json_t *claims, double now)
{
    struct jwt_cache *c = cache_for(p);
    if (!c)
        return;
    double exp;
    if (!numeric_date(json_object_get(claims, "exp"), &exp))
        exp = now + JWT_CACHE_NO_EXP_TTL - (double)p->leeway;
    int i;
    for (i = c->buckets[cache_bucket(c, hash)]; i >= 0; i = c->e[i].bucket_next)
        if (memcmp(c->e[i].hash, hash, sizeof(c->e[i].hash)) == 0)
            break;
    if (i >= 0) { /* a stale entry of the same token */
        lru_unlink(c, i);
        bucket_unlink(c, i);
        json_decref(c->e[i].claims);
    } else if (c->n < c->cap) {
        i = (int)c->n++;
    } else {
        i = c->tail;
        lru_unlink(c, i);
        bucket_unlink(c, i);
        json_decref(c->e[i].claims);
    }
    struct cache_entry *e = &c->e[i];
    memcpy(e->hash, hash, sizeof(e->hash));
    e->gen = gen;
    e->expires = exp + (double)p->leeway;
    e->claims = json_incref(claims);
    size_t b = cache_bucket(c, hash);
    e->bucket_next = c->buckets[b];
    c->buckets[b] = i;
    lru_push_front(c, i);
}

/* ---- verification ------------------------------------------------------- */

/* SHA-256 of the token, the cache key. On a cache hit this is most of the
 * module's work, and OpenSSL 3's EVP digests allocate a provider context at
 * every init (SHA256() also looks the algorithm up each time), which cost
 * more than the hashing itself. The low-level SHA-256 functions (deprecated
 * in 3.0, still shipped by every 3.x) run the same assembly without either.
 */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
static void token_hash(const char *tok, size_t len, unsigned char *hash)
{
    SHA256_CTX c;
    SHA256_Init(&c);
    SHA256_Update(&c, tok, len);
    SHA256_Final(hash, &c);
}
#pragma GCC diagnostic pop

/* How a verification ended when it did not succeed. */
struct verdict {
    const char *why;
    int status; /* 401, or 503 when the keys are not there yet */
    /* This request asked for an early refetch of wait_for's keys: it may
     * wait until the fetch attempt after seq has finished, then retry. */
    struct jwt_provider *wait_for;
    uint64_t seq;
};

/* Ask for an early refetch of p's keys; if this request is the one that
 * asked, note in v that it may wait for the result. */
static void refetch_and_maybe_wait(struct jwt_provider *p, struct verdict *v)
{
    uint64_t seq = __atomic_load_n(&p->fetches_done, __ATOMIC_ACQUIRE);
    if (provider_refetch_early(p)) {
        v->wait_for = p;
        v->seq = seq;
    }
}

/* Explicit typing (RFC 8725 3.11): "at+jwt" matches "at+JWT" and
 * "application/at+jwt" (RFC 7515 4.1.9: the prefix may be left out, media
 * types compare without case). */
static int typ_matches(const char *want, const char *typ)
{
    if (!typ)
        return 0;
    if (strncasecmp(typ, "application/", 12) == 0)
        typ += 12;
    return strcasecmp(typ, want) == 0;
}

/* Verify t against p: algorithm, key, signature, registered claims. On
 * success returns 1 and sets *gen to the key set used. */
static int provider_verify(struct jwt_provider *p, const struct jwt_token *t, double now,
                           uint64_t *gen, struct verdict *v)
{
    if (p->typ && !typ_matches(p->typ, json_string_value(json_object_get(t->header, "typ")))) {
        v->why = "wrong typ";
        return 0;
    }
    if (!(p->algs & ALG_BIT(t->alg))) {
        v->why = "alg not accepted";
        return 0;
    }
    struct jwt_keyset *ks = provider_keys(p);
    if (!ks) {
        v->why = "keys not fetched yet";
        v->status = 503;
        refetch_and_maybe_wait(p, v);
        return 0;
    }
    int named = 0, tried = 0, ok = 0;
    for (size_t i = 0; i < ks->n && !ok; i++) {
        const struct jwt_key *k = &ks->keys[i];
        if (t->kid && (!k->kid || strcmp(k->kid, t->kid) != 0))
            continue;
        named = 1;
        if (!(k->alg_mask & ALG_BIT(t->alg)))
            continue;
        tried = 1;
        ok = token_verify_sig(t, k);
    }
    *gen = ks->gen;
    keyset_unref(ks);
    if (!ok) {
        if (!named) {
            v->why = "unknown kid";
            refetch_and_maybe_wait(p, v);
        } else {
            v->why = tried ? "bad signature" : "alg does not match the key";
        }
        return 0;
    }
    v->why = claims_check(p, t->claims, now);
    return v->why == NULL;
}

/* Verify the token tok (len bytes, within the size limit) for any of the
 * providers: a cached verification first, else decode and let the token's
 * iss pick the provider. Returns the claims (a new reference), or NULL with
 * the reason in *v. */
static json_t *token_verify(struct jwt_provider *const *providers, size_t n, const char *tok,
                            size_t len, double now, struct verdict *v)
{
    unsigned char hash[SHA256_DIGEST_LENGTH];
    token_hash(tok, len, hash);
    for (size_t i = 0; i < n; i++) {
        json_t *c = cache_get(providers[i], hash, now);
        if (c)
            return json_incref(c);
    }
    struct jwt_token t;
    v->status = 401;
    if ((v->why = token_decode(tok, len, &t)) != NULL)
        return NULL;
    const char *iss = json_string_value(json_object_get(t.claims, "iss"));
    json_t *claims = NULL;
    v->why = iss ? "wrong issuer" : "token has no iss";
    for (size_t i = 0; iss && i < n && !claims; i++) {
        struct jwt_provider *p = providers[i];
        struct verdict pv = { NULL, 401, NULL, 0 };
        uint64_t gen = 0;
        if (strcmp(p->issuer, iss) != 0)
            continue;
        if (provider_verify(p, &t, now, &gen, &pv)) {
            claims = json_incref(t.claims);
            cache_put(p, hash, gen, t.claims, now);
        } else if (!v->why || strcmp(v->why, "wrong issuer") == 0) {
            *v = pv;
        }
    }
    token_free(&t);
    return claims;
}

/* ---- config: jwt_providers ------------------------------------------------ */

__attribute__((format(printf, 3, 4))) static int fail(char *err, size_t errlen, const char *fmt,
                                                      ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

/* Refuse keys of obj not in known (a space-separated list). */
static int check_keys(json_t *obj, const char *path, const char *known, char *err, size_t errlen)
{
    const char *key;
    json_t *v;
    char probe[80];
    json_object_foreach (obj, key, v) {
        snprintf(probe, sizeof(probe), " %.64s ", key);
        if (strchr(key, ' ') || !strstr(known, probe))
            return fail(err, errlen, "%s.%.64s: unknown key (known:%s)", path, key, known);
    }
    return 0;
}

static int get_int(json_t *obj, const char *path, const char *key, long min, long max, long *out,
                   char *err, size_t errlen)
{
    json_t *v = json_object_get(obj, key);
    if (!v)
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max)
        return fail(err, errlen, "%s.%s: expected an integer from %ld to %ld", path, key, min, max);
    *out = (long)json_integer_value(v);
    return 0;
}

static int get_bool(json_t *obj, const char *path, const char *key, bool *out, char *err,
                    size_t errlen)
{
    json_t *v = json_object_get(obj, key);
    if (!v)
        return 0;
    if (!json_is_boolean(v))
        return fail(err, errlen, "%s.%s: expected true or false", path, key);
    *out = json_is_true(v);
    return 0;
}

/* Read a whole regular file of at most JWT_KEY_FILE_MAX bytes (config load
 * only: never on a worker). Returns a malloc'ed NUL-terminated copy, or
 * NULL with the reason in why. */
static char *read_file(const char *path, size_t *len, char *why, size_t whylen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    struct stat st;
    if (fd < 0) {
        snprintf(why, whylen, "cannot read \"%.200s\": %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size > JWT_KEY_FILE_MAX) {
        snprintf(why, whylen, "\"%.200s\" is not a regular file of at most 1 MiB", path);
        close(fd);
        return NULL;
    }
    char *buf = xmalloc((size_t)st.st_size + 1);
    size_t n = 0;
    while (n < (size_t)st.st_size) {
        ssize_t r = read(fd, buf + n, (size_t)st.st_size - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* A PEM public key or certificate (text) as an EVP_PKEY, or NULL. */
static EVP_PKEY *pem_public_key(const char *text, size_t len)
{
    BIO *bio = BIO_new_mem_buf(text, (int)len);
    EVP_PKEY *pk = bio ? PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL) : NULL;
    if (!pk && bio && strstr(text, "-----BEGIN CERTIFICATE-----")) {
        BIO_free(bio);
        bio = BIO_new_mem_buf(text, (int)len);
        X509 *x = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
        pk = x ? X509_get_pubkey(x) : NULL;
        X509_free(x);
    }
    BIO_free(bio);
    ERR_clear_error();
    return pk;
}

static void provider_free(struct jwt_provider *p)
{
    if (!p)
        return;
    free(p->name);
    free(p->issuer);
    free(p->typ);
    for (size_t i = 0; i < p->naudiences; i++)
        free(p->audiences[i]);
    free(p->audiences);
    keyset_unref(p->keys);
    pthread_mutex_destroy(&p->lock);
    free(p->jwks_uri);
    free(p->discovery_url);
    free(p->found_jwks_uri);
    SSL_CTX_free(p->ssl_ctx);
    free(p);
}

static int is_http_url(const char *s)
{
    return strncmp(s, "http://", 7) == 0 || strncmp(s, "https://", 8) == 0;
}

/* A URL the fetcher can GET: http(s)://host[:port]/path, no credentials. */
static int url_ok(const char *s)
{
    struct evhttp_uri *u = is_http_url(s) ? evhttp_uri_parse(s) : NULL;
    int ok = u && evhttp_uri_get_host(u) && *evhttp_uri_get_host(u) &&
             !evhttp_uri_get_userinfo(u) && strlen(s) < 2048;
    if (u)
        evhttp_uri_free(u);
    return ok;
}

static int provider_keys_static(struct jwt_provider *p, json_t *j, const char *path, char *err,
                                size_t errlen)
{
    json_t *secret = json_object_get(j, "secret"), *pub = json_object_get(j, "public_key");
    json_t *file = json_object_get(j, "jwks_file");
    char why[256];
    if (secret) {
        const char *s = json_string_value(secret);
        size_t len = s ? json_string_length(secret) : 0;
        if (!s || len == 0)
            return fail(err, errlen, "%s.secret: expected a string (\"${ENV}\" or \"@file\")",
                        path);
        if (p->algs & ~ALGS_HMAC)
            return fail(err, errlen,
                        "%s.algorithms: a secret verifies only HS256, HS384 and "
                        "HS512",
                        path);
        /* RFC 7518 3.2: a key at least as long as the hash output. */
        size_t need = p->algs & ALG_BIT(HS512) ? 64 : p->algs & ALG_BIT(HS384) ? 48 : 32;
        if (len < need)
            return fail(err, errlen,
                        "%s.secret: too short: at least %zu bytes for the "
                        "algorithms listed (RFC 7518)",
                        path, need);
        struct jwt_keyset *ks = keyset_new();
        ks->keys[0].kind = KEY_HMAC;
        ks->keys[0].alg_mask = p->algs;
        ks->keys[0].secret = xmalloc(len);
        memcpy(ks->keys[0].secret, s, len);
        ks->keys[0].secret_len = len;
        ks->n = 1;
        p->keys = ks;
    } else if (pub) {
        const char *s = json_string_value(pub);
        char *text = NULL;
        size_t len = 0;
        if (!s || !*s)
            return fail(err, errlen, "%s.public_key: expected a PEM file path or \"@file\"", path);
        if (strncmp(s, "-----BEGIN", 10) == 0) {
            len = json_string_length(pub);
        } else if (!(text = read_file(s, &len, why, sizeof(why)))) {
            return fail(err, errlen, "%s.public_key: %s", path, why);
        }
        EVP_PKEY *pk = pem_public_key(text ? text : s, len);
        free(text);
        if (!pk)
            return fail(err, errlen, "%s.public_key: not a PEM public key or certificate", path);
        const char *kwhy = "";
        unsigned mask = pkey_algs(pk, &kwhy);
        if (!mask || (p->algs & ~mask)) {
            EVP_PKEY_free(pk);
            if (!mask)
                return fail(err, errlen, "%s.public_key: %s", path, kwhy);
            return fail(err, errlen, "%s.algorithms: this %s key verifies only %s", path,
                        mask == ALGS_RSA ? "RSA" : "EC",
                        mask == ALGS_RSA         ? "RS256, RS384 and RS512"
                        : mask == ALG_BIT(ES256) ? "ES256"
                        : mask == ALG_BIT(ES384) ? "ES384"
                                                 : "ES512");
        }
        struct jwt_keyset *ks = keyset_new();
        ks->keys[0].kind = mask == ALGS_RSA ? KEY_RSA : KEY_EC;
        ks->keys[0].alg_mask = p->algs;
        ks->keys[0].pkey = pk;
        ks->n = 1;
        p->keys = ks;
    } else if (file) {
        const char *s = json_string_value(file);
        char *text = NULL;
        size_t len = 0;
        if (!s || !*s)
            return fail(err, errlen, "%s.jwks_file: expected a file path", path);
        if (s[0] == '{') /* "@file" gave the content */
            len = json_string_length(file);
        else if (!(text = read_file(s, &len, why, sizeof(why))))
            return fail(err, errlen, "%s.jwks_file: %s", path, why);
        p->keys = jwks_parse(text ? text : s, len, p->algs, 1, why, sizeof(why));
        free(text);
        if (!p->keys)
            return fail(err, errlen, "%s.jwks_file: %s", path, why);
    }
    if (p->keys)
        p->gen = p->keys->gen;
    return 0;
}

static int provider_remote(struct jwt_provider *p, json_t *j, const char *path, char *err,
                           size_t errlen)
{
    json_t *uri = json_object_get(j, "jwks_uri"), *ca = json_object_get(j, "ca_file");
    long refresh = 300, min_refetch = 10, timeout = 5000, max_bytes = 262144;
    const char *url;
    if (get_int(j, path, "jwks_refresh_s", 10, 86400, &refresh, err, errlen) < 0 ||
        get_int(j, path, "jwks_min_refetch_s", 1, 3600, &min_refetch, err, errlen) < 0 ||
        get_int(j, path, "jwks_timeout_ms", 100, 60000, &timeout, err, errlen) < 0 ||
        get_int(j, path, "jwks_max_bytes", 1024, 4194304, &max_bytes, err, errlen) < 0)
        return -1;
    p->refresh_s = (int)refresh;
    p->min_refetch_s = (int)min_refetch;
    p->timeout_ms = (int)timeout;
    p->max_bytes = (size_t)max_bytes;
    p->last_early = INT64_MIN / 2;
    if (uri) {
        if (!json_is_string(uri) || !url_ok(json_string_value(uri)))
            return fail(err, errlen, "%s.jwks_uri: expected an http:// or https:// URL", path);
        p->jwks_uri = xstrdup(json_string_value(uri));
        url = p->jwks_uri;
    } else {
        size_t n = strlen(p->issuer);
        char *d = xmalloc(n + 40);
        snprintf(d, n + 40, "%s%s.well-known/openid-configuration", p->issuer,
                 n && p->issuer[n - 1] == '/' ? "" : "/");
        p->discovery_url = d;
        if (!url_ok(d))
            return fail(err, errlen, "%s.issuer: discovery needs an http:// or https:// issuer",
                        path);
        url = d;
    }
    if (ca && (!json_is_string(ca) || !*json_string_value(ca)))
        return fail(err, errlen, "%s.ca_file: expected a file of PEM CA certificates", path);
    if (ca || strncmp(url, "https://", 8) == 0 || p->discovery_url) {
        p->ssl_ctx = SSL_CTX_new(TLS_client_method());
        if (!p->ssl_ctx)
            die("jwt_auth: SSL_CTX_new failed");
        SSL_CTX_set_min_proto_version(p->ssl_ctx, TLS1_2_VERSION);
        SSL_CTX_set_verify(p->ssl_ctx, SSL_VERIFY_PEER, NULL);
        int ok = ca ? SSL_CTX_load_verify_locations(p->ssl_ctx, json_string_value(ca), NULL)
                    : SSL_CTX_set_default_verify_paths(p->ssl_ctx);
        ERR_clear_error();
        if (ok != 1)
            return fail(err, errlen, "%s.ca_file: cannot load CA certificates from \"%.200s\"",
                        path, ca ? json_string_value(ca) : "the system store");
    }
    return 0;
}

static int provider_parse(json_t *j, const char *path, struct jwt_provider *p, char *err,
                          size_t errlen)
{
    static const char known[] =
        " issuer audiences algorithms leeway_s require_exp typ cache_size secret public_key "
        "jwks_file jwks_uri discovery jwks_refresh_s jwks_min_refetch_s jwks_timeout_ms "
        "jwks_max_bytes ca_file ";
    json_t *v;
    size_t i;
    long leeway = 0, cache = JWT_CACHE_DEFAULT;
    if (!json_is_object(j))
        return fail(err, errlen,
                    "%s: expected an object like {\"issuer\": \"...\", "
                    "\"algorithms\": [\"RS256\"], \"public_key\": \"@key.pem\"}",
                    path);
    if (check_keys(j, path, known, err, errlen) < 0)
        return -1;
    v = json_object_get(j, "issuer");
    if (!json_is_string(v) || json_string_length(v) == 0)
        return fail(err, errlen, "%s.issuer: required, the exact \"iss\" of the tokens", path);
    p->issuer = xstrdup(json_string_value(v));
    v = json_object_get(j, "typ");
    if (v && (!json_is_string(v) || json_string_length(v) == 0 || json_string_length(v) > 64))
        return fail(err, errlen,
                    "%s.typ: expected the header \"typ\" tokens must carry, like "
                    "\"at+jwt\"",
                    path);
    if (v)
        p->typ = xstrdup(json_string_value(v));
    v = json_object_get(j, "audiences");
    if (v) {
        if (json_is_string(v)) {
            p->audiences = xcalloc(1, sizeof(char *));
            p->audiences[p->naudiences++] = xstrdup(json_string_value(v));
        } else if (json_is_array(v) && json_array_size(v) > 0) {
            json_t *a;
            p->audiences = xcalloc(json_array_size(v), sizeof(char *));
            json_array_foreach (v, i, a) {
                if (!json_is_string(a) || json_string_length(a) == 0)
                    return fail(err, errlen, "%s.audiences[%zu]: expected a string", path, i);
                p->audiences[p->naudiences++] = xstrdup(json_string_value(a));
            }
        } else {
            return fail(err, errlen, "%s.audiences: expected a non-empty list of strings", path);
        }
    }
    v = json_object_get(j, "algorithms");
    if (!json_is_array(v) || json_array_size(v) == 0)
        return fail(err, errlen,
                    "%s.algorithms: required, a list like [\"RS256\"] (HS256, HS384, "
                    "HS512, RS256, RS384, RS512, ES256, ES384, ES512)",
                    path);
    json_t *a;
    json_array_foreach (v, i, a) {
        int alg = json_is_string(a) ? alg_find(json_string_value(a)) : -1;
        if (alg < 0)
            return fail(err, errlen,
                        "%s.algorithms[%zu]: not one of HS256, HS384, HS512, RS256, "
                        "RS384, RS512, ES256, ES384, ES512%s",
                        path, i,
                        json_is_string(a) && strcasecmp(json_string_value(a), "none") == 0
                            ? " (\"none\" is never accepted)"
                            : "");
        p->algs |= ALG_BIT(alg);
    }
    if (get_int(j, path, "leeway_s", 0, 600, &leeway, err, errlen) < 0 ||
        get_int(j, path, "cache_size", 0, JWT_CACHE_LIMIT, &cache, err, errlen) < 0 ||
        get_bool(j, path, "require_exp", &p->require_exp, err, errlen) < 0)
        return -1;
    p->leeway = leeway;
    p->cache_size = (size_t)cache;
    bool discovery = false;
    if (get_bool(j, path, "discovery", &discovery, err, errlen) < 0)
        return -1;
    int sources = !!json_object_get(j, "secret") + !!json_object_get(j, "public_key") +
                  !!json_object_get(j, "jwks_file") + !!json_object_get(j, "jwks_uri") + discovery;
    if (sources > 1)
        return fail(err, errlen,
                    "%s: give one key source: secret, public_key, jwks_file, "
                    "jwks_uri or discovery",
                    path);
    if (sources == 0 && !is_http_url(p->issuer))
        return fail(err, errlen,
                    "%s: no keys: give secret, public_key, jwks_file or jwks_uri "
                    "(or an http(s) issuer, for OpenID Connect discovery)",
                    path);
    if (json_object_get(j, "jwks_uri") || sources == 0 || discovery) {
        if (provider_remote(p, j, path, err, errlen) < 0)
            return -1;
    } else {
        static const char *const remote_only[] = { "jwks_refresh_s", "jwks_min_refetch_s",
                                                   "jwks_timeout_ms", "jwks_max_bytes", "ca_file" };
        for (i = 0; i < sizeof(remote_only) / sizeof(remote_only[0]); i++)
            if (json_object_get(j, remote_only[i]))
                return fail(err, errlen, "%s.%s: only for jwks_uri or discovery", path,
                            remote_only[i]);
        if (provider_keys_static(p, j, path, err, errlen) < 0)
            return -1;
    }
    return 0;
}

static void global_free(void *arg);

static int name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!(isalnum((unsigned char)s[i]) || strchr("_-.", s[i])))
            return 0;
    return 1;
}

static int global_parse(json_t *json, const char *path, void **gcfg, char *err, size_t errlen)
{
    const char *name;
    json_t *v;
    *gcfg = NULL;
    if (!json)
        return 0;
    if (!json_is_object(json))
        return fail(err, errlen,
                    "%s: expected an object of named providers, like {\"main\": "
                    "{\"issuer\": ..., \"algorithms\": [...], \"jwks_uri\": ...}}",
                    path);
    struct jwt_global *g = xcalloc(1, sizeof(*g));
    g->wake_fd = -1;
    g->p = xcalloc(json_object_size(json) + 1, sizeof(*g->p));
    json_object_foreach (json, name, v) {
        char where[256];
        snprintf(where, sizeof(where), "%s.%.64s", path, name);
        if (!name_ok(name)) {
            global_free(g);
            return fail(err, errlen,
                        "%s: a provider name is 1 to 64 letters, digits, '_', '-' "
                        "or '.'",
                        where);
        }
        struct jwt_provider *p = xcalloc(1, sizeof(*p));
        pthread_mutex_init(&p->lock, NULL);
        p->name = xstrdup(name);
        p->id = __atomic_add_fetch(&provider_id_counter, 1, __ATOMIC_RELAXED);
        p->require_exp = true;
        p->g = g;
        g->p[g->n++] = p;
        if (provider_parse(v, where, p, err, errlen) < 0) {
            global_free(g);
            return -1;
        }
        if (p->jwks_uri || p->discovery_url)
            g->remote = true;
    }
    *gcfg = g;
    return 0;
}

/* ---- the key fetcher ---------------------------------------------------------
 * One thread per config that has remote providers, with its own event loop.
 * Per provider, a fetch is one GET of the JWKS, or with discovery a GET of
 * the openid-configuration and then one of the jwks_uri it names:
 *
 *   idle --(timer | early wake)--> [GET openid-configuration] --> GET jwks --> idle
 *   success: next fetch after jwks_refresh_s
 *   any failure: keep the last good set; retry after jwks_min_refetch_s
 *
 * A connection is never freed inside its own callback: a finished one is
 * parked in conn_old and freed when the next fetch starts (from a timer or
 * a wake-up, never from an HTTP callback) or at stop. */

static void fetch_start(struct jwt_provider *p);

static void fetch_schedule(struct jwt_provider *p, int seconds)
{
    struct timeval tv = { seconds, 0 };
    evtimer_add(p->timer, &tv);
}

static void fetch_done(struct jwt_provider *p, const char *failure)
{
    p->busy = false;
    __atomic_add_fetch(&p->fetches_done, 1, __ATOMIC_RELEASE);
    module_metric_add("portico_jwt_key_fetches_total", 1, "provider", p->name, "result",
                      failure ? "failed" : "ok");
    if (failure) {
        unsigned long long n = __atomic_add_fetch(&p->fetch_failures, 1, __ATOMIC_RELAXED);
        /* Logged once per run of failures, not at every retry. */
        if (!p->failing)
            log_warn("jwt_auth: provider %s: fetching keys failed: %s (%s; %llu failure%s so far)",
                     p->name, failure,
                     __atomic_load_n(&p->gen, __ATOMIC_RELAXED) ? "keeping the last good keys"
                                                                : "no keys yet: its tokens get 503",
                     n, n == 1 ? "" : "s");
        else
            log_debug("jwt_auth: provider %s: fetching keys failed again: %s", p->name, failure);
        p->failing = true;
        fetch_schedule(p, p->min_refetch_s < p->refresh_s ? p->min_refetch_s : p->refresh_s);
        return;
    }
    if (p->failing)
        log_info("jwt_auth: provider %s: fetching keys works again", p->name);
    p->failing = false;
    fetch_schedule(p, p->refresh_s);
}

static void on_http_done(struct evhttp_request *req, void *arg);

/* Start a GET of url for p on the fetcher's loop. Returns NULL, or why not. */
static const char *http_get(struct jwt_provider *p, const char *url)
{
    struct jwt_global *g = p->g;
    struct evhttp_uri *u = evhttp_uri_parse(url);
    const char *why = NULL;
    if (!u || !evhttp_uri_get_host(u))
        why = "bad URL";
    else if (strcmp(evhttp_uri_get_scheme(u), "https") == 0 && !p->ssl_ctx)
        why = "no TLS context";
    if (why) {
        if (u)
            evhttp_uri_free(u);
        return why;
    }
    const char *host = evhttp_uri_get_host(u), *path = evhttp_uri_get_path(u);
    const char *query = evhttp_uri_get_query(u);
    int https = strcmp(evhttp_uri_get_scheme(u), "https") == 0;
    int port = evhttp_uri_get_port(u) > 0 ? evhttp_uri_get_port(u) : https ? 443 : 80;
    char target[2200], hosthdr[300], bare[256];
    snprintf(target, sizeof(target), "%s%s%s", path && *path ? path : "/", query ? "?" : "",
             query ? query : "");
    if (evhttp_uri_get_port(u) > 0)
        snprintf(hosthdr, sizeof(hosthdr), "%s:%d", host, port);
    else
        snprintf(hosthdr, sizeof(hosthdr), "%s", host);
    /* evhttp keeps the brackets of an IPv6 literal */
    snprintf(bare, sizeof(bare), "%s", host);
    if (bare[0] == '[' && strlen(bare) > 2) {
        memmove(bare, bare + 1, strlen(bare));
        bare[strlen(bare) - 1] = '\0';
    }
    struct bufferevent *bev = NULL;
    if (https) {
        SSL *ssl = SSL_new(p->ssl_ctx);
        unsigned char ip[16];
        int literal = inet_pton(AF_INET, bare, ip) == 1 || inet_pton(AF_INET6, bare, ip) == 1;
        if (!ssl)
            die("jwt_auth: SSL_new failed");
        if (literal) {
            X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), bare);
        } else {
            SSL_set_tlsext_host_name(ssl, bare);
            SSL_set1_host(ssl, bare);
        }
        bev = bufferevent_openssl_socket_new(g->base, -1, ssl, BUFFEREVENT_SSL_CONNECTING,
                                             BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
        if (!bev)
            die("jwt_auth: bufferevent_openssl_socket_new failed");
        bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
    }
    p->conn = evhttp_connection_base_bufferevent_new(g->base, g->dns, bev, bare, (uint16_t)port);
    if (!p->conn)
        die("jwt_auth: evhttp_connection_base_bufferevent_new failed");
    struct timeval tv = { p->timeout_ms / 1000, (p->timeout_ms % 1000) * 1000 };
    evhttp_connection_set_timeout_tv(p->conn, &tv);
    evhttp_connection_set_max_body_size(p->conn, (ev_ssize_t)p->max_bytes);
    evhttp_connection_set_retries(p->conn, 0);
    struct evhttp_request *req = evhttp_request_new(on_http_done, p);
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Host", hosthdr);
    evhttp_add_header(h, "Accept", "application/json");
    evhttp_add_header(h, "Connection", "close");
    evhttp_add_header(h, "User-Agent", "portico-jwt_auth");
    evhttp_uri_free(u);
    if (evhttp_make_request(p->conn, req, EVHTTP_REQ_GET, target) != 0)
        return "cannot send the request";
    return NULL;
}

/* Park the current connection (its callback may be running). */
static void conn_park(struct jwt_provider *p)
{
    if (!p->conn)
        return;
    if (p->conn_old[0] && p->conn_old[1])
        die("jwt_auth: more than two connections in one fetch");
    p->conn_old[p->conn_old[0] ? 1 : 0] = p->conn;
    p->conn = NULL;
}

/* Free every connection of p; only where none of their callbacks runs. */
static void conns_free(struct jwt_provider *p)
{
    conn_park(p);
    for (int i = 0; i < 2; i++) {
        if (p->conn_old[i])
            evhttp_connection_free(p->conn_old[i]);
        p->conn_old[i] = NULL;
    }
}

/* Discovery answered: take its jwks_uri and fetch that. */
static const char *discovery_answer(struct jwt_provider *p, const char *body, size_t len)
{
    json_t *j = json_loadb(body, len, JSON_REJECT_DUPLICATES, NULL);
    const char *iss = json_string_value(json_object_get(j, "issuer"));
    const char *uri = json_string_value(json_object_get(j, "jwks_uri"));
    const char *why = NULL;
    if (!json_is_object(j))
        why = "the openid-configuration is not a JSON object";
    else if (!iss || strcmp(iss, p->issuer) != 0)
        why = "the openid-configuration names another issuer";
    else if (!uri || !url_ok(uri))
        why = "the openid-configuration has no usable jwks_uri";
    else if (strncmp(p->discovery_url, "https://", 8) == 0 && strncmp(uri, "https://", 8) != 0)
        why = "the openid-configuration's jwks_uri is not https";
    if (!why) {
        free(p->found_jwks_uri);
        p->found_jwks_uri = xstrdup(uri);
    }
    json_decref(j);
    return why;
}

static const char *jwks_answer(struct jwt_provider *p, const char *body, size_t len)
{
    unsigned char hash[SHA256_DIGEST_LENGTH];
    char why[200];
    static __thread char reason[256];
    SHA256((const unsigned char *)body, len, hash);
    if (p->have_hash && memcmp(hash, p->last_hash, sizeof(hash)) == 0)
        return NULL; /* unchanged: keep the set (and the caches) */
    struct jwt_keyset *ks = jwks_parse(body, len, p->algs, 0, why, sizeof(why));
    if (!ks) {
        snprintf(reason, sizeof(reason), "bad key set: %s", why);
        return reason;
    }
    size_t n = ks->n;
    provider_set_keys(p, ks);
    memcpy(p->last_hash, hash, sizeof(hash));
    p->have_hash = true;
    log_info("jwt_auth: provider %s: %zu key%s loaded", p->name, n, n == 1 ? "" : "s");
    return NULL;
}

static void on_http_done(struct evhttp_request *req, void *arg)
{
    struct jwt_provider *p = arg;
    int code = req ? evhttp_request_get_response_code(req) : 0;
    char why[120];
    const char *failure = NULL;
    if (code == 0) {
        failure = "no answer (refused, timed out, TLS or DNS failure, or too large)";
    } else if (code != 200) {
        snprintf(why, sizeof(why), "HTTP status %d", code);
        failure = why;
    } else {
        struct evbuffer *b = evhttp_request_get_input_buffer(req);
        size_t len = evbuffer_get_length(b);
        char *body = xmalloc(len + 1);
        evbuffer_copyout(b, body, len);
        body[len] = '\0';
        if (p->stage_discovery) {
            failure = discovery_answer(p, body, len);
            if (!failure) {
                p->stage_discovery = false;
                conn_park(p);
                failure = http_get(p, p->found_jwks_uri);
                if (!failure) {
                    free(body);
                    return; /* busy until the JWKS answer */
                }
            }
        } else {
            failure = jwks_answer(p, body, len);
        }
        free(body);
    }
    conn_park(p);
    fetch_done(p, failure);
}

static void fetch_start(struct jwt_provider *p)
{
    if (p->busy)
        return;
    evtimer_del(p->timer);
    conns_free(p);
    p->busy = true;
    p->stage_discovery = p->discovery_url != NULL;
    const char *why = http_get(p, p->jwks_uri ? p->jwks_uri : p->discovery_url);
    if (why) {
        conn_park(p);
        fetch_done(p, why);
    }
}

static void on_fetch_timer(evutil_socket_t fd, short what, void *arg)
{
    fetch_start(arg);
}

/* Workers' early refetch requests, and the stop request. */
static void on_fetcher_wake(evutil_socket_t fd, short what, void *arg)
{
    struct jwt_global *g = arg;
    uint64_t n;
    while (read(fd, &n, sizeof(n)) > 0)
        ;
    if (__atomic_load_n(&g->stop, __ATOMIC_ACQUIRE)) {
        event_base_loopbreak(g->base);
        return;
    }
    for (size_t i = 0; i < g->n; i++)
        if (__atomic_exchange_n(&g->p[i]->early, 0, __ATOMIC_ACQ_REL))
            fetch_start(g->p[i]);
}

static void *fetcher_main(void *arg)
{
    struct jwt_global *g = arg;
    event_base_dispatch(g->base);
    return NULL;
}

static int global_start(void *gcfg, char *err, size_t errlen)
{
    struct jwt_global *g = gcfg;
    if (!g || !g->remote || g->running)
        return 0;
    g->base = event_base_new();
    if (!g->base)
        return fail(err, errlen, "jwt_auth: cannot create the key fetcher's event loop");
    g->dns = evdns_base_new(g->base, EVDNS_BASE_INITIALIZE_NAMESERVERS);
    if (!g->dns)
        g->dns = evdns_base_new(g->base, 0);
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0 || !g->dns) {
        if (fd >= 0)
            close(fd);
        return fail(err, errlen, "jwt_auth: cannot set up the key fetcher");
    }
    g->wake_ev = event_new(g->base, fd, EV_READ | EV_PERSIST, on_fetcher_wake, g);
    event_add(g->wake_ev, NULL);
    for (size_t i = 0; i < g->n; i++) {
        struct jwt_provider *p = g->p[i];
        if (!p->jwks_uri && !p->discovery_url)
            continue;
        p->timer = evtimer_new(g->base, on_fetch_timer, p);
        fetch_schedule(p, 0);
    }
    int rc = pthread_create(&g->thread, NULL, fetcher_main, g);
    if (rc != 0)
        return fail(err, errlen, "jwt_auth: cannot start the key fetcher: %s", strerror(rc));
    g->running = true;
    __atomic_store_n(&g->wake_fd, fd, __ATOMIC_RELEASE);
    return 0;
}

static void global_free(void *arg)
{
    struct jwt_global *g = arg;
    if (!g)
        return;
    if (g->running) {
        uint64_t one = 1;
        __atomic_store_n(&g->stop, 1, __ATOMIC_RELEASE);
        if (write(g->wake_fd, &one, sizeof(one)) < 0)
            log_warn("jwt_auth: cannot wake the key fetcher to stop it: %s", strerror(errno));
        pthread_join(g->thread, NULL);
    }
    for (size_t i = 0; i < g->n; i++) {
        struct jwt_provider *p = g->p[i];
        conns_free(p);
        if (p->timer)
            event_free(p->timer);
    }
    if (g->wake_ev) {
        close(event_get_fd(g->wake_ev));
        event_free(g->wake_ev);
    }
    if (g->dns)
        evdns_base_free(g->dns, 0);
    if (g->base)
        event_base_free(g->base);
    for (size_t i = 0; i < g->n; i++)
        provider_free(g->p[i]);
    free(g->p);
    free(g);
}

/* ---- config: the route filter --------------------------------------------- */

enum src_kind { SRC_BEARER, SRC_HEADER, SRC_COOKIE, SRC_QUERY };

struct token_src {
    enum src_kind kind;
    char *name; /* header, cookie or parameter name; NULL for bearer */
};

enum rule_op { RULE_EQUALS, RULE_ONE_OF, RULE_CONTAINS };

struct claim_rule {
    char *claim;
    enum rule_op op;
    json_t *value; /* equals: a scalar; one_of, contains: a list */
};

struct claim_header {
    char *claim, *header;
};

struct jwt_route {
    struct jwt_provider **providers;
    size_t nproviders;
    struct token_src *src;
    size_t nsrc;
    char **required;
    size_t nrequired;
    struct claim_rule *rules;
    size_t nrules;
    struct claim_header *hdrs;
    size_t nhdrs;
    bool forward_token, allow_anonymous;
    size_t max_token;
    char *realm;
};

static void route_free(void *cfg)
{
    struct jwt_route *rc = cfg;
    if (!rc)
        return;
    free(rc->providers);
    for (size_t i = 0; i < rc->nsrc; i++)
        free(rc->src[i].name);
    free(rc->src);
    for (size_t i = 0; i < rc->nrequired; i++)
        free(rc->required[i]);
    free(rc->required);
    for (size_t i = 0; i < rc->nrules; i++) {
        free(rc->rules[i].claim);
        json_decref(rc->rules[i].value);
    }
    free(rc->rules);
    for (size_t i = 0; i < rc->nhdrs; i++) {
        free(rc->hdrs[i].claim);
        free(rc->hdrs[i].header);
    }
    free(rc->hdrs);
    free(rc->realm);
    free(rc);
}

/* Claim names go into messages and variable names: printable, no quotes. */
static int claim_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > JWT_CLAIM_NAME_MAX)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] <= 0x20 || s[i] >= 0x7f || s[i] == '"' || s[i] == '\\')
            return 0;
    return 1;
}

static int header_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 128)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!(isalnum((unsigned char)s[i]) || strchr("!#$%&'*+-.^_`|~", s[i])))
            return 0;
    return 1;
}

static struct jwt_provider *provider_find(struct jwt_global *g, const char *name)
{
    for (size_t i = 0; g && i < g->n; i++)
        if (strcmp(g->p[i]->name, name) == 0)
            return g->p[i];
    return NULL;
}

static int route_providers(json_t *j, const char *path, struct jwt_global *g, struct jwt_route *rc,
                           char *err, size_t errlen)
{
    json_t *one = json_object_get(j, "provider"), *many = json_object_get(j, "providers"), *v;
    size_t i;
    if (!!one == !!many)
        return fail(err, errlen,
                    "%s: give \"provider\": \"NAME\" or \"providers\": [\"NAME\", "
                    "...] (one of the two), naming entries of jwt_providers",
                    path);
    if (many && (!json_is_array(many) || json_array_size(many) == 0))
        return fail(err, errlen, "%s.providers: expected a non-empty list of provider names", path);
    size_t n = one ? 1 : json_array_size(many);
    rc->providers = xcalloc(n, sizeof(*rc->providers));
    for (i = 0; i < n; i++) {
        char where[300];
        v = one ? one : json_array_get(many, i);
        if (one)
            snprintf(where, sizeof(where), "%s.provider", path);
        else
            snprintf(where, sizeof(where), "%s.providers[%zu]", path, i);
        if (!json_is_string(v))
            return fail(err, errlen, "%s: expected a provider name", where);
        struct jwt_provider *p = provider_find(g, json_string_value(v));
        if (!p)
            return fail(err, errlen, "%s: no provider named \"%.64s\" in jwt_providers%s", where,
                        json_string_value(v), g ? "" : " (the section is missing or invalid)");
        for (size_t k = 0; k < rc->nproviders; k++)
            if (rc->providers[k] == p)
                return fail(err, errlen, "%s: \"%.64s\" is listed twice", where, p->name);
        rc->providers[rc->nproviders++] = p;
    }
    return 0;
}

static int route_sources(json_t *j, const char *path, struct jwt_route *rc, char *err,
                         size_t errlen)
{
    json_t *list = json_object_get(j, "token_from"), *v;
    size_t i;
    if (!list) {
        rc->src = xcalloc(1, sizeof(*rc->src));
        rc->nsrc = 1; /* SRC_BEARER */
        return 0;
    }
    if (!json_is_array(list) || json_array_size(list) == 0 || json_array_size(list) > 8)
        return fail(err, errlen,
                    "%s.token_from: expected a list of 1 to 8 sources like "
                    "[\"bearer\", \"header:X-Token\", \"cookie:session\", \"query:access_token\"]",
                    path);
    rc->src = xcalloc(json_array_size(list), sizeof(*rc->src));
    json_array_foreach (list, i, v) {
        const char *s = json_string_value(v), *colon = s ? strchr(s, ':') : NULL;
        const char *name = colon ? colon + 1 : "";
        size_t kl = colon ? (size_t)(colon - s) : 0;
        struct token_src *src = &rc->src[rc->nsrc];
        if (s && strcmp(s, "bearer") == 0)
            src->kind = SRC_BEARER;
        else if (kl == 6 && strncmp(s, "header", 6) == 0 && header_name_ok(name))
            src->kind = SRC_HEADER;
        else if (kl == 6 && strncmp(s, "cookie", 6) == 0 && header_name_ok(name))
            src->kind = SRC_COOKIE;
        else if (kl == 5 && strncmp(s, "query", 5) == 0 && *name && strlen(name) <= 128 &&
                 !strpbrk(name, "&=#; "))
            src->kind = SRC_QUERY;
        else
            return fail(err, errlen,
                        "%s.token_from[%zu]: expected \"bearer\", \"header:NAME\", "
                        "\"cookie:NAME\" or \"query:NAME\"",
                        path, i);
        if (src->kind != SRC_BEARER)
            src->name = xstrdup(name);
        rc->nsrc++;
    }
    return 0;
}

static int route_required(json_t *j, const char *path, struct jwt_route *rc, char *err,
                          size_t errlen)
{
    json_t *list = json_object_get(j, "required"), *v;
    size_t i;
    if (!list)
        return 0;
    if (!json_is_array(list))
        return fail(err, errlen, "%s.required: expected a list of claim names like [\"sub\"]",
                    path);
    rc->required = xcalloc(json_array_size(list) + 1, sizeof(char *));
    json_array_foreach (list, i, v) {
        if (!json_is_string(v) || !claim_name_ok(json_string_value(v)))
            return fail(err, errlen,
                        "%s.required[%zu]: expected a claim name (1 to 64 printable "
                        "characters, no spaces or quotes)",
                        path, i);
        rc->required[rc->nrequired++] = xstrdup(json_string_value(v));
    }
    return 0;
}

static int route_rules(json_t *j, const char *path, struct jwt_route *rc, char *err, size_t errlen)
{
    json_t *obj = json_object_get(j, "claims"), *rule;
    const char *claim;
    if (!obj)
        return 0;
    if (!json_is_object(obj))
        return fail(err, errlen,
                    "%s.claims: expected an object like {\"scope\": {\"contains\": "
                    "[\"users:read\"]}, \"tenant\": {\"equals\": \"acme\"}}",
                    path);
    rc->rules = xcalloc(json_object_size(obj) + 1, sizeof(*rc->rules));
    json_object_foreach (obj, claim, rule) {
        const char *op;
        json_t *val;
        if (!claim_name_ok(claim))
            return fail(err, errlen,
                        "%s.claims: \"%.64s\" is not a claim name (1 to 64 printable "
                        "characters, no spaces or quotes)",
                        path, claim);
        if (!json_is_object(rule) || json_object_size(rule) != 1)
            return fail(err, errlen,
                        "%s.claims.%s: expected one of {\"equals\": VALUE}, "
                        "{\"one_of\": [VALUES]}, {\"contains\": [STRINGS]}",
                        path, claim);
        op = json_object_iter_key(json_object_iter(rule));
        val = json_object_iter_value(json_object_iter(rule));
        struct claim_rule *r = &rc->rules[rc->nrules];
        if (strcmp(op, "equals") == 0) {
            if (!json_is_string(val) && !json_is_number(val) && !json_is_boolean(val))
                return fail(err, errlen,
                            "%s.claims.%s.equals: expected a string, number or "
                            "boolean",
                            path, claim);
            r->op = RULE_EQUALS;
            json_incref(val);
        } else if (strcmp(op, "one_of") == 0 || strcmp(op, "contains") == 0) {
            int contains = op[0] == 'c';
            size_t i;
            json_t *x;
            if (contains && json_is_string(val)) {
                val = json_pack("[O]", val);
            } else if (!json_is_array(val) || json_array_size(val) == 0) {
                return fail(err, errlen, "%s.claims.%s.%s: expected a non-empty list", path, claim,
                            op);
            } else {
                json_incref(val);
            }
            json_array_foreach (val, i, x) {
                if (contains ? !json_is_string(x)
                             : !(json_is_string(x) || json_is_number(x) || json_is_boolean(x))) {
                    json_decref(val);
                    return fail(err, errlen, "%s.claims.%s.%s[%zu]: expected a %s", path, claim, op,
                                i, contains ? "string" : "string, number or boolean");
                }
            }
            r->op = contains ? RULE_CONTAINS : RULE_ONE_OF;
        } else {
            return fail(err, errlen,
                        "%s.claims.%s.%.32s: unknown rule (known: equals, one_of, "
                        "contains)",
                        path, claim, op);
        }
        r->value = val; /* a reference of our own, or a new list */
        r->claim = xstrdup(claim);
        rc->nrules++;
    }
    return 0;
}

static int route_headers(json_t *j, const char *path, struct jwt_route *rc, char *err,
                         size_t errlen)
{
    json_t *obj = json_object_get(j, "claims_to_headers"), *h;
    const char *claim;
    if (!obj)
        return 0;
    if (!json_is_object(obj))
        return fail(err, errlen,
                    "%s.claims_to_headers: expected an object like {\"sub\": "
                    "\"X-User-Id\"}",
                    path);
    rc->hdrs = xcalloc(json_object_size(obj) + 1, sizeof(*rc->hdrs));
    json_object_foreach (obj, claim, h) {
        const char *name = json_string_value(h);
        if (!claim_name_ok(claim))
            return fail(err, errlen, "%s.claims_to_headers: \"%.64s\" is not a claim name", path,
                        claim);
        if (!name || !header_name_ok(name))
            return fail(err, errlen, "%s.claims_to_headers.%s: expected a header name", path,
                        claim);
        static const char *const owned[] = { "Host",
                                             "Content-Length",
                                             "Transfer-Encoding",
                                             "Connection",
                                             "Authorization",
                                             "Cookie",
                                             "Keep-Alive",
                                             "TE",
                                             "Trailer",
                                             "Upgrade",
                                             NULL };
        for (size_t i = 0; owned[i]; i++)
            if (strcasecmp(name, owned[i]) == 0)
                return fail(err, errlen, "%s.claims_to_headers.%s: \"%s\" cannot carry a claim",
                            path, claim, owned[i]);
        rc->hdrs[rc->nhdrs].claim = xstrdup(claim);
        rc->hdrs[rc->nhdrs].header = xstrdup(name);
        rc->nhdrs++;
    }
    return 0;
}

static int route_parse(json_t *j, const char *path, void *gcfg, void **cfg, char *err,
                       size_t errlen)
{
    static const char known[] = " provider providers token_from required claims "
                                "claims_to_headers forward_token allow_anonymous max_token_bytes "
                                "realm ";
    long max_token = JWT_MAX_TOKEN_DEFAULT;
    if (!json_is_object(j))
        return fail(err, errlen, "%s: expected an object like {\"provider\": \"main\"}", path);
    if (check_keys(j, path, known, err, errlen) < 0)
        return -1;
    struct jwt_route *rc = xcalloc(1, sizeof(*rc));
    rc->forward_token = true;
    json_t *realm = json_object_get(j, "realm");
    int bad_realm = realm && (!json_is_string(realm) || json_string_length(realm) > 64 ||
                              !claim_name_ok(json_string_value(realm)));
    if (route_providers(j, path, gcfg, rc, err, errlen) < 0 ||
        route_sources(j, path, rc, err, errlen) < 0 ||
        route_required(j, path, rc, err, errlen) < 0 || route_rules(j, path, rc, err, errlen) < 0 ||
        route_headers(j, path, rc, err, errlen) < 0 ||
        get_bool(j, path, "forward_token", &rc->forward_token, err, errlen) < 0 ||
        get_bool(j, path, "allow_anonymous", &rc->allow_anonymous, err, errlen) < 0 ||
        get_int(j, path, "max_token_bytes", 256, JWT_MAX_TOKEN_LIMIT, &max_token, err, errlen) <
            0 ||
        (bad_realm && fail(err, errlen,
                           "%s.realm: expected 1 to 64 printable characters without "
                           "spaces or quotes",
                           path) < 0)) {
        route_free(rc);
        return -1;
    }
    rc->max_token = (size_t)max_token;
    rc->realm = xstrdup(realm ? json_string_value(realm) : "portico");
    *cfg = rc;
    return 0;
}

/* ---- the hooks ---------------------------------------------------------- */

/* A test may fix the clock. */
static double (*jwt_clock)(void);

static double now_s(void)
{
    if (jwt_clock)
        return jwt_clock();
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Locate "name=value" in a list separated by sep (a query string or a
 * Cookie header). Returns the value and its length, or NULL. */
static const char *find_pair(const char *s, size_t n, char sep, const char *name, size_t *len)
{
    size_t nl = strlen(name);
    const char *end = s + n;
    while (s < end) {
        const char *e = memchr(s, sep, (size_t)(end - s));
        if (!e)
            e = end;
        while (s < e && (*s == ' ' || *s == '\t'))
            s++;
        if ((size_t)(e - s) > nl && memcmp(s, name, nl) == 0 && s[nl] == '=') {
            const char *v = s + nl + 1, *ve = e;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            if (ve - v >= 2 && v[0] == '"' && ve[-1] == '"') { /* a quoted cookie value */
                v++;
                ve--;
            }
            *len = (size_t)(ve - v);
            return v;
        }
        s = e + 1;
    }
    return NULL;
}

/* The token in r from the first configured source that has one, or NULL.
 * *src is the source's index. */
static const char *token_find(struct request *r, const struct jwt_route *rc, size_t *len,
                              size_t *src)
{
    for (size_t i = 0; i < rc->nsrc; i++) {
        const struct token_src *s = &rc->src[i];
        const char *v = NULL, *q;
        size_t n = 0;
        *src = i;
        switch (s->kind) {
        case SRC_BEARER:
        case SRC_HEADER:
            v = request_header(r, s->kind == SRC_BEARER ? "Authorization" : s->name, &n);
            if (v && n >= 6 && strncasecmp(v, "Bearer", 6) == 0 &&
                (n == 6 || v[6] == ' ' || v[6] == '\t')) {
                v += 6;
                n -= 6;
                while (n && (*v == ' ' || *v == '\t')) {
                    v++;
                    n--;
                }
            } else if (s->kind == SRC_BEARER) {
                v = NULL; /* another scheme (Basic, ...): not ours */
            }
            break;
        case SRC_COOKIE:
            v = request_header(r, "Cookie", &n);
            v = v ? find_pair(v, n, ';', s->name, &n) : NULL;
            break;
        case SRC_QUERY:
            q = request_query(r, &n);
            v = q ? find_pair(q, n, '&', s->name, &n) : NULL;
            break;
        }
        if (v) {
            while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
                n--;
            *len = n;
            return v;
        }
    }
    return NULL;
}

/* Answer 401/403/503 the RFC 6750 way. error NULL: no token was given, so
 * the challenge carries no error attribute. why (a fixed text without
 * quotes) goes to error_description and to the access log. */
static enum filter_status refuse(struct request *r, const struct jwt_route *rc, int status,
                                 const char *error, const char *why)
{
    char www[256], body[256];
    int n;
    if (error)
        snprintf(www, sizeof(www), "Bearer realm=\"%s\", error=\"%s\", error_description=\"%s\"",
                 rc->realm, error, why);
    else
        snprintf(www, sizeof(www), "Bearer realm=\"%s\"", rc->realm);
    if (status == 503) {
        response_set_header(r, "Retry-After", "5");
        n = snprintf(body, sizeof(body),
                     "{\"error\":\"temporarily_unavailable\",\"error_description\":\"%s\"}\n", why);
    } else {
        response_set_header(r, "WWW-Authenticate", www);
        n = snprintf(body, sizeof(body), "{\"error\":\"%s\",\"error_description\":\"%s\"}\n",
                     error ? error : "unauthorized", why);
    }
    request_log_field(r, "jwt_error", why);
    /* why is one of a fixed set of static reasons: a bounded label */
    module_metric_add("portico_jwt_requests_total", 1, "outcome",
                      status == 503   ? "unavailable"
                      : status == 403 ? "forbidden"
                      : status == 400 ? "bad_request"
                                      : "refused",
                      "reason", why);
    request_respond(r, status, NULL, body, (size_t)n < sizeof(body) ? (size_t)n : 0);
    return FILTER_RESPONDED;
}

/* A claim as header or variable text: strings as they are, numbers and
 * booleans written out; lists and objects as compact JSON (headers only).
 * Returns NULL for null or when scalar_only and the claim is not a scalar. */
static char *claim_text(struct request *r, json_t *v, int scalar_only)
{
    char buf[64];
    if (json_is_string(v))
        return request_strdup(r, json_string_value(v));
    if (json_is_integer(v)) { /* exp, iat...: every request, so no printf */
        json_int_t x = json_integer_value(v);
        unsigned long long u = x < 0 ? 0ULL - (unsigned long long)x : (unsigned long long)x;
        char *p = buf + sizeof(buf);
        *--p = '\0';
        do
            *--p = (char)('0' + u % 10);
        while (u /= 10);
        if (x < 0)
            *--p = '-';
        return request_strdup(r, p);
    }
    if (json_is_real(v)) {
        snprintf(buf, sizeof(buf), "%.17g", json_real_value(v));
        return request_strdup(r, buf);
    }
    if (json_is_boolean(v))
        return request_strdup(r, json_is_true(v) ? "true" : "false");
    if (scalar_only || !(json_is_array(v) || json_is_object(v)))
        return NULL;
    char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    char *out = s ? request_strdup(r, s) : NULL;
    free(s);
    return out;
}

/* Is the space-separated word w (wl bytes) in the string s? */
static int has_word(const char *s, const char *w, size_t wl)
{
    while (*s) {
        size_t n = strcspn(s, " ");
        if (n == wl && memcmp(s, w, wl) == 0)
            return 1;
        s += n;
        while (*s == ' ')
            s++;
    }
    return 0;
}

static int rule_holds(const struct claim_rule *rule, json_t *claims)
{
    json_t *v = json_object_get(claims, rule->claim), *x;
    size_t i;
    if (!v)
        return 0;
    switch (rule->op) {
    case RULE_EQUALS:
        return json_equal(v, rule->value);
    case RULE_ONE_OF:
        json_array_foreach (rule->value, i, x)
            if (json_equal(v, x))
                return 1;
        return 0;
    case RULE_CONTAINS:
        json_array_foreach (rule->value, i, x) {
            const char *want = json_string_value(x);
            size_t k, wl = json_string_length(x);
            json_t *e;
            int found = 0;
            if (json_is_string(v)) {
                found = has_word(json_string_value(v), want, wl);
            } else if (json_is_array(v)) {
                json_array_foreach (v, k, e)
                    found |= json_is_string(e) && strcmp(json_string_value(e), want) == 0;
            }
            if (!found)
                return 0;
        }
        return 1;
    }
    return 0;
}

static void share_claims(struct request *r, const struct jwt_route *rc, json_t *claims)
{
    const char *key;
    json_t *v;
    char name[JWT_CLAIM_NAME_MAX + 8] = "jwt.";
    json_object_foreach (claims, key, v) {
        char *text;
        if (!claim_name_ok(key) || !(text = claim_text(r, v, 1)))
            continue;
        memcpy(name + 4, key, strlen(key) + 1); /* claim_name_ok: at most 64 */
        request_var_set(r, name, text);
    }
    for (size_t i = 0; i < rc->nhdrs; i++) {
        char *text = claim_text(r, json_object_get(claims, rc->hdrs[i].claim), 0);
        /* refused when it holds CR, LF or NUL: the header then stays unset */
        if (text)
            request_set_header(r, rc->hdrs[i].header, text);
    }
}

/* A request waiting for the early refetch it asked for (an unknown kid, or
 * no keys yet). Polled on the worker's own loop: the fetcher thread never
 * touches a request. */
struct jwt_wait {
    struct request *r;
    const struct jwt_route *rc;
    struct event *timer; /* NULL once fired or freed */
    char *tok;           /* a copy, in the request's arena */
    size_t len, src;
    struct jwt_provider *p;
    uint64_t seq;
    int64_t deadline_ms;
};

#define JWT_WAIT_POLL_MS 10

static enum filter_status authenticate(struct request *r, const struct jwt_route *rc,
                                       const char *tok, size_t len, size_t src, int may_wait);

static void wait_cleanup(void *arg)
{
    struct jwt_wait *w = arg;
    if (w->timer) { /* the request ended while waiting (client gone) */
        event_free(w->timer);
        w->timer = NULL;
    }
}

static void on_wait_timer(evutil_socket_t fd, short what, void *arg)
{
    struct jwt_wait *w = arg;
    if (__atomic_load_n(&w->p->fetches_done, __ATOMIC_ACQUIRE) == w->seq &&
        monotonic_ms() < w->deadline_ms) {
        struct timeval tv = { 0, JWT_WAIT_POLL_MS * 1000 };
        evtimer_add(w->timer, &tv);
        return;
    }
    event_free(w->timer);
    w->timer = NULL;
    /* One more try, without waiting again; a refusal is answered inside. */
    if (authenticate(w->r, w->rc, w->tok, w->len, w->src, 0) == FILTER_CONTINUE)
        request_resume(w->r);
}

static enum filter_status wait_for_keys(struct request *r, const struct jwt_route *rc,
                                        const char *tok, size_t len, size_t src,
                                        const struct verdict *v)
{
    struct jwt_wait *w = request_alloc(r, sizeof(*w));
    w->r = r;
    w->rc = rc;
    w->tok = request_alloc(r, len + 1);
    memcpy(w->tok, tok, len);
    w->len = len;
    w->src = src;
    w->p = v->wait_for;
    w->seq = v->seq;
    w->deadline_ms = monotonic_ms() + w->p->timeout_ms + 100;
    w->timer = evtimer_new(request_event_base(r), on_wait_timer, w);
    if (!w->timer)
        die("jwt_auth: evtimer_new failed");
    request_cleanup_add(r, wait_cleanup, w);
    struct timeval tv = { 0, JWT_WAIT_POLL_MS * 1000 };
    evtimer_add(w->timer, &tv);
    return FILTER_PAUSED;
}

/* Verify the token and apply the route's rules. Returns FILTER_CONTINUE,
 * FILTER_RESPONDED (refused, answered here), or FILTER_PAUSED (may_wait and
 * the keys are being refetched for this request). */
static enum filter_status authenticate(struct request *r, const struct jwt_route *rc,
                                       const char *tok, size_t len, size_t src, int may_wait)
{
    struct verdict v = { NULL, 401, NULL, 0 };
    json_t *claims = token_verify(rc->providers, rc->nproviders, tok, len, now_s(), &v);
    if (!claims && may_wait && v.wait_for)
        return wait_for_keys(r, rc, tok, len, src, &v);
    if (!claims)
        return refuse(r, rc, v.status, "invalid_token", v.why);
    for (size_t i = 0; i < rc->nrequired; i++) {
        json_t *c = json_object_get(claims, rc->required[i]);
        if (!c || json_is_null(c)) {
            json_decref(claims);
            return refuse(r, rc, 401, "invalid_token", "a required claim is missing");
        }
    }
    for (size_t i = 0; i < rc->nrules; i++) {
        if (!rule_holds(&rc->rules[i], claims)) {
            json_decref(claims);
            return refuse(r, rc, 403, "insufficient_scope", "a claim rule does not hold");
        }
    }
    share_claims(r, rc, claims);
    json_decref(claims);
    if (!rc->forward_token && rc->src[src].kind == SRC_BEARER)
        request_remove_header(r, "Authorization");
    else if (!rc->forward_token && rc->src[src].kind == SRC_HEADER)
        request_remove_header(r, rc->src[src].name);
    module_metric_add("portico_jwt_requests_total", 1, "outcome", "accepted", "reason", "");
    return FILTER_CONTINUE;
}

static enum filter_status jwt_on_request(struct request *r, void *cfg, void **ctx)
{
    const struct jwt_route *rc = cfg;
    size_t len = 0, src = 0;
    /* Whatever happens next, a client's own copy never reaches the upstream. */
    for (size_t i = 0; i < rc->nhdrs; i++)
        request_remove_header(r, rc->hdrs[i].header);
    /* Two credentials: which one would the upstream believe? Refuse. */
    for (size_t i = 0; i < rc->nsrc; i++) {
        const struct token_src *ts = &rc->src[i];
        const char *h = ts->kind == SRC_BEARER ? "Authorization"
                        : ts->kind == SRC_HEADER ? ts->name
                                                 : NULL;
        if (h && request_header_count(r, h) > 1)
            return refuse(r, rc, 400, "invalid_request", "more than one credential field");
    }
    const char *tok = token_find(r, rc, &len, &src);
    if (!tok) {
        if (rc->allow_anonymous) {
            module_metric_add("portico_jwt_requests_total", 1, "outcome", "anonymous", "reason", "");
            return FILTER_CONTINUE;
        }
        return refuse(r, rc, 401, NULL, "no token");
    }
    if (len > rc->max_token)
        return refuse(r, rc, 401, "invalid_token", "token too large");
    if (len == 0)
        return refuse(r, rc, 401, "invalid_token", "empty token");
    return authenticate(r, rc, tok, len, src, 1);
}

const struct module module_jwt_auth = {
    .name = "jwt_auth",
    .global_key = "jwt_providers",
    .parse_global = global_parse,
    .start_global = global_start,
    .free_global = global_free,
    .parse_config = route_parse,
    .free_config = route_free,
    .on_request = jwt_on_request,
};
