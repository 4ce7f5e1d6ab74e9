"""jwt_auth module: tokens made here (python3 standard library + the openssl
command) for every algorithm and for the attacks RFC 8725 lists, against
providers with a secret, PEM public keys, a JWKS file, a JWKS URI served by
a real HTTP(S) key server (rotation, server down, random-kid flood) and
OpenID Connect discovery; token sources, claim rules, claims forwarded as
headers and variables, and config refusals with JSON paths."""
import base64
import hashlib
import hmac
import json
import os
import random
import subprocess
import time

import pytest

import util
from conftest import Upstream, make_config

HS_SECRET = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"  # 64 bytes
CURVES = {"ES256": ("P-256", "prime256v1", 32), "ES384": ("P-384", "secp384r1", 48),
          "ES512": ("P-521", "secp521r1", 66)}


@pytest.fixture(autouse=True)
def need_module(portico_bin):
    out = subprocess.run([portico_bin, "-V"], capture_output=True, timeout=10).stdout.decode()
    mods = [ln for ln in out.splitlines() if ln.lower().startswith("modules:")]
    if not mods or "jwt_auth" not in mods[0].replace(",", " ").split():
        pytest.skip("jwt_auth module not built in")


# ---- tokens ---------------------------------------------------------------

def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def b64json(obj):
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def der_to_raw(der, n):
    """ECDSA DER SEQUENCE{INTEGER r, INTEGER s} -> r||s, n bytes each."""
    i = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = b""
    for _ in range(2):
        assert der[i] == 2
        ln = der[i + 1]
        out += der[i + 2:i + 2 + ln].lstrip(b"\x00").rjust(n, b"\x00")
        i += 2 + ln
    return out


def sign_raw(alg, msg, key=None, secret=None, der=False):
    if alg.startswith("HS"):
        return hmac.new(secret, msg, getattr(hashlib, "sha" + alg[2:])).digest()
    sig = subprocess.run(["openssl", "dgst", "-sha" + alg[2:], "-sign", key], input=msg,
                         capture_output=True, check=True).stdout
    if alg.startswith("ES") and not der:
        sig = der_to_raw(sig, CURVES[alg][2])
    return sig


def token(claims, alg="RS256", key=None, secret=None, kid=None, header=None, der=False):
    h = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        h["kid"] = kid
    h.update(header or {})
    hp = b64json(h) + "." + b64json(claims)
    if alg == "none":
        return hp + "."
    return hp + "." + b64(sign_raw(alg, hp.encode(), key, secret, der))


class Keys:
    """RSA and EC key pairs made with the openssl command, PEM files in d."""

    def __init__(self, d):
        self.d = d

    def make(self, name, kind):
        priv, pub = os.path.join(self.d, name + ".key"), os.path.join(self.d, name + ".pub")
        if kind == "rsa":
            gen = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
        else:
            gen = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:" + kind]
        subprocess.run(["openssl", "genpkey"] + gen + ["-out", priv], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "pkey", "-in", priv, "-pubout", "-out", pub], check=True,
                       capture_output=True)
        return priv, pub


def jwk_of(pub, kid, alg=None):
    """The public JWK of a PEM public key file (RSA or EC)."""
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", pub, "-outform", "DER"],
                         capture_output=True, check=True).stdout
    text = subprocess.run(["openssl", "pkey", "-pubin", "-in", pub, "-noout", "-text"],
                          capture_output=True, check=True).stdout.decode()
    if "Modulus" in text:
        mod = subprocess.run(["openssl", "rsa", "-pubin", "-in", pub, "-noout", "-modulus"],
                             capture_output=True, check=True).stdout.decode()
        n = bytes.fromhex(mod.strip().split("=", 1)[1])
        k = {"kty": "RSA", "n": b64(n), "e": "AQAB"}
    else:
        crv = [c for c in CURVES.values() if c[1] in text or c[0] in text][0]
        pt = der[-(1 + 2 * crv[2]):]
        assert pt[0] == 4
        k = {"kty": "EC", "crv": crv[0], "x": b64(pt[1:1 + crv[2]]), "y": b64(pt[1 + crv[2]:])}
    k["kid"] = kid
    k["use"] = "sig"
    if alg:
        k["alg"] = alg
    return k


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("jwtkeys")
    k = Keys(str(d))
    out = {"dir": d, "rsa": k.make("rsa", "rsa"), "rsa2": k.make("rsa2", "rsa"),
           "ES256": k.make("ec256", "P-256"), "ES384": k.make("ec384", "P-384"),
           "ES512": k.make("ec521", "P-521")}
    jwks = {"keys": [jwk_of(out["rsa"][1], "rsa-1"), jwk_of(out["ES256"][1], "ec-1"),
                     jwk_of(out["rsa2"][1], "rsa-2", "RS256")]}
    (d / "jwks.json").write_text(json.dumps(jwks))
    return out


