"""cors module: preflights answered locally (allowed, refused origin, refused
method), exact and pattern origins, credentials, the wildcard, headers added
to proxied and local answers, Vary, and config refusals with JSON paths."""
import json
import subprocess

import pytest

from conftest import make_config

APP = "https://app.example.com"
PREFLIGHT_VARY = {"origin", "access-control-request-method", "access-control-request-headers"}


@pytest.fixture(autouse=True)
def need_module(portico_bin):
    out = subprocess.run([portico_bin, "-V"], capture_output=True, timeout=10).stdout.decode()
    mods = [ln for ln in out.splitlines() if ln.lower().startswith("modules:")]
    if not mods or "cors" not in mods[0].replace(",", " ").split():
        pytest.skip("cors module not built in")


def cors_route(conf, path="/"):
    return [{"name": "api", "path": path, "upstream": "echo", "filters": [{"cors": conf}]}]


FULL = {"origins": [APP, "https://*.example.com"], "methods": ["GET", "POST"],
        "headers": ["Authorization", "X-Trace"], "expose_headers": ["X-Request-Id", "ETag"],
        "credentials": True, "max_age_s": 600}


def acx(resp):
    """Every Access-Control-* header of a response, lowercased names."""
    return {k.lower(): v for k, v in resp.headers if k.lower().startswith("access-control-")}


def vary_tokens(resp):
    return {t.strip().lower() for v in resp.header_all("vary") for t in v.split(",") if t.strip()}


def preflight(g, origin, method="POST", req_headers=None, path="/api/things"):
    hdrs = [("Origin", origin), ("Access-Control-Request-Method", method)]
    if req_headers:
        hdrs.append(("Access-Control-Request-Headers", req_headers))
    return g.request("OPTIONS", path, headers=hdrs)


def upstream_requests(g):
    return g.echo.stats()["requests"]


def test_preflight_allowed(gateway):
    g = gateway(routes=cors_route(FULL))
    before = upstream_requests(g)
    r = preflight(g, APP, "POST", "authorization, x-not-configured")
    assert r.status == 204, r
    assert r.body == b""
    assert r.header("Access-Control-Allow-Origin") == APP
    assert r.header("Access-Control-Allow-Methods") == "GET, POST"
    # Only the configured names, whatever was asked: the browser then refuses.
    assert r.header("Access-Control-Allow-Headers") == "Authorization, X-Trace"
    assert r.header("Access-Control-Allow-Credentials") == "true"
    assert r.header("Access-Control-Max-Age") == "600"
    assert PREFLIGHT_VARY <= vary_tokens(r)
    assert "access-control-expose-headers" not in acx(r)   # not a preflight header
    assert upstream_requests(g) == before                  # answered locally


def test_preflight_then_request_on_same_connection(gateway):
    g = gateway(routes=cors_route(FULL))
    with g.conn() as c:
        c.request("OPTIONS", "/x", [("Origin", APP), ("Access-Control-Request-Method", "GET")])
        r1 = c.read_response("OPTIONS")
        c.request("GET", "/x", [("Origin", APP)])
        r2 = c.read_response()
    assert r1.status == 204 and r1.complete
    assert r2.status == 200 and r2.json()["target"] == "/x"
    assert r2.header("Access-Control-Allow-Origin") == APP


@pytest.mark.parametrize("origin", ["https://evil.example.org", "http://app.example.com",
                                    "https://app.example.com:8443", "null",
                                    "https://app.example.com.evil.org", "https://example.com"])
def test_preflight_refused_origin(gateway, origin):
    g = gateway(routes=cors_route(FULL))
    before = upstream_requests(g)
    r = preflight(g, origin)
    assert r.status == 403, r
    assert acx(r) == {}, r.headers
    assert r.json() == {"error": "Forbidden", "status": 403}
    assert upstream_requests(g) == before


def test_preflight_refused_method(gateway):
    g = gateway(routes=cors_route(FULL))
    r = preflight(g, APP, "DELETE")
    assert r.status == 403
    assert acx(r) == {}
    r = preflight(g, APP, "post")          # methods are case-sensitive
    assert r.status == 403
    assert preflight(g, APP, "GET").status == 204


def test_default_methods(gateway):
    g = gateway(routes=cors_route({"origins": [APP]}))
    r = preflight(g, APP, "HEAD")
    assert r.status == 204
    assert r.header("Access-Control-Allow-Methods") == "GET, HEAD, POST"
    assert "access-control-allow-credentials" not in acx(r)
    assert "access-control-max-age" not in acx(r)
    assert "access-control-allow-headers" not in acx(r)
    assert preflight(g, APP, "PUT").status == 403


