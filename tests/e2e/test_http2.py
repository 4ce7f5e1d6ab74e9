"""HTTP/2 to clients: ALPN h2 on a TLS listener, streams proxied to HTTP/1.1
upstreams through the same routing and filters, flow control, and the
flood limits (rapid reset, SETTINGS/PING, empty frames, CONTINUATION).

Clients: curl --http2 and nghttp (Debian's curl and nghttp2-client), and a
small client on python's h2 package (python3-h2) for what those cannot do:
many streams at once, resets, and the malformed or abusive frame sequences.
"""
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import hyperframe.frame
import pytest

from conftest import free_port, make_config
import util

CURL = shutil.which("curl")
NGHTTP = shutil.which("nghttp")
ENHANCE_YOUR_CALM = 0xB


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("h2tls")
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=h2.test",
                        "-addext", "subjectAltName=DNS:h2.test,DNS:other.test", "-keyout",
                        str(d / "k.pem"), "-out", str(d / "c.pem")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(d / "c.pem"), str(d / "k.pem")


@pytest.fixture
def h2gw(portico, upstream, cert):
    """h2gw(routes=None, http2=None, tls=None, **top) -> (portico, port, echo, admin_port)."""

    def start(routes=None, http2=None, tls=None, upstreams=None, **top):
        e = upstream("echo.py")
        port, admin = free_port(), free_port()
        ups = {"echo": {"endpoints": [e.addr]}}
        ups.update(upstreams or {})
        cfg = make_config(port=port, upstreams=ups,
                          routes=routes or [{"path": "/local", "respond": {"status": 200,
                                                                         "body": "local\n"}},
                                            {"path": "/", "upstream": "echo"}],
                          admin={"address": "127.0.0.1:%d" % admin}, **top)
        t = {"certificates": [{"cert": cert[0], "key": cert[1]}]}
        t.update(tls or {})
        cfg["listeners"] = [{"address": "127.0.0.1:%d" % port, "tls": t}]
        if http2 is not None:
            cfg["http2"] = http2
        p = portico(cfg, port=port)
        return p, port, e, admin

    return start


def curl(port, cert, path, *args):
    r = subprocess.run([CURL, "-s", "--http2", "--cacert", cert[0], "--resolve",
                        "h2.test:%d:127.0.0.1" % port, "-w", "\n%{http_version} %{http_code}",
                        *args, "https://h2.test:%d%s" % (port, path)],
                       capture_output=True, timeout=30)
    body, _, tail = r.stdout.rpartition(b"\n")
    version, code = tail.decode().split()
    return version, int(code), body


def metric(admin, name):
    text = util.get(admin, "/metrics").body.decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


