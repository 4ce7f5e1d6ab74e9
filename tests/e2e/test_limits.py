"""Body size limits and the client-side timeouts (header, body rate, idle,
send)."""
import socket
import threading
import time

import util

H = b"Host: a.example\r\n"


def test_body_over_limit_by_content_length_refused_at_once(gateway):
    g = gateway(limits={"max_body_bytes": 1000})
    with g.conn(timeout=2.0) as c:
        # the head alone must be enough: no body byte is sent
        c.send(b"POST /p HTTP/1.1\r\n" + H + b"Content-Length: 1001\r\n\r\n")
        r = c.read_response()
        assert r.status == 413, r
        assert "error" in r.json()
        assert r.has_token("connection", "close")
        assert c.wait_closed(2.0)
    assert g.echo.stats()["requests"] == 0


def test_body_at_limit_accepted(gateway):
    g = gateway(limits={"max_body_bytes": 1000})
    r = g.request("POST", "/p", body=b"x" * 1000)
    assert r.status == 200, r
    assert r.json()["body_len"] == 1000


def test_chunked_body_over_limit_refused(gateway):
    g = gateway(limits={"max_body_bytes": 1000})
    with g.conn(timeout=3.0) as c:
        c.send(b"POST /p HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(5):
                c.send(b"12c\r\n" + b"y" * 300 + b"\r\n")   # 5 x 300 bytes
                time.sleep(0.01)
            c.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass   # refused while we were still sending: fine
        r = c.read_response()
        assert r.status == 413, r
        assert c.wait_closed(2.0)


def test_chunked_body_at_limit_accepted(gateway):
    g = gateway(limits={"max_body_bytes": 1000})
    with g.conn() as c:
        c.send(b"POST /p HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" +
               (b"c8\r\n" + b"z" * 200 + b"\r\n") * 5 + b"0\r\n\r\n")
        r = c.read_response()
        assert r.status == 200, r
        assert r.json()["body_len"] == 1000


def test_default_body_limit_is_10_mib(gw):
    with gw.conn(timeout=2.0) as c:
        c.send(b"POST /p HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % (10 * 1024 * 1024 + 1))
        assert c.read_response().status == 413


def test_body_limit_zero_means_unlimited(gateway):
    g = gateway(limits={"max_body_bytes": 0})
    n = 12 * 1024 * 1024
    with g.conn(timeout=10.0) as c:
        c.send(b"POST /sink HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % n)
        for _ in range(12):
            c.send(util.PATTERN_MIB)
        r = c.read_response()
        assert r.status == 200, r
        assert r.json()["length"] == n


# -- header timeout ----------------------------------------------------------

def test_header_timeout_408_then_close(gateway):
    g = gateway(limits={"header_timeout_ms": 500})
    with g.conn(timeout=4.0) as c:
        t0 = time.monotonic()
        c.send(b"GET / HTTP/1.1\r\n" + H)      # never finished
        r = c.read_response()
        elapsed = time.monotonic() - t0
        assert r.status == 408, r
        assert 0.35 <= elapsed <= 2.5, elapsed
        assert c.wait_closed(2.0)
    assert g.echo.stats()["requests"] == 0


def test_header_timeout_covers_the_whole_head(gateway):
    """A client trickling header bytes does not reset the clock."""
    g = gateway(limits={"header_timeout_ms": 500})
    c = g.conn(timeout=0.1)
    t0 = time.monotonic()
    got = b""
    try:
        c.send(b"GET / HTTP/1.1\r\n" + H)
        while time.monotonic() - t0 < 5.0:
            try:
                c.send(b"X-Slow-%d: v\r\n" % int((time.monotonic() - t0) * 1000))
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                d = c.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                break
            if not d:
                break
            got += d
            if b"\r\n\r\n" in got:
                break
        elapsed = time.monotonic() - t0
    finally:
        c.close()
    assert util.status_of(got) == 408, got[:200]
    assert elapsed <= 2.5, elapsed


# -- body rate -----------------------------------------------------------------

def test_slow_body_dripper_cut_with_408(gateway):
    g = gateway(limits={"body_timeout_ms": 500, "body_min_rate": 1000})
    c = g.conn(timeout=0.2)
    t0 = time.monotonic()
    got = b""
    closed = False
    try:
        c.send(b"POST /sink HTTP/1.1\r\n" + H + b"Content-Length: 100\r\n\r\n")
        for _ in range(60):      # at most 12 s of dripping
            try:
                c.send(b"d")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            try:
                d = c.sock.recv(65536)
                if not d:
                    closed = True
                    break
                got += d
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed = True
                break
        elapsed = time.monotonic() - t0
        if not closed:
            closed = c.wait_closed(1.0)
            got += c.extra
    finally:
        c.close()
    assert util.status_of(got) == 408, got[:300]
    assert closed
    assert elapsed < 5.0, elapsed


def test_steady_body_passes_rate_check(gateway):
    g = gateway(limits={"body_timeout_ms": 500, "body_min_rate": 1000})
    with g.conn(timeout=3.0) as c:
        c.send(b"POST /sink HTTP/1.1\r\n" + H + b"Content-Length: 6000\r\n\r\n")
        for _ in range(10):     # 600 bytes every 200 ms: 3000 B/s for 2 s
            c.send(b"s" * 600)
            time.sleep(0.2)
        r = c.read_response()
        assert r.status == 200, r
        assert r.json()["length"] == 6000


# -- idle ------------------------------------------------------------------

def test_idle_keepalive_connection_closed(gateway):
    g = gateway(limits={"idle_timeout_ms": 300})
    with g.conn() as c:
        c.request("GET", "/1")
        assert c.read_response().status == 200
        time.sleep(0.1)
        c.request("GET", "/2")        # still open before the idle timeout
        assert c.read_response().status == 200
        t0 = time.monotonic()
        assert c.wait_closed(2.5), "idle connection not closed"
        elapsed = time.monotonic() - t0
        assert 0.2 <= elapsed <= 2.0, elapsed
        assert c.extra == b"" or util.status_of(c.extra) == 408


def test_idle_timeout_does_not_cut_a_request_in_flight(gateway):
    g = gateway(limits={"idle_timeout_ms": 300})
    with g.conn(timeout=3.0) as c:
        c.request("GET", "/slow/900")
        r = c.read_response()
        assert r.status == 200, r


# -- send timeout ------------------------------------------------------------

def test_client_not_reading_is_dropped_after_send_timeout(gateway):
    g = gateway(limits={"send_timeout_ms": 500})
    n = 64 * 1024 * 1024
    c = g.conn(timeout=3.0, rcvbuf=16384)
    try:
        c.request("GET", "/big/%d" % n)
        time.sleep(3.0)          # read nothing for six send timeouts
        total = 0
        c.sock.settimeout(3.0)
        eof = False
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 8:
                d = c.sock.recv(1 << 20)
                if not d:
                    eof = True
                    break
                total += len(d)
        except ConnectionResetError:
            eof = True
        except socket.timeout:
            pass
    finally:
        c.close()
    assert eof, "connection not closed"
    assert total < n, "the whole body arrived although the client did not read for 3 s"


def test_413_reaches_a_client_that_sends_its_body_anyway(gateway):
    """Refusing must not reset the connection under the response (the
    unread body would make a plain close() send RST)."""
    g = gateway(limits={"max_body_bytes": 1000})
    n = 5 * 1024 * 1024
    for _ in range(3):
        with g.conn(timeout=3.0) as c:
            def sender():
                try:
                    c.send(b"POST /p HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % n)
                    c.send(b"x" * n)
                except OSError:
                    pass
            t = threading.Thread(target=sender)
            t.start()
            r = c.read_response()
            t.join(5)
            assert r.status == 413, r


def test_max_connections(gateway):
    g = gateway(limits={"max_connections": 2})
    time.sleep(0.2)                      # let the startup probe connection go
    a, b = g.conn(), g.conn()
    try:
        for c in (a, b):
            c.request("GET", "/held")
            assert c.read_response().status == 200
        with g.conn() as third:
            try:
                third.request("GET", "/third")
                got = third.read_response()
            except (util.ProtocolError, OSError):
                got = None
            assert got is None or got.status == 503, "a connection over max_connections was served"
        a.close()
        time.sleep(0.2)
        assert g.get("/after-release").status == 200
        b.request("GET", "/still")
        assert b.read_response().status == 200
    finally:
        a.close()
        b.close()