@pytest.mark.parametrize("origin,allowed", [
    ("https://a.example.com", True),
    ("https://a.b.example.com", True),
    ("https://A-1.Example.COM", True),
    ("https://example.com", False),          # the domain itself is not under it
    ("http://a.example.com", False),         # other scheme
    ("https://a.example.com:8443", False),   # other port
    ("https://aexample.com", False),
    ("https://.example.com", False),
    ("https://a..example.com", False),
    ("https://a.example.com.evil.org", False),
    ("https://evil.org/.example.com", False),
    ("https://x:y@a.example.com", False),
])
def test_pattern_origin(gateway, origin, allowed):
    g = gateway(routes=cors_route({"origins": ["https://*.example.com"], "methods": ["GET"]}))
    p = preflight(g, origin, "GET")
    r = g.get("/p", headers=[("Origin", origin)])
    assert r.status == 200
    if allowed:
        assert p.status == 204
        assert p.header("Access-Control-Allow-Origin") == origin
        assert r.header("Access-Control-Allow-Origin") == origin
    else:
        assert p.status == 403
        assert acx(r) == {}


def test_exact_origin_case_and_default_port(gateway):
    conf = {"origins": ["HTTPS://App.Example.COM:443", "http://localhost:3000",
                        "http://[::1]:8080"]}
    g = gateway(routes=cors_route(conf))
    for origin in ("https://app.example.com", "https://APP.example.com",
                   "http://localhost:3000", "http://[::1]:8080"):
        r = g.get("/c", headers=[("Origin", origin)])
        assert r.header("Access-Control-Allow-Origin") == origin, origin
    for origin in ("http://localhost:3001", "http://localhost", "https://localhost:3000",
                   "http://[::2]:8080", "https://app.example.com/"):
        r = g.get("/c", headers=[("Origin", origin)])
        assert "access-control-allow-origin" not in acx(r), origin


def test_simple_request_allowed(gateway):
    g = gateway(routes=cors_route(FULL))
    r = g.get("/api/items?x=1", headers=[("Origin", APP)])
    assert r.status == 200
    assert r.json()["target"] == "/api/items?x=1"      # proxied
    assert r.echoed_headers()["origin"] == [APP]       # the upstream sees the Origin
    assert r.header_all("Access-Control-Allow-Origin") == [APP]
    assert r.header("Access-Control-Allow-Credentials") == "true"
    assert r.header("Access-Control-Expose-Headers") == "X-Request-Id, ETag"
    assert "origin" in vary_tokens(r)
    assert "access-control-allow-methods" not in acx(r)


def test_simple_request_refused_origin_still_proxied(gateway):
    g = gateway(routes=cors_route(FULL))
    before = upstream_requests(g)
    r = g.request("POST", "/api/items", headers=[("Origin", "https://evil.org")], body="x=1")
    assert r.status == 200
    assert r.json()["method"] == "POST"
    assert upstream_requests(g) == before + 1
    assert acx(r) == {}
    assert "origin" in vary_tokens(r)


def test_no_origin_gets_vary_only(gateway):
    g = gateway(routes=cors_route(FULL))
    r = g.get("/plain")
    assert r.status == 200
    assert acx(r) == {}
    assert "origin" in vary_tokens(r)


def test_options_without_request_method_is_not_a_preflight(gateway):
    g = gateway(routes=cors_route(FULL))
    r = g.request("OPTIONS", "/opt", headers=[("Origin", APP)])
    assert r.status == 200
    assert r.json()["method"] == "OPTIONS"              # reached the upstream
    assert r.header("Access-Control-Allow-Origin") == APP
    assert "access-control-allow-methods" not in acx(r)
    # Access-Control-Request-Method without an Origin: not a preflight either.
    r = g.request("OPTIONS", "/opt", headers=[("Access-Control-Request-Method", "GET")])
    assert r.status == 200 and r.json()["method"] == "OPTIONS"


def test_upstream_cors_headers_replaced_and_vary_kept(gateway):
    g = gateway(routes=cors_route(FULL))
    r = g.get("/headers-out?Access-Control-Allow-Origin=https://other.org&Vary=Accept-Encoding",
              headers=[("Origin", APP)])
    assert r.header_all("Access-Control-Allow-Origin") == [APP]
    assert {"origin", "accept-encoding"} <= vary_tokens(r)


