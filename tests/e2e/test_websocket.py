"""WebSocket tunnels through Portico (route "websocket": true) against a
real WebSocket upstream (servers/ws_echo.py): messages both ways, plain
and over TLS, the close handshake, half-close, idle timeout and maximum
lifetime, many tunnels at once, back-pressure in both directions (memory
stays bounded), filters before the upgrade (jwt_auth refuses with 401),
and what is never tunnelled: upgrades on routes without "websocket",
h2c, an upgrade with a body, and a 101 nobody asked for."""
import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

import util
from conftest import free_port, make_config

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"


class WS:
    """A minimal WebSocket client on a (plain or TLS) socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def handshake(self, path="/ws", headers=(), host="ws.test"):
        self.key = base64.b64encode(os.urandom(16)).decode()
        lines = ["GET %s HTTP/1.1" % path, "Host: " + host, "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Key: " + self.key,
                 "Sec-WebSocket-Version: 13"] + ["%s: %s" % h for h in headers]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return self.read_head()

    def read_head(self):
        while b"\r\n\r\n" not in self.buf:
            d = self.sock.recv(65536)
            assert d, "connection closed before the response head: %r" % self.buf
            self.buf += d
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        hdrs = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            hdrs.setdefault(k.strip().lower(), []).append(v.strip())
        return status, hdrs

    def read_body(self, hdrs):
        n = int(hdrs["content-length"][0])
        return self.recv_exact(n)

    def send_frame(self, op, payload, fin=True):
        mask = os.urandom(4)
        n = len(payload)
        b0 = (0x80 if fin else 0) | op
        if n < 126:
            head = struct.pack("!BB", b0, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", b0, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", b0, 0x80 | 127, n)
        if n:
            m = (mask * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")
        self.sock.sendall(head + mask + payload)

    def send(self, data):
        self.send_frame(0x1 if isinstance(data, str) else 0x2,
                        data.encode() if isinstance(data, str) else data)

    def recv_exact(self, n):
        while len(self.buf) < n:
            d = self.sock.recv(max(65536, n - len(self.buf)))
            if not d:
                raise EOFError("closed with %d of %d bytes" % (len(self.buf), n))
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self):
        b0, b1 = self.recv_exact(2)
        assert not b1 & 0x80, "server frames are not masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self.recv_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self.recv_exact(8))[0]
        return bool(b0 & 0x80), b0 & 0x0F, self.recv_exact(n)

    def recv(self):
        """The next data message (text as str); control frames returned as (op, data)."""
        parts = []
        while True:
            fin, op, data = self.recv_frame()
            if op in (0x8, 0x9, 0xA):
                return (op, data)
            parts.append(data)
            if op in (0x1, 0x2):
                kind = op
            if fin:
                payload = b"".join(parts)
                return payload.decode() if kind == 0x1 else payload

    def at_eof(self, timeout=3.0):
        """Wait for the peer's FIN with no more data."""
        self.sock.settimeout(timeout)
        try:
            return self.buf == b"" and self.sock.recv(1) == b""
        except (ConnectionResetError, socket.timeout):
            return False

    def close(self):
        self.sock.close()


def accept_of(key):
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def connect(port, timeout=10):
    return WS(socket.create_connection(("127.0.0.1", port), timeout=timeout))


def log_lines(p, path=None):
    out = []
    for ln in p.stdout().splitlines():
        if ln.startswith("{"):
            e = json.loads(ln)
            if path is None or e.get("path") == path:
                out.append(e)
    return out


@pytest.fixture
def ws_gw(portico, upstream):
    """ws_gw(route_opts..., top...) -> (portico, ws upstream)."""

    def start(routes=None, listeners=None, up_args=(), up_opts=None, **top):
        u = upstream("ws_echo.py", *up_args)
        port = free_port()
        cfg = make_config(port=port, upstreams={"ws": dict({"endpoints": [u.addr]}, **(up_opts or {}))},
                          routes=routes or [{"path": "/ws", "upstream": "ws", "websocket": True},
                                            {"path": "/", "upstream": "ws"}], **top)
        if listeners:
            cfg["listeners"] = listeners
            port = int(listeners[0]["address"].rsplit(":", 1)[1])
        return portico(cfg, port=port), u

    return start


