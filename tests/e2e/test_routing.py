"""Routing: host precedence, exact and longest-prefix paths, methods, path
normalisation, strip_prefix / prefix_rewrite, absolute-form targets."""
import pytest

import util
from conftest import make_config


def respond(body, **kw):
    r = {"respond": {"status": 200, "body": body}}
    r.update(kw)
    return r


def body_of(port, target, host="test.local", method="GET"):
    r = util.request(port, method, target, host=host)
    return r.status, r.body.decode("latin-1")


HOST_ROUTES = [
    respond("exact", host="api.example.com", path="/"),
    respond("wild", host="*.example.com", path="/"),
    respond("nohost", path="/"),
]


@pytest.mark.parametrize("order", ["given", "reversed"])
@pytest.mark.parametrize("host,expect", [
    ("api.example.com", "exact"),
    ("API.Example.COM", "exact"),
    ("api.example.com:8080", "exact"),
    ("a.example.com", "wild"),
    ("x.y.example.com", "wild"),
    ("example.com", "nohost"),
    ("other.org", "nohost"),
])
def test_host_precedence(portico, order, host, expect):
    routes = HOST_ROUTES if order == "given" else list(reversed(HOST_ROUTES))
    p = portico(make_config(routes=routes))
    assert body_of(p.port, "/x", host=host) == (200, expect)


def test_host_group_without_path_match_falls_back(portico):
    p = portico(make_config(routes=[respond("only", host="api.example.com", path="/only/"),
                                    respond("nohost", path="/")]))
    assert body_of(p.port, "/only/x", host="api.example.com") == (200, "only")
    assert body_of(p.port, "/other", host="api.example.com") == (200, "nohost")


PATH_ROUTES = [
    respond("a", path="/a/"),
    respond("ab", path="/a/b/"),
    respond("abc-exact", path="/a/b/c", exact=True),
    respond("root", path="/"),
]


@pytest.mark.parametrize("order", ["given", "reversed"])
@pytest.mark.parametrize("target,expect", [
    ("/a/x", "a"),
    ("/a/b/x", "ab"),
    ("/a/b/", "ab"),
    ("/a/b/c", "abc-exact"),
    ("/a/b/c?q=1", "abc-exact"),
    ("/a/b/c/d", "ab"),
    ("/a/b/cd", "ab"),
    ("/a", "root"),
    ("/zzz", "root"),
])
def test_path_precedence(portico, order, target, expect):
    routes = PATH_ROUTES if order == "given" else list(reversed(PATH_ROUTES))
    p = portico(make_config(routes=routes))
    assert body_of(p.port, target) == (200, expect)


def test_exact_route_alone_does_not_match_subpaths(portico):
    p = portico(make_config(routes=[respond("exact", path="/health", exact=True)]))
    assert body_of(p.port, "/health") == (200, "exact")
    r = util.get(p.port, "/health/x")
    assert r.status == 404 and "error" in r.json()
    assert util.get(p.port, "/healthz").status == 404


def test_method_not_allowed_405_with_allow(portico):
    p = portico(make_config(routes=[respond("m", path="/m/", methods=["GET", "POST"])]))
    assert body_of(p.port, "/m/x") == (200, "m")
    assert body_of(p.port, "/m/x", method="POST") == (200, "m")
    r = util.request(p.port, "DELETE", "/m/x")
    assert r.status == 405, r
    allow = {t.strip().upper() for t in ",".join(r.header_all("allow")).split(",")}
    assert {"GET", "POST"} <= allow and "DELETE" not in allow
    assert "error" in r.json()


def test_routes_split_by_method(portico):
    p = portico(make_config(routes=[respond("r-get", path="/r/", methods=["GET"]),
                                    respond("r-post", path="/r/", methods=["POST"])]))
    assert body_of(p.port, "/r/1") == (200, "r-get")
    assert body_of(p.port, "/r/1", method="POST") == (200, "r-post")
    r = util.request(p.port, "PUT", "/r/1")
    assert r.status == 405
    allow = {t.strip().upper() for t in ",".join(r.header_all("allow")).split(",")}
    assert {"GET", "POST"} <= allow


def test_405_does_not_fall_through_to_another_host_group(portico):
    p = portico(make_config(routes=[respond("h", host="api.example.com", path="/", methods=["GET"]),
                                    respond("nohost", path="/")]))
    assert util.request(p.port, "POST", "/x", host="api.example.com").status == 405


def test_nothing_matches_404_json(portico):
    p = portico(make_config(routes=[respond("h", host="api.example.com", path="/")]))
    r = util.get(p.port, "/x", host="other.example.com")
    assert r.status == 404
    assert "error" in r.json()