def test_wildcard(gateway):
    g = gateway(routes=cors_route({"origins": ["*"], "methods": ["GET", "PUT"],
                                   "expose_headers": ["X-Total"]}))
    p = preflight(g, "https://anything.test", "PUT", "x-whatever")
    assert p.status == 204
    assert p.header("Access-Control-Allow-Origin") == "*"
    assert "access-control-allow-credentials" not in acx(p)
    assert preflight(g, "https://anything.test", "DELETE").status == 403
    for origin in ("https://a.test", "null", "http://localhost:1"):
        r = g.get("/w", headers=[("Origin", origin)])
        assert r.header("Access-Control-Allow-Origin") == "*"
        assert r.header("Access-Control-Expose-Headers") == "X-Total"
        assert "access-control-allow-credentials" not in acx(r)
        assert "origin" not in vary_tokens(r)   # the answer does not depend on it


def test_headers_reach_local_answers(gateway):
    """A global cors filter: a 404 (no route) and a route's own "respond"
    answer carry the CORS headers too."""
    g = gateway(routes=[{"path": "/api/", "upstream": "echo"},
                        {"path": "/local", "respond": {"status": 200, "body": "hi\n"}}],
                filters=[{"cors": {"origins": [APP], "credentials": True}}])
    r = g.get("/nowhere", headers=[("Origin", APP)])
    assert r.status == 404
    assert r.header("Access-Control-Allow-Origin") == APP
    assert r.header("Access-Control-Allow-Credentials") == "true"
    assert "origin" in vary_tokens(r)
    r = g.get("/local", headers=[("Origin", APP)])
    assert r.status == 200 and r.body == b"hi\n"
    assert r.header("Access-Control-Allow-Origin") == APP
    r = g.get("/nowhere", headers=[("Origin", "https://evil.org")])
    assert r.status == 404 and acx(r) == {}
    p = preflight(g, APP, "GET", path="/nowhere")
    assert p.status == 204 and p.header("Access-Control-Allow-Origin") == APP


# ---- config refusals: `portico -t` names the offending key ----------------

def check_fails(binary, tmp_path, conf, path_fragment, word=None):
    cfg = make_config(upstreams={"echo": {"endpoints": ["127.0.0.1:9"]}},
                      routes=[{"path": "/", "upstream": "echo"},
                              {"path": "/api/", "upstream": "echo", "filters": [{"cors": conf}]}])
    f = tmp_path / "cors.json"
    f.write_text(json.dumps(cfg, indent=2))
    p = subprocess.run([binary, "-t", "-c", str(f)], capture_output=True, timeout=10,
                       stdin=subprocess.DEVNULL)
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode == 1, out
    full = "routes[1].filters[0].cors" + path_fragment
    assert any(full in ln and (word is None or word in ln) for ln in out.splitlines()), \
        "no line with %r (%r) in:\n%s" % (full, word, out)


@pytest.mark.parametrize("conf,path,word", [
    ({"origins": ["*"], "credentials": True}, ".credentials", "*"),
    ({"origins": [APP, "app.example.com"]}, ".origins[1]", "not an origin"),
    ({"origins": ["https://app.example.com/"]}, ".origins[0]", "not an origin"),
    ({"origins": ["https://*"]}, ".origins[0]", "not an origin"),
    ({"origins": [APP, "*"]}, ".origins[1]", None),
    ({"origins": []}, ".origins", None),
    ({"methods": ["GET"]}, ".origins", None),
    ({"origins": [APP], "max_age_s": 0}, ".max_age_s", None),
    ({"origins": [APP], "max_age_s": -600}, ".max_age_s", None),
    ({"origins": [APP], "max_age_s": "600"}, ".max_age_s", None),
    ({"origins": [APP], "methods": ["GET", "BAD METHOD"]}, ".methods[1]", None),
    ({"origins": [APP], "headers": "Authorization"}, ".headers", None),
    ({"origins": [APP], "credentials": "true"}, ".credentials", None),
    ({"origins": [APP], "bogus": 1}, ".bogus", "unknown"),
])
def test_config_errors(portico_bin, tmp_path, conf, path, word):
    check_fails(portico_bin, tmp_path, conf, path, word)


def test_config_valid(portico_bin, tmp_path):
    cfg = make_config(upstreams={"echo": {"endpoints": ["127.0.0.1:9"]}},
                      routes=[{"path": "/", "upstream": "echo", "filters": [{"cors": FULL}]}])
    f = tmp_path / "ok.json"
    f.write_text(json.dumps(cfg))
    p = subprocess.run([portico_bin, "-t", "-c", str(f)], capture_output=True, timeout=10,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, (p.stdout + p.stderr).decode(errors="replace")
