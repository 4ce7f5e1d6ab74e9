"""Basic proxying, respond routes, HEAD, Expect: 100-continue, workers,
and the access log."""
import json
import os
import signal
import threading
import time

import pytest

import util
from conftest import make_config


def test_get_is_proxied(gw):
    r = gw.get("/hello/world?x=1&y=%20z")
    assert r.status == 200, r
    j = r.json()
    assert j["method"] == "GET"
    assert j["target"] == "/hello/world?x=1&y=%20z"
    assert j["version"] == "HTTP/1.1"
    assert j["body_len"] == 0


def test_post_body_proxied_with_content_length(gw):
    body = b'{"a": 1, "b": "' + b"x" * 5000 + b'"}'
    r = gw.request("POST", "/items", body=body, headers={"Content-Type": "application/json"})
    assert r.status == 200, r
    j = r.json()
    assert j["method"] == "POST"
    assert j["body"].encode("latin-1") == body
    assert j["framing"] == "length"
    h = r.echoed_headers()
    assert h["content-length"] == [str(len(body))]
    assert h["content-type"] == ["application/json"]


def test_binary_body_round_trip(gw):
    body = bytes(range(256)) * 40
    r = gw.request("PUT", "/bin", body=body)
    assert r.status == 200, r
    assert r.json()["body"].encode("latin-1") == body


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "PURGE"])
def test_methods_forwarded(gw, method):
    r = gw.request(method, "/m")
    assert r.status == 200, r
    assert r.json()["method"] == method


@pytest.mark.parametrize("code", [201, 404, 500, 503])
def test_upstream_status_passed_through(gw, code):
    r = gw.get("/status/%d" % code)
    assert r.status == code, r
    # the upstream's own body, not an error made up by portico
    assert r.json()["target"] == "/status/%d" % code


def test_204_from_upstream_has_no_body(gw):
    with gw.conn() as c:
        c.send(util.build_request("GET", "/status/204") + util.build_request("GET", "/after"))
        r1 = c.read_response()
        assert r1.status == 204 and r1.body == b""
        r2 = c.read_response()
        assert r2.status == 200 and r2.json()["target"] == "/after", r2


def test_head_response_has_no_body(gw):
    with gw.conn() as c:
        c.send(util.build_request("HEAD", "/x") + util.build_request("GET", "/y"))
        r1 = c.read_response("HEAD")
        assert r1.status == 200
        # the upstream advertised the length of the body it would have sent
        assert int(r1.header("content-length")) > 0
        r2 = c.read_response()
        assert r2.status == 200, r2
        assert r2.json()["target"] == "/y"


def test_head_on_respond_route_has_no_body(portico):
    cfg = make_config(routes=[{"path": "/", "respond": {"status": 200, "body": "hello\n"}}])
    p = portico(cfg)
    with util.Conn(p.port) as c:
        c.send(util.build_request("HEAD", "/") + util.build_request("GET", "/"))
        r1 = c.read_response("HEAD")
        assert r1.status == 200 and r1.body == b""
        assert r1.header("content-length") in (None, "6")
        r2 = c.read_response()
        assert r2.status == 200 and r2.body == b"hello\n", r2


def test_response_headers_relayed(gw):
    r = gw.get("/headers-out?X-Custom=abc&Set-Cookie=a%3D1&Set-Cookie=b%3D2&Cache-Control=no-store")
    assert r.status == 200, r
    assert r.header("x-custom") == "abc"
    assert r.header_all("set-cookie") == ["a=1", "b=2"]
    assert r.header("cache-control") == "no-store"


def test_request_headers_relayed_in_order_with_duplicates(gw):
    r = gw.get("/h", headers=[("X-Dup", "1"), ("X-Other", "y"), ("X-Dup", "2"),
                              ("Authorization", "Bearer abc.def"), ("X-Empty", "")])
    assert r.status == 200, r
    h = r.json()["headers"]
    dup = [v for k, v in h if k.lower() == "x-dup"]
    assert dup == ["1", "2"]
    assert r.echoed_headers()["x-other"] == ["y"]
    assert r.echoed_headers()["authorization"] == ["Bearer abc.def"]
    assert r.echoed_headers().get("x-empty") == [""]