def now():
    return int(time.time())


def good(**over):
    c = {"iss": "https://issuer.test/", "aud": "api", "sub": "user-1", "exp": now() + 600,
         "iat": now() - 10, "scope": "users:read users:write", "tenant": "acme"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def providers(keys):
    iss = "https://issuer.test/"
    p = {
        "hs": {"issuer": iss, "audiences": ["api"], "algorithms": ["HS256", "HS384", "HS512"],
               "secret": HS_SECRET},
        "rs": {"issuer": iss, "audiences": ["api", "other-api"],
               "algorithms": ["RS256", "RS384", "RS512"], "public_key": keys["rsa"][1]},
        "set": {"issuer": "jwks-file", "audiences": ["api"], "algorithms": ["RS256", "ES256"],
                "jwks_file": str(keys["dir"] / "jwks.json")},
    }
    for alg in CURVES:
        p[alg.lower()] = {"issuer": iss, "audiences": "api", "algorithms": [alg],
                          "public_key": "@" + keys[alg][1]}
    return p


def route(path, conf, upstream="echo", **extra):
    r = {"path": path, "upstream": upstream, "filters": [{"jwt_auth": conf}]}
    r.update(extra)
    return r


@pytest.fixture
def gw(gateway, keys):
    routes = [route("/" + name + "/", {"provider": name, "claims_to_headers": {"sub": "X-User-Id"}})
              for name in providers(keys)]
    routes.append(route("/anon/", {"provider": "rs", "allow_anonymous": True,
                                    "claims_to_headers": {"sub": "X-User-Id", "tenant": "X-Tenant"}}))
    routes.append(route("/multi/", {"providers": ["set", "rs"]}))
    return gateway(routes=routes, jwt_providers=providers(keys))


def call(g, path, tok=None, headers=None):
    h = [("Authorization", "Bearer " + tok)] if tok is not None else []
    return g.get(path, headers=h + list(headers or []))


def refused(r, status=401, error="invalid_token"):
    assert r.status == status, r
    www = r.header("WWW-Authenticate") or ""
    assert www.startswith("Bearer realm="), r
    assert ('error="%s"' % error) in www, r
    body = r.json()
    assert body["error"] == error and body["error_description"]
    return body["error_description"]


# ---- valid tokens -----------------------------------------------------------

@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512",
                                 "ES256", "ES384", "ES512"])
def test_valid_token_each_algorithm(gw, keys, alg):
    prov = {"HS": "hs", "RS": "rs"}.get(alg[:2], alg.lower())
    key = keys["rsa"][0] if alg.startswith("RS") else keys.get(alg, (None,))[0]
    tok = token(good(sub="u-" + alg), alg, key=key, secret=HS_SECRET.encode())
    r = call(gw, "/%s/x" % prov, tok, [("X-User-Id", "spoofed"), ("x-user-id", "spoofed2")])
    assert r.status == 200, r
    h = r.echoed_headers()
    assert h["x-user-id"] == ["u-" + alg]
    assert h["authorization"] == ["Bearer " + tok]  # forwarded by default


def test_jwks_file_keys_by_kid(gw, keys):
    r = call(gw, "/set/x", token(good(iss="jwks-file"), "RS256", keys["rsa"][0], kid="rsa-1"))
    assert r.status == 200, r
    r = call(gw, "/set/x", token(good(iss="jwks-file"), "ES256", keys["ES256"][0], kid="ec-1"))
    assert r.status == 200, r
    r = call(gw, "/set/x", token(good(iss="jwks-file"), "RS256", keys["rsa2"][0], kid="rsa-2"))
    assert r.status == 200, r
    # the right key under the wrong kid
    assert refused(call(gw, "/set/x", token(good(iss="jwks-file"), "RS256", keys["rsa2"][0],
                                             kid="rsa-1"))) == "bad signature"


def test_multiple_providers_iss_picks(gw, keys):
    assert call(gw, "/multi/x", token(good(), "RS256", keys["rsa"][0])).status == 200
    assert call(gw, "/multi/x", token(good(iss="jwks-file"), "ES256", keys["ES256"][0],
                                      kid="ec-1")).status == 200
    assert refused(call(gw, "/multi/x", token(good(iss="nobody"), "RS256",
                                              keys["rsa"][0]))) == "wrong issuer"


