/* libFuzzer target for modules/jwt_auth.c's token path: the input is a
 * token, verified (size limit, base64url, strict JSON, alg and kid against
 * real keys, signature, claims) against providers with an HMAC secret, an
 * RSA and an EC public key and a JWK Set with kids; the same bytes are also
 * parsed as a JWK Set, as a fetched one would be.
 *
 * Checks:
 *   - nothing a fuzzer can write verifies (it cannot sign), except the one
 *     seed token made here with the secret, which must verify;
 *   - a base64url text that decodes encodes back to exactly itself (the
 *     decoder accepts canonical encodings only);
 *   - every refusal has a reason.
 * Build: see SOURCES in tests/fuzz/run.sh (the module is included, the
 * request API it links against is stubbed: no request exists here). */
#define module_jwt_auth jwt_auth_under_fuzz
#include "../../modules/jwt_auth.c"

#include <openssl/pem.h>

/* ---- the module API, unused on this path --------------------------------- */
const char *request_header(const struct request *r, const char *n, size_t *l)
{
    return NULL;
}
const char *request_query(const struct request *r, size_t *l)
{
    return NULL;
}
int request_set_header(struct request *r, const char *n, const char *v)
{
    return 0;
}
void request_remove_header(struct request *r, const char *n)
{
}
int response_set_header(struct request *r, const char *n, const char *v)
{
    return 0;
}
void request_respond(struct request *r, int s, const char *c, const char *b, size_t l)
{
}
void request_resume(struct request *r)
{
}
void *request_alloc(struct request *r, size_t n)
{
    abort();
}
char *request_strdup(struct request *r, const char *s)
{
    abort();
}
void request_cleanup_add(struct request *r, void (*fn)(void *), void *arg)
{
}
void request_log_field(struct request *r, const char *k, const char *v)
{
}
void request_var_set(struct request *r, const char *n, const char *v)
{
}
struct event_base *request_event_base(const struct request *r)
{
    return NULL;
}
size_t request_header_count(const struct request *r, const char *n)
{
    return 0;
}
void module_metric_add(const char *name, uint64_t n, const char *k1, const char *v1,
                       const char *k2, const char *v2)
{
}

static struct jwt_global *g;
static char *seed_token;

static double fuzz_clock(void)
{
    return 1700000000.0;
}

static char *pem_of(EVP_PKEY *pk)
{
    BIO *b = BIO_new(BIO_s_mem());
    PEM_write_bio_PUBKEY(b, pk);
    char *p, *out;
    long n = BIO_get_mem_data(b, &p);
    out = malloc((size_t)n + 1);
    memcpy(out, p, (size_t)n);
    out[n] = '\0';
    BIO_free(b);
    return out;
}

static void encode(const unsigned char *d, size_t n, char *out)
{
    static const char al[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)d[i] << 16 | (uint32_t)d[i + 1] << 8 | d[i + 2];
        *out++ = al[v >> 18];
        *out++ = al[(v >> 12) & 63];
        *out++ = al[(v >> 6) & 63];
        *out++ = al[v & 63];
    }
    if (n - i == 1) {
        *out++ = al[d[i] >> 2];
        *out++ = al[(d[i] & 3) << 4];
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)d[i] << 8 | d[i + 1];
        *out++ = al[v >> 10];
        *out++ = al[(v >> 4) & 63];
        *out++ = al[(v & 15) << 2];
    }
    *out = '\0';
}

static void setup(void)
{
    static const char secret[] = "fuzz-secret-0123456789abcdef-0123456789abcdef-0123";
    EVP_PKEY *rsa = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    EVP_PKEY *ec = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    char *rsa_pem = pem_of(rsa), *ec_pem = pem_of(ec);
    json_t *conf = json_pack(
        "{s:{s:s, s:[s,s], s:s, s:s}, s:{s:s, s:[s,s], s:s, s:s}, s:{s:s, s:[s], s:s},"
        " s:{s:s, s:[s,s], s:s}}",
        "hs", "issuer", "fuzz", "algorithms", "HS256", "HS384", "secret", secret, "audiences",
        "api", "rs", "issuer", "fuzz", "algorithms", "RS256", "RS512", "public_key", rsa_pem,
        "audiences", "api", "es", "issuer", "fuzz-es", "algorithms", "ES256", "public_key", ec_pem,
        "set", "issuer", "fuzz-set", "algorithms", "RS256", "HS256", "jwks_file",
        "{\"keys\": [{\"kty\": \"oct\", \"kid\": \"a\", \"k\": "
        "\"AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow\""
        "}]}");
    char err[512];
    void *gp = NULL;
    if (!conf || global_parse(conf, "jwt_providers", &gp, err, sizeof(err)) != 0) {
        fprintf(stderr, "fuzz_jwt setup: %s\n", err);
        abort();
    }
    g = gp;
    json_decref(conf);
    free(rsa_pem);
    free(ec_pem);
    EVP_PKEY_free(rsa);
    EVP_PKEY_free(ec);
    jwt_clock = fuzz_clock;

    /* The one token that must verify. */
    const char *h = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    const char *p = "{\"iss\":\"fuzz\",\"aud\":\"api\",\"sub\":\"x\",\"exp\":1800000000}";
    char hb[128], pb[128], sb[64];
    unsigned char mac[32];
    unsigned int maclen = 0;
    encode((const unsigned char *)h, strlen(h), hb);
    encode((const unsigned char *)p, strlen(p), pb);
    seed_token = malloc(512);
    snprintf(seed_token, 512, "%s.%s", hb, pb);
    HMAC(EVP_sha256(), secret, (int)strlen(secret), (unsigned char *)seed_token, strlen(seed_token),
         mac, &maclen);
    encode(mac, maclen, sb);
    strcat(seed_token, ".");
    strcat(seed_token, sb);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!g)
        setup();
    if (size > JWT_MAX_TOKEN_DEFAULT)
        return 0; /* refused before any parsing by the hook */
    char *tok = malloc(size + 1);
    memcpy(tok, data, size);
    tok[size] = '\0';

    struct verdict v = { NULL, 401, NULL, 0 };
    json_t *claims = token_verify(g->p, g->n, tok, size, jwt_clock(), &v);
    int is_seed = size == strlen(seed_token) && memcmp(tok, seed_token, size) == 0;
    if (claims) {
        if (!is_seed) {
            fprintf(stderr, "fuzz_jwt: a token nobody signed verified\n");
            abort();
        }
        json_decref(claims);
    } else if (is_seed || !v.why) {
        fprintf(stderr, "fuzz_jwt: %s\n", is_seed ? "the signed token was refused" : "no reason");
        abort();
    }

    /* Canonical base64url: decode then encode gives the input back. */
    unsigned char *bin = malloc(size * 3 / 4 + 1);
    long n = b64url_decode(tok, size, bin);
    if (n >= 0) {
        char *again = malloc(size + 4);
        encode(bin, (size_t)n, again);
        if (strlen(again) != size || memcmp(again, tok, size) != 0) {
            fprintf(stderr, "fuzz_jwt: base64url decoding is not canonical\n");
            abort();
        }
        free(again);
    }
    free(bin);

    /* The same bytes as a fetched JWK Set. */
    char why[200];
    struct jwt_keyset *ks =
        jwks_parse(tok, size, ALGS_RSA | ALGS_EC | ALGS_HMAC, 0, why, sizeof(why));
    if (ks) {
        for (size_t i = 0; i < ks->n; i++)
            if (!ks->keys[i].alg_mask || (!ks->keys[i].pkey && !ks->keys[i].secret))
                abort();
        keyset_unref(ks);
    }
    free(tok);
    return 0;
}
