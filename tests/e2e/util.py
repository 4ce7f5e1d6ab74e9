"""Raw-socket HTTP/1.1 client helpers for the end-to-end tests.

Everything about framing is checked on the bytes, so this is deliberately
not http.client: it sends exactly what a test writes and parses responses
strictly enough to notice a proxy's mistakes (a body after a HEAD answer,
a missing chunk terminator, a connection left open after an error).
"""
import json
import os
import socket
import time

PATTERN = bytes(range(256)) * 256          # the echo server's /big pattern: byte k is k % 256
PATTERN_MIB = PATTERN * 16                 # 1 MiB of it, starting at offset 0


class ProtocolError(AssertionError):
    pass


class Response:
    def __init__(self, version, status, reason, headers, raw_head):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers   # list of (name, value) as received
        self.raw_head = raw_head
        self.body = b""
        self.body_len = 0        # counted even when the body went to a sink
        self.trailers = []
        self.framing = None      # "length", "chunked", "close" or "none"
        self.complete = False    # the body ended as its framing said (not cut short)

    def header(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def has_token(self, name, token):
        vals = ",".join(self.header_all(name)).lower()
        return token.lower() in [t.strip() for t in vals.split(",")]

    def json(self):
        try:
            return json.loads(self.body.decode("latin-1"))
        except ValueError as e:
            raise AssertionError("body is not JSON (%s): %r" % (e, self.body[:300]))

    def echoed_headers(self):
        """For an echo-server answer: {lowercased name: [values]}."""
        out = {}
        for k, v in self.json()["headers"]:
            out.setdefault(k.lower(), []).append(v)
        return out

    def __repr__(self):
        return "<Response %s %d %r headers=%r body=%r>" % (
            self.version, self.status, self.reason, self.headers, self.body[:200])


class Conn:
    """One client connection with a read buffer kept across responses."""

    def __init__(self, port, timeout=3.0, host="127.0.0.1", rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False

    def settimeout(self, t):
        self.sock.settimeout(t)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    def request(self, method, target, headers=None, body=None, host="test.local",
                version="HTTP/1.1"):
        self.send(build_request(method, target, headers, body, host, version))

    # -- reading ---------------------------------------------------------
    def _fill(self, n=262144):
        if self.eof:
            raise ProtocolError("connection closed by peer; buffered: %r" % bytes(self.buf[:300]))
        try:
            data = self.sock.recv(n)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            raise ProtocolError("connection closed by peer; buffered: %r" % bytes(self.buf[:300]))
        self.buf += data

    def _readline(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            self._fill()

    def _read_exact(self, n, sink):
        while n:
            if not self.buf:
                self._fill(min(max(n, 65536), 1 << 20))
            k = min(n, len(self.buf))
            sink(bytes(self.buf[:k]))
            del self.buf[:k]
            n -= k

    def read_head(self):
        """Read one response head (any status, 1xx included)."""
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                break
            if len(self.buf) > 1 << 20:
                raise ProtocolError("response head too long")
            self._fill()
        raw = bytes(self.buf[: i + 4])
        del self.buf[: i + 4]
        lines = raw[:-4].split(b"\r\n")
        parts = lines[0].decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ProtocolError("bad status line %r" % lines[0])
        headers = []
        for ln in lines[1:]:
            name, sep, value = ln.decode("latin-1").partition(":")
            if not sep or name != name.strip() or not name:
                raise ProtocolError("bad header line %r" % ln)
            headers.append((name, value.strip(" \t")))
        return Response(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "", headers, raw)

    def read_response(self, method="GET", skip_interim=True, sink=None):
        """Read one response and its body. 1xx heads are skipped unless
        skip_interim is False (then a 1xx is returned alone). With a sink,
        body bytes go to sink(bytes) instead of resp.body."""
        while True:
            resp = self.read_head()
            if 100 <= resp.status < 200 and skip_interim:
                continue
            break
        self.read_body(resp, method, sink)
        return resp

    def read_body(self, resp, method="GET", sink=None):
        pieces = []

        def collect(b):
            resp.body_len += len(b)
            if sink:
                sink(b)
            else:
                pieces.append(b)

        te = ",".join(resp.header_all("transfer-encoding")).lower()
        cls = resp.header_all("content-length")
        if method == "HEAD" or 100 <= resp.status < 200 or resp.status in (204, 304):
            resp.framing = "none"
            resp.complete = True
        elif te:
            if cls:
                raise ProtocolError("response has both Transfer-Encoding and Content-Length")
            if te.split(",")[-1].strip() != "chunked":
                raise ProtocolError("unexpected transfer-encoding %r" % te)
            resp.framing = "chunked"
            self._read_chunked(resp, collect)
        elif cls:
            if len(set(cls)) != 1:
                raise ProtocolError("differing Content-Length %r" % cls)
            resp.framing = "length"
            n = int(cls[0])
            try:
                self._read_exact(n, collect)
                resp.complete = True
            except (ProtocolError, socket.timeout):
                resp.body = b"".join(pieces)
                raise
        else:
            resp.framing = "close"
            try:
                while True:
                    self._fill()
                    collect(bytes(self.buf))
                    self.buf.clear()
            except ProtocolError:
                collect(bytes(self.buf))
                self.buf.clear()
                resp.complete = True
        resp.body = b"".join(pieces)

    def _read_chunked(self, resp, collect):
        while True:
            line = self._readline()
            if not line.endswith(b"\r\n"):
                raise ProtocolError("chunk size line without CRLF: %r" % line)
            size_txt = line[:-2].split(b";", 1)[0].strip()
            try:
                size = int(size_txt, 16)
            except ValueError:
                raise ProtocolError("bad chunk size line %r" % line)
            if size == 0:
                while True:
                    t = self._readline()
                    if t == b"\r\n":
                        resp.complete = True
                        return
                    resp.trailers.append(t[:-2].decode("latin-1"))
            self._read_exact(size, collect)
            while len(self.buf) < 2:
                self._fill()
            if bytes(self.buf[:2]) != b"\r\n":
                raise ProtocolError("chunk data not followed by CRLF: %r" % bytes(self.buf[:20]))
            del self.buf[:2]

    def wait_closed(self, timeout=2.0):
        """True if the peer closes (EOF or reset) within timeout; any data
        arriving meanwhile is kept in self.extra."""
        self.extra = bytes(self.buf)
        self.buf.clear()
        if self.eof:
            return True
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.sock.settimeout(left)
                data = self.sock.recv(65536)
                if not data:
                    self.eof = True
                    return True
                self.extra += data
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError):
            self.eof = True
            return True

    def is_open(self, wait=0.1):
        """True if nothing closed the connection (no EOF, no data) within wait."""
        closed = self.wait_closed(wait)
        return not closed and not self.extra


def build_request(method, target, headers=None, body=None, host="test.local",
                  version="HTTP/1.1"):
    lines = ["%s %s %s" % (method, target, version)]
    hdrs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {k.lower() for k, _ in hdrs}
    if host is not None and "host" not in names:
        lines.append("Host: %s" % host)
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        hdrs.append(("Content-Length", str(len(body))))
    for k, v in hdrs:
        lines.append("%s: %s" % (k, v))
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if body is not None:
        data += body if isinstance(body, bytes) else body.encode("latin-1")
    return data


def request(port, method, target, headers=None, body=None, host="test.local",
            version="HTTP/1.1", timeout=3.0):
    """One request on a fresh connection; returns the Response."""
    with Conn(port, timeout=timeout) as c:
        c.request(method, target, headers, body, host, version)
        return c.read_response(method)


def get(port, target, **kw):
    return request(port, "GET", target, **kw)


def raw_exchange(port, data, timeout=3.0):
    """Send raw bytes; read one response (Conn.read_response); then report
    whether the server closed the connection within timeout.
    Returns (Response, closed, conn) -- conn is already closed."""
    with Conn(port, timeout=timeout) as c:
        c.send(data)
        resp = c.read_response()
        closed = c.wait_closed(timeout)
        return resp, closed, c


def recv_all(port, data, timeout=2.0):
    """Send raw bytes, return everything received until close or timeout."""
    with Conn(port, timeout=timeout) as c:
        c.send(data)
        out = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                c.sock.settimeout(max(0.01, deadline - time.monotonic()))
                d = c.sock.recv(65536)
                if not d:
                    break
                out += d
        except (socket.timeout, ConnectionResetError):
            pass
        return bytes(out)


def parse_responses(data, methods=None):
    """Split bytes holding several pipelined responses into Responses."""
    class _Fake(Conn):
        def __init__(self, data):
            self.buf = bytearray(data)
            self.eof = False
            self.sock = None

        def _fill(self, n=0):
            self.eof = True
            raise ProtocolError("incomplete response data: %r" % bytes(self.buf[:300]))

    c = _Fake(data)
    out = []
    i = 0
    while c.buf:
        m = (methods[i] if methods and i < len(methods) else "GET")
        out.append(c.read_response(m))
        i += 1
    return out


def status_of(data):
    """Status code of the first status line in raw bytes, or None."""
    if not data.startswith(b"HTTP/1."):
        return None
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def wait_until(fn, timeout, interval=0.02):
    """Poll fn() until truthy or timeout; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def cpu_seconds(pid):
    """User plus system CPU seconds a process has used, from /proc/<pid>/stat."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kb(pid, key):
    """VmRSS / VmHWM etc. of a process in kB from /proc/<pid>/status."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)