def test_audience_list_and_numbers(gw, keys):
    k = keys["rsa"][0]
    assert call(gw, "/rs/x", token(good(aud=["x", "other-api"]), "RS256", k)).status == 200
    assert call(gw, "/rs/x", token(good(exp=now() + 60.5), "RS256", k)).status == 200


# ---- attacks ----------------------------------------------------------------

def attacks(keys):
    rk, pub = keys["rsa"][0], keys["rsa"][1]
    t = token(good(), "RS256", rk)
    h, p, s = t.split(".")
    dup_payload = b64(b'{"iss":"https://issuer.test/","aud":"api","sub":"user-1","sub":"admin",'
                      b'"exp":%d}' % (now() + 600))
    dup_header = b64(b'{"alg":"RS256","alg":"HS256"}')

    def resign(hh, pp, alg="RS256"):
        return hh + "." + pp + "." + b64(sign_raw(alg, (hh + "." + pp).encode(), rk))

    return {
        "expired": (token(good(exp=now() - 120), "RS256", rk), "token expired"),
        "not yet valid": (token(good(nbf=now() + 3600), "RS256", rk), "token not yet valid"),
        "issued in the future": (token(good(iat=now() + 3600), "RS256", rk),
                                 "token issued in the future"),
        "wrong issuer": (token(good(iss="https://evil.test/"), "RS256", rk), "wrong issuer"),
        "no issuer": (token(good(iss=None), "RS256", rk), "token has no iss"),
        "wrong audience": (token(good(aud="elsewhere"), "RS256", rk), "wrong audience"),
        "wrong audience list": (token(good(aud=["a", "b"]), "RS256", rk), "wrong audience"),
        "no audience": (token(good(aud=None), "RS256", rk), "token has no aud"),
        "missing exp": (token(good(exp=None), "RS256", rk), "token has no exp"),
        "exp as string": (token(good(exp=str(now() + 600)), "RS256", rk), "exp is not a number"),
        "bad signature": (h + "." + p + "." + ("A" if s[0] != "A" else "B") + s[1:],
                          "bad signature"),
        "payload swapped": (h + "." + b64json(good(sub="admin")) + "." + s, "bad signature"),
        "empty signature": (h + "." + p + ".", "missing signature"),
        "truncated": (t[:len(t) // 2], None),
        "two segments": (h + "." + p, "malformed token (not three segments)"),
        "four segments": (t + ".AAAA", "malformed token (not three segments)"),
        "non-base64": (h + "." + p + "." + s[:-4] + "*!$%", "malformed signature"),
        "padded base64": (h + "=." + p + "." + s, "malformed token header"),
        # 256 bytes end in a character carrying 2 bits; its 4 low bits set
        # give another text for the same bytes
        "non-canonical base64": (h + "." + p + "." + s[:-1] + chr(ord(s[-1]) + 1),
                                 "malformed signature"),
        "header not json": (b64(b"hello") + "." + p + "." + s, "malformed token header"),
        "header not object": (b64(b"[1]") + "." + p + "." + s, "malformed token header"),
        "payload not object": (resign(h, b64(b'"x"')), "malformed token payload"),
        "alg none": (token(good(), "none"), "missing signature"),
        "alg none signed": (token(good(), "none") + s, "unsupported alg"),
        "alg None": (b64json({"alg": "None"}) + "." + p + "." + s, "unsupported alg"),
        "no alg": (b64json({"typ": "JWT"}) + "." + p + "." + s, "token header has no alg"),
        "HS256 with the RSA public key": (token(good(), "HS256", secret=open(pub, "rb").read()),
                                          "alg not accepted"),
        "ES256 on an RSA provider": (token(good(), "ES256", keys["ES256"][0]),
                                     "alg not accepted"),
        "other RSA key": (token(good(), "RS256", keys["rsa2"][0]), "bad signature"),
        "RS384 signature labelled RS256": (h + "." + p + "." + b64(sign_raw(
            "RS384", (h + "." + p).encode(), rk)), "bad signature"),
        "duplicate claims": (resign(h, dup_payload), "malformed token payload"),
        "duplicate header keys": (resign(dup_header, p), "malformed token header"),
        "crit header": (token(good(), "RS256", rk, header={"crit": ["exp"], "exp": 1}),
                        "unsupported crit header"),
        "kid path trick": (token(good(), "RS256", rk, kid="../../../../etc/passwd"),
                           "unknown kid"),
        "kid not a string": (token(good(), "RS256", rk, header={"kid": 7}), "bad kid"),
        "huge token": (token(good(pad="x" * 9000), "RS256", rk), "token too large"),
        "garbage": ("not.a.jwt", None),
        "nul in header": (b64(b'{"alg":"RS256\\u0000"}') + "." + p + "." + s, None),
    }


ATTACK_NAMES = ["expired", "not yet valid", "issued in the future", "wrong issuer", "no issuer",
                "wrong audience", "wrong audience list", "no audience", "missing exp",
                "exp as string", "bad signature", "payload swapped", "empty signature",
                "truncated", "two segments", "four segments", "non-base64", "padded base64",
                "non-canonical base64", "header not json", "header not object",
                "payload not object", "alg none", "alg none signed", "alg None", "no alg",
                "HS256 with the RSA public key", "ES256 on an RSA provider", "other RSA key",
                "RS384 signature labelled RS256", "duplicate claims", "duplicate header keys",
                "crit header", "kid path trick", "kid not a string", "huge token", "garbage",
                "nul in header"]


def test_attacks_refused(gw, keys):
    before = gw.echo.stats()["requests"]
    table = attacks(keys)
    assert sorted(table) == sorted(ATTACK_NAMES)
    wrong = []
    for name in ATTACK_NAMES:
        tok, why = table[name]
        r = call(gw, "/rs/x", tok, [("X-User-Id", "spoofed")])
        if r.status != 401:
            wrong.append("%s: status %d" % (name, r.status))
            continue
        got = refused(r)
        if why and got != why:
            wrong.append("%s: %r, expected %r" % (name, got, why))
    assert not wrong, wrong
    assert gw.echo.stats()["requests"] == before  # nothing reached the upstream
    # The access log has the reasons, never a token.
    if not util.wait_until(lambda: "token expired" in gw.portico.stdout(), 2.0):
        gw.portico.stop()
    log = gw.portico.stdout()
    errors = [json.loads(ln).get("jwt_error") for ln in log.splitlines() if ln.startswith("{")]
    assert "token expired" in errors and "unknown kid" in errors, log[-2000:]
    for name in ("expired", "bad signature", "alg none"):
        tok = table[name][0]
        assert tok.split(".")[1] not in log


def test_hs_token_with_wrong_secret(gw):
    tok = token(good(), "HS256", secret=b"x" * 64)
    assert refused(call(gw, "/hs/x", tok)) == "bad signature"
    # A secret provider never takes RS*, whatever the token says.
    fake_rs = b64json({"alg": "RS256"}) + "." + b64json(good()) + ".AAAA"
    assert refused(call(gw, "/hs/x", fake_rs)) == "alg not accepted"


def test_es_signature_must_be_raw(gw, keys):
    tok = token(good(), "ES256", keys["ES256"][0], der=True)
    assert refused(call(gw, "/es256/x", tok)) == "bad signature"
    # r||s of the wrong length
    h, p, s = token(good(), "ES256", keys["ES256"][0]).split(".")
    assert refused(call(gw, "/es256/x", h + "." + p + "." + b64(base64.urlsafe_b64decode(
        s + "==")[:-1]))) == "bad signature"


def test_missing_token(gw):
    r = call(gw, "/rs/x")
    assert r.status == 401
    assert r.header("WWW-Authenticate") == 'Bearer realm="portico"'  # RFC 6750 3.1: no error
    r = call(gw, "/rs/x", headers=[("Authorization", "Basic dXNlcjpwdw==")])
    assert r.status == 401 and "error=" not in r.header("WWW-Authenticate")


def test_two_authorization_fields_refused(gw, keys):
    """Which of two credentials would the upstream believe? Neither."""
    tok = token(good(sub="alice"), "RS256", key=keys["rsa"][0])
    r = call(gw, "/rs/x", tok, [("Authorization", "Bearer " + tok)])
    refused(r, 400, "invalid_request")
    r = call(gw, "/rs/x", tok, [("Authorization", "Basic dXNlcjpwdw==")])
    refused(r, 400, "invalid_request")
    r = call(gw, "/anon/x", tok, [("authorization", "Bearer x")])
    refused(r, 400, "invalid_request")


def test_allow_anonymous(gw, keys):
    r = call(gw, "/anon/x", headers=[("X-User-Id", "spoofed"), ("X-Tenant", "evil")])
    assert r.status == 200
    h = r.echoed_headers()
    assert "x-user-id" not in h and "x-tenant" not in h
    refused(call(gw, "/anon/x", token(good(exp=now() - 100), "RS256", keys["rsa"][0])))
    r = call(gw, "/anon/x", token(good(), "RS256", keys["rsa"][0]), [("X-Tenant", "evil")])
    assert r.status == 200 and r.echoed_headers()["x-tenant"] == ["acme"]


# ---- route options ----------------------------------------------------------

def test_sources_rules_and_forwarding(gateway, keys):
    rk = keys["rsa"][0]
    routes = [
        route("/cookie/", {"provider": "rs", "token_from": ["cookie:session", "query:access_token"],
                           "forward_token": False}),
        route("/hdr/", {"provider": "rs", "token_from": ["header:X-Token"],
                        "forward_token": False, "realm": "api.example"}),
        route("/scope/", {"provider": "rs", "required": ["sub", "email"]}),
        route("/rules/", {"provider": "rs", "claims": {
            "scope": {"contains": ["users:read"]}, "tenant": {"one_of": ["acme", "initech"]},
            "roles": {"contains": "admin"}, "level": {"equals": 3}}}),
        route("/vars/", {"provider": "rs", "claims_to_headers": {"roles": "X-Roles",
                                                                 "level": "X-Level"}},
              ),
    ]
    routes[-1]["filters"].append({"headers": {"request": {"set": {
        "X-Sub": "%{jwt.sub}", "X-Admin": "%{jwt.admin}", "X-Lvl": "%{jwt.level}"}}}})
    g = gateway(routes=routes, jwt_providers=providers(keys))
    tok = token(good(email="a@b.c", roles=["admin", "dev"], level=3, admin=True), "RS256", rk)
    r = g.get("/cookie/x", headers=[("Cookie", "a=b; session=%s; c=d" % tok),
                                    ("Authorization", "Bearer junk")])
    assert r.status == 200, r
    assert "authorization" in r.echoed_headers()  # only a header token is stripped
    r = g.get("/cookie/x?x=1&access_token=%s" % tok)
    assert r.status == 200, r
    assert g.get("/cookie/x?access_token=bad.bad.bad").status == 401
    r = g.get("/hdr/x", headers=[("X-Token", tok)])
    assert r.status == 200 and "x-token" not in r.echoed_headers()
    r = g.get("/hdr/x", headers=[("X-Token", "Bearer " + tok)])
    assert r.status == 200
    r = g.get("/hdr/x")
    assert r.status == 401 and r.header("WWW-Authenticate") == 'Bearer realm="api.example"'

    assert call(g, "/scope/x", tok).status == 200
    assert refused(call(g, "/scope/x", token(good(), "RS256", rk))) == \
        "a required claim is missing"

    assert call(g, "/rules/x", tok).status == 200
    for bad in (dict(scope="users:write"), dict(scope="users:readx"), dict(tenant="umbrella"),
                dict(roles="dev administrator"), dict(roles=["dev"]), dict(level=4), dict(level="3"),
                dict(scope=None)):
        claims = good(email="a@b.c", roles=["admin"], level=3)
        claims.update(bad)
        claims = {k: v for k, v in claims.items() if v is not None}
        r = call(g, "/rules/x", token(claims, "RS256", rk))
        refused(r, 403, "insufficient_scope")
    assert call(g, "/rules/x", token(good(roles=["admin"], level=3, scope="a users:read"),
                                     "RS256", rk)).status == 200

    r = call(g, "/vars/x", tok)
    h = r.echoed_headers()
    assert h["x-sub"] == ["user-1"] and h["x-admin"] == ["true"] and h["x-lvl"] == ["3"]
    assert h["x-roles"] == ['["admin","dev"]'] and h["x-level"] == ["3"]


def test_cache_serves_repeats_and_expiry_holds(gateway, keys):
    """A reused token is served from the worker's cache; the cache never
    outlives exp."""
    g = gateway(routes=[route("/rs/", {"provider": "rs"})], jwt_providers=providers(keys))
    tok = token(good(exp=now() + 2), "RS256", keys["rsa"][0])
    for _ in range(20):
        assert call(g, "/rs/x", tok).status == 200
    time.sleep(2.2)
    assert refused(call(g, "/rs/x", tok)) == "token expired"


# ---- remote keys ----------------------------------------------------------

def write_jwks(d, *jwks):
    tmp = d / "jwks.json.tmp"
    tmp.write_text(json.dumps({"keys": list(jwks)}))
    os.replace(tmp, d / "jwks.json")


def key_count(srv, path="/jwks.json"):
    """Requests the (plain HTTP) key server has had for path."""
    return util.get(srv.port, "/__count").json().get(path, 0)


class KeyServer(Upstream):
    def __init__(self, tmp_path, d, tls=None):
        args = ["--dir", str(d)] + (["--cert", tls[0], "--key", tls[1]] if tls else [])
        super().__init__("jwks.py", tmp_path, args)
        self.tls = tls


@pytest.fixture
def keyserver(request, tmp_path):
    started = []

    def start(d, tls=None):
        s = KeyServer(tmp_path, d, tls)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()
        s.finish()


def wait_status(fn, status, timeout=8.0):
    deadline = time.monotonic() + timeout
    r = None
    while time.monotonic() < deadline:
        r = fn()
        if r.status == status:
            return r
        time.sleep(0.05)
    return r


def remote_gateway(gateway, provider, routes=None):
    routes = routes or [route("/r/", {"provider": "remote", "claims_to_headers": {"sub": "X-Sub"}})]
    return gateway(routes=routes, jwt_providers={"remote": provider})


def test_jwks_uri_rotation_outage_and_flood(gateway, keys, keyserver, tmp_path):
    d = tmp_path / "ks"
    d.mkdir()
    write_jwks(d, jwk_of(keys["rsa"][1], "k1"))
    srv = keyserver(d)
    g = remote_gateway(gateway, {
        "issuer": "https://issuer.test/", "algorithms": ["RS256", "ES256"],
        "jwks_uri": "http://127.0.0.1:%d/jwks.json" % srv.port,
        "jwks_refresh_s": 3600, "jwks_min_refetch_s": 1})
    rk = keys["rsa"][0]
    r = wait_status(lambda: call(g, "/r/x", token(good(), "RS256", rk, kid="k1")), 200)
    assert r.status == 200, r
    assert r.echoed_headers()["x-sub"] == ["user-1"]

    # Rotation: a token with a new kid makes portico refetch early; that
    # request waits for the new set and passes.
    time.sleep(1.1)
    write_jwks(d, jwk_of(keys["rsa"][1], "k1"), jwk_of(keys["ES256"][1], "k2"))
    r = call(g, "/r/x", token(good(), "ES256", keys["ES256"][0], kid="k2"))
    assert r.status == 200, r

    # Random-kid flood: refetches stay bounded by jwks_min_refetch_s.
    time.sleep(1.1)  # past the rotation's refetch
    before = key_count(srv)
    t0 = time.monotonic()
    for _ in range(150):
        time.sleep(0.01)
        kid = "%016x" % random.getrandbits(64)
        fake = b64json({"alg": "RS256", "kid": kid}) + "." + b64json(good()) + ".AAAA"
        assert refused(call(g, "/r/x", fake)) == "unknown kid"
    elapsed = time.monotonic() - t0
    time.sleep(0.3)
    fetched = key_count(srv) - before
    assert 1 <= fetched <= elapsed / 1.0 + 1, (fetched, elapsed)

    # Key server down: the last good set is still used.
    srv.kill()
    time.sleep(1.2)
    call(g, "/r/x", token(good(), "RS256", rk, kid="nope"))  # forces a failing refetch
    time.sleep(0.5)
    for _ in range(3):
        assert call(g, "/r/x", token(good(jti=random.random()), "RS256", rk, kid="k1")).status == 200
    assert "fetching keys failed" in g.portico.stderr()
    assert g.portico.stderr().count("fetching keys failed:") == 1  # logged once per outage


def test_two_workers_share_rotating_keys(gateway, keys, keyserver, tmp_path):
    """Workers verify concurrently while the fetcher swaps key sets under
    them (run it under ASan): no error, no mixed-up answer."""
    import threading
    d = tmp_path / "mw"
    d.mkdir()
    k1, k2 = jwk_of(keys["rsa"][1], "k1"), jwk_of(keys["ES256"][1], "k2")
    write_jwks(d, k1)
    srv = keyserver(d)
    g = gateway(routes=[route("/r/", {"provider": "remote", "claims_to_headers": {"sub": "X-Sub"}})],
                jwt_providers={"remote": {
                    "issuer": "https://issuer.test/", "algorithms": ["RS256", "ES256"],
                    "jwks_uri": "http://127.0.0.1:%d/jwks.json" % srv.port,
                    "jwks_min_refetch_s": 1, "cache_size": 8}}, workers=2)
    t1 = [token(good(sub="a%d" % i), "RS256", keys["rsa"][0], kid="k1") for i in range(12)]
    t2 = token(good(sub="b"), "ES256", keys["ES256"][0], kid="k2")
    assert wait_status(lambda: call(g, "/r/x", t1[0]), 200).status == 200
    bad = []

    def worker(n):
        for i in range(40):
            tok = t1[(n + i) % len(t1)]
            r = call(g, "/r/x", tok)
            if r.status != 200 or r.echoed_headers()["x-sub"] != [json.loads(
                    base64.urlsafe_b64decode(tok.split(".")[1] + "==="))["sub"]]:
                bad.append((n, i, r.status))
            if i % 10 == 5:
                r = call(g, "/r/x", t2)
                if r.status not in (200, 401):
                    bad.append((n, i, "k2", r.status))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for flip in range(4):  # the set changes under the workers
        time.sleep(0.3)
        write_jwks(d, k1, k2) if flip % 2 == 0 else write_jwks(d, k2, k1)
    for t in threads:
        t.join()
    assert not bad, bad[:10]
    time.sleep(1.1)
    assert wait_status(lambda: call(g, "/r/x", t2), 200).status == 200


def test_client_gone_while_waiting_for_keys(gateway, keys, keyserver, tmp_path):
    d = tmp_path / "slow"
    d.mkdir()
    write_jwks(d, jwk_of(keys["rsa"][1], "k1"))
    srv = keyserver(d)
    g = remote_gateway(gateway, {
        "issuer": "https://issuer.test/", "algorithms": ["RS256"],
        "jwks_uri": "http://127.0.0.1:%d/jwks.json" % srv.port, "jwks_min_refetch_s": 1})
    ok = token(good(), "RS256", keys["rsa"][0], kid="k1")
    assert wait_status(lambda: call(g, "/r/x", ok), 200).status == 200
    time.sleep(1.1)
    (d / "delay_ms").write_text("600")
    fake = b64json({"alg": "RS256", "kid": "new"}) + "." + b64json(good()) + ".AAAA"
    c = util.Conn(g.port)
    c.request("GET", "/r/x", [("Authorization", "Bearer " + fake)])
    time.sleep(0.1)
    c.close()  # gone while its request waits for the refetch
    time.sleep(0.8)
    assert call(g, "/r/x", ok).status == 200
    assert g.portico.poll() is None


def test_jwks_not_fetched_yet_is_503(gateway, keys, tmp_path):
    g = remote_gateway(gateway, {
        "issuer": "https://issuer.test/", "algorithms": ["RS256"],
        "jwks_uri": "http://127.0.0.1:9/jwks.json", "jwks_min_refetch_s": 1})
    r = call(g, "/r/x", token(good(), "RS256", keys["rsa"][0], kid="k1"))
    assert r.status == 503 and r.header("Retry-After")
    assert r.json()["error"] == "temporarily_unavailable"
    time.sleep(0.3)
    assert "fetching keys failed" in g.portico.stderr()


def test_discovery(gateway, keys, keyserver, tmp_path):
    d = tmp_path / "disc"
    d.mkdir()
    write_jwks(d, jwk_of(keys["ES384"][1], "e384"))
    srv = keyserver(d)
    issuer = "http://127.0.0.1:%d" % srv.port
    (d / "openid.json").write_text(json.dumps({"issuer": issuer,
                                               "jwks_uri": issuer + "/jwks.json"}))
    g = remote_gateway(gateway, {"issuer": issuer, "algorithms": ["ES384"]})
    tok = token(good(iss=issuer), "ES384", keys["ES384"][0], kid="e384")
    r = wait_status(lambda: call(g, "/r/x", tok), 200)
    assert r.status == 200, r
    counts = util.get(srv.port, "/__count").json()
    assert counts.get("/.well-known/openid-configuration", 0) >= 1 and counts.get("/jwks.json")


def make_tls(d):
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    run = lambda *a: subprocess.run(list(a), check=True, capture_output=True, cwd=d)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=test ca", "-keyout", "ca.key", "-out", "ca.pem")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "srv.key", "-out", "srv.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "srv.pem")
    return str(d / "ca.pem"), (str(d / "srv.pem"), str(d / "srv.key"))


def test_jwks_over_https_verifies_the_server(gateway, keys, keyserver, tmp_path):
    d = tmp_path / "tls"
    d.mkdir()
    ca, cert = make_tls(d)
    write_jwks(d, jwk_of(keys["rsa"][1], "k1"))
    srv = keyserver(d, tls=cert)
    url = "https://127.0.0.1:%d/jwks.json" % srv.port
    tok = token(good(), "RS256", keys["rsa"][0], kid="k1")
    routes = [route("/good/", {"provider": "good"}), route("/bad/", {"provider": "untrusted"})]
    g = gateway(routes=routes, jwt_providers={
        "good": {"issuer": "https://issuer.test/", "algorithms": ["RS256"], "jwks_uri": url,
                 "ca_file": ca},
        "untrusted": {"issuer": "https://issuer.test/", "algorithms": ["RS256"], "jwks_uri": url,
                      "jwks_min_refetch_s": 1}})
    r = wait_status(lambda: call(g, "/good/x", tok), 200)
    assert r.status == 200, r
    # Not signed by a CA of the system store: never fetched.
    time.sleep(0.5)
    assert call(g, "/bad/x", tok).status == 503


# ---- config ---------------------------------------------------------------

def check_config(portico_bin, tmp_path, cfg):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    r = subprocess.run([portico_bin, "-t", "-c", str(p)], capture_output=True, timeout=10)
    return r.returncode, (r.stdout + r.stderr).decode()


@pytest.mark.parametrize("provs,filt,where,what", [
    ({}, {"provider": "nope"}, "routes[0].filters[0].jwt_auth.provider", "no provider named"),
    ({"p": {"issuer": "i", "algorithms": ["HS256"], "secret": "short"}}, {"provider": "p"},
     "jwt_providers.p.secret", "too short"),
    ({"p": {"issuer": "i", "algorithms": ["none"], "secret": "x" * 40}}, {"provider": "p"},
     "jwt_providers.p.algorithms[0]", "never accepted"),
    ({"p": {"issuer": "i", "algorithms": ["HS256", "RS256"], "secret": "x" * 40}},
     {"provider": "p"}, "jwt_providers.p.algorithms", "only HS256"),
    ({"p": {"issuer": "i", "algorithms": ["RS256"]}}, {"provider": "p"}, "jwt_providers.p",
     "no keys"),
    ({"p": {"issuer": "i", "algorithms": ["RS256"], "public_key": "/nonexistent.pem"}},
     {"provider": "p"}, "jwt_providers.p.public_key", "cannot read"),
    ({"p": {"issuer": "i", "algorithms": ["RS256"], "jwks_uri": "ftp://x/"}},
     {"provider": "p"}, "jwt_providers.p.jwks_uri", "http"),
    ({"p": {"issuer": "i", "algorithms": ["HS256"], "secret": "x" * 40, "leeway": 3}},
     {"provider": "p"}, "jwt_providers.p.leeway", "unknown key"),
    ({"p": {"issuer": "i", "algorithms": ["HS256"], "secret": "x" * 40}},
     {"provider": "p", "token_from": ["form:x"]}, "routes[0].filters[0].jwt_auth.token_from[0]",
     "expected"),
    ({"p": {"issuer": "i", "algorithms": ["HS256"], "secret": "x" * 40}},
     {"provider": "p", "claims": {"scope": {"like": "x"}}},
     "routes[0].filters[0].jwt_auth.claims.scope.like", "unknown rule"),
    ({"p": {"issuer": "i", "algorithms": ["HS256"], "secret": "x" * 40}},
     {"provider": "p", "claims_to_headers": {"sub": "Host"}},
     "routes[0].filters[0].jwt_auth.claims_to_headers.sub", "cannot carry"),
])
def test_config_errors(portico_bin, tmp_path, provs, filt, where, what):
    cfg = make_config(port=1, routes=[route("/", filt, upstream="u")],
                      upstreams={"u": {"endpoints": ["127.0.0.1:1"]}}, jwt_providers=provs)
    rc, out = check_config(portico_bin, tmp_path, cfg)
    assert rc != 0, out
    assert where + ":" in out and what in out, out


def test_config_public_key_kind_must_match(portico_bin, tmp_path, keys):
    cfg = make_config(port=1, routes=[route("/", {"provider": "p"}, upstream="u")],
                      upstreams={"u": {"endpoints": ["127.0.0.1:1"]}},
                      jwt_providers={"p": {"issuer": "i", "algorithms": ["ES256"],
                                           "public_key": keys["rsa"][1]}})
    rc, out = check_config(portico_bin, tmp_path, cfg)
    assert rc != 0 and "jwt_providers.p.algorithms: this RSA key verifies only RS" in out, out
    cfg["jwt_providers"]["p"]["public_key"] = keys["ES384"][1]
    rc, out = check_config(portico_bin, tmp_path, cfg)
    assert rc != 0 and "verifies only ES384" in out, out
    cfg["jwt_providers"]["p"]["algorithms"] = ["ES384"]
    rc, out = check_config(portico_bin, tmp_path, cfg)
    assert rc == 0, out