def test_header_value_with_tab_and_long_value_accepted(gw):
    r = gw.get("/t", headers={"X-Tab": "a\tb", "X-Long": "v" * 4000})
    assert r.status == 200, r
    h = r.echoed_headers()
    assert h["x-tab"] == ["a\tb"]
    assert h["x-long"] == ["v" * 4000]


def test_respond_route_defaults(portico):
    cfg = make_config(routes=[{"path": "/", "respond": {"status": 200, "body": "portico is running\n"}}])
    p = portico(cfg)
    r = util.get(p.port, "/")
    assert r.status == 200
    assert r.body == b"portico is running\n"
    assert r.header("content-type") == "text/plain; charset=utf-8"
    assert r.header("content-length") == str(len(r.body))


def test_respond_route_custom_status_and_type(portico):
    cfg = make_config(routes=[{"path": "/gone", "respond": {
        "status": 410, "body": '{"gone":true}', "content_type": "application/json"}}])
    p = portico(cfg)
    r = util.get(p.port, "/gone")
    assert r.status == 410
    assert r.json() == {"gone": True}
    assert r.header("content-type") == "application/json"


def test_unmatched_is_404_json(portico):
    cfg = make_config(routes=[{"path": "/api/", "respond": {"status": 200, "body": "api"}}])
    p = portico(cfg)
    r = util.get(p.port, "/elsewhere")
    assert r.status == 404
    assert "error" in r.json()
    assert "json" in (r.header("content-type") or "")


# -- Expect: 100-continue ------------------------------------------------

def test_expect_100_continue(gw):
    with gw.conn(timeout=2.0) as c:
        c.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n"
               b"Expect: 100-continue\r\n\r\n")
        interim = c.read_head()   # must come before we send any body byte
        assert interim.status == 100, interim
        assert interim.version == "HTTP/1.1"
        c.send(b"hello world")
        r = c.read_response()
        assert r.status == 200, r
        assert r.json()["body"] == "hello world"


def test_expect_100_refused_by_length_gets_final_status(gateway):
    g = gateway(limits={"max_body_bytes": 100})
    with g.conn(timeout=2.0) as c:
        c.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n"
               b"Expect: 100-continue\r\n\r\n")
        r = c.read_head()
        assert r.status == 413, r


def test_expect_100_unrouted_gets_404_without_100(gateway):
    g = gateway(routes=[{"path": "/api/", "upstream": "echo"}])
    with g.conn(timeout=2.0) as c:
        c.send(b"POST /nope HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
               b"Expect: 100-continue\r\n\r\n")
        r = c.read_head()
        assert r.status == 404, r


# -- workers -------------------------------------------------------------