def exchange(ws, big=1 << 20):
    """Messages both ways: small text, 1 MiB binary, a fragmented text, a ping."""
    ws.send("hello")
    assert ws.recv() == "hello"
    payload = os.urandom(big)
    ws.send(payload)
    assert ws.recv() == payload
    ws.send_frame(0x1, b"frag", fin=False)
    ws.send_frame(0x0, b"mented", fin=True)
    assert ws.recv() == "fragmented"
    ws.send_frame(0x9, b"are you there")
    assert ws.recv() == (0xA, b"are you there")


def close_handshake(ws):
    ws.send_frame(0x8, struct.pack("!H", 1000) + b"bye")
    op, data = ws.recv()
    assert op == 0x8 and data[:2] == struct.pack("!H", 1000)
    assert ws.at_eof(), "the server's FIN did not come through"


def test_echo_both_ways_and_close(ws_gw):
    p, u = ws_gw(admin={"address": "127.0.0.1:%d" % free_port()})
    ws = connect(p.port)
    status, hdrs = ws.handshake(headers=[("Sec-WebSocket-Protocol", "chat, superchat")])
    assert status == 101
    assert hdrs["upgrade"] == ["websocket"] and hdrs["connection"] == ["Upgrade"]
    assert hdrs["sec-websocket-accept"] == [accept_of(ws.key)]
    assert hdrs["sec-websocket-protocol"] == ["chat"]
    assert "content-length" not in hdrs and "transfer-encoding" not in hdrs
    exchange(ws)
    # what the upstream was sent: the upgrade fields, the Sec-WebSocket-* intact
    ws.send("__headers")
    seen = {}
    for k, v in json.loads(ws.recv()):
        seen.setdefault(k.lower(), []).append(v)
    assert seen["upgrade"] == ["websocket"] and seen["connection"] == ["Upgrade"]
    assert seen["sec-websocket-key"] == [ws.key] and seen["sec-websocket-version"] == ["13"]
    assert seen["sec-websocket-protocol"] == ["chat, superchat"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    close_handshake(ws)
    ws.close()
    e = util.wait_until(lambda: log_lines(p, "/ws"), 3)
    assert e[0]["status"] == 101 and e[0]["tunnel_end"] in ("client_closed", "upstream_closed")
    assert e[0]["bytes_in"] > 1 << 20 and e[0]["bytes_out"] > 1 << 20
    st, text = util.get(int(p.config["admin"]["address"].rsplit(":", 1)[1]), "/metrics").status, \
        util.get(int(p.config["admin"]["address"].rsplit(":", 1)[1]), "/metrics").body.decode()
    assert st == 200
    assert 'portico_websocket_tunnels_opened_total{route="routes[0]"} 1' in text, text
    assert 'portico_websocket_tunnels_closed_total{route="routes[0]",reason=' in text, text
    # the tunnel counts as a request, but its life is not a request latency
    assert 'portico_requests_total{route="routes[0]",method="GET",code="1xx"} 1' in text, text
    assert 'portico_request_duration_seconds_count{route="routes[0]"}' not in text, text


def test_server_starts_close(ws_gw):
    p, _ = ws_gw()
    ws = connect(p.port)
    assert ws.handshake()[0] == 101
    ws.send("__close 1001")
    op, data = ws.recv()
    assert op == 0x8 and data == struct.pack("!H", 1001)
    ws.send_frame(0x8, data)
    assert ws.at_eof()
    ws.close()
    e = util.wait_until(lambda: log_lines(p, "/ws"), 3)
    assert e[0]["status"] == 101


def test_half_close_both_ways(ws_gw):
    p, _ = ws_gw()
    # client half-closes: what it sent before is still echoed, then EOF
    ws = connect(p.port)
    assert ws.handshake()[0] == 101
    ws.send("last words")
    ws.sock.shutdown(socket.SHUT_WR)
    assert ws.recv() == "last words"
    assert ws.at_eof()
    ws.close()
    # upstream half-closes: the client sees EOF but may still send
    ws = connect(p.port)
    assert ws.handshake()[0] == 101
    ws.send("__shutdown")
    assert ws.at_eof()
    ws.send("after")  # our write side is still open
    ws.close()
    lines = util.wait_until(lambda: len(log_lines(p, "/ws")) == 2 and log_lines(p, "/ws"), 3)
    assert [e["tunnel_end"] for e in lines] == ["client_closed", "upstream_closed"], lines


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    """A self-signed certificate for ws.test and 127.0.0.1 (openssl CLI)."""
    d = tmp_path_factory.mktemp("wscert")
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=ws.test",
                        "-addext", "subjectAltName=DNS:ws.test,IP:127.0.0.1", "-keyout",
                        str(d / "k.pem"), "-out", str(d / "c.pem")], capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return d