class H2Client:
    """An HTTP/2 client over TLS on python's h2 state machine."""

    def __init__(self, port, cert, timeout=10, validate=True):
        ctx = ssl.create_default_context(cafile=cert[0])
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname="h2.test")
        assert self.sock.selected_alpn_protocol() == "h2"
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                        validate_inbound_headers=validate,
                                        validate_outbound_headers=validate)
        self.conn = h2.connection.H2Connection(config=cfg)
        self.conn.initiate_connection()
        self.streams = {}
        self.goaway = None
        self.closed = False
        self.rbuf = b""
        self.flush()

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data):
        self.sock.sendall(data)

    def stream(self, sid):
        return self.streams.setdefault(sid, {"status": None, "headers": None, "data": b"",
                                             "trailers": None, "ended": False, "reset": None})

    def request(self, path, method="GET", headers=(), body=None, end=True, authority="h2.test"):
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(":method", method), (":scheme", "https"), (":authority", authority),
                (":path", path)] + list(headers)
        self.conn.send_headers(sid, hdrs, end_stream=end and body is None)
        if body is not None:
            self.send_body(sid, body, end=end)
        self.flush()
        self.stream(sid)
        return sid

    def send_body(self, sid, body, end=True):
        while body:
            while self.conn.local_flow_control_window(sid) == 0:
                self.pump(0.5)
            n = min(len(body), self.conn.local_flow_control_window(sid),
                    self.conn.max_outbound_frame_size)
            self.conn.send_data(sid, body[:n])
            body = body[n:]
            self.flush()
        if end:
            self.conn.end_stream(sid)
            self.flush()

    def pump(self, timeout=5.0):
        """Read once (up to timeout) and handle the events; False at EOF."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            return True
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return False
        # One frame at a time: python-h2 closes its state machine on a
        # GOAWAY and would refuse the DATA of a stream it still covers
        # (RFC 9113 6.8) if both came in one read.
        self.rbuf += data
        while len(self.rbuf) >= 9:
            n = 9 + int.from_bytes(self.rbuf[:3], "big")
            if len(self.rbuf) < n:
                break
            frame, self.rbuf = self.rbuf[:n], self.rbuf[n:]
            self._handle(frame)
        self.flush()
        return True

    def _handle(self, frame):
        for ev in self.conn.receive_data(frame):
            if isinstance(ev, h2.events.ResponseReceived):
                s = self.stream(ev.stream_id)
                s["headers"] = ev.headers
                s["status"] = int(dict(ev.headers)[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                self.stream(ev.stream_id)["data"] += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                self.stream(ev.stream_id)["trailers"] = ev.headers
            elif isinstance(ev, h2.events.StreamEnded):
                self.stream(ev.stream_id)["ended"] = True
            elif isinstance(ev, h2.events.StreamReset):
                self.stream(ev.stream_id)["reset"] = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
        if self.goaway is not None and self.goaway.error_code == 0:
            # RFC 9113 6.8: streams up to last_stream_id still complete after
            # a graceful GOAWAY; python-h2 would refuse their frames.
            self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN

    def wait(self, sids, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(self.stream(s)["ended"] or self.stream(s)["reset"] is not None for s in sids):
                return [self.streams[s] for s in sids]
            if not self.pump(0.5):
                break
        return [self.stream(s) for s in sids]

    def wait_goaway(self, timeout=10):
        deadline = time.time() + timeout
        while self.goaway is None and time.time() < deadline:
            try:
                if not self.pump(0.5):
                    break
            except h2.exceptions.ProtocolError:
                break
        return self.goaway

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def raw_frames(data):
    """Parse a byte string into hyperframe frames (the server's output)."""
    out = []
    while len(data) >= 9:
        f, length = hyperframe.frame.Frame.parse_frame_header(memoryview(data[:9]))
        if len(data) < 9 + length:
            break
        f.parse_body(memoryview(data[9:9 + length]))
        out.append(f)
        data = data[9 + length:]
    return out


def read_until_goaway(sock, timeout=10):
    """Read raw frames until a GOAWAY or EOF; returns the GOAWAY frame or None."""
    buf = b""
    deadline = time.time() + timeout
    sock.settimeout(1)
    while time.time() < deadline:
        try:
            d = sock.recv(1 << 20)
        except socket.timeout:
            continue
        except (ConnectionResetError, ssl.SSLError):
            break
        if not d:
            break
        buf += d
        for f in raw_frames(buf):
            if isinstance(f, hyperframe.frame.GoAwayFrame):
                return f
    for f in raw_frames(buf):
        if isinstance(f, hyperframe.frame.GoAwayFrame):
            return f
    return None


# ---- basics with real clients ------------------------------------------------


@pytest.mark.skipif(not CURL, reason="curl not installed")
def test_curl_http2_get_proxied_and_local(h2gw, cert):
    _, port, _, _ = h2gw()
    v, code, body = curl(port, cert, "/h2path?q=1")
    assert (v, code) == ("2", 200)
    doc = json.loads(body)
    assert doc["target"] == "/h2path?q=1"
    assert doc["version"] == "HTTP/1.1"  # upstreams stay HTTP/1.1
    hdrs = {k.lower(): v for k, v in doc["headers"]}
    assert hdrs["host"] == "h2.test:%d" % port
    assert hdrs["x-forwarded-proto"] == "https"
    assert curl(port, cert, "/local") == ("2", 200, b"local\n")
    assert curl(port, cert, "/status/404")[:2] == ("2", 404)


@pytest.mark.skipif(not CURL, reason="curl not installed")
def test_access_log_names_the_protocol(h2gw, cert, tmp_path):
    log = tmp_path / "access.log"
    _, port, _, _ = h2gw(access_log={"path": str(log)})
    assert curl(port, cert, "/local")[:2] == ("2", 200)
    assert curl(port, cert, "/local", "--http1.1")[:2] == ("1.1", 200)
    deadline = time.monotonic() + 5
    lines = []
    while time.monotonic() < deadline:
        lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()] if log.exists() else []
        if len(lines) >= 2:
            break
        time.sleep(0.05)
    assert [e["protocol"] for e in lines] == ["HTTP/2.0", "HTTP/1.1"], lines


@pytest.mark.skipif(not CURL, reason="curl not installed")
def test_curl_http2_bodies_both_ways(h2gw, cert, tmp_path):
    _, port, _, _ = h2gw()
    payload = os.urandom(3_000_000)
    f = tmp_path / "up.bin"
    f.write_bytes(payload)
    want = hashlib.sha256(payload).hexdigest()
    # a known length, then an unknown one (chunked towards the upstream)
    _, code, body = curl(port, cert, "/sink", "-X", "POST", "--data-binary", "@%s" % f)
    assert code == 200 and json.loads(body)["sha256"] == want
    assert json.loads(body)["framing"] == "length"
    _, code, body = curl(port, cert, "/sink", "-X", "POST", "-T", str(f),
                         "-H", "Transfer-Encoding:")
    assert code == 200 and json.loads(body)["sha256"] == want
    # downloads: length-framed and chunked from the upstream
    _, code, body = curl(port, cert, "/big/5000000")
    assert code == 200 and body == (bytes(range(256)) * 19532)[:5000000]
    _, code, body = curl(port, cert, "/bigchunked/1000000")
    assert code == 200 and body == (bytes(range(256)) * 3907)[:1000000]