# -- normalisation ------------------------------------------------------------

@pytest.fixture
def ngw(gateway):
    return gateway(routes=[{"path": "/api/", "upstream": "echo"},
                           {"path": "/admin", "respond": {"status": 200, "body": "admin"}},
                           {"path": "/", "respond": {"status": 200, "body": "root"}}])


@pytest.mark.parametrize("target,forwarded", [
    ("/api/./x", "/api/x"),
    ("//api//x", "/api/x"),
    ("/api/a/./b/../c", "/api/a/c"),
    ("/api/%7Euser", "/api/~user"),
    ("/api/%41%62c", "/api/Abc"),
    ("/api/a%20b", "/api/a%20b"),
    ("/api/a%3cb", "/api/a%3Cb"),
    ("/api/x/..", "/api/"),
    ("/api/x?a=/../b&c=%2F&d=%7E", "/api/x?a=/../b&c=%2F&d=%7E"),
    ("/api/./x?q=./y", "/api/x?q=./y"),
])
def test_path_normalised_and_forwarded(ngw, target, forwarded):
    r = ngw.get(target)
    assert r.status == 200, r
    assert r.json()["target"] == forwarded


@pytest.mark.parametrize("target", ["/api/../admin", "/api/%2e%2e/admin", "/api/%2E%2E/admin",
                                    "/api/x/../../admin"])
def test_dot_dot_cannot_stay_in_the_api_route(ngw, target):
    r = ngw.get(target)
    assert r.status == 200
    assert r.body == b"admin"
    assert ngw.echo.stats()["requests"] == 0


@pytest.mark.parametrize("target", ["/../x", "/api/../../x", "/%2e%2e/x", "/api/a%2Fb", "/api/a%2fb",
                                    "/api/a%5Cb", "/api/a%00b", "/api/%zz", "/api/%4"])
def test_bad_paths_refused_400(ngw, target):
    r = ngw.get(target)
    assert r.status == 400, r
    assert "error" in r.json()
    assert ngw.echo.stats()["requests"] == 0


# -- rewriting ---------------------------------------------------------------

def test_strip_prefix(gateway):
    g = gateway(routes=[{"path": "/api/users/", "upstream": "echo", "strip_prefix": "/api"}])
    r = g.get("/api/users/42?x=1")
    assert r.status == 200, r
    assert r.json()["target"] == "/users/42?x=1"
    assert r.echoed_headers().get("x-forwarded-prefix") == ["/api"]


def test_strip_prefix_after_normalisation(gateway):
    g = gateway(routes=[{"path": "/api/users/", "upstream": "echo", "strip_prefix": "/api"}])
    r = g.get("//api/./users//7")
    assert r.status == 200, r
    assert r.json()["target"] == "/users/7"


def test_prefix_rewrite(gateway):
    g = gateway(routes=[{"path": "/old/", "upstream": "echo", "prefix_rewrite": "/new/"},
                        {"path": "/v1/", "upstream": "echo", "prefix_rewrite": "/"}])
    r = g.get("/old/a/b?q=1")
    assert r.status == 200, r
    assert r.json()["target"] == "/new/a/b?q=1"
    assert g.get("/v1/items").json()["target"] == "/items"


def test_plain_route_forwards_path_unchanged(gw):
    r = gw.get("/api/users/42")
    assert r.json()["target"] == "/api/users/42"
    assert "x-forwarded-prefix" not in r.echoed_headers()


# -- absolute-form ------------------------------------------------------------

def test_absolute_form_routes_by_its_authority(gateway):
    g = gateway(routes=[{"host": "a.example", "path": "/", "respond": {"status": 200, "body": "a"}},
                        {"host": "b.example", "path": "/", "upstream": "echo"}])
    resp, _, _ = util.raw_exchange(g.port, b"GET http://b.example/p?q=1 HTTP/1.1\r\n"
                                           b"Host: a.example\r\nConnection: close\r\n\r\n")
    assert resp.status == 200, resp
    j = resp.json()
    assert j["target"] == "/p?q=1"
    assert resp.echoed_headers()["host"] == ["b.example"]


def test_absolute_form_with_port_and_empty_path(gateway):
    g = gateway(routes=[{"host": "b.example", "path": "/", "upstream": "echo"}])
    resp, _, _ = util.raw_exchange(g.port, b"GET http://b.example:8080 HTTP/1.1\r\n"
                                           b"Host: x\r\nConnection: close\r\n\r\n")
    assert resp.status == 200, resp
    assert resp.json()["target"] == "/"
    assert resp.echoed_headers()["host"] == ["b.example:8080"]