def test_two_workers_serve_the_same_port(gateway):
    g = gateway(workers=2)
    # The port accepts (kernel backlog) before the worker threads exist, so
    # the count is read once the daemon has answered a request.
    assert g.get("/w/first").status == 200
    deadline = time.monotonic() + 5
    tasks = os.listdir("/proc/%d/task" % g.portico.pid)
    while len(tasks) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
        tasks = os.listdir("/proc/%d/task" % g.portico.pid)
    assert len(tasks) >= 3, "expected main + 2 worker threads with workers=2, got %d" % len(tasks)
    results = []

    def run(i):
        try:
            r = g.get("/w/%d" % i)
            results.append((r.status, r.json()["target"]))
        except Exception as e:  # noqa: BLE001 - reported below
            results.append(("error", repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == sorted((200, "/w/%d" % i) for i in range(40))


def test_busy_polling_serves_then_sleeps_when_idle(gateway):
    """busy_poll_us keeps a worker polling after its events; it must still
    answer correctly, go back to sleep once idle (an open keep-alive
    connection included) and stop on SIGTERM."""
    g = gateway(workers=2, busy_poll_us=1000)
    with g.conn() as c:
        for i in range(300):
            c.request("GET", "/bp/%d" % i)
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == "/bp/%d" % i
        time.sleep(0.3)
        t0 = util.cpu_seconds(g.portico.pid)
        time.sleep(2.0)
        used = util.cpu_seconds(g.portico.pid) - t0
        # Polling without end would be about 4 s (two workers); the tick
        # (every 250 ms) costs each worker at most 1 ms of polling.
        assert used < 0.3, "idle workers used %.2f s of CPU in 2 s" % used
        c.request("GET", "/bp/after")
        assert c.read_response().status == 200
    t0 = time.monotonic()
    assert g.portico.stop(signal.SIGTERM, timeout=3.0) == 0
    assert time.monotonic() - t0 < 1.5


# -- access log ------------------------------------------------------------

LOG_KEYS = {"time", "client", "method", "host", "path", "status", "bytes_in", "bytes_out",
            "duration_ms", "upstream_ms", "route", "upstream"}


def read_log_lines(path, n, proc):
    """Wait for n lines (up to 2 s); if they are not there, stop portico
    (which must flush) and read again."""
    def lines():
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [ln for ln in f.read().splitlines() if ln.strip()]
    got = util.wait_until(lambda: len(lines()) >= n, 2.0)
    if not got:
        proc.stop()
    return [json.loads(ln) for ln in lines()]


def test_access_log_to_file(gateway, tmp_path):
    log = tmp_path / "access.log"
    g = gateway(routes=[{"name": "main", "path": "/", "upstream": "echo"},
                        {"name": "hello", "path": "/hello", "exact": True,
                         "respond": {"status": 200, "body": "hi"}}],
                access_log={"path": str(log)})
    assert g.get("/x/y?q=1", host="h.example").status == 200
    body = b"b" * 5000
    assert g.request("POST", "/post", body=body).status == 200
    assert g.get("/hello").status == 200
    entries = read_log_lines(str(log), 3, g.portico)
    assert len(entries) == 3, entries
    for e in entries:
        assert LOG_KEYS <= set(e), "missing keys: %s" % (LOG_KEYS - set(e))
        assert str(e["client"]).startswith("127.0.0.1")
        assert isinstance(e["duration_ms"], (int, float)) and e["duration_ms"] >= 0
    get, post, hello = entries
    assert get["method"] == "GET" and get["status"] == 200
    assert get["protocol"] == "HTTP/1.1"
    assert get["host"] == "h.example"
    assert get["path"].startswith("/x/y")
    assert get["route"] == "main"
    assert get["upstream"] == g.echo.addr
    assert get["bytes_out"] > 0
    assert isinstance(get["upstream_ms"], (int, float)) and get["upstream_ms"] >= 0
    assert post["method"] == "POST" and post["bytes_in"] >= 5000
    assert hello["route"] == "hello" and hello["upstream"] is None
    assert hello["bytes_out"] >= 2


def test_access_log_records_errors(gateway, tmp_path):
    log = tmp_path / "access.log"
    g = gateway(routes=[{"path": "/api/", "upstream": "echo"}], access_log={"path": str(log)})
    assert g.get("/missing").status == 404
    entries = read_log_lines(str(log), 1, g.portico)
    assert len(entries) == 1, entries
    assert entries[0]["status"] == 404
    assert entries[0]["upstream"] is None


def test_access_log_to_stdout(gateway):
    g = gateway()
    assert g.get("/stdout-check").status == 200

    def found():
        for ln in g.portico.stdout().splitlines():
            try:
                e = json.loads(ln)
            except ValueError:
                continue
            if isinstance(e, dict) and str(e.get("path", "")).startswith("/stdout-check"):
                return e
        return None
    e = util.wait_until(found, 2.0)
    if e is None:
        g.portico.stop()
        e = found()
    assert e is not None, "no access log line on stdout:\n" + g.portico.stdout()
    assert e["status"] == 200


def test_access_log_off(gateway):
    g = gateway(access_log={"path": "off"})
    assert g.get("/quiet").status == 200
    time.sleep(0.3)
    g.portico.stop()
    assert "/quiet" not in g.portico.stdout()


def test_expect_100_continue_with_chunked_body(gw):
    with gw.conn(timeout=2.0) as c:
        c.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
               b"Expect: 100-continue\r\n\r\n")
        interim = c.read_head()
        assert interim.status == 100, interim
        c.send(b"5\r\nhello\r\n0\r\n\r\n")
        r = c.read_response()
        assert r.status == 200, r
        assert r.json()["body"] == "hello"
