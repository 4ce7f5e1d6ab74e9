"""Strict RFC 9112 request framing: what portico refuses, with which status,
and that the connection is closed afterwards. Raw bytes on raw sockets."""
import time

import pytest

import util

LIMITS = {"max_uri_bytes": 300, "max_header_bytes": 2048, "max_headers": 20}

H = b"Host: a.example\r\n"


@pytest.fixture
def fgw(gateway):
    return gateway(limits=LIMITS)


def assert_refused(port, data, status):
    """The request gets `status`, a JSON error body, Connection: close, and
    the connection is closed."""
    resp, closed, _ = util.raw_exchange(port, data, timeout=3.0)
    assert resp.status == status, resp
    assert resp.has_token("connection", "close"), resp
    assert "error" in resp.json()
    assert closed, "connection left open after a %d" % status


BAD = [
    # ambiguous or invalid message length
    ("cl_and_te", b"POST / HTTP/1.1\r\n" + H +
     b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te_and_cl", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
    ("differing_duplicate_cl", b"POST / HTTP/1.1\r\n" + H +
     b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", 400),
    ("differing_cl_list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4, 5\r\n\r\nabcde", 400),
    ("cl_not_a_number", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\n", 400),
    ("cl_negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("cl_plus_sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +4\r\n\r\nabcd", 400),
    ("cl_hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x4\r\n\r\nabcd", 400),
    ("cl_two_numbers", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4 4\r\n\r\nabcd", 400),
    # transfer codings
    ("te_gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 501),
    ("te_gzip_chunked", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("te_chunked_not_last", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 501),
    ("te_chunked_twice", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    ("te_in_http10", b"POST / HTTP/1.0\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    # field syntax
    ("obs_fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n", 400),
    ("obs_fold_tab", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n\tc\r\n\r\n", 400),
    ("space_before_colon", b"GET / HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n", 400),
    ("space_before_colon_host", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    ("bare_lf_in_field", b"GET / HTTP/1.1\r\nHost: a\nX-B: c\r\n\r\n", 400),
    ("bare_lf_everywhere", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("bare_cr", b"GET / HTTP/1.1\r\nHost: a\rX-B: c\r\n\r\n", 400),
    ("ctl_in_name", b"GET / HTTP/1.1\r\n" + H + b"X\x01A: b\r\n\r\n", 400),
    ("ctl_in_value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x01c\r\n\r\n", 400),
    ("nul_in_value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x00c\r\n\r\n", 400),
    ("del_in_value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x7fc\r\n\r\n", 400),
    ("empty_name", b"GET / HTTP/1.1\r\n" + H + b": novalue\r\n\r\n", 400),
    ("no_colon", b"GET / HTTP/1.1\r\n" + H + b"JustAName\r\n\r\n", 400),
    ("separator_in_name", b"GET / HTTP/1.1\r\n" + H + b"X(A): b\r\n\r\n", 400),
    # chunked bodies
    ("bad_chunk_size", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk_size_overflow", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk_size_negative", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk_missing_crlf", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcXY\r\n0\r\n\r\n", 400),
    # request line and version
    ("http2", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("http12", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 505),
    ("http09", b"GET /\r\n\r\n", 400),
    ("missing_host", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
    ("two_hosts_same", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
    ("two_hosts_differ", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("connect", b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n", 501),
    ("asterisk_get", b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("space_in_target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("relative_target", b"GET a/b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("bad_method_token", b"GE(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("double_space", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("fragment_in_target", b"GET /a#frag HTTP/1.1\r\n" + H + b"\r\n", 400),
    # limits (see LIMITS)
    ("uri_too_long", b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("head_too_big", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"b" * 3000 + b"\r\n\r\n", 431),
    ("head_too_big_many_lines", b"GET / HTTP/1.1\r\n" + H +
     b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 150) for i in range(15)) + b"\r\n", 431),
    ("too_many_fields", b"GET / HTTP/1.1\r\n" + H +
     b"".join(b"X-F%d: v\r\n" % i for i in range(20)) + b"\r\n", 431),
]


@pytest.mark.parametrize("name,data,status", BAD, ids=[n for n, _, _ in BAD])
def test_refused(fgw, name, data, status):
    assert_refused(fgw.port, data, status)
    # A malformed head never reaches the upstream. (A bad chunk is found
    # only after the head may already have been forwarded: not checked.)
    if "chunk_" not in name:
        assert fgw.echo.stats()["requests"] == 0


GOOD = [
    ("tab_in_value", b"GET /ok HTTP/1.1\r\n" + H + b"X-A: b\tc\r\n\r\n"),
    ("http10_without_host", b"GET /ok HTTP/1.0\r\n\r\n"),
    ("uri_at_limit", b"GET /" + b"a" * 299 + b" HTTP/1.1\r\n" + H + b"\r\n"),
    ("fields_at_limit", b"GET /ok HTTP/1.1\r\n" + H +
     b"".join(b"X-F%d: v\r\n" % i for i in range(19)) + b"\r\n"),
    ("head_under_limit", b"GET /ok HTTP/1.1\r\n" + H + b"X-Big: " + b"b" * 1500 + b"\r\n\r\n"),
    ("post_with_body", b"POST /ok HTTP/1.1\r\n" + H +
     b"Content-Length: 3\r\n\r\nabc"),
    ("ows_around_value", b"GET /ok HTTP/1.1\r\n" + H + b"X-A:   spaced \t \r\n\r\n"),
    ("case_insensitive_names", b"POST /ok HTTP/1.1\r\nhOsT: a\r\ncontent-LENGTH: 2\r\n\r\nhi"),
    ("te_chunked_case", b"POST /ok HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: Chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("data", [d for _, d in GOOD], ids=[n for n, _ in GOOD])
def test_accepted(fgw, data):
    with util.Conn(fgw.port) as c:
        c.send(data)
        r = c.read_response()
        assert r.status == 200, r
        assert "target" in r.json()


def test_value_ows_trimmed(fgw):
    r = util.raw_exchange(fgw.port, b"GET /ok HTTP/1.1\r\n" + H +
                          b"X-A:   spaced \t \r\nConnection: close\r\n\r\n")[0]
    assert r.echoed_headers()["x-a"] == ["spaced"]


def test_error_then_pipelined_request_is_not_processed(fgw):
    data = (b"GET / HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n"
            b"GET /second HTTP/1.1\r\n" + H + b"\r\n")
    resp, closed, c = util.raw_exchange(fgw.port, data)
    assert resp.status == 400
    assert closed
    assert b"HTTP/1.1 200" not in c.extra
    assert fgw.echo.stats()["requests"] == 0


def test_smuggling_cl_te_does_not_reach_upstream(fgw):
    data = (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n")
    resp, closed, c = util.raw_exchange(fgw.port, data)
    assert resp.status == 400 and closed
    assert b"smuggled" not in c.extra
    assert fgw.echo.stats()["requests"] == 0


def test_chunked_request_with_extensions_and_trailers(fgw):
    data = (b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n1;a=\"q\"\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")
    with util.Conn(fgw.port) as c:
        c.send(data)
        r = c.read_response()
        assert r.status == 200, r
        j = r.json()
        assert j["body"] == "hello world"
        assert j["framing"] == "chunked"
        assert "content-length" not in r.echoed_headers()
        # the connection stays usable: the body was consumed exactly
        c.request("GET", "/next")
        assert c.read_response().json()["target"] == "/next"


def test_chunked_request_sent_byte_by_byte(fgw):
    head = b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    body = b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n"
    with util.Conn(fgw.port) as c:
        for i in range(0, len(head), 7):
            c.send(head[i:i + 7])
            time.sleep(0.002)
        for b in body:
            c.send(bytes([b]))
            time.sleep(0.002)
        r = c.read_response()
        assert r.status == 200, r
        assert r.json()["body"] == "abc0123456789abcdef"


def test_zero_length_post(fgw):
    r = util.raw_exchange(fgw.port, b"POST /z HTTP/1.1\r\n" + H +
                          b"Content-Length: 0\r\nConnection: close\r\n\r\n")[0]
    assert r.status == 200
    assert r.json()["body_len"] == 0


def test_error_on_second_request_of_keepalive_connection(fgw):
    with util.Conn(fgw.port) as c:
        c.request("GET", "/first")
        assert c.read_response().status == 200
        c.send(b"GET / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab")
        r = c.read_response()
        assert r.status == 400
        assert r.has_token("connection", "close")
        assert c.wait_closed(2.0)


@pytest.mark.parametrize("target,status", [("/nope", 404), ("/m", 405)])
def test_body_of_refused_request_is_never_parsed_as_a_request(gateway, target, status):
    g = gateway(routes=[{"path": "/api/", "upstream": "echo"},
                        {"path": "/m", "methods": ["GET"], "respond": {"status": 200, "body": "m"}}])
    inner = b"GET /api/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    with util.Conn(g.port) as c:
        c.send(b"POST " + target.encode() + b" HTTP/1.1\r\n" + H +
               b"Content-Length: %d\r\n\r\n" % len(inner) + inner)
        r = c.read_response()
        assert r.status == status
        # either the connection ends here, or it goes on with a clean slate
        if not c.wait_closed(0.5):
            assert c.extra == b"", c.extra
            c.request("GET", "/api/next")
            assert c.read_response().json()["target"] == "/api/next"
    assert all(e.get("path") != "/api/smuggled" for e in g.echo.stats()["events"])
    assert g.echo.stats()["requests"] <= 1