def test_over_tls(ws_gw, cert_dir):
    d = cert_dir
    port = free_port()
    p, _ = ws_gw(listeners=[{"address": "127.0.0.1:%d" % port,
                             "tls": {"certificates": [{"cert": str(d / "c.pem"),
                                                       "key": str(d / "k.pem")}]}}])
    assert p.port == port
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(d / "c.pem"))
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx.maximum_version = version
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        ws = WS(ctx.wrap_socket(raw, server_hostname="ws.test"))
        status, hdrs = ws.handshake()
        assert status == 101 and hdrs["sec-websocket-accept"] == [accept_of(ws.key)]
        exchange(ws)
        ws.send("__flood %d" % (4 << 20))
        got = 0
        while True:
            m = ws.recv()
            if m == "done":
                break
            got += len(m)
        assert got == 4 << 20
        close_handshake(ws)
        ws.close()
    lines = util.wait_until(lambda: len(log_lines(p, "/ws")) == 2 and log_lines(p, "/ws"), 3)
    assert all(e["status"] == 101 for e in lines)


def test_tls_upstream(ws_gw, cert_dir):
    d = cert_dir
    p, _ = ws_gw(up_args=("--tls-cert", str(d / "c.pem"), "--tls-key", str(d / "k.pem")),
                 up_opts={"tls": {"ca": str(d / "c.pem")}})
    ws = connect(p.port)
    status, hdrs = ws.handshake()
    assert status == 101 and hdrs["sec-websocket-accept"] == [accept_of(ws.key)]
    exchange(ws)
    ws.send("__flood %d" % (4 << 20))
    got = 0
    while True:
        m = ws.recv()
        if m == "done":
            break
        got += len(m)
    assert got == 4 << 20
    close_handshake(ws)
    ws.close()
    # upstream half-close over TLS
    ws = connect(p.port)
    assert ws.handshake()[0] == 101
    ws.send("__shutdown")
    assert ws.at_eof()
    ws.close()
    lines = util.wait_until(lambda: len(log_lines(p, "/ws")) == 2 and log_lines(p, "/ws"), 3)
    # the server answers a close with its close and FIN at once
    assert [e["tunnel_end"] for e in lines] == ["upstream_closed", "upstream_closed"], lines


def test_idle_timeout(ws_gw):
    p, _ = ws_gw(routes=[{"path": "/ws", "upstream": "ws", "websocket": True,
                          "websocket_idle_timeout_ms": 600}])
    ws = connect(p.port)
    assert ws.handshake()[0] == 101
    # traffic keeps it open past the idle timeout
    for i in range(6):
        time.sleep(0.25)
        ws.send("tick %d" % i)
        assert ws.recv() == "tick %d" % i
    t0 = time.monotonic()
    assert ws.at_eof(timeout=5)
    waited = time.monotonic() - t0
    assert 0.4 < waited < 2.5, waited
    ws.close()
    e = util.wait_until(lambda: log_lines(p, "/ws"), 3)
    assert e[0]["tunnel_end"] == "idle_timeout"


def test_max_lifetime(ws_gw):
    p, _ = ws_gw(routes=[{"path": "/ws", "upstream": "ws", "websocket": True,
                          "websocket_max_lifetime_ms": 1000}])
    ws = connect(p.port)
    t0 = time.monotonic()
    assert ws.handshake()[0] == 101
    closed = False
    while time.monotonic() - t0 < 4:
        try:
            ws.send("still here")
            if ws.recv() != "still here":
                break
        except (EOFError, OSError):
            closed = True
            break
        time.sleep(0.1)
    assert closed, "the tunnel outlived websocket_max_lifetime_ms"
    assert 0.8 < time.monotonic() - t0 < 2.5
    ws.close()
    e = util.wait_until(lambda: log_lines(p, "/ws"), 3)
    assert e[0]["tunnel_end"] == "max_lifetime"
    assert 900 <= e[0]["duration_ms"] < 2500


def test_many_concurrent_tunnels(ws_gw):
    p, _ = ws_gw(workers=2)
    n = 100
    tunnels = []
    base = p.rss_kb()
    for i in range(n):
        ws = connect(p.port)
        assert ws.handshake()[0] == 101
        tunnels.append(ws)
    for i, ws in enumerate(tunnels):
        ws.send("from %d" % i)
    for i, ws in enumerate(tunnels):
        assert ws.recv() == "from %d" % i
    # quiet tunnels give their buffers back (about 10 kB each remain)
    assert p.rss_kb() - base < n * 48, (base, p.rss_kb())
    for ws in tunnels:
        ws.send_frame(0x8, struct.pack("!H", 1000))
    for ws in tunnels:
        assert ws.recv()[0] == 0x8
        ws.close()
    lines = util.wait_until(lambda: len(log_lines(p, "/ws")) == n and log_lines(p, "/ws"), 5)
    assert lines and all(e["status"] == 101 for e in lines)