@pytest.mark.skipif(not NGHTTP, reason="nghttp not installed")
def test_nghttp_many_streams_one_connection(h2gw, cert):
    _, port, echo, _ = h2gw()
    r = subprocess.run([NGHTTP, "-ns", "-m", "200", "https://127.0.0.1:%d/nghttp" % port],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # one line per stream in the statistics, all 200
    lines = [ln for ln in r.stdout.splitlines() if "/nghttp" in ln]
    assert len(lines) == 200, r.stdout[-2000:]
    assert all(" 200 " in ln for ln in lines), r.stdout[-2000:]


def test_concurrent_streams_answered_in_any_order(h2gw, cert):
    _, port, echo, _ = h2gw()
    c = H2Client(port, cert)
    # slow ones first: the fast ones must not wait behind them
    slow = [c.request("/slow/700?i=%d" % i) for i in range(3)]
    fast = [c.request("/fast?i=%d" % i) for i in range(100)]
    t0 = time.time()
    got = c.wait(fast)
    assert time.time() - t0 < 0.6
    for i, s in enumerate(got):
        assert s["status"] == 200 and s["ended"], s
        assert json.loads(s["data"])["target"] == "/fast?i=%d" % i
    assert all(s["status"] == 200 for s in c.wait(slow))
    c.close()


def test_slow_reader_gets_the_whole_body(h2gw, cert):
    """The upstream is done long before the client has read: what waits in
    Portico for the client's window must still arrive, and end cleanly."""
    _, port, _, _ = h2gw()
    c = H2Client(port, cert)
    sids = [c.request("/big/300000"), c.request("/bigchunked/200000")]
    time.sleep(0.5)  # the window closes; the upstream has sent everything
    deadline = time.time() + 20
    while time.time() < deadline and not all(c.stream(s)["ended"] or c.stream(s)["reset"]
                                              for s in sids):
        c.pump(0.2)
        time.sleep(0.01)
    big, chunked = c.stream(sids[0]), c.stream(sids[1])
    assert big["reset"] is None and big["ended"]
    assert big["data"] == (bytes(range(256)) * 1172)[:300000]
    assert chunked["reset"] is None and chunked["ended"]
    assert chunked["data"] == (bytes(range(256)) * 782)[:200000]
    c.close()


def test_head_204_304_and_no_connection_fields(h2gw, cert):
    _, port, _, _ = h2gw()
    c = H2Client(port, cert)  # h2 validates inbound headers: connection fields would raise
    a = c.request("/big/100", method="HEAD")
    b = c.request("/status/204")
    d = c.request("/headers-out?Connection=keep-alive&Keep-Alive=timeout%3D5&X-Kept=1")
    ra, rb, rd = c.wait([a, b, d])
    assert ra["status"] == 200 and ra["data"] == b"" and dict(ra["headers"])["content-length"] == "100"
    assert rb["status"] == 204 and rb["data"] == b""
    names = [k for k, _ in rd["headers"]]
    assert "x-kept" in names and "connection" not in names and "keep-alive" not in names
    assert all(k == k.lower() for k in names)
    c.close()


def test_trailers_relayed_as_http2_trailers(h2gw, cert):
    _, port, _, _ = h2gw()
    c = H2Client(port, cert)
    sid = c.request("/trailers?grpc-status=0&grpc-message=ok", headers=[("te", "trailers")])
    (s,) = c.wait([sid])
    assert s["status"] == 200 and s["data"] == b"hello"
    assert dict(s["trailers"]) == {"grpc-status": "0", "grpc-message": "ok"}
    c.close()


def test_cookie_crumbs_joined_and_request_fields(h2gw, cert):
    _, port, _, _ = h2gw()
    c = H2Client(port, cert)
    sid = c.request("/c", headers=[("cookie", "a=1"), ("x-one", "1"), ("cookie", "b=2")])
    (s,) = c.wait([sid])
    hdrs = json.loads(s["data"])["headers"]
    assert ["Cookie", "a=1; b=2"] in hdrs
    assert ["x-one", "1"] in hdrs
    c.close()


def test_request_body_with_window_and_slow_upstream(h2gw, cert):
    """A 4 MB body into a sink that reads at about 3 MB/s through a 64 KiB
    stream window: arrives intact, and Portico does not buffer it all."""
    p, port, _, _ = h2gw(http2={"initial_window_size": 65535})
    c = H2Client(port, cert, timeout=30)
    payload = os.urandom(4_000_000)
    before = p.rss_kb()
    sid = c.request("/slowsink", method="POST", body=payload,
                    headers=[("content-length", str(len(payload)))])
    (s,) = c.wait([sid], timeout=30)
    assert s["status"] == 200, s
    assert json.loads(s["data"])["sha256"] == hashlib.sha256(payload).hexdigest()
    if "ASAN_OPTIONS" not in os.environ:  # ASan's quarantine keeps freed blocks
        assert p.hwm_kb() - before < 3000, (before, p.hwm_kb())
    c.close()


# ---- refusals ----------------------------------------------------------------


def test_header_list_too_large_431_and_host_mismatch_400(h2gw, cert):
    _, port, echo, _ = h2gw(limits={"max_header_bytes": 4096, "max_uri_bytes": 2048})
    c = H2Client(port, cert, validate=False)
    big = c.request("/big-headers", headers=[("x-big", "v" * 5000)])
    mismatch = c.request("/m", headers=[("host", "other.test")])
    ok = c.request("/ok")
    rb, rm, ro = c.wait([big, mismatch, ok])
    assert rb["status"] == 431
    assert rm["status"] == 400
    assert ro["status"] == 200
    c.close()


MALFORMED = {
    # RFC 9113 8.2 / 8.3: each makes the request malformed (a stream error)
    "uppercase-name": [(":method", "GET"), (":scheme", "https"), (":authority", "h2.test"),
                       (":path", "/m"), ("X-Upper", "1")],
    "connection-header": [(":method", "GET"), (":scheme", "https"), (":authority", "h2.test"),
                          (":path", "/m"), ("connection", "keep-alive")],
    "te-not-trailers": [(":method", "GET"), (":scheme", "https"), (":authority", "h2.test"),
                        (":path", "/m"), ("te", "gzip")],
    "pseudo-after-regular": [(":method", "GET"), (":scheme", "https"), ("x-a", "1"),
                             (":authority", "h2.test"), (":path", "/m")],
    "missing-path": [(":method", "GET"), (":scheme", "https"), (":authority", "h2.test")],
    "duplicate-method": [(":method", "GET"), (":method", "POST"), (":scheme", "https"),
                         (":authority", "h2.test"), (":path", "/m")],
    "unknown-pseudo": [(":method", "GET"), (":scheme", "https"), (":authority", "h2.test"),
                       (":path", "/m"), (":foo", "bar")],
    "empty-path": [(":method", "GET"), (":scheme", "https"), (":authority", "h2.test"),
                   (":path", "")],
    "newline-in-value": [(":method", "GET"), (":scheme", "https"), (":authority", "h2.test"),
                         (":path", "/m"), ("x-a", "1\r\nx-b: 2")],
    "space-in-path": [(":method", "GET"), (":scheme", "https"), (":authority", "h2.test"),
                      (":path", "/a b")],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_refused_never_forwarded(h2gw, cert, case):
    _, port, echo, _ = h2gw()
    before = echo.stats()["requests"]
    c = H2Client(port, cert)
    hf = hyperframe.frame.HeadersFrame(1)
    hf.data = hpack.Encoder().encode(MALFORMED[case])
    hf.flags.add("END_HEADERS")
    hf.flags.add("END_STREAM")
    c.send_raw(hf.serialize())
    buf, outcome = b"", None
    deadline = time.time() + 5
    c.sock.settimeout(1)
    while outcome is None and time.time() < deadline:
        try:
            d = c.sock.recv(65536)
        except socket.timeout:
            continue
        if not d:
            outcome = "closed"
            break
        buf += d
        for f in raw_frames(buf):
            if isinstance(f, hyperframe.frame.RstStreamFrame) and f.stream_id == 1:
                outcome = "reset"
            elif isinstance(f, hyperframe.frame.GoAwayFrame):
                outcome = "goaway"
            elif isinstance(f, hyperframe.frame.HeadersFrame) and f.stream_id == 1:
                status = hpack.Decoder().decode(f.data)
                outcome = "status %s" % dict(status).get(":status")
    assert outcome in ("reset", "goaway", "closed", "status 400"), outcome
    c.close()
    assert echo.stats()["requests"] == before  # nothing reached the upstream
    assert curl(port, cert, "/after")[:2] == ("2", 200)


def test_content_length_mismatch_is_a_stream_error(h2gw, cert):
    _, port, echo, _ = h2gw()
    c = H2Client(port, cert, validate=False)
    sid = c.request("/sink", method="POST", headers=[("content-length", "10")],
                    body=b"0123456789ABCDEF")
    (s,) = c.wait([sid])
    assert s["reset"] is not None or (s["status"] or 0) >= 400, s
    ok = c.request("/ok")
    assert c.wait([ok])[0]["status"] == 200
    c.close()


def test_filters_apply_to_streams(h2gw, cert, portico_bin):
    v = subprocess.run([portico_bin, "-V"], capture_output=True, text=True).stdout
    if "ip_access" not in v:
        pytest.skip("ip_access module not built")
    _, port, _, _ = h2gw(routes=[{"path": "/denied", "upstream": "echo",
                                  "filters": [{"ip_access": {"deny": ["127.0.0.0/8"]}}]},
                                 {"path": "/", "upstream": "echo"}])
    c = H2Client(port, cert)
    a, b = c.request("/denied"), c.request("/fine")
    ra, rb = c.wait([a, b])
    assert ra["status"] == 403 and rb["status"] == 200
    c.close()


def test_client_reset_of_inflight_stream_leaves_others(h2gw, cert):
    _, port, echo, _ = h2gw()
    c = H2Client(port, cert)
    slow = c.request("/slow/2000")
    time.sleep(0.3)
    c.conn.reset_stream(slow, error_code=8)  # CANCEL
    c.flush()
    ok = c.request("/after")
    (r,) = c.wait([ok])
    assert r["status"] == 200
    # the upstream request was cancelled: echo saw its peer go
    deadline = time.time() + 5
    while time.time() < deadline:
        ev = echo.stats().get("events", [])
        if any(e.get("outcome") == "peer_closed" for e in ev):
            break
        time.sleep(0.2)
    assert any(e.get("outcome") == "peer_closed" for e in echo.stats()["events"]), echo.stats()
    c.close()


def test_max_concurrent_streams_refuses_extra(h2gw, cert):
    _, port, _, _ = h2gw(http2={"max_concurrent_streams": 4})
    c = H2Client(port, cert)
    # raw frames: python-h2 itself would hold the extra streams back
    enc = hpack.Encoder()
    out = bytearray()
    for i in range(8):
        hf = hyperframe.frame.HeadersFrame(1 + 2 * i)
        hf.data = enc.encode([(":method", "GET"), (":scheme", "https"),
                              (":authority", "h2.test"), (":path", "/slow/300?i=%d" % i)])
        hf.flags.add("END_HEADERS")
        hf.flags.add("END_STREAM")
        out += hf.serialize()
    c.send_raw(bytes(out))
    buf, outcome = b"", {}
    deadline = time.time() + 10
    c.sock.settimeout(1)
    while len(outcome) < 8 and time.time() < deadline:
        try:
            buf += c.sock.recv(1 << 20)
        except socket.timeout:
            continue
        for f in raw_frames(buf):
            if isinstance(f, hyperframe.frame.HeadersFrame):
                outcome.setdefault(f.stream_id, "answered")
            elif isinstance(f, hyperframe.frame.RstStreamFrame):
                outcome.setdefault(f.stream_id, "reset %d" % f.error_code)
    answered = [k for k, v in outcome.items() if v == "answered"]
    refused = [k for k, v in outcome.items() if v.startswith("reset")]
    assert len(answered) == 4 and len(refused) == 4, outcome
    c.close()


def test_max_requests_then_goaway(h2gw, cert):
    _, port, _, _ = h2gw(http2={"max_requests": 5})
    c = H2Client(port, cert)
    sids = [c.request("/r%d" % i) for i in range(5)]
    assert all(s["status"] == 200 for s in c.wait(sids))
    ga = c.wait_goaway()
    assert ga is not None and ga.error_code == 0 and ga.last_stream_id == sids[-1]
    c.close()


def test_idle_connection_goaway(h2gw, cert):
    _, port, _, _ = h2gw(limits={"idle_timeout_ms": 400})
    c = H2Client(port, cert)
    (s,) = c.wait([c.request("/one")])
    assert s["status"] == 200
    t0 = time.time()
    ga = c.wait_goaway(5)
    assert ga is not None and ga.error_code == 0
    assert 0.2 < time.time() - t0 < 3
    c.close()


def test_header_block_never_finished_times_out(h2gw, cert):
    _, port, _, _ = h2gw(limits={"header_timeout_ms": 500})
    c = H2Client(port, cert)
    block = hpack.Encoder().encode([(":method", "GET"), (":scheme", "https"),
                                    (":authority", "h2.test"), (":path", "/stuck")])
    hf = hyperframe.frame.HeadersFrame(1)
    hf.data = block[:5]  # no END_HEADERS, and no CONTINUATION ever
    c.send_raw(hf.serialize())
    t0 = time.time()
    read_until_goaway(c.sock, timeout=5)
    c.sock.settimeout(3)
    try:
        while c.sock.recv(65536):
            pass
    except (socket.timeout, OSError, ssl.SSLError):
        pass
    assert time.time() - t0 < 3  # closed by the header timeout, not left open
    c.close()


def test_sigterm_finishes_open_stream(h2gw, cert):
    p, port, _, _ = h2gw(limits={"drain_timeout_ms": 5000})
    c = H2Client(port, cert)
    sid = c.request("/slow/800")
    time.sleep(0.2)
    p.stop(timeout=0)
    (s,) = c.wait([sid])
    assert s["status"] == 200 and s["ended"]
    assert c.wait_goaway() is not None
    assert p.wait(5) == 0
    c.close()


# ---- floods ----------------------------------------------------------------------


def flood_expect_calm(c, data, admin, kind):
    """Send data in one go (the server may close while we write); the
    answer must be GOAWAY ENHANCE_YOUR_CALM, counted under kind."""
    try:
        c.send_raw(bytes(data))
    except OSError:
        pass
    ga = read_until_goaway(c.sock)
    assert ga is not None and ga.error_code == ENHANCE_YOUR_CALM
    c.close()
    assert metric(admin, 'portico_http2_floods_total{kind="%s"}' % kind) >= 1


def test_rapid_reset_flood_goaway_bounded(h2gw, cert):
    p, port, echo, admin = h2gw()
    before_req = echo.stats()["requests"]
    cpu0, rss0 = util.cpu_seconds(p.pid), p.rss_kb()
    c = H2Client(port, cert)
    enc = hpack.Encoder()
    out = bytearray()
    sid = 1
    for i in range(5000):
        hf = hyperframe.frame.HeadersFrame(sid)
        hf.data = enc.encode([(":method", "GET"), (":scheme", "https"),
                              (":authority", "h2.test"), (":path", "/flood")])
        hf.flags.add("END_HEADERS")
        hf.flags.add("END_STREAM")
        rst = hyperframe.frame.RstStreamFrame(sid)
        rst.error_code = 8
        out += hf.serialize() + rst.serialize()
        sid += 2
    try:
        c.send_raw(bytes(out))
    except OSError:
        pass  # the server may close while we still write
    ga = read_until_goaway(c.sock)
    assert ga is not None and ga.error_code == ENHANCE_YOUR_CALM
    c.close()
    # bounded: a few hundred streams at most reached the upstream, little CPU
    assert echo.stats()["requests"] - before_req < 400
    assert util.cpu_seconds(p.pid) - cpu0 < 3.0
    assert p.rss_kb() - rss0 < 20000
    assert metric(admin, 'portico_http2_floods_total{kind="stream_resets"}') >= 1
    # and the gateway still serves
    assert curl(port, cert, "/after")[:2] == ("2", 200)


@pytest.mark.parametrize("kind", ["ping", "settings", "priority"])
def test_control_frame_flood_goaway(h2gw, cert, kind):
    p, port, _, admin = h2gw()
    c = H2Client(port, cert)
    out = bytearray()
    for i in range(2000):
        if kind == "ping":
            f = hyperframe.frame.PingFrame(0)
            f.opaque_data = b"%08d" % i
        elif kind == "priority":
            f = hyperframe.frame.PriorityFrame(1 + 2 * (i % 50))
            f.depends_on = 0
            f.stream_weight = 15
        else:
            f = hyperframe.frame.SettingsFrame(0)
            f.settings = {hyperframe.frame.SettingsFrame.INITIAL_WINDOW_SIZE: 65535}
        out += f.serialize()
    flood_expect_calm(c, out, admin, "control_frames")
    assert curl(port, cert, "/after")[:2] == ("2", 200)


def test_a_few_pings_are_fine(h2gw, cert):
    _, port, _, _ = h2gw()
    c = H2Client(port, cert)
    for i in range(20):
        c.conn.ping(b"%08d" % i)
    c.flush()
    (s,) = c.wait([c.request("/x")])
    assert s["status"] == 200 and c.goaway is None
    c.close()


def test_empty_data_frame_flood_goaway(h2gw, cert):
    _, port, _, admin = h2gw()
    c = H2Client(port, cert)
    sid = c.request("/sink", method="POST", end=False)
    out = bytearray()
    for _ in range(500):
        out += hyperframe.frame.DataFrame(sid).serialize()  # no payload, no END_STREAM
    flood_expect_calm(c, out, admin, "empty_frames")


def test_continuation_flood_closes(h2gw, cert):
    p, port, _, _ = h2gw()
    rss0 = p.rss_kb()
    c = H2Client(port, cert)
    block = hpack.Encoder().encode([(":method", "GET"), (":scheme", "https"),
                                    (":authority", "h2.test"), (":path", "/cont")] +
                                   [("x-h%d" % i, "v" * 50) for i in range(40)])
    hf = hyperframe.frame.HeadersFrame(1)
    hf.data = block[:10]
    out = bytearray(hf.serialize())
    rest = block[10:]
    for i in range(0, len(rest), 5):  # never END_HEADERS
        cf = hyperframe.frame.ContinuationFrame(1)
        cf.data = rest[i:i + 5]
        out += cf.serialize()
    for _ in range(2000):  # then endless empty-ish ones
        cf = hyperframe.frame.ContinuationFrame(1)
        cf.data = b"\x00"
        out += cf.serialize()
    try:
        c.send_raw(bytes(out))
    except OSError:
        pass
    ga = read_until_goaway(c.sock)
    assert ga is not None and ga.error_code != 0
    c.close()
    assert p.rss_kb() - rss0 < 10000
    assert curl(port, cert, "/after")[:2] == ("2", 200)


def test_garbage_after_preface_closes_cleanly(h2gw, cert):
    _, port, _, _ = h2gw()
    c = H2Client(port, cert)
    try:
        c.send_raw(b"\x00\x00\x04\x99\x00\x00\x00\x00\x01abcd" + os.urandom(2000))
    except OSError:
        pass
    read_until_goaway(c.sock, timeout=5)
    c.close()
    assert curl(port, cert, "/after")[:2] == ("2", 200)


# ---- configuration -------------------------------------------------------------


def test_alpn_http11_only_listener_speaks_http11(h2gw, cert):
    _, port, _, _ = h2gw(tls={"alpn": ["http/1.1"]})
    v, code, _ = curl(port, cert, "/x")
    assert (v, code) == ("1.1", 200)


@pytest.mark.parametrize("bad,msg", [
    ({"http2": {"max_concurrent_streams": 0}}, "http2.max_concurrent_streams"),
    ({"http2": {"initial_window_size": 2147483648}}, "http2.initial_window_size"),
    ({"http2": {"nope": 1}}, "http2.nope"),
    ({"http2": []}, "http2"),
])
def test_http2_config_errors(portico_bin, tmp_path, bad, msg):
    cfg = make_config(routes=[{"path": "/", "respond": {"status": 200}}], **bad)
    f = tmp_path / "c.json"
    f.write_text(json.dumps(cfg))
    r = subprocess.run([portico_bin, "-t", "-c", str(f)], capture_output=True, text=True)
    assert r.returncode == 1 and msg in r.stderr, r.stderr


@pytest.mark.parametrize("alpn,msg", [
    (["h3"], "alpn[0]"), ([], "alpn"), (["h2", "h2"], "alpn[1]"), ("h2", "alpn"),
])
def test_alpn_config_errors(portico_bin, tmp_path, cert, alpn, msg):
    cfg = make_config(routes=[{"path": "/", "respond": {"status": 200}}])
    cfg["listeners"][0]["tls"] = {"certificates": [{"cert": cert[0], "key": cert[1]}],
                                  "alpn": alpn}
    f = tmp_path / "c.json"
    f.write_text(json.dumps(cfg))
    r = subprocess.run([portico_bin, "-t", "-c", str(f)], capture_output=True, text=True)
    assert r.returncode == 1 and msg in r.stderr, r.stderr


# ---- gRPC: errors from Portico itself ------------------------------------------------

GRPC_HEADERS = [("content-type", "application/grpc"), ("te", "trailers")]


def grpc_frame(msg):
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def test_grpc_errors_from_portico_are_grpc_statuses(h2gw, cert, portico_bin):
    v = subprocess.run([portico_bin, "-V"], capture_output=True, text=True).stdout
    routes = [{"path": "/svc.Up/", "upstream": "echo"},
              {"path": "/svc.Down/", "upstream": "down"}]
    top = {}
    if "ip_access" in v:
        routes.append({"path": "/svc.Denied/", "upstream": "echo",
                       "filters": [{"ip_access": {"deny": ["127.0.0.0/8"]}}]})
    if "jwt_auth" in v:
        top["jwt_providers"] = {"hs": {"issuer": "t", "algorithms": ["HS256"],
                                       "secret": "0123456789abcdef0123456789abcdef"}}
        routes.append({"path": "/svc.Auth/", "upstream": "echo",
                       "filters": [{"jwt_auth": {"provider": "hs"}}]})
    if "rate_limit" in v:
        routes.append({"path": "/svc.Limited/", "upstream": "echo",
                       "filters": [{"rate_limit": {"key": "ip", "rate": "1/m", "burst": 1}}]})
    _, port, _, _ = h2gw(routes=routes,
                         upstreams={"down": {"endpoints": ["127.0.0.1:%d" % free_port()]}}, **top)
    c = H2Client(port, cert)
    body = grpc_frame(b"\x0a\x03abc")
    want = {"/svc.Nope/Call": "12", "/svc.Down/Call": "14"}
    if "ip_access" in v:
        want["/svc.Denied/Call"] = "7"
    if "jwt_auth" in v:
        want["/svc.Auth/Call"] = "16"  # no token: 401 UNAUTHENTICATED
    if "rate_limit" in v:
        first = c.request("/svc.Limited/Call", method="POST", headers=GRPC_HEADERS, body=body)
        (f,) = c.wait([first])
        assert f["status"] == 200 and "grpc-status" not in dict(f["headers"])  # the echo's
        want["/svc.Limited/Call"] = "8"  # the second: 429 RESOURCE_EXHAUSTED
    sids = {path: c.request(path, method="POST", headers=GRPC_HEADERS, body=body)
            for path in want}
    plain = c.request("/svc.Nope/Call")  # not gRPC: a plain 404
    for path, sid in sids.items():
        (s,) = c.wait([sid])
        h = dict(s["headers"])
        assert s["status"] == 200 and s["ended"] and s["data"] == b"", (path, s)
        assert h["content-type"] == "application/grpc"
        assert h["grpc-status"] == want[path], (path, h)
        assert h["grpc-message"]
    (p,) = c.wait([plain])
    assert p["status"] == 404 and "grpc-status" not in dict(p["headers"])
    c.close()


# ---- gRPC: HTTP/2 upstreams ("protocol": "h2c" / "h2") ------------------------------


def grpc_messages(data):
    out = []
    while len(data) >= 5:
        n = int.from_bytes(data[1:5], "big")
        out.append(data[5:5 + n])
        data = data[5 + n:]
    return out


@pytest.fixture
def grpc_gw(h2gw, upstream, cert):
    def start(tls=False):
        args = ("--tls-cert", cert[0], "--tls-key", cert[1]) if tls else ()
        g = upstream("grpc_h2.py", *args)
        up = {"endpoints": [g.addr], "protocol": "h2" if tls else "h2c"}
        if tls:
            up["tls"] = {"ca": cert[0], "sni": "h2.test"}
        p, port, _, admin = h2gw(routes=[{"path": "/test.Echo/", "upstream": "grpc"},
                                         {"path": "/", "upstream": "echo"}],
                                 upstreams={"grpc": up})
        return p, port, g

    return start


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "h2"])
def test_grpc_unary_and_streaming_through_portico(grpc_gw, cert, tls):
    _, port, _ = grpc_gw(tls=tls)
    c = H2Client(port, cert)
    unary = c.request("/test.Echo/Unary", method="POST", headers=GRPC_HEADERS,
                      body=grpc_frame(b"hello grpc"))
    server = c.request("/test.Echo/ServerStream", method="POST", headers=GRPC_HEADERS,
                       body=grpc_frame(b"5"))
    client = c.request("/test.Echo/ClientStream", method="POST", headers=GRPC_HEADERS,
                       body=b"".join(grpc_frame(b"x" * i) for i in range(1, 11)))
    fail = c.request("/test.Echo/Fail", method="POST", headers=GRPC_HEADERS,
                     body=grpc_frame(b""))
    ru, rs, rc, rf = c.wait([unary, server, client, fail])
    for r in (ru, rs, rc):
        assert r["status"] == 200 and r["ended"], r
        h = dict(r["headers"])
        assert h["content-type"] == "application/grpc"
        assert h["x-seen-te"] == "trailers"  # gRPC servers require it
        assert dict(r["trailers"])["grpc-status"] == "0", r
    assert grpc_messages(ru["data"]) == [b"hello grpc"]
    assert grpc_messages(rs["data"]) == [b"0", b"1", b"2", b"3", b"4"]
    assert grpc_messages(rc["data"]) == [b"10:55"]
    # Trailers-Only from the upstream stays one HEADERS frame with the status
    hf = dict(rf["headers"])
    assert rf["status"] == 200 and hf["grpc-status"] == "5" and hf["grpc-message"] == "no such thing"
    assert rf["data"] == b"" and rf["trailers"] is None
    c.close()


