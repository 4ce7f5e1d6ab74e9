"""Client-side persistence and pipelining."""
import util


def test_http11_is_persistent(gw):
    with gw.conn() as c:
        for i in range(3):
            c.request("GET", "/p/%d" % i)
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == "/p/%d" % i
            assert not r.has_token("connection", "close")
        assert c.is_open(0.2)


def test_connection_close_honoured(gw):
    with gw.conn() as c:
        c.request("GET", "/c", headers={"Connection": "close"})
        r = c.read_response()
        assert r.status == 200
        assert r.has_token("connection", "close")
        assert c.wait_closed(2.0)


def test_http10_closes_by_default(gw):
    with gw.conn() as c:
        c.send(b"GET /ten HTTP/1.0\r\nHost: a\r\n\r\n")
        r = c.read_response()
        assert r.status == 200 and r.json()["target"] == "/ten"
        assert c.wait_closed(2.0)


def test_http10_keepalive_when_asked(gw):
    with gw.conn() as c:
        for i in range(2):
            c.send(b"GET /ten/%d HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n" % i)
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == "/ten/%d" % i
            assert r.has_token("connection", "keep-alive"), r
            assert r.header("content-length") is not None
        assert c.is_open(0.2)


def test_pipelined_requests_answered_in_order(gw):
    with gw.conn() as c:
        c.send(b"".join(util.build_request("GET", "/pipe/%d" % i) for i in range(5)))
        for i in range(5):
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == "/pipe/%d" % i


def test_pipelining_keeps_order_behind_a_slow_request(gw):
    with gw.conn(timeout=4.0) as c:
        c.send(util.build_request("GET", "/slow/400") + util.build_request("GET", "/fast"))
        assert c.read_response().json()["target"] == "/slow/400"
        assert c.read_response().json()["target"] == "/fast"


def test_pipelined_posts_with_bodies(gw):
    with gw.conn() as c:
        c.send(util.build_request("POST", "/a", body=b"first") +
               util.build_request("POST", "/b", body=b"second body") +
               util.build_request("GET", "/c"))
        got = [c.read_response().json() for _ in range(3)]
    assert [(j["target"], j["body"]) for j in got] == [("/a", "first"), ("/b", "second body"),
                                                       ("/c", "")]


def test_pipelined_mix_of_respond_and_proxy(gateway):
    g = gateway(routes=[{"path": "/r", "exact": True, "respond": {"status": 200, "body": "R"}},
                        {"path": "/", "upstream": "echo"}])
    with g.conn() as c:
        c.send(util.build_request("GET", "/slow/200") + util.build_request("GET", "/r") +
               util.build_request("GET", "/y"))
        assert c.read_response().json()["target"] == "/slow/200"
        assert c.read_response().body == b"R"
        assert c.read_response().json()["target"] == "/y"


def test_pipelined_head_then_get(gw):
    with gw.conn() as c:
        c.send(util.build_request("HEAD", "/big/1000") + util.build_request("GET", "/big/10"))
        r1 = c.read_response("HEAD")
        assert r1.status == 200 and r1.header("content-length") == "1000"
        r2 = c.read_response()
        assert r2.body == util.PATTERN[:10]


def test_many_requests_on_one_connection(gw):
    with gw.conn() as c:
        for i in range(100):
            c.request("GET", "/n/%d" % i)
            assert c.read_response().json()["target"] == "/n/%d" % i


def test_pipelined_last_request_closes(gw):
    with gw.conn() as c:
        c.send(util.build_request("GET", "/1") +
               util.build_request("GET", "/2", headers={"Connection": "close"}))
        assert c.read_response().json()["target"] == "/1"
        r2 = c.read_response()
        assert r2.json()["target"] == "/2" and r2.has_token("connection", "close")
        assert c.wait_closed(2.0)


def test_requests_after_connection_close_are_ignored(gw):
    with gw.conn() as c:
        c.send(util.build_request("GET", "/only", headers={"Connection": "close"}) +
               util.build_request("GET", "/ignored"))
        assert c.read_response().json()["target"] == "/only"
        assert c.wait_closed(2.0)
        assert b"HTTP/1.1" not in c.extra
    assert gw.echo.stats()["requests"] == 1


def test_upstream_keepalive_independent_of_client(gw):
    """A client closing its connection does not stop upstream reuse."""
    ids = set()
    for i in range(5):
        r = gw.get("/ind/%d" % i, headers={"Connection": "close"})
        ids.add(r.json()["conn_id"])
    assert len(ids) <= 2, ids


def test_body_sent_to_respond_route_is_consumed(gateway):
    g = gateway(routes=[{"path": "/r", "exact": True, "respond": {"status": 200, "body": "R"}},
                        {"path": "/", "upstream": "echo"}])
    with g.conn() as c:
        c.send(util.build_request("POST", "/r", body=b"GET /inner HTTP/1.1\r\nHost: a\r\n\r\n") +
               util.build_request("GET", "/after"))
        r1 = c.read_response()
        assert r1.body == b"R"
        if r1.has_token("connection", "close"):
            # not reading the body and closing instead is allowed; the
            # response must still arrive whole and nothing else follows
            assert c.wait_closed(2.0)
            assert c.extra == b""
            expected = []
        else:
            r2 = c.read_response()
            assert r2.json()["target"] == "/after", r2
            expected = ["/after"]
    # the body's text was never taken for a request
    assert g.echo.stats()["requests"] == len(expected)


def test_pipelined_head_on_chunked_upstream_response(gw):
    with gw.conn() as c:
        c.send(util.build_request("HEAD", "/bigchunked/1000") + util.build_request("GET", "/next"))
        r1 = c.read_response("HEAD")
        assert r1.status == 200 and r1.body == b""
        assert c.read_response().json()["target"] == "/next"


def test_two_hundred_pipelined_requests_in_one_write(gw):
    with gw.conn(timeout=5.0) as c:
        c.send(b"".join(util.build_request("GET", "/pp/%d" % i) for i in range(200)))
        for i in range(200):
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == "/pp/%d" % i