def test_back_pressure_bounded_memory(ws_gw):
    p, _ = ws_gw()
    ws = connect(p.port, timeout=30)
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    assert ws.handshake()[0] == 101
    time.sleep(0.2)
    base = p.rss_kb()
    # upstream -> client: 128 MiB while the client reads nothing
    total = 128 << 20
    ws.send("__flood %d" % total)
    time.sleep(1.5)
    held = p.rss_kb()
    assert held - base < 8192, (base, held)
    got = 0
    while True:
        m = ws.recv()
        if m == "done":
            break
        got += len(m)
    assert got == total
    # client -> upstream: the echo server is not read back, so it stops
    # reading and Portico must stop reading the client
    sent = [0]

    def pump():
        chunk = os.urandom(1 << 20)
        try:
            for _ in range(128):
                ws.send(chunk)
                sent[0] += len(chunk)
        except OSError:
            pass

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    time.sleep(2)
    assert sent[0] < 64 << 20, "nothing pushed back: %d bytes taken" % sent[0]
    assert p.rss_kb() - base < 8192, (base, p.rss_kb())
    n = 0
    while n < 128:
        assert len(ws.recv()) == 1 << 20
        n += 1
    t.join(10)
    assert sent[0] == 128 << 20
    close_handshake(ws)
    ws.close()


def test_client_not_reading_cut_by_send_timeout(ws_gw):
    p, _ = ws_gw(limits={"send_timeout_ms": 800},
                 routes=[{"path": "/ws", "upstream": "ws", "websocket": True}])
    ws = connect(p.port)
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    assert ws.handshake()[0] == 101
    ws.send("__flood %d" % (256 << 20))
    e = util.wait_until(lambda: log_lines(p, "/ws"), 5)
    assert e and e[0]["tunnel_end"] == "send_timeout", e
    ws.close()


def test_reload_keeps_tunnels_and_shutdown_ends_them(ws_gw):
    p, _ = ws_gw()
    ws = connect(p.port)
    assert ws.handshake()[0] == 101
    p.signal(signal.SIGHUP)
    assert util.wait_until(lambda: "reloaded" in p.stderr(), 5)
    ws.send("after reload")
    assert ws.recv() == "after reload"
    # a stopping Portico lets the tunnel run until limits.drain_timeout_ms
    t0 = time.monotonic()
    p.expect_exit = True
    p.signal(signal.SIGTERM)
    time.sleep(0.3)
    ws.send("while draining")
    assert ws.recv() == "while draining"
    assert ws.at_eof(timeout=5)
    assert 0.8 < time.monotonic() - t0 < 4
    assert p.wait(5) == 0
    e = log_lines(p, "/ws")
    assert e and e[0]["tunnel_end"] == "shutdown", e


def test_filters_edit_the_upgrade_and_the_101(ws_gw, portico_bin):
    mods = subprocess.run([portico_bin, "-V"], capture_output=True, text=True).stdout
    if "headers" not in mods or "ip_access" not in mods:
        pytest.skip("headers and ip_access are not both built in")
    p, _ = ws_gw(routes=[
        {"path": "/ws", "upstream": "ws", "websocket": True,
         "filters": [{"headers": {"request": {"set": {"X-Route": "%{route}"}},
                                  "response": {"set": {"X-Gateway": "portico"}}}}]},
        {"path": "/deny", "upstream": "ws", "websocket": True,
         "filters": [{"ip_access": {"deny": ["127.0.0.0/8"]}}]}])
    ws = connect(p.port)
    status, hdrs = ws.handshake()
    assert status == 101 and hdrs["x-gateway"] == ["portico"]
    ws.send("__headers")
    seen = {k.lower(): v for k, v in json.loads(ws.recv())}
    assert seen["x-route"] == "routes[0]" and seen["upgrade"] == "websocket"
    close_handshake(ws)
    ws.close()
    ws = connect(p.port)
    status, hdrs = ws.handshake(path="/deny")
    assert status == 403
    ws.close()