def test_grpc_timeout_is_deadline_exceeded_and_ejects_nothing(h2gw, upstream, cert):
    """grpc-timeout bounds the wait for the answer: DEADLINE_EXCEEDED (4)
    as Trailers-Only, no retry, and no verdict on the endpoint, so short
    client deadlines cannot open its breaker."""
    g = upstream("grpc_h2.py")
    _, port, _, admin = h2gw(
        routes=[{"path": "/test.Echo/", "upstream": "grpc"}, {"path": "/", "upstream": "echo"}],
        upstreams={"grpc": {"endpoints": [g.addr], "protocol": "h2c",
                            "retry": {"attempts": 3, "on": ["timeout", "reset"]},
                            "circuit_breaker": {"consecutive_failures": 2, "open_ms": 10000}}})
    c = H2Client(port, cert)
    for timeout, lo, hi in (("300m", 0.25, 2.0), ("200000u", 0.15, 2.0), ("0S", 0.0, 1.0)):
        t0 = time.monotonic()
        sid = c.request("/test.Echo/Slow", method="POST",
                        headers=GRPC_HEADERS + [("grpc-timeout", timeout)], body=grpc_frame(b"x"))
        r, = c.wait([sid])
        took = time.monotonic() - t0
        h = dict(r["headers"])
        assert r["status"] == 200 and h["grpc-status"] == "4", (timeout, r)
        assert lo <= took < hi, (timeout, took)
    # malformed: no deadline; the call is still served normally elsewhere
    sid = c.request("/test.Echo/Unary", method="POST",
                    headers=GRPC_HEADERS + [("grpc-timeout", "5x")], body=grpc_frame(b"ok"))
    r, = c.wait([sid])
    assert dict(r["trailers"])["grpc-status"] == "0", r
    assert metric(admin, "portico_upstream_ejections_total") == 0
    assert metric(admin, "portico_upstream_retries_total") == 0
    c.close()


