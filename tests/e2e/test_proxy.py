"""What the upstream sees and what the client gets back: forwarding headers,
hop-by-hop stripping, body re-framing, upstream connection pooling."""
import threading
import time

import pytest

import util
from conftest import make_config

HOP_REQUEST = [("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "timeout=5"),
               ("TE", "trailers"), ("Trailer", "X-T"), ("Upgrade", "foo/1"),
               ("Proxy-Connection", "keep-alive"), ("X-Keep", "yes")]


def test_host_forwarded_as_sent(gw):
    r = gw.get("/h", host="Svc.Example:1234")
    assert r.echoed_headers()["host"] == ["Svc.Example:1234"]


def test_forwarding_headers_added(gw):
    r = gw.get("/f", host="front.example")
    h = r.echoed_headers()
    assert h["x-forwarded-for"] == ["127.0.0.1"]
    assert h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-host"] == ["front.example"]


def test_untrusted_forwarding_headers_replaced(gw):
    r = gw.get("/f", host="front.example", headers=[
        ("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"), ("X-Real-IP", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6;proto=https")])
    h = r.echoed_headers()
    assert h["x-forwarded-for"] == ["127.0.0.1"]
    assert h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-host"] == ["front.example"]
    assert h.get("x-real-ip", ["127.0.0.1"]) == ["127.0.0.1"]
    assert "6.6.6.6" not in str(r.json()["headers"])


def test_trusted_proxy_xff_appended(gateway):
    g = gateway(trusted_proxies=["127.0.0.0/8"])
    r = g.get("/f", headers={"X-Forwarded-For": "1.2.3.4"})
    xff = ",".join(r.echoed_headers()["x-forwarded-for"])
    assert [a.strip() for a in xff.split(",")] == ["1.2.3.4", "127.0.0.1"]


def test_trusted_proxy_headers_kept(gateway):
    g = gateway(trusted_proxies=["127.0.0.0/8"])
    h = g.get("/f", headers={"X-Real-IP": "6.6.6.6", "Forwarded": "for=6.6.6.6"}).echoed_headers()
    assert "for=6.6.6.6" in ",".join(h.get("forwarded", []))
    assert h.get("x-real-ip") == ["6.6.6.6"]


def test_trusted_proxy_list_not_matching_is_untrusted(gateway):
    g = gateway(trusted_proxies=["10.0.0.0/8"])
    r = g.get("/f", headers={"X-Forwarded-For": "1.2.3.4"})
    assert r.echoed_headers()["x-forwarded-for"] == ["127.0.0.1"]


def test_via_added_when_enabled(gateway):
    g = gateway(via=True)
    h = g.get("/v").echoed_headers()
    assert "1.1 portico" in ",".join(h.get("via", []))
    h = g.get("/v", headers={"Via": "1.0 other"}).echoed_headers()
    via = ",".join(h.get("via", []))
    assert "1.0 other" in via and "1.1 portico" in via
    assert via.index("1.0 other") < via.index("1.1 portico")


def test_no_via_by_default(gw):
    assert "via" not in gw.get("/v").echoed_headers()


def test_hop_by_hop_request_headers_removed(gw):
    r = gw.get("/hop", headers=HOP_REQUEST)
    h = r.echoed_headers()
    for name in ("x-hop", "keep-alive", "te", "trailer", "upgrade", "proxy-connection"):
        assert name not in h, "%s reached the upstream: %r" % (name, h)
    assert "x-hop" not in ",".join(h.get("connection", [])).lower()
    assert h["x-keep"] == ["yes"]


def test_hop_by_hop_response_headers_removed(gw):
    r = gw.get("/headers-out?Connection=X-Foo&X-Foo=1&Keep-Alive=timeout%3D5"
               "&Proxy-Connection=keep-alive&Trailer=X-T&Upgrade=foo%2F1&X-Stay=1")
    assert r.status == 200, r
    names = {k.lower() for k, _ in r.headers}
    for name in ("x-foo", "keep-alive", "proxy-connection", "trailer", "upgrade"):
        assert name not in names, "%s reached the client: %r" % (name, r.headers)
    assert "x-foo" not in ",".join(r.header_all("connection")).lower()
    assert r.header("x-stay") == "1"


def test_content_length_body_forwarded_with_length(gw):
    r = gw.request("POST", "/b", body=b"0123456789")
    j = r.json()
    assert j["framing"] == "length" and j["body"] == "0123456789"
    assert r.echoed_headers()["content-length"] == ["10"]
    assert "transfer-encoding" not in r.echoed_headers()


def test_chunked_body_forwarded_chunked(gw):
    chunks = [b"a" * 10, b"b" * 70000, b"c" * 3]
    data = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    with gw.conn() as c:
        c.send(b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + data)
        r = c.read_response()
    assert r.status == 200, r
    j = r.json()
    assert j["framing"] == "chunked"
    assert j["body"].encode("latin-1") == b"".join(chunks)
    assert "content-length" not in r.echoed_headers()


def test_chunked_response_to_http11_client_stays_chunked(gw):
    with gw.conn() as c:
        c.request("GET", "/bigchunked/100000")
        r = c.read_response()
        assert r.status == 200
        assert r.framing == "chunked" and r.complete
        assert r.body == (util.PATTERN * 2)[:100000]
        c.request("GET", "/after")                 # still usable
        assert c.read_response().json()["target"] == "/after"


def test_chunked_response_to_http10_client_is_close_delimited(gw):
    with gw.conn() as c:
        c.send(b"GET /bigchunked/100000 HTTP/1.0\r\nHost: a\r\n\r\n")
        r = c.read_response()
        assert r.status == 200
        assert "chunked" not in ",".join(r.header_all("transfer-encoding")).lower()
        assert r.body == (util.PATTERN * 2)[:100000]
        assert r.framing in ("close", "length")
        if r.framing == "length":
            assert c.wait_closed(2.0)


def test_length_response_to_http10_client_keeps_length(gw):
    with gw.conn() as c:
        c.send(b"GET /big/5000 HTTP/1.0\r\nHost: a\r\n\r\n")
        r = c.read_response()
        assert r.header("content-length") == "5000"
        assert r.body == util.PATTERN[:5000]
        assert c.wait_closed(2.0)


# -- upstream connection pool --------------------------------------------------

def test_upstream_connections_are_reused(gw):
    conns = []
    for i in range(30):
        r = gw.get("/ka/%d" % i)          # a new client connection each time
        assert r.status == 200
        conns.append(r.json()["stats"]["connections"])
    assert conns[-1] <= 3, "30 requests used %d upstream connections" % conns[-1]


def test_keepalive_zero_disables_pooling(gateway):
    g = gateway(upstream_opts={"keepalive": 0})
    for i in range(5):
        j = g.get("/np/%d" % i).json()
        assert j["conn_requests"] == 1
    assert j["stats"]["connections"] == 5


def test_keepalive_requests_caps_requests_per_connection(gateway):
    g = gateway(upstream_opts={"keepalive_requests": 3})
    seen = []
    for i in range(9):
        j = g.get("/kr/%d" % i).json()
        seen.append(j["conn_requests"])
    assert max(seen) <= 3, seen
    assert j["stats"]["connections"] >= 3
    assert max(seen) >= 2, "no reuse at all: %r" % seen


def test_pooled_connection_expires_after_keepalive_timeout(gateway):
    g = gateway(upstream_opts={"keepalive_timeout_ms": 300})
    a = g.get("/kt/1").json()["conn_id"]
    b = g.get("/kt/2").json()["conn_id"]
    assert a == b, "connection not pooled at all"
    time.sleep(0.8)
    c = g.get("/kt/3").json()["conn_id"]
    assert c != a


def test_pooled_connection_closed_by_upstream_is_not_used(gateway):
    g = gateway(echo_args=("--idle-close-ms", "200"))
    for i in range(5):
        r = g.get("/ic/%d" % i)
        assert r.status == 200, "request %d after a pause failed: %r" % (i, r)
        time.sleep(0.5)


def test_upstream_connection_close_response_not_reused(gw):
    with gw.conn() as c:
        c.request("GET", "/headers-out?Connection=close")
        r1 = c.read_response()
        assert r1.status == 200
        assert c.is_open(0.2), "client connection closed because the upstream's was"
        c.request("GET", "/after")
        r2 = c.read_response()
        assert r2.status == 200
        assert r2.json()["conn_id"] != r1.json()["conn_id"]


def test_concurrent_requests_are_not_serialised(gw):
    results = []

    def run(i):
        try:
            results.append(gw.get("/slow/400?%d" % i, timeout=5.0).status)
        except Exception as e:  # noqa: BLE001
            results.append(repr(e))

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - t0
    assert results == [200] * 10
    assert elapsed < 2.0, "10 parallel 400 ms requests took %.2f s" % elapsed


def test_two_upstreams_by_route(portico, upstream):
    e1, e2 = upstream("echo.py"), upstream("echo.py")
    p = portico(make_config(
        upstreams={"one": {"endpoints": [e1.addr]}, "two": {"endpoints": [e2.addr]}},
        routes=[{"path": "/one/", "upstream": "one"}, {"path": "/two/", "upstream": "two"}]))
    assert util.get(p.port, "/one/x").json()["port"] == e1.port
    assert util.get(p.port, "/two/x").json()["port"] == e2.port


@pytest.mark.parametrize("size", [0, 1, 65536, 300000])
def test_response_sizes(gw, size):
    with gw.conn() as c:
        c.request("GET", "/big/%d" % size)
        r = c.read_response()
        assert r.status == 200 and r.complete
        assert r.body == (util.PATTERN * 5)[:size]