def test_unauthenticated_upgrade_refused(ws_gw, portico_bin):
    mods = subprocess.run([portico_bin, "-V"], capture_output=True, text=True).stdout
    if "jwt_auth" not in mods:
        pytest.skip("jwt_auth is not built in")
    secret = "0123456789abcdef0123456789abcdef"

    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    def token(claims):
        h = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        pl = b64(json.dumps(claims).encode())
        sig = hmac.new(secret.encode(), (h + "." + pl).encode(), hashlib.sha256).digest()
        return h + "." + pl + "." + b64(sig)

    p, u = ws_gw(jwt_providers={"t": {"issuer": "test", "algorithms": ["HS256"],
                                      "secret": secret}},
                 routes=[{"path": "/ws", "upstream": "ws", "websocket": True,
                          "filters": [{"jwt_auth": {"provider": "t"}}]}])
    ws = connect(p.port)
    status, hdrs = ws.handshake()
    assert status == 401
    ws.read_body(hdrs)
    ws.close()
    ws = connect(p.port)
    good = token({"iss": "test", "sub": "alice", "exp": int(time.time()) + 600})
    status, _ = ws.handshake(headers=[("Authorization", "Bearer " + good)])
    assert status == 101
    ws.send("authorised")
    assert ws.recv() == "authorised"
    close_handshake(ws)
    ws.close()


def test_route_without_websocket_strips_upgrade(ws_gw):
    p, _ = ws_gw()
    ws = connect(p.port)
    status, hdrs = ws.handshake(path="/plain")
    assert status == 200
    body = json.loads(ws.read_body(hdrs))
    names = {k.lower(): v for k, v in body["headers"]}
    assert "upgrade" not in names
    assert names.get("connection", "").lower() != "upgrade"
    # the connection carries on as plain HTTP
    ws.sock.sendall(util.build_request("GET", "/again", host="ws.test"))
    status, hdrs = ws.read_head()
    assert status == 200 and json.loads(ws.read_body(hdrs))["path"] == "/again"
    ws.close()


@pytest.mark.parametrize("how", ["post_with_body", "http10"])
def test_upgrade_that_is_not_a_websocket_handshake_is_plain(ws_gw, how):
    p, _ = ws_gw()
    if how == "post_with_body":
        req = (b"POST /ws HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade, close\r\n"
               b"Upgrade: websocket\r\nContent-Length: 2\r\n\r\nhi")
    else:
        req = b"GET /ws HTTP/1.0\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    r = util.parse_responses(util.recv_all(p.port, req))[0]
    assert r.status == 200, r
    hdrs = r.echoed_headers()
    assert "upgrade" not in hdrs


def test_h2c_never_tunnelled(ws_gw):
    p, u = ws_gw()
    with util.Conn(p.port) as c:
        c.request("GET", "/ws", headers={"Connection": "Upgrade, HTTP2-Settings",
                                         "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABkAAQAAP__"})
        r = c.read_response()
        assert r.status == 200, r
        hdrs = r.echoed_headers()
        assert "upgrade" not in hdrs and "http2-settings" not in hdrs
        # an upstream that switches anyway is refused
        c.request("GET", "/switch", headers={"Connection": "Upgrade", "Upgrade": "h2c"})
        r = c.read_response(skip_interim=False)
        assert r.status == 502, r


def test_unsolicited_101_is_502(ws_gw):
    p, _ = ws_gw(routes=[{"path": "/", "upstream": "ws", "websocket": True}])
    with util.Conn(p.port) as c:
        c.request("GET", "/switch")
        r = c.read_response(skip_interim=False)
        assert r.status == 502, r
        c.request("GET", "/next")
        r = c.read_response()
        assert r.status == 200 and r.json()["path"] == "/next"


def test_refused_upgrade_relayed_and_upstream_not_reused(ws_gw):
    p, u = ws_gw(routes=[{"path": "/", "upstream": "ws", "websocket": True}])
    before = util.get(u.port, "/__conns").json()["conns"]
    ws = connect(p.port)
    status, hdrs = ws.handshake(path="/status/403")
    assert status == 403
    assert json.loads(ws.read_body(hdrs))["path"] == "/status/403"
    # the client connection goes on; the upstream connection was not pooled
    ws.sock.sendall(util.build_request("GET", "/after", host="ws.test"))
    status, hdrs = ws.read_head()
    assert status == 200 and json.loads(ws.read_body(hdrs))["path"] == "/after"
    ws.close()
    assert util.get(u.port, "/__conns").json()["conns"] - before == 1 + 2