def test_grpc_bidi_messages_flow_both_ways_before_the_end(grpc_gw, cert):
    _, port, _ = grpc_gw()
    c = H2Client(port, cert)
    sid = c.request("/test.Echo/Bidi", method="POST", headers=GRPC_HEADERS, end=False)
    for i in range(3):
        c.send_body(sid, grpc_frame(b"ping %d" % i), end=False)
        deadline = time.time() + 5
        while len(grpc_messages(c.stream(sid)["data"])) < i + 1 and time.time() < deadline:
            c.pump(0.2)
        # each answer arrives while the request is still open
        assert grpc_messages(c.stream(sid)["data"])[i] == b"ping %d" % i
    c.conn.end_stream(sid)
    c.flush()
    (s,) = c.wait([sid])
    assert s["ended"] and dict(s["trailers"])["grpc-status"] == "0"
    c.close()


def test_grpc_many_calls_reuse_upstream_connections(grpc_gw, cert):
    _, port, g = grpc_gw()
    c = H2Client(port, cert)
    for _round in range(3):
        sids = [c.request("/test.Echo/Unary", method="POST", headers=GRPC_HEADERS,
                          body=grpc_frame(b"m%d" % i)) for i in range(20)]
        for i, s in enumerate(c.wait(sids)):
            assert grpc_messages(s["data"]) == [b"m%d" % i], s
            assert dict(s["trailers"])["grpc-status"] == "0"
    c.close()
    r = subprocess.run([CURL, "-s", "--http2-prior-knowledge", "http://%s/__stats" % g.addr],
                       capture_output=True, text=True, timeout=10)
    stats = json.loads(r.stdout)
    assert stats["streams"] >= 60
    assert stats["connections"] <= 25  # pooled, not one per call


def test_grpc_upstream_down_is_unavailable(h2gw, cert):
    _, port, _, _ = h2gw(routes=[{"path": "/test.Echo/", "upstream": "grpc"}],
                         upstreams={"grpc": {"endpoints": ["127.0.0.1:%d" % free_port()],
                                             "protocol": "h2c"}})
    c = H2Client(port, cert)
    (s,) = c.wait([c.request("/test.Echo/Unary", method="POST", headers=GRPC_HEADERS,
                             body=grpc_frame(b"x"))])
    assert s["status"] == 200 and dict(s["headers"])["grpc-status"] == "14"
    c.close()


@pytest.mark.parametrize("up,msg", [
    ({"protocol": "h3"}, "upstreams.u.protocol"),
    ({"protocol": "h2"}, "needs \"tls\""),
    ({"protocol": "h2c", "tls": True}, "use \"h2\""),
])
def test_upstream_protocol_config_errors(portico_bin, tmp_path, up, msg):
    cfg = make_config(routes=[{"path": "/", "upstream": "u"}],
                      upstreams={"u": dict({"endpoints": ["127.0.0.1:9"]}, **up)})
    f = tmp_path / "c.json"
    f.write_text(json.dumps(cfg))
    r = subprocess.run([portico_bin, "-t", "-c", str(f)], capture_output=True, text=True)
    assert r.returncode == 1 and msg in r.stderr, r.stderr
